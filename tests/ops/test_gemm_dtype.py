"""The GEMM dtype of the fused cosine classifier (cosine_ce, cbd_loss): bf16 tensor-core GEMMs with fp32
accumulation on CUDA, fp32 elsewhere. The bf16 path runs here on CPU by adding "cpu" to
LOW_PRECISION_GEMM_DEVICES, so it is tested without a GPU (with fp32 GEMMs of upcast copies standing in
for cuBLAS's out_dtype GEMMs: the same numbers)."""
from __future__ import annotations

import pytest
import torch
from ops_testing import assert_close, assert_low_precision, use_backend

from fastcbd.ops import cosine_ce as ce_mod
from fastcbd.ops.cbd_loss import cbd_loss, cbd_loss_ref
from fastcbd.ops.cosine_ce import cosine_ce, cosine_ce_ref, gemm_dtype

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _t(*shape, dtype=F32, device="cpu"):
    return torch.empty(*shape, dtype=dtype, device=device)


def test_gemm_dtype_choice(monkeypatch):
    cpu_bf16 = _t(2, 3, dtype=BF16)
    assert gemm_dtype(cpu_bf16, cpu_bf16) == F32, "CPU bf16 must keep fp32 GEMMs by default"
    monkeypatch.setattr(ce_mod, "LOW_PRECISION_GEMM_DEVICES", {"cuda", "cpu"})
    assert gemm_dtype(cpu_bf16, cpu_bf16) == BF16
    for p_dt, w_dt in [(F32, F32), (BF16, F32), (F32, BF16), (F16, F16), (BF16, F16)]:
        got = gemm_dtype(_t(2, 3, dtype=p_dt), _t(4, 3, dtype=w_dt))
        assert got == F32, f"p {p_dt}, w {w_dt}: GEMM dtype {got}, expected float32"
    meta_bf16 = _t(2, 3, dtype=BF16, device="meta")  # a device type outside the set
    assert gemm_dtype(meta_bf16, meta_bf16) == F32


def test_out_dtype_gemms_probe_on_cpu():
    # No bf16 -> fp32 out_dtype GEMMs on CPU (CUDA only): the CPU path must use the upcast stand-in.
    assert ce_mod._out_dtype_gemms("cpu") == (False, False)


