"""GPU-only checks of the four custom ops on the triton and cuda backends (skipped without a CUDA GPU).

Streams, CUDA-graph capture, torch.compile, determinism, the Triton launch's device, bf16/fp16, strided and
zero-row inputs through Triton, and the CUDA twins of test_contract.py's cases. One shape per op (B = 33,
D = 96, C = 1000) so that each Triton kernel compiles once per dtype; nothing touches CUDA at import.
"""
from __future__ import annotations

import pytest
import torch
from ops_testing import assert_close, assert_low_precision, check_compiled, use_backend
from test_contract import (
    _check_nan_pattern,
    _kd_inputs,
    check_fp16_relative,
    fp16_classifier_inputs,
    fp16_reference,
)

from fastcbd.ops import _common, cbd_loss, cosine_ce, cosine_distill, multi_teacher_kd
from fastcbd.ops.cbd_loss import cbd_loss_ref
from fastcbd.ops.cosine_ce import cosine_ce_ref
from fastcbd.ops.cosine_distill import cosine_distill_ref
from fastcbd.ops.multi_teacher_kd import multi_teacher_kd_ref

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "cuda"]
OPS = ["cosine_distill", "cosine_ce", "multi_teacher_kd", "cbd_loss"]
LEAVES = {"cosine_distill": ("p",), "cosine_ce": ("p", "w"), "multi_teacher_kd": ("z",), "cbd_loss": ("p", "w")}
# which outputs of each custom op are (loss, gradient of each leaf)
GRAD_OUTPUTS = {"cosine_distill": (0, 1), "cosine_ce": (0, 1, 2), "multi_teacher_kd": (0, 1), "cbd_loss": (0, 3, 4)}
DEVICE = "cuda"  # a name, not a device object: nothing touches CUDA at import


def _inputs(B=33, dtype=torch.float32, seed=0):
    """Every op's inputs on the GPU, fixed shapes: p (B, 96) = teachers (B, 64) + (B, 32), w (1000, 96)."""
    g = torch.Generator().manual_seed(seed)
    D, C = 96, 1000
    x = {
        "p": torch.relu(torch.randn(B, D, generator=g)),
        "w": torch.randn(C, D, generator=g) * (0.5 + torch.rand(C, 1, generator=g)),
        "target": torch.randint(0, C, (B,), generator=g),
        "teachers": [torch.randn(B, 64, generator=g), torch.randn(B, 32, generator=g) * 2],
        "z": torch.randn(B, C, generator=g) * 4,
        "logits": [torch.randn(B, C, generator=g) * 3, torch.randn(B, C, generator=g) * 5],
        "weights": torch.tensor([0.3, 0.7]),
    }
    keep_dtype = ("target", "weights")
    return _map(x, lambda k, t: t.to(DEVICE) if k in keep_dtype else t.to(DEVICE, dtype))


def _map(x, fn):
    return {k: [fn(k, t) for t in v] if isinstance(v, list) else fn(k, v) for k, v in x.items()}


def _copy_into(dst, src):
    for k, v in src.items():
        for a, b in zip(dst[k] if isinstance(v, list) else [dst[k]], v if isinstance(v, list) else [v]):
            a.copy_(b)


def _call(op, x, compute_grad=True):
    """The custom op itself (no target check): its outputs, loss and fp32 gradients."""
    ops = torch.ops.fastcbd
    if op == "cosine_distill":
        return ops.cosine_distill(x["p"], x["teachers"], compute_grad)
    if op == "cosine_ce":
        return ops.cosine_ce(x["p"], x["w"], x["target"], 20.0, -100, 0.1, True, compute_grad, 16)
    if op == "multi_teacher_kd":
        return ops.multi_teacher_kd(x["z"], x["logits"], x["weights"], 4.0, compute_grad)
    return ops.cbd_loss(x["p"], x["w"], x["target"], x["teachers"], 0.4, 100.0, 20.0, compute_grad, 16)


def _public(op, x):
    """The public function (with its target check) on x; the loss."""
    if op == "cosine_distill":
        return cosine_distill.cosine_distill(x["p"], x["teachers"])
    if op == "cosine_ce":
        return cosine_ce.cosine_ce(x["p"], x["w"], x["target"], label_smoothing=0.1, chunk_size=16)
    if op == "multi_teacher_kd":
        return multi_teacher_kd.multi_teacher_kd(x["z"], x["logits"], weights=x["weights"])
    return cbd_loss.cbd_loss(x["p"], x["w"], x["target"], x["teachers"], chunk_size=16)


