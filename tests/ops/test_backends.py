"""Backend plumbing: the Triton cases under the interpreter, and the Triton kernels compiled for a GPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ops_testing import CPU_BACKENDS, interpreter_env, use_backend

import fastcbd.ops.cbd_loss  # noqa: F401  (registers the custom ops)
import fastcbd.ops.cosine_ce  # noqa: F401
import fastcbd.ops.cosine_distill  # noqa: F401
import fastcbd.ops.multi_teacher_kd  # noqa: F401
from fastcbd.ops import _common, backend

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


# the triton cases of tests/ops that run in the interpreter (71 on 2026-11-30); fewer means some stopped running
INTERPRETER_CASES = 70


def _tail(text: str, n: int = 6000) -> str:
    return text[-n:]


def test_interpreter_suite():
    """Run every `triton` case of tests/ops in a subprocess with TRITON_INTERPRET=1 set before import."""
    if _common.triton is None:
        pytest.skip("triton is not installed")
    if _common.triton_interpreting():
        pytest.skip("this process already runs the triton cases in the interpreter")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rs",
           "-k", "triton and not cuda and not gpu", str(HERE)]
    proc = subprocess.run(cmd, cwd=ROOT, env=interpreter_env(), capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    rc = proc.returncode
    assert rc == 0, f"triton cases failed (TRITON_INTERPRET=1, rc {rc}):\n{_tail(out)}"
    # every case ran, but for the few too slow for the interpreter (each covered by a smaller one)
    skips = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", out, flags=re.M)
    unexpected = [why for _, why in skips if "slow in the Triton interpreter" not in why]
    assert not unexpected, f"triton cases skipped in the interpreter: {unexpected}\n{_tail(out)}"
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= INTERPRETER_CASES, (
        f"only {passed.group(1) if passed else 0} triton cases ran in the interpreter, expected >= "
        f"{INTERPRETER_CASES}:\n{_tail(out)}")


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile each launched kernel for sm_90."""
    if _common.triton is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(HERE / "compile_sm90.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "ptxas" in out and "not found" in out.lower():
        pytest.skip(f"triton cannot compile for CUDA here: {_tail(out, 500)}")
    if proc.returncode == 3 and "SKIP:" in out:  # compile_sm90.SKIP_EXIT: this Triton's private API differs
        pytest.skip(_tail(out[out.index("SKIP:"):], 500))
    assert proc.returncode == 0, f"a Triton kernel failed to compile for sm_90:\n{_tail(out)}"
    assert "kernel specialisations compiled" in out, _tail(out)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("FASTCBD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FASTCBD_BACKEND=cuda cannot run"):
        backend.select(torch.device("cpu"))
    monkeypatch.setenv("FASTCBD_BACKEND", "auto")
    assert backend.select(torch.device("cpu")) in ("cpu", "torch")


def _opcheck_cases(requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 12, generator=g).requires_grad_(requires_grad)
    w = torch.randn(7, 12, generator=g).requires_grad_(requires_grad)
    z = torch.randn(5, 7, generator=g).requires_grad_(requires_grad)
    y = torch.randint(0, 7, (5,), generator=g)
    teachers = [torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)]
    logits = [torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)]
    rg = requires_grad
    return {
        "cosine_distill": (p, teachers, rg),
        "cosine_ce": (p, w, y, 20.0, -100, 0.1, True, rg, 2),
        "multi_teacher_kd": (z, logits, torch.tensor([0.5, 0.5]), 4.0, rg),
        "cbd_loss": (p, w, y, teachers, 0.4, 100.0, 20.0, rg, 2),
    }


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("op", ["cosine_distill", "cosine_ce", "multi_teacher_kd", "cbd_loss"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_opcheck(monkeypatch, name, op, requires_grad):
    """torch.library.opcheck: schema, fake implementation, autograd registration, AOT dispatch."""
    use_backend(monkeypatch, name, op)
    args = _opcheck_cases(requires_grad)[op]
    results = torch.library.opcheck(getattr(torch.ops.fastcbd, op).default, args)
    bad = {k: v for k, v in results.items() if v != "SUCCESS"}
    assert not bad, f"opcheck of fastcbd::{op} on {name}: {bad}"


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (to drive the launch guard without a GPU)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_triton_launch_runs_on_the_tensors_device(monkeypatch):
    """Triton launches on the *current* device: _common.launch must make the tensors' device current around
    the launch (and its hooks), and restore the previous one after. torch.cuda.device is mocked here."""
    state = {"current": 0, "entered": []}

    class FakeDevice:
        def __init__(self, device):
            self.idx = torch.device(device).index

        def __enter__(self):
            state["entered"].append(self.idx)
            self.prev, state["current"] = state["current"], self.idx

        def __exit__(self, *exc):
            state["current"] = self.prev

    seen = {}

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen["kernel"] = state["current"]
            return run

    def hook(kernel, grid, args, kwargs):
        seen["hook"] = state["current"]  # returns None: do not skip the launch

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(_common, "LAUNCH_HOOKS", [hook])
    x = torch.Tensor._make_subclass(_OnCuda1, torch.zeros(3))
    _common.launch(Kernel(), (1,), 3, (x, x), 0.5, BLOCK=16)
    assert seen == {"hook": 1, "kernel": 1}, f"current device during the hook / launch: {seen}, want cuda:1"
    assert state["entered"] == [1] and state["current"] == 0, f"guard entered {state['entered']}, left {state}"
    seen.clear()
    _common.launch(Kernel(), (1,), torch.zeros(3), 2)  # CPU tensors (the interpreter): no guard
    assert seen == {"hook": 0, "kernel": 0} and state["entered"] == [1], f"{seen}, {state}"
