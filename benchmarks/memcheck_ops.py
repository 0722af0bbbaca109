"""Call every kernel of fastcbd.ops once at awkward sizes: the driver compute-sanitizer runs.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        .venv/bin/python benchmarks/memcheck_ops.py --device cuda      # triton and cuda backends
    .venv/bin/python benchmarks/memcheck_ops.py --device cpu           # dry run: torch and cpu backends

Each call is one op (cosine_ce, cbd_loss, cosine_distill, multi_teacher_kd) on one backend
(FASTCBD_BACKEND set for the call), one dtype (fp32, bf16, and for the classifier ops bf16 features
with an fp32 weight, autocast's mix) and one shape (B in {1, 7, 129}; C and D not powers of two, C above
the row kernels' 2048-column block, a one-class and a one-feature-column case, several chunks with a
ragged last one), either forward only (no gradient wanted: the kernels' no-grad specialisations) or
forward + backward with a non-unit upstream gradient. The device is synchronised after every call, so an
error is reported at the call that caused it; one line is printed per call, then
"memcheck driver: N calls ok". Any exception, or a non-finite loss or gradient, exits non-zero;
so does a requested backend that cannot run. The allocator is left alone: the runner sets
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every tensor is its own cudaMalloc and memcheck sees each bound.
--budget-s (default 60 on CUDA, counted from the process start) stops starting calls after that many
seconds, so that a sanitizer run ends (and prints its summary) inside the runner's limit; the calls run
in rounds of growing size, every op and backend in each round, so a cut drops the largest shapes first.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_T_PROCESS = time.perf_counter()  # before torch's import: --budget-s counts from here

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_loss import fastcbd_backend  # noqa: E402
from fastcbd.ops import backend as fc_backend  # noqa: E402
from fastcbd.ops.cbd_loss import cbd_loss  # noqa: E402
from fastcbd.ops.cosine_ce import cosine_ce  # noqa: E402
from fastcbd.ops.cosine_distill import cosine_distill  # noqa: E402
from fastcbd.ops.multi_teacher_kd import multi_teacher_kd  # noqa: E402

# dtype label -> (dtype of the differentiable input, dtype of the classifier weight)
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16+fp32w": (torch.bfloat16, torch.float32)}
OPS = ("cosine_ce", "cbd_loss", "cosine_distill", "multi_teacher_kd")

# Per op, shapes in rounds of growing cost (round i of every op runs before round i + 1 of any).
#   cosine_ce: (B, C, D, chunk_size, options); cbd_loss: (B, C, teacher widths, chunk_size)
#   cosine_distill: (B, teacher widths); multi_teacher_kd: (B, K, C, tau)
SHAPES = {
    "cosine_ce": [(1, 3, 37, 0, {}), (7, 1, 50, 0, {"label_smoothing": 0.1}), (7, 5, 1, 0, {}),
                  (129, 1000, 33, 50, {"label_smoothing": 0.2, "ignore_some": True}),
                  (129, 2049, 130, 0, {"reduction": "sum"})],
    "cbd_loss": [(1, 3, (37,), 0), (7, 1, (25, 6), 3), (7, 5, (1,), 0), (129, 1000, (50, 13, 7), 40),
                 (129, 2049, (100, 30), 0)],
    "cosine_distill": [(1, (37,)), (7, (1, 3)), (7, (1,)), (129, (300, 45, 2)), (129, (1000, 1000))],
    "multi_teacher_kd": [(1, 1, 3, 1.0), (7, 2, 1, 4.0), (7, 1, 5, 2.0), (129, 3, 1001, 2.0),
                         (129, 2, 2049, 4.0)],
}


@dataclass(frozen=True)
class Call:
    op: str
    backend: str
    dtype: str
    grad: bool
    shape: tuple

    @property
    def label(self) -> str:
        return f"{self.op:16s} {self.backend:6s} {self.dtype:10s} {'fwd+bwd' if self.grad else 'fwd':7s} {self.shape}"


def plan(backends: list[str], dtypes: list[str], ops=OPS) -> list[Call]:
    """Every call, in rounds: round i = the i-th shape of every op, each backend, dtype and grad mode."""
    calls = []
    for i in range(max(len(SHAPES[op]) for op in ops)):
        for op in ops:
            if i >= len(SHAPES[op]):
                continue
            for backend in backends:
                for dtype in dtypes:
                    if dtype == "bf16+fp32w" and op not in ("cosine_ce", "cbd_loss"):
                        continue
                    for grad in (False, True):
                        calls.append(Call(op, backend, dtype, grad, SHAPES[op][i]))
    return calls


def _inputs(call: Call, device: torch.device, seed: int):
    """(loss closure, differentiable tensors) of one call; inputs made on the CPU, then moved."""
    g = torch.Generator().manual_seed(seed)
    x_dt, w_dt = DTYPES[call.dtype]

    def randn(*shape, dtype=x_dt, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if call.op == "cosine_ce":
        B, C, D, chunk, opts = call.shape
        opts = dict(opts)
        p, w = randn(B, D).relu_(), randn(C, D, dtype=w_dt)
        target = torch.randint(0, C, (B,), generator=g)
        if opts.pop("ignore_some", False):
            target[::3] = -100
        target = target.to(device)
        leaves = [p, w]
        return (lambda: cosine_ce(p, w, target, chunk_size=chunk, **opts)), leaves
    if call.op == "cbd_loss":
        B, C, dims, chunk = call.shape
        p, w = randn(B, sum(dims)).relu_(), randn(C, sum(dims), dtype=w_dt)
        target = torch.randint(0, C, (B,), generator=g).to(device)
        teachers = [randn(B, d) for d in dims]
        return (lambda: cbd_loss(p, w, target, teachers, chunk_size=chunk)), [p, w]
    if call.op == "cosine_distill":
        B, dims = call.shape
        p = randn(B, sum(dims)).relu_()
        teachers = [randn(B, d) for d in dims]
        return (lambda: cosine_distill(p, teachers)), [p]
    B, K, C, tau = call.shape
    z = randn(B, C, scale=3.0)
    teachers = [randn(B, C, scale=3.0) for _ in range(K)]
    return (lambda: multi_teacher_kd(z, teachers, tau=tau)), [z]


def run_call(call: Call, device: torch.device, seed: int) -> str:
    """Run one call (forward, and backward when call.grad), synchronise, check finiteness; returns a summary."""
    loss_fn, leaves = _inputs(call, device, seed)
    for t in leaves:
        t.requires_grad_(call.grad)
    with fastcbd_backend(call.backend):
        loss = loss_fn()
        if call.grad:
            loss.backward(torch.tensor(0.5, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value}")
    if call.grad:
        for i, t in enumerate(leaves):
            if t.grad is None or t.grad.shape != t.shape or t.grad.dtype != t.dtype:
                raise RuntimeError(f"gradient {i}: {None if t.grad is None else (t.grad.shape, t.grad.dtype)}")
            if not torch.isfinite(t.grad).all():
                raise FloatingPointError(f"gradient {i} has {int((~torch.isfinite(t.grad)).sum())} non-finite")
    return f"loss {value:.5g}"


def main(argv=None, t_start: float | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default: triton + cuda backends) or cpu (torch + cpu)")
    ap.add_argument("--backends", default="", help="comma-separated backends (default: by device, see --device)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {', '.join(DTYPES)}")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: no OpenMP barrier stalls on a loaded machine)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no call after this many seconds from the process start (default 60 on CUDA, "
                         "none on CPU; 0 = none)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter() if t_start is None else t_start
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is available")
    backends = args.backends.split(",") if args.backends else (
        ["triton", "cuda"] if device.type == "cuda" else ["torch", "cpu"])
    dtypes, ops = args.dtypes.split(","), args.ops.split(",")
    bad = [d for d in dtypes if d not in DTYPES] + [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"unknown dtype(s)/op(s): {bad}")
    for name in backends:
        reason = fc_backend.why_unavailable(name, device)
        if reason is not None:
            print(f"memcheck driver: backend {name} cannot run on {device}: {reason}", flush=True)
            return 2
    budget = args.budget_s if args.budget_s is not None else (60.0 if device.type == "cuda" else 0.0)
    calls = plan(backends, dtypes, ops)
    print(f"memcheck driver: {len(calls)} calls on {device} (backends {', '.join(backends)}; "
          f"dtypes {', '.join(dtypes)}{f'; budget {budget:g} s' if budget > 0 else ''})", flush=True)
    done = 0
    for i, call in enumerate(calls):
        if budget > 0 and time.perf_counter() - t0 > budget:
            print(f"memcheck driver: {done} calls ok, {len(calls) - done} skipped past the {budget:g} s budget",
                  flush=True)
            return 0
        try:
            summary = run_call(call, device, seed=i)
        except Exception as exc:  # noqa: BLE001 - report which call, then fail
            print(f"[{time.perf_counter() - t0:6.1f} s] FAILED {call.label}: {type(exc).__name__}: {exc}",
                  flush=True)
            return 1
        done += 1
        print(f"[{time.perf_counter() - t0:6.1f} s] ok {call.label} {summary}", flush=True)
    print(f"memcheck driver: {done} calls ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(t_start=_T_PROCESS))
