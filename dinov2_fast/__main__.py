"""``python -m dinov2_fast`` (also under ``torchrun -m dinov2_fast``): the dinov2-fast CLI."""

from .cli import main

raise SystemExit(main())
