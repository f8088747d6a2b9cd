"""Benchmarks of dinov2_fast against transformers, torch.compile, SDPA and xformers.

See bench/README.md: the pytest-benchmark suites, the results files and the GPU check.
"""
