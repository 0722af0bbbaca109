"""Shared helpers of the fused-op tests (imported as `ops_testing`): backend selection, comparisons.

Backends: `torch` always runs; `cpu` when fastcbd._C has the op (else skipped with the reason); `triton`
on CPU tensors only when this process imported triton under TRITON_INTERPRET=1 (triton picks the
interpreter at import time) -- otherwise test_backends.py::test_interpreter_suite runs those cases in a
subprocess that sets it. CUDA cases skip without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastcbd.ops import _common, backend

CPU_BACKENDS = ("torch", "cpu", "triton")


def use_backend(monkeypatch, name: str, op: str, device: str = "cpu") -> None:
    """Make FASTCBD_BACKEND=name for this test, or skip with the reason it cannot run here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "triton" and device == "cpu":
        if _common.triton is None:
            pytest.skip("triton is not installed")
        if not _common.triton_interpreting():
            pytest.skip(
                "triton on CPU needs TRITON_INTERPRET=1 before triton is imported; "
                "test_backends.py::test_interpreter_suite runs these cases in such a subprocess"
            )
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if name in ("cpu", "cuda") and not _common.has_compiled(op):
        import fastcbd._ext as ext

        pytest.skip(f"fastcbd._C has no {op}_fwd (import error: {ext.IMPORT_ERROR!r})")
    monkeypatch.setenv("FASTCBD_BACKEND", name)
    reason = backend.why_unavailable(name, torch.device(device))
    if reason is not None:
        pytest.skip(reason)


def assert_close(actual, expected, *, what: str, rtol: float = 1e-4, atol: float | None = None,
                 atol_frac: float = 1e-5) -> None:
    """|actual - expected| <= atol + rtol |expected| elementwise; atol defaults to atol_frac * max|expected|.

    On failure says how many elements are off, the worst one (index, values, error, tolerance) and how
    many NaN/inf the result holds.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    if atol is None:
        atol = atol_frac * (e.abs().max().item() if e.numel() else 0.0) + 1e-12
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~(err <= tol)  # NaN compares False, so NaN counts as bad
    if bad.any():
        excess = torch.where(bad, (err - tol).nan_to_num(float("inf")), torch.zeros_like(err))
        flat = int(excess.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements off; worst at {idx}: got {a[idx].item():.8g}, "
            f"expected {e[idx].item():.8g} (|err| {err[idx].item():.3g} > tol {tol[idx].item():.3g}); "
            f"max |err| {err.nan_to_num(float('inf')).max().item():.3g}; result has "
            f"{int(a.isnan().sum())} NaN, {int(a.isinf().sum())} inf"
        )


def max_err(actual, expected) -> float:
    """max |actual - expected| in float64 (inf when either holds NaN/inf where the other does not)."""
    d = (actual.detach().double() - expected.detach().double()).abs()
    return float(d.nan_to_num(float("inf")).max()) if d.numel() else 0.0


def assert_low_precision(op_value, ref_lp_value, truth, *, what: str, factor: float = 2.0,
                         floor: float = 0.0) -> None:
    """The op's error on low-precision inputs is at most `factor` x the reference's own error.

    op_value: the op on the bf16/fp16 inputs; ref_lp_value: the reference computed natively in that dtype;
    truth: the reference in float64 on the same (rounded) inputs.
    """
    op_err = max_err(op_value, truth)
    ref_err = max_err(ref_lp_value, truth)
    limit = factor * ref_err + floor
    assert op_err <= limit, (
        f"{what}: max |err| {op_err:.3g} vs the float64 reference, above {factor} x the low-precision "
        f"reference's own error {ref_err:.3g} (+{floor:.2g}); NaN in result: {int(op_value.isnan().sum())}"
    )


def check_compiled(f, leaves, *rest, backend: str = "aot_eager", what: str = "compiled") -> None:
    """torch.compile(f, fullgraph=True) against f itself: the value and the gradient of every leaf
    (tensors given fresh clones that require grad; `rest` passed as they are)."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    eager, comp = ([x.clone().requires_grad_() for x in leaves] for _ in range(2))
    want = f(*eager, *rest)
    want.backward()
    got = compiled(*comp, *rest)
    got.backward()
    assert_close(got, want, what=f"{what} loss", rtol=1e-6, atol=1e-7)
    for i, (c, e) in enumerate(zip(comp, eager)):
        assert_close(c.grad, e.grad, what=f"{what} grad of argument {i}", rtol=1e-6)


def interpreter_env() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FASTCBD_BACKEND", None)
    return env