def _reference(op, x, dtype=torch.float64):
    """The <op>_ref on x's tensors in `dtype`, autograd: [loss, gradient of each leaf] (as GRAD_OUTPUTS)."""
    leaves = [x[n].detach().to(dtype).requires_grad_() for n in LEAVES[op]]
    teachers = [t.to(dtype) for t in x["teachers"]]
    if op == "cosine_distill":
        loss = cosine_distill_ref(leaves[0], teachers)
    elif op == "cosine_ce":
        loss = cosine_ce_ref(*leaves, x["target"], label_smoothing=0.1)
    elif op == "multi_teacher_kd":
        loss = multi_teacher_kd_ref(leaves[0], [t.to(dtype) for t in x["logits"]], tau=4.0,
                                    weights=x["weights"].tolist())
    else:
        loss = cbd_loss_ref(*leaves, x["target"], teachers)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _check_against_reference(op, out, x, what):
    want = _reference(op, x)
    for i, (j, e) in enumerate(zip(GRAD_OUTPUTS[op], want)):
        if i == 0:
            assert_close(out[j], e, what=f"{what} loss", rtol=1e-5, atol=1e-6)
        else:
            assert_close(out[j], e, what=f"{what} gradient of {LEAVES[op][i - 1]}")


def _assert_same(got, want, what, rtol=0.0):
    for i, (a, b) in enumerate(zip(got, want)):
        if rtol == 0.0:
            assert torch.equal(a, b), f"{what}: output {i} differs, max |diff| {(a - b).abs().max().item():.3g}"
        else:
            assert_close(a, b, what=f"{what}: output {i}", rtol=rtol, atol_frac=rtol)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", BACKENDS)
def test_matches_reference_and_is_deterministic(monkeypatch, name, op):
    use_backend(monkeypatch, name, op, device="cuda")
    x = _inputs()
    first = _call(op, x)
    _check_against_reference(op, first, x, f"{name} {op}")
    _assert_same(_call(op, x), first, f"{name} {op}: a second identical call")


@pytest.mark.parametrize("op", OPS)
def test_triton_launches_on_the_tensors_device(monkeypatch, op):
    """Every Triton launch runs inside torch.cuda.device(<the tensors' device>) (Triton itself launches on the
    current device), and the hooks see that device current."""
    use_backend(monkeypatch, "triton", op, device="cuda")
    entered, launches = [], []
    real = torch.cuda.device

    class Recording(real):
        def __enter__(self):
            entered.append(self.idx)
            return super().__enter__()

    def hook(kernel, grid, args, kwargs):
        launches.append((kernel.fn.__name__, torch.cuda.current_device(), _common.launch_device(args)))

    monkeypatch.setattr(torch.cuda, "device", Recording)
    monkeypatch.setattr(_common, "LAUNCH_HOOKS", [hook])
    x = _inputs()
    _call(op, x)
    index = x["p"].device.index if x["p"].device.index is not None else torch.cuda.current_device()
    assert launches, f"{op}: no Triton launch seen"
    wrong = [(k, cur, dev) for k, cur, dev in launches if dev is None or cur != dev.index]
    assert not wrong, f"{op}: launches with the wrong device current (kernel, current, tensors'): {wrong}"
    assert entered.count(index) >= len(launches), f"{op}: guard entered {entered} for {len(launches)} launches"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", BACKENDS)
