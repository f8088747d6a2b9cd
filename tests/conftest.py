import os

# The interpreter must be chosen before any @triton.jit kernel is defined (DESIGN.md §5).
# On a CUDA machine the GPU tests run natively instead.
if os.environ.get("DINOV2_FAST_NATIVE_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
