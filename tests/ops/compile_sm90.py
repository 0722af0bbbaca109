"""Compile every Triton kernel of fastcbd.ops for sm_90 without a GPU (run by test_backends.py).

The Triton interpreter is lenient: it runs code that the compiler rejects. This script drives each op's
triton path on CPU tensors with a launch hook that compiles the launched kernel (same arguments, so the
same specialisation) for a CUDA target and skips the launch. Prints one line per kernel compiled.
Must run without TRITON_INTERPRET (triton would be imported in interpreter mode).

It binds arguments through Triton's private API (create_function_from_signature, JITFunction._pack_args),
which changes between releases. When that API is not the one expected, a machine with a GPU compiles
through the public `kernel.warmup` for its own GPU instead; without one the script prints "SKIP: <why>"
and exits with SKIP_EXIT, which the test reports as a skip. Errors of the compiler itself always fail.
"""
from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402

from fastcbd.ops import _common, backend  # noqa: E402

SKIP_EXIT = 3
SM = int(os.environ.get("SM", "90"))
seen: set = set()
API_ERRORS = (ImportError, AttributeError, TypeError, ValueError, KeyError, IndexError)


class ApiMismatch(RuntimeError):
    """Triton's private binding API is not the one this script was written against."""


def _private_api():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except API_ERRORS as exc:
        raise ApiMismatch(f"triton {triton.__version__}: {exc!r}") from exc
    return GPUTarget, ASTSource, make_backend, create_function_from_signature


def _bind(kernel, args, kwargs):
    """(key, ASTSource, options) for the specialisation that kernel[grid](*args, **kwargs) would compile."""
    GPUTarget, ASTSource, make_backend, create_function_from_signature = _private_api()
    try:
        target = GPUTarget("cuda", SM, 32)
        be = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, be)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(be, kwargs, bound, spec, options)
    except API_ERRORS as exc:
        raise ApiMismatch(f"triton {triton.__version__}: binding {kernel.fn.__name__} failed: {exc!r}") from exc
    key = (kernel.fn.__name__, str(signature), str(constexprs))
    return key, target, ASTSource(kernel, signature, constexprs, attrs), options, constexprs


def compile_hook(kernel, grid, args, kwargs):
    try:
        key, target, src, options, constexprs = _bind(kernel, args, kwargs)
    except ApiMismatch:
        if not torch.cuda.is_available():
            raise
        return warmup_hook(kernel, grid, args, kwargs)
    if key not in seen:
        seen.add(key)
        ck = triton.compile(src, target=target, options=options.__dict__)
        meta = ck.metadata
        print(f"compiled {kernel.fn.__name__} {constexprs} warps={meta.num_warps} smem={meta.shared}",
              flush=True)
    return True  # skip the launch: there is no GPU


def warmup_hook(kernel, grid, args, kwargs):
    """The public route, on a machine with a GPU: compile for that GPU without launching."""
    key = (kernel.fn.__name__, repr([getattr(a, "dtype", type(a)) for a in args]), repr(sorted(kwargs.items())))
    if key not in seen:
        seen.add(key)
        kernel.warmup(*args, grid=grid, **kwargs)
        print(f"compiled {kernel.fn.__name__} (warmup for the local GPU)", flush=True)
    return True


def main() -> int:
    hook = compile_hook
    try:
        _private_api()
    except ApiMismatch as exc:
        if not torch.cuda.is_available():
            print(f"SKIP: {exc}; no GPU to compile through kernel.warmup instead", flush=True)
            return SKIP_EXIT
        hook = warmup_hook
    _common.LAUNCH_HOOKS.append(hook)
    backend.select = lambda device: "triton"
    try:
        run_all_ops()
    except ApiMismatch as exc:
        print(f"SKIP: {exc}", flush=True)
        return SKIP_EXIT
    print(f"{len(seen)} kernel specialisations compiled for cuda sm_{SM} (or the local GPU)")
    return 0


def run_all_ops() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        from fastcbd.ops.cosine_distill import cosine_distill

        for dims in ((40,), (40, 24), (40, 24, 8, 16)):
            p = torch.randn(5, sum(dims), generator=g).to(dtype).requires_grad_()
            cosine_distill(p, [torch.randn(5, d, generator=g).to(dtype) for d in dims]).backward()
        from fastcbd.ops.cosine_ce import cosine_ce

        for C, D in ((10, 48), (5000, 300)):
            p = torch.randn(6, D, generator=g).to(dtype).requires_grad_()
            w = torch.randn(C, D, generator=g).to(dtype).requires_grad_()
            cosine_ce(p, w, torch.randint(0, C, (6,), generator=g), label_smoothing=0.1).backward()
        from fastcbd.ops.multi_teacher_kd import multi_teacher_kd

        for K, C in ((1, 10), (4, 5000)):
            z = torch.randn(6, C, generator=g).to(dtype).requires_grad_()
            multi_teacher_kd(z, [torch.randn(6, C, generator=g).to(dtype) for _ in range(K)]).backward()
        from fastcbd.ops.cbd_loss import cbd_loss

        p = torch.randn(6, 48, generator=g).to(dtype).requires_grad_()
        w = torch.randn(100, 48, generator=g).to(dtype).requires_grad_()
        teachers = [torch.randn(6, 16, generator=g).to(dtype), torch.randn(6, 32, generator=g).to(dtype)]
        cbd_loss(p, w, torch.randint(0, 100, (6,), generator=g), teachers).backward()


if __name__ == "__main__":
    sys.exit(main())
