"""Suite-wide options.

FASTCBD_GPU_ONLY=1 keeps only the tests that need a CUDA GPU: those marked `gpu` and those whose id names
`cuda` (the parametrised backend cases and the tests/csrc/*_cuda.py files). `make gpu-check` runs the suite
that way on the GPU machine, so the CPU cases (which CI runs anyway) do not spend its minutes.
"""
from __future__ import annotations

import os


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FASTCBD_GPU_ONLY", "0") != "1":
        return
    keep, drop = [], []
    for item in items:
        (keep if item.get_closest_marker("gpu") or "cuda" in item.nodeid.lower() else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
