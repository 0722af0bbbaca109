"""The one place that decides which backend runs a fused op.

FASTCBD_BACKEND=auto|triton|cuda|cpu|torch (read at call time, so tests can switch it).
`auto` falls back quietly to the best backend that can run on the tensors' device; an explicit choice
that cannot run raises with the reason (the saved import error, or the device mismatch).
"""
from __future__ import annotations

import functools
import os

import torch

from fastcbd import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


def requested() -> str:
    name = os.environ.get("FASTCBD_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTCBD_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device}"
        if not _ext.available():
            return f"fastcbd._C failed to import: {_ext.IMPORT_ERROR!r}"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
        if not _ext.available():
            return f"fastcbd._C failed to import: {_ext.IMPORT_ERROR!r}"
        if not _ext.with_cuda():
            return "fastcbd._C was built without CUDA (no nvcc, a CPU torch, or FASTCBD_NO_CUDA=1)"
        return None
    if name == "triton":
        try:
            import triton
            import triton.language  # noqa: F401
        except BaseException as exc:
            return f"triton failed to import: {exc!r}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpret():
            from triton.runtime.interpreter import InterpretedFunction

            # triton.language is built of @triton.jit functions, so the interpreter is chosen at import
            if not isinstance(triton.language.zeros, InterpretedFunction):
                return "triton was imported before TRITON_INTERPRET=1 was set (set it before starting Python)"
            return None
        return f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
    raise ValueError(f"unknown backend {name!r}")


def select(device: torch.device) -> str:
    """The backend to use for tensors on `device` (FASTCBD_BACKEND read now; the answer cached per value)."""
    return _select(requested(), device.type, _triton_interpret())


@functools.lru_cache(maxsize=64)
def _select(name: str, device_type: str, _interpret: bool) -> str:
    # everything why_unavailable reads is fixed for the process once imported, except the two variables
    # in the key: FASTCBD_BACKEND and TRITON_INTERPRET (which only matters before triton's import)
    device = torch.device(device_type)
    if name == "auto":
        # CUDA before Triton: faster in 9 of 10 H200 rows of bench_loss (docs/ops.md, "Backend auto")
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for candidate in order:
            if why_unavailable(candidate, device) is None:
                return candidate
        return "torch"
    reason = why_unavailable(name, device)
    if reason is not None:
        raise RuntimeError(f"FASTCBD_BACKEND={name} cannot run: {reason}")
    return name


def report(device: torch.device | None = None) -> dict[str, str]:
    """Backend -> 'available' or the reason it is not (for `fastcbd doctor`)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if device is not None:
        devices = [device]
    out = {}
    for name in ("triton", "cuda", "cpu", "torch"):
        reasons = [why_unavailable(name, d) for d in devices]
        ok = [str(d) for d, r in zip(devices, reasons) if r is None]
        out[name] = f"available on {', '.join(ok)}" if ok else "; ".join(r for r in reasons if r)
    return out