@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_f32_bf16_equals_fp32_gemm_of_upcast_inputs(accumulate):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 33, generator=g).bfloat16()
    b = torch.randn(33, 5, generator=g).bfloat16()
    base = torch.randn(7, 5, generator=g)
    out = base.clone()
    ce_mod._mm_f32(a, b, out, accumulate=accumulate)
    want = (base if accumulate else 0) + a.double() @ b.double()
    assert out.dtype == F32
    assert_close(out, want, what=f"_mm_f32 bf16 (accumulate={accumulate})", rtol=1e-6, atol=1e-5)
    out_t = torch.zeros(5, 7)
    ce_mod._mm_f32(b.t(), a.t(), out_t)  # transposed (non-contiguous) operands, as grad_w's GEMM has
    assert_close(out_t, (a.double() @ b.double()).t(), what="_mm_f32 bf16 transposed", rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("support", [(True, True), (True, False)], ids=["addmm", "mm-plus-add"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_f32_out_dtype_calls_accepted(monkeypatch, support, accumulate):
    """The cuBLAS branches' calls (out_dtype= with out=) as this torch's binding and meta kernels take them."""
    monkeypatch.setattr(ce_mod, "_out_dtype_gemms", lambda device_type: support)
    a, b = _t(7, 33, dtype=BF16, device="meta"), _t(33, 5, dtype=BF16, device="meta")
    out = _t(7, 5, device="meta")
    ce_mod._mm_f32(a, b, out, accumulate=accumulate)
    assert out.dtype == F32 and out.shape == (7, 5)


def _spy_gemm_dtypes(monkeypatch) -> list:
    seen = []
    real = ce_mod._mm_f32

    def spy(a, b, out, **kw):
        seen.append((a.dtype, b.dtype))
        return real(a, b, out, **kw)

    monkeypatch.setattr(ce_mod, "_mm_f32", spy)
    return seen


def _lp_inputs(B, C, D, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.relu(torch.randn(B, D, generator=g)).bfloat16()
    w = (torch.randn(C, D, generator=g) * torch.rand(C, 1, generator=g) * 3).bfloat16()
    return p, w, torch.randint(0, C, (B,), generator=g)


def _grads(fn, p, w, *args):
    pt, wt = p.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(pt, wt, *args)
    loss.backward()
    return loss, pt.grad, wt.grad


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("chunk", [0, 8], ids=["one-chunk", "chunks-of-8"])
def test_bf16_gemm_path_cosine_ce(monkeypatch, name, chunk):
    """bf16 GEMMs (dL/dS rounded to bf16) stay within 2x the bf16 reference's own error. (The `cpu` and
    `cuda` backends are compiled ops with their own GEMMs: not this path.)"""
    use_backend(monkeypatch, name, "cosine_ce")
    monkeypatch.setattr(ce_mod, "LOW_PRECISION_GEMM_DEVICES", {"cuda", "cpu"})
    seen = _spy_gemm_dtypes(monkeypatch)
    p, w, target = _lp_inputs(33, 500, 70, seed=3)
    truth = _grads(lambda a, b, y: cosine_ce_ref(a, b, y), p.double(), w.double(), target)
    ref = _grads(lambda a, b, y: cosine_ce_ref(a, b, y), p, w, target)
    got = _grads(lambda a, b, y: cosine_ce(a, b, y, chunk_size=chunk), p, w, target)
    assert seen and all(d == (BF16, BF16) for d in seen), f"GEMM input dtypes {seen}, expected bf16 only"
    rows = chunk or ce_mod.auto_chunk(33, 500, 70)
    assert len(seen) == 3 * -(-33 // rows), f"{len(seen)} GEMMs for {-(-33 // rows)} chunks, expected 3 each"
    for what, g, r, t in zip(("loss", "grad_p", "grad_w"), got, ref, truth):
        assert_low_precision(g, r, t, what=f"{name} bf16-GEMM {what}")


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_bf16_gemm_path_cbd_loss(monkeypatch, name):
    """cbd_loss accumulates the CE's grad_p GEMM into the distillation term's buffer (addmm)."""
    use_backend(monkeypatch, name, "cbd_loss")
    monkeypatch.setattr(ce_mod, "LOW_PRECISION_GEMM_DEVICES", {"cuda", "cpu"})
    seen = _spy_gemm_dtypes(monkeypatch)
    p, w, target = _lp_inputs(33, 300, 80, seed=4)
    g = torch.Generator().manual_seed(5)
    teachers = [torch.randn(33, d, generator=g).bfloat16() for d in (60, 20)]
    truth = _grads(lambda a, b, y: cbd_loss_ref(a, b, y, [t.double() for t in teachers]), p.double(), w.double(),
                   target)
    ref = _grads(lambda a, b, y: cbd_loss_ref(a, b, y, teachers), p, w, target)
    got = _grads(lambda a, b, y: cbd_loss(a, b, y, teachers, chunk_size=8), p, w, target)
    assert seen and all(d == (BF16, BF16) for d in seen), f"GEMM input dtypes {seen}, expected bf16 only"
    for what, g_, r, t in zip(("loss", "grad_p", "grad_w"), got, ref, truth):
        assert_low_precision(g_, r, t, what=f"{name} bf16-GEMM {what}")


def test_fp32_and_default_cpu_bf16_keep_fp32_gemms(monkeypatch):
    monkeypatch.setenv("FASTCBD_BACKEND", "torch")
    seen = _spy_gemm_dtypes(monkeypatch)
    p, w, target = _lp_inputs(9, 20, 16, seed=6)
    _grads(cosine_ce, p, w, target)  # bf16 on CPU, LOW_PRECISION_GEMM_DEVICES untouched
    _grads(cosine_ce, p.float(), w.float(), target)
    assert seen and all(d == (F32, F32) for d in seen), f"GEMM input dtypes {seen}, expected fp32 only"


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_bf16_gemms_on_cuda(monkeypatch, name):
    """On a GPU: the out_dtype GEMMs exist in this torch, and the bf16 path is within 2x bf16's own error."""
    use_backend(monkeypatch, name, "cosine_ce", device="cuda")
    assert ce_mod._out_dtype_gemms("cuda")[0], "torch.mm(bf16, bf16, out_dtype=float32) is missing on CUDA"
    p, w, target = (x.cuda() for x in _lp_inputs(129, 8142, 520, seed=7))
    assert gemm_dtype(p, w) == BF16
    truth = _grads(lambda a, b, y: cosine_ce_ref(a, b, y), p.double(), w.double(), target)
    ref = _grads(lambda a, b, y: cosine_ce_ref(a, b, y), p, w, target)
    got = _grads(lambda a, b, y: cosine_ce(a, b, y, chunk_size=40), p, w, target)
    for what, g, r, t in zip(("loss", "grad_p", "grad_w"), got, ref, truth):
        assert_low_precision(g, r, t, what=f"{name} cuda bf16 {what}")
