import os

import torch

# Without a GPU the kernels run on the CPU through Triton's interpreter, which must be chosen
# before any @triton.jit kernel is defined (DESIGN.md §5). With a GPU they run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
