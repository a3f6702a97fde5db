"""The one switch between Triton kernels and PyTorch references, the Triton import guard, and `Launch`.

`use_triton_for(t, use_triton, unsupported)` is the visible `if` of every dispatch function (STYLE rule 4):
    use_triton=False -> reference
    use_triton=None  -> Triton iff `t` is a CUDA tensor, triton imports and the op supports the inputs
    use_triton=True  -> Triton, or a clear error: triton missing, CPU tensor without the interpreter,
                        unsupported dtype/shape (the op's `unsupported` reason)
On CPU the kernels run only under Triton's interpreter, which the user enables with TRITON_INTERPRET=1 before
triton is first imported (Triton decides compiled vs interpreted when `@triton.jit` runs, at module import).

Every launcher builds its launches with a pure `*_launches` function of the tensors (their shapes, strides,
dtypes: it reads no data, so meta tensors work) and then runs them; `kernels/aot.py` compiles the same
`Launch` objects ahead of time for sm_80/sm_90 (tests/test_kernels_compile.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

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
# Triton reads TRITON_INTERPRET when `@triton.jit` decorates (this module's import); so does this flag
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jit(fn=None, **options):
    """`triton.jit` (bare or with options such as do_not_specialize), or the plain function when triton is
    missing (it is then never launched)."""
    if fn is None:
        return lambda f: jit(f, **options)
    return triton.jit(fn, **options) if HAS_TRITON else fn


def interpreting() -> bool:
    """Whether the kernels were decorated as Triton interpreter functions (TRITON_INTERPRET=1 at import)."""
    return INTERPRETED


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
                           "TRITON_INTERPRET=1 in the environment before triton is imported (or pass "
                           "use_triton=None/False to use the PyTorch reference)")
    if unsupported is not None:
        raise ValueError(f"use_triton=True but the Triton {op} does not support these inputs: {unsupported}")
    return True


@dataclass
class Launch:
    """One kernel launch: `kernel[grid](*args, **constexprs, num_warps=, num_stages=)`. Pointer arguments are
    tensors (None for an absent optional tensor, read only under a constexpr False flag)."""
    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)