def test_non_default_stream(monkeypatch, name, op):
    """On a side stream whose inputs are written late (after a sleep on that stream), the results are those
    of the default stream: a kernel launched on another stream would read the inputs before they exist."""
    use_backend(monkeypatch, name, op, device="cuda")
    x = _inputs()
    want = _call(op, x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        y = _map(x, lambda k, t: t.clone())
        got = _call(op, y)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    # cuBLAS may pick its workspace per stream: equal up to fp32 round-off, not necessarily bitwise
    _assert_same(got, want, f"{name} {op} on a side stream", rtol=1e-6)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", BACKENDS)
def test_cuda_graph_capture(monkeypatch, name, op):
    """Capture the custom op and the public function (whose target check must stand aside while capturing),
    replay with new inputs copied in, compare with eager on those inputs."""
    use_backend(monkeypatch, name, op, device="cuda")
    static, fresh = _inputs(seed=0), _inputs(seed=1)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS handles, outside the capture
            _call(op, static)
            _public(op, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _call(op, static)
            loss = _public(op, static)
        _copy_into(static, fresh)
        graph.replay()
        torch.cuda.synchronize()
        want, want_loss = _call(op, fresh), _public(op, fresh)
    _assert_same(out, want, f"{name} {op} replayed graph", rtol=1e-6)
    assert_close(loss, want_loss, what=f"{name} {op} replayed public function", rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", BACKENDS)
def test_torch_compile_fullgraph(monkeypatch, name, op):
    use_backend(monkeypatch, name, op, device="cuda")
    x = _inputs()
    if op == "cosine_distill":
        check_compiled(lambda p, t0, t1: cosine_distill.cosine_distill(p * 1.5, [t0, t1]), [x["p"]], *x["teachers"])
    elif op == "cosine_ce":
        check_compiled(lambda p, w, y: 2.0 * cosine_ce.cosine_ce(p, w, y, label_smoothing=0.1), [x["p"], x["w"]],
                       x["target"])
    elif op == "multi_teacher_kd":
        check_compiled(lambda z, t0, t1: multi_teacher_kd.multi_teacher_kd(z * 2.0, [t0, t1], tau=3.0), [x["z"]],
                       *x["logits"])
    else:
        check_compiled(lambda p, w, y, t0, t1: cbd_loss.cbd_loss(torch.relu(p), w, y, [t0, t1], alpha=0.3),
                       [x["p"], x["w"]], x["target"], *x["teachers"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_triton_low_precision(monkeypatch, op, dtype):
    """bf16/fp16 inputs through Triton: at most twice the error of PyTorch's own computation in that dtype."""
    use_backend(monkeypatch, "triton", op, device="cuda")
    x = _inputs(dtype=dtype)
    out = _call(op, x)
    truth, native = _reference(op, x), _reference(op, x, dtype)
    for i, (j, t, n) in enumerate(zip(GRAD_OUTPUTS[op], truth, native)):
        assert_low_precision(out[j], n, t, what=f"triton {op} {dtype} output {j}")


@pytest.mark.parametrize("op", OPS)
def test_triton_strided_inputs(monkeypatch, op):
    """Row-strided and column-major inputs, strided teachers, weights[::2] and target[::2] through Triton."""
    use_backend(monkeypatch, "triton", op, device="cuda")
    x = _inputs()

    def strided(k, t):
        if k == "weights":
            return torch.stack([t, torch.full_like(t, 9.0)], dim=1).reshape(-1)[::2]
        if k == "target":
            return torch.stack([t, torch.full_like(t, -7)], dim=1).reshape(-1)[::2]
        if k == "w":
            return t.t().contiguous().t()  # column-major
        wide = torch.zeros(t.shape[0], t.shape[1] + 13, device=t.device, dtype=t.dtype)
        wide[:, 5:5 + t.shape[1]] = t
        return wide[:, 5:5 + t.shape[1]]

    y = _map(x, strided)
    assert not y["weights"].is_contiguous() and not y["target"].is_contiguous() and y["p"].stride(0) != 96
    out = _call(op, y)
    _check_against_reference(op, out, x, f"triton {op} strided")
    _assert_same(out, _call(op, x), f"triton {op} strided vs contiguous", rtol=1e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", BACKENDS)
def test_zero_rows(monkeypatch, name, op):
    use_backend(monkeypatch, name, op, device="cuda")
    x = _inputs(B=0)
    out = _call(op, x)
    want = _reference(op, x)
    loss = out[0]
    assert loss.isnan().item() == want[0].isnan().item(), f"{name} {op} B=0: loss {loss.item()} vs {want[0].item()}"
    for j, e in zip(GRAD_OUTPUTS[op][1:], want[1:]):
        assert out[j].shape == e.shape and not out[j].any(), f"{name} {op} B=0: output {j} {tuple(out[j].shape)}"


@pytest.mark.parametrize("C", [10, 100, 1024])
def test_triton_cosine_ce_rows_race_free(monkeypatch, C):
    """The row kernel overwrites its row in place; z_y must be read before any warp writes (in pass 1).
    Many rows and repeats, bitwise the same every time, and right."""
    use_backend(monkeypatch, "triton", "cosine_ce", device="cuda")
    g = torch.Generator().manual_seed(C)
    p = torch.relu(torch.randn(512, 64, generator=g)).to(DEVICE)
    w = torch.randn(C, 64, generator=g).to(DEVICE)
    target = torch.randint(0, C, (512,), generator=g).to(DEVICE)
    first = torch.ops.fastcbd.cosine_ce(p, w, target, 20.0, -100, 0.1, True, True, 0)
    want_loss = cosine_ce_ref(p.double(), w.double(), target, label_smoothing=0.1)
    assert_close(first[0], want_loss, what=f"C={C} loss", rtol=1e-5, atol=1e-6)
    for i in range(30):
        again = torch.ops.fastcbd.cosine_ce(p, w, target, 20.0, -100, 0.1, True, True, 0)
        _assert_same(again, first, f"C={C} repeat {i}")


def test_cuda_fp16_weights_keep_fp32_logit_gradients(monkeypatch):
    """fp16 W at iNat18 size: every element of grad_p / grad_w within 0.2% of its row's scale (the fp16 cast of
    dL/dlogits before the grad_p GEMM put grad_p off by 1-3%)."""
    use_backend(monkeypatch, "cuda", "cosine_ce", device="cuda")
    p, w, target = fp16_classifier_inputs(DEVICE)
    _, gp, gw = torch.ops.fastcbd.cosine_ce(p, w, target, 20.0, -100, 0.0, True, True, 0)
    check_fp16_relative("cuda fp16 W", gp, gw, *fp16_reference(p, w, target))


@pytest.mark.parametrize("name", BACKENDS)
def test_targets_on_the_gpu(monkeypatch, name):
    """Bad targets: a ValueError from the public functions, NaN (masked) from the ops; int32 = int64; cbd_loss's
    -100 rows ignored as the reference does."""
    use_backend(monkeypatch, name, "cosine_ce", device="cuda")
    use_backend(monkeypatch, name, "cbd_loss", device="cuda")
    x = _inputs()
    bad = x["target"].clone()
    bad[3] = 1000
    with pytest.raises(ValueError, match=r"target\[3\] = 1000 is outside"):
        cosine_ce.cosine_ce(x["p"], x["w"], bad)
    with pytest.raises(ValueError, match=r"target\[3\] = 1000 is outside"):
        cbd_loss.cbd_loss(x["p"], x["w"], bad, x["teachers"])
    for op in ("cosine_ce", "cbd_loss"):
        out = _call(op, dict(x, target=bad))
        j = GRAD_OUTPUTS[op]
        _check_nan_pattern(f"{name} {op}", out[j[0]].cpu(), out[j[1]].cpu(), out[j[2]].cpu(), [3])
        _assert_same(_call(op, dict(x, target=x["target"].int())), _call(op, x), f"{name} {op} int32 target")
    ignored = x["target"].clone()
    ignored[::4] = -100
    y = dict(x, target=ignored)
    _check_against_reference("cbd_loss", _call("cbd_loss", y), y, f"{name} cbd_loss with ignored rows")


@pytest.mark.parametrize("name", BACKENDS)
def test_trusted_targets_make_the_losses_sync_free(monkeypatch, name):
    """fastcbd's loop runs its CUDA steps under trusted_targets(): forward and backward of cbd_loss and
    cosine_ce then never wait for the GPU (torch's sync debug mode raises on any synchronising call); without
    it the range check is the one sync."""
    use_backend(monkeypatch, name, "cosine_ce", device="cuda")
    use_backend(monkeypatch, name, "cbd_loss", device="cuda")
    x = _inputs()
    p, w, target, teachers = x["p"].requires_grad_(), x["w"].requires_grad_(), x["target"], x["teachers"]

    def step():
        loss = cbd_loss.cbd_loss(p, w, target, teachers) + cosine_ce.cosine_ce(p, w, target)
        return torch.autograd.grad(loss, [p, w])

    step()  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with _common.trusted_targets():
            step()
        with pytest.raises(RuntimeError, match="synchroniz"):
            cbd_loss.cbd_loss(p, w, target, teachers)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", BACKENDS)
def test_kd_minus_inf_teacher_logits(monkeypatch, name):
    use_backend(monkeypatch, name, "multi_teacher_kd", device="cuda")
    z, teachers = (t.to(DEVICE) if isinstance(t, torch.Tensor) else [u.to(DEVICE) for u in t] for t in _kd_inputs())
    weights = torch.tensor([0.7, 0.3], device=DEVICE)
    loss, grad = torch.ops.fastcbd.multi_teacher_kd(z, teachers, weights, 2.0, True)
    z64 = z.double().requires_grad_()
    want = multi_teacher_kd_ref(z64, [t.double() for t in teachers], tau=2.0, weights=(0.7, 0.3))
    want.backward()
    assert_close(loss, want, what=f"{name} loss with -inf teacher logits", rtol=1e-5, atol=1e-6)
    assert_close(grad, z64.grad, what=f"{name} grad_z with -inf teacher logits")
