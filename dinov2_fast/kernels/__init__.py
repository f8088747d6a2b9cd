"""Triton kernels, one op per file (kernel + launcher). Import triton lazily through these."""
