"""Plumbing shared by the fused ops: the Triton launch, the dtype policy and the torch backend.

Dtype policy (the same in every backend): inputs may be fp32, bf16 or fp16, in any mix; all arithmetic
accumulates in fp32; the loss comes back as a 0-dim fp32 tensor and each gradient is cast to its input's
dtype on the way out of backward. The custom ops are not autocast-aware on purpose: under `torch.autocast`
they receive their inputs as they are (typically a bf16 projection and an fp32 classifier weight) and
compute in fp32 anyway, which is autocast's own policy for losses, without an fp32 copy of the inputs.
Autocast is switched off inside the implementations so that their internal matmuls stay fp32.

The `torch` backend computes the loss and its gradient with the same analytic formulas as the kernels,
in plain PyTorch (autograd cannot run inside a custom op's implementation: its keys are excluded there,
and torch.func clashes with the dispatch modes torch.compile's runtime puts around custom ops). The
`<op>_ref` functions stay the autograd-based definitions that the tests compare every backend against.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable

import torch

try:  # triton ships with CUDA builds of torch; a CPU-only install has no triton and no triton backend
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

EPS = 1e-12  # norms are clamped below at EPS, as in F.normalize
GRAD_BLOCK_ELEMS = 4 << 20  # scale_saved_grad's rows per block: 16 MiB of fp32 at most in flight

# Callables (kernel, grid, args, kwargs) run before every Triton launch; one that returns True skips the
# launch. The tests use this to compile each kernel for a GPU target on a machine without a GPU.
LAUNCH_HOOKS: list[Callable] = []


@functools.cache
def has_compiled(op: str) -> bool:
    """True when fastcbd._C imported and registered torch.ops.fastcbd_C.<op>_fwd (fixed for the process)."""
    from fastcbd import _ext

    return _ext.available() and hasattr(torch.ops.fastcbd_C, f"{op}_fwd")


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will want a gradient for one of `tensors`."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def scale_saved_grad(saved: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient a fused loss's backward returns: `saved * grad_out` in `dtype`.

    saved: the fp32 gradient of the loss that the forward computed (an output marked non-differentiable);
    grad_out: the upstream 0-dim gradient. When grad_out is exactly 1 (`loss.backward()`, or a loss added
    to others) and no cast is needed, `saved` itself is returned: a copy and a full pass over a (C, D)
    gradient less (266 MB at iNat18 size). Checked only in plain eager mode (never while tracing: the value
    is data) and for a CPU grad_out (reading a CUDA scalar would synchronise; the GPU multiply is cheap).
    Aliasing is safe here: when the graph is freed after backward (the default) nothing else holds
    `saved`; with retain_graph=True the graph still does, so AccumulateGrad copies it into `.grad`
    instead of stealing it (only `torch.autograd.grad(..., retain_graph=True)` hands the caller the
    saved tensor itself, which must then not be modified in place before the next backward).
    """
    if (saved.dtype == dtype and grad_out.device.type == "cpu" and grad_out.numel() == 1
            and _plain_eager(grad_out) and grad_out.item() == 1.0):
        return saved
    if saved.dtype == dtype:
        return saved * grad_out
    # bf16/fp16 inputs: multiplied in fp32 and written in `dtype` a block of rows at a time. In one piece the
    # fp32 product of the whole gradient was a temporary (266 MB at iNat18 size, the bf16 step's peak); an
    # `out=` of another dtype still makes one on the CPU (TensorIterator casts through a common-dtype copy)
    out = torch.empty_like(saved, dtype=dtype)  # saved: an (N, ...) gradient
    rows = max(1, GRAD_BLOCK_ELEMS // max(1, saved[0].numel())) if len(saved) else 1
    for r0 in range(0, len(saved), rows):
        torch.mul(saved[r0:r0 + rows], grad_out, out=out[r0:r0 + rows])
    return out


def _plain_eager(t: torch.Tensor) -> bool:
    """True for a real tensor outside any tracing (torch.compile, make_fx/opcheck, functorch, modes)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None
            and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and not torch._is_functional_tensor(t))


def eager_autograd(name: str, forward: Callable, setup_context: Callable, backward: Callable):
    """A torch.autograd.Function made of a custom op's own implementation, setup_context and backward.

    torch.library's eager path around a custom op (schema-checked argument binding, pytree flattening of
    inputs and outputs, its Python autograd shim) costs ~200 us a call on this project's CPUs: more than the
    fused kernel itself at a CIFAR-size batch, and the whole difference to torch.compile on a GPU. This
    Function runs the same three functions for ~20 us. `run_op` takes it for plain eager tensors only;
    anything traced (torch.compile, make_fx/opcheck, functorch transforms, dispatch modes, tensor
    subclasses) goes through the registered custom op, so both paths compute with the very same code.
    Backward's list entries (the teachers' None gradients) become one None: autograd.Function sees a list
    argument as a single non-tensor input.
    """
    def run(ctx, *inputs):  # forward(ctx, ...): the separate setup_context style binds a signature per call
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def grads(ctx, *grad_outputs):
        return tuple(None if isinstance(g, list) else g for g in backward(ctx, *grad_outputs))

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run), "backward": staticmethod(grads)})


def run_op(op, eager, *args):
    """op(*args): through `eager` (eager_autograd's Function) when args[0] is a plain eager tensor."""
    return eager.apply(*args) if _plain_eager(args[0]) else op(*args)


_TRUSTED = contextvars.ContextVar("fastcbd_trusted_targets", default=False)


@contextlib.contextmanager
def trusted_targets(enabled: bool = True):
    """Within: the public ops skip check_target's range check, the one host sync a fused loss makes on a
    GPU. For loops whose labels were validated when read (fastcbd's `fit` on CUDA): a bad target then
    masks its row to NaN, which a loop's non-finite check stops on. The dtype and shape checks remain."""
    token = _TRUSTED.set(enabled)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def check_target(target, num_classes: int, ignore_index: int | None = None, name: str = "target") -> None:
    """ValueError naming `name` unless target is a 1-D int64/int32 tensor with every entry in [0, C) or
    equal to ignore_index.

    The range check reads the tensor on the host (a device sync on a GPU), so it is skipped where that is
    impossible: while torch.compile traces (a data-dependent branch) and while a CUDA graph is captured,
    and where the caller vouches for its labels (`trusted_targets`).
    There the kernels mask a bad target instead: its row gets a NaN loss and NaN gradients (docs/ops.md).
    """
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        shape = "x".join(map(str, target.shape)) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"{name} must be a 1-D int64 (or int32) tensor of class indices, got {shape} "
                         f"{getattr(target, 'dtype', '')}")
    if target.numel() == 0 or _TRUSTED.get() or not _plain_eager(target) or target.device.type == "meta":
        return
    if target.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = (int(v) for v in torch.aminmax(target))  # one reduction and one sync when all is well
    if lo >= 0 and hi < num_classes:
        return
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        also = f" and is not ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"{name}[{i}] = {int(target[i])} is outside [0, C={num_classes}){also}")


