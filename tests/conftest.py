import os

import pytest
import torch

# Without a GPU the kernels run on the CPU through Triton's interpreter, which must be chosen
# before any @triton.jit kernel is defined (DESIGN.md §5). With a GPU they run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Without the interpreter (a CUDA machine) kernels cannot take CPU tensors: skip the
    interpreter tier there; its gpu-marked twins run natively instead."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="launches kernels on CPU tensors: needs TRITON_INTERPRET=1")
    for item in items:
        if "interpreter" in item.keywords and "gpu" not in item.keywords:
            item.add_marker(skip)
