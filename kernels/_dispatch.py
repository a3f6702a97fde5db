"""The one switch between Triton kernels and PyTorch references, and the Triton import guard.

`use_triton_for(t, use_triton, unsupported)` is the visible `if` of every dispatch function (STYLE rule 4):
    use_triton=False -> reference
    use_triton=None  -> Triton iff `t` is a CUDA tensor, triton imports and the op supports the inputs
    use_triton=True  -> Triton, or a clear error: triton missing, CPU tensor without the interpreter,
                        unsupported dtype/shape (the op's `unsupported` reason)
On CPU the kernels run only under Triton's interpreter, which the user enables with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: every op runs its PyTorch reference
    triton = None

    class tl:  # noqa: N801  (lets kernel signatures annotated with tl.constexpr be defined, never launched)
        constexpr = float32 = None

HAS_TRITON = triton is not None
INSTALL_HINT = "pip install 'ssdd-runtime[triton]'"


def jit(fn):
    """`triton.jit`, or the plain function when triton is missing (it is then never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def interpreting() -> bool:
    """Whether Triton's interpreter is requested (read at call time, as Triton reads it at decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton_for(t: torch.Tensor, use_triton: bool | None, unsupported: str | None = None,
                   op: str = "kernel") -> bool:
    """use_triton=None: auto (CUDA tensor, triton importable, inputs supported); False: reference; True: Triton."""
    if use_triton is False:
        return False
    if use_triton is None:
        return t.is_cuda and HAS_TRITON and unsupported is None
    if not HAS_TRITON:
        raise RuntimeError(f"use_triton=True but triton cannot be imported; install it with {INSTALL_HINT}")
    if not t.is_cuda and not interpreting():
        raise RuntimeError(f"use_triton=True with a {t.device.type} tensor needs Triton's interpreter: set "
                           "TRITON_INTERPRET=1 in the environment (or pass use_triton=None/False to use the "
                           "PyTorch reference)")
    if unsupported is not None:
        raise ValueError(f"use_triton=True but the Triton {op} does not support these inputs: {unsupported}")
    return True


_INTERPRETED: dict = {}


def launchable(kernel, device: torch.device):
    """The kernel to launch for tensors on `device`. Triton picks compiled vs interpreted when `@triton.jit` runs
    (module import); if TRITON_INTERPRET=1 was set only afterwards, CPU tensors get an interpreted copy."""
    if device.type == "cuda" or not HAS_TRITON:
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel not in _INTERPRETED:
        _INTERPRETED[kernel] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