def rowmajor(x: torch.Tensor) -> torch.Tensor:
    """`x` with unit stride along its last dim (the kernels take a row stride, not a column stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def dispatch(op: str, device: torch.device, *, triton_fwd: Callable, compiled_fwd: Callable, torch_fwd: Callable):
    """Run an op's forward (three zero-argument callables) on the backend FASTCBD_BACKEND selects for
    `device`, autocast off: Triton, the compiled C++/CUDA op `torch.ops.fastcbd_C.<op>_fwd` (an explicit
    cpu/cuda request fails when fastcbd._C lacks it; auto falls back), or plain torch."""
    from fastcbd import _ext
    from fastcbd.ops import backend

    name = backend.select(device)
    with no_autocast(device):
        if name == "triton":
            return triton_fwd()
        if name in ("cpu", "cuda"):
            if has_compiled(op):
                return compiled_fwd()
            if backend.requested() != "auto":
                raise RuntimeError(f"fastcbd._C has no {op}_fwd (import error: {_ext.IMPORT_ERROR!r})")
        return torch_fwd()


def no_autocast(device: torch.device):
    """Internals in fp32 whatever autocast the caller runs (custom-op bodies and the unfused paths)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def triton_interpreting() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1, so its kernels run on CPU tensors.

    Triton decides at import time (triton.language itself is built of @triton.jit functions), so setting
    the variable later has no effect: run `TRITON_INTERPRET=1 python ...` from the start.
    """
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.zeros, InterpretedFunction)


def launch_device(args) -> torch.device | None:
    """The device of the first CUDA tensor among a launch's arguments (tuples of tensors included)."""
    for a in args:
        if isinstance(a, (tuple, list)):
            dev = launch_device(a)
            if dev is not None:
                return dev
        elif isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return a.device
    return None


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the device of its tensors.

    Triton launches on the *current* device (and its current stream), not on the tensors' device: without
    the guard, tensors on cuda:1 with cuda:0 current would run on the wrong GPU (an illegal address, or
    worse, a silently wrong stream). The hooks run inside the guard, so they see the launch's device.
    """
    dev = launch_device(args)
    with torch.cuda.device(dev) if dev is not None else contextlib.nullcontext():
        skip = False
        for hook in LAUNCH_HOOKS:
            skip = bool(hook(kernel, grid, args, kwargs)) or skip
        if skip:
            return
        kernel[grid](*args, **kwargs)


def next_pow2(n: int, lo: int = 16, hi: int = 1024) -> int:
    """Block size: the next power of two of n, within [lo, hi]."""
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))


def project_rows_torch(g: torch.Tensor, x: torch.Tensor, inv_n: torch.Tensor) -> None:
    """In place: g_r -= <g_r, x_r> x_r / ||x_r||^2, the gradient of x_r / ||x_r|| applied to g_r.

    g (N, D) fp32, x (N, D), inv_n (N,) fp32 = 1 / max(||x_r||, EPS). Rows whose norm was clamped get no
    projection, as in F.normalize's autograd (the clamp has no gradient).
    """
    x = x.float()
    # einsum and addcmul_ rather than vecdot and `g -= c x`: both of those materialise an (N, D) temporary
    c = torch.einsum("nd,nd->n", g, x) * inv_n * inv_n
    c = torch.where(inv_n < 1.0 / EPS, c, torch.zeros_like(c))
    g.addcmul_(c[:, None], x, value=-1.0)


def inv_norms(x: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 1 / max(||x_r||, EPS), accumulated in fp32 without an fp32 copy of x."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min_(EPS).reciprocal_()
