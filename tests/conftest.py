"""Suite-wide options.

Under CI=true (or FASTCBD_REQUIRE_EXT=1) the run stops at once, with the import error, when fastcbd._C is
missing or does not import, or was built without its CUDA kernels although nvcc and a CUDA torch are
here: otherwise the compiled-backend tests would skip and a broken build would pass.

FASTCBD_GPU_ONLY=1 keeps only the tests that need a CUDA GPU: those marked `gpu` and those whose id names
`cuda` (the parametrised backend cases and the tests/csrc/*_cuda.py files). `make gpu-check` runs the suite
that way on the GPU machine, so the CPU cases (which CI runs anyway) do not spend its minutes.
"""
from __future__ import annotations

import os

import pytest


def pytest_sessionstart(session):
    if os.environ.get("CI", "").lower() not in ("true", "1") and os.environ.get("FASTCBD_REQUIRE_EXT") != "1":
        return
    import torch

    from fastcbd import _ext

    if not _ext.available():
        pytest.exit(f"CI: fastcbd._C is missing or does not import: {_ext.IMPORT_ERROR!r}", returncode=1)
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    can_cuda = (os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) and torch.version.cuda is not None
                and os.environ.get("FASTCBD_NO_CUDA", "0") != "1")
    if can_cuda and not _ext.with_cuda():
        pytest.exit(f"CI: nvcc ({cuda_home}) and a CUDA torch are here but fastcbd._C has no CUDA kernels", returncode=1)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FASTCBD_GPU_ONLY", "0") != "1":
        return
    keep, drop = [], []
    for item in items:
        (keep if item.get_closest_marker("gpu") or "cuda" in item.nodeid.lower() else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
