"""Optimisations as transforms on a plain model (STYLE rule 5): nothing here is threaded through model.py.

Each function takes a plain `nn.Module` (or callable) and returns the transformed one; the math is unchanged
(up to float reassociation for compile):

    use_kernels(m, use_triton)  which implementation every fused op runs (Triton kernels or PyTorch references)
    channels_last(m)            NHWC memory format for every 4-D parameter (oneDNN / cuDNN prefer it for convs)
    compile(m, freezing=...)    torch.compile (inductor); freezing constant-folds weights and weight-only
                                subgraphs (e.g. the relative-position bias of every block) and prepacks convs
    cuda_graph(fn, inputs)      capture one call on static buffers and replay it (CUDA only)
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ssdd_runtime.model import FusedOp


def use_kernels(model: nn.Module, use_triton: bool | None) -> nn.Module:
    """Set the kernel switch of every fused-op leaf once (the gpt-fast `setup_caches` pattern), in place.
    None: Triton on CUDA tensors when triton imports and the op supports the inputs, else the PyTorch reference;
    False: always the reference; True: always Triton (an error where it cannot run)."""
    if use_triton not in (None, True, False):
        raise TypeError(f"use_triton must be None, True or False, got {use_triton!r}")
    for m in model.modules():
        if isinstance(m, FusedOp):
            m.use_triton = use_triton
    return model


def channels_last(model: nn.Module) -> nn.Module:
    """Parameters of 4-D convs to channels_last in place; activations follow (PyTorch propagates the format)."""
    return model.to(memory_format=torch.channels_last)


def compile(model: nn.Module | Callable, *, freezing: bool = True, mode: str | None = None,
            dynamic: bool = False, fullgraph: bool = False) -> Callable:
    """torch.compile with inductor. freezing=True treats parameters as constants (inference only: call the
    result under torch.no_grad or torch.inference_mode). Compilation happens lazily on the first call."""
    options = {"freezing": freezing}
    return torch.compile(model, mode=mode, dynamic=dynamic, fullgraph=fullgraph, options=options)


def cuda_graph(fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor], *,
               warmup: int = 2) -> Callable[..., torch.Tensor]:
    """Capture `fn(*example_inputs)` into a CUDA graph. The returned callable copies its arguments into the
    captured input buffers, replays, and returns the output buffer (overwritten by the next call: clone it
    to keep it). Shapes, dtypes and devices must equal the examples."""
    if not torch.cuda.is_available():
        raise ValueError("cuda_graph needs CUDA; no CUDA device is available")
    static_in = [t.clone() for t in example_inputs]
    if not all(t.is_cuda for t in static_in):
        raise ValueError("cuda_graph needs CUDA tensors as example inputs")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # allocator and lazy init outside the capture
            fn(*static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_in)

    def replay(*args: torch.Tensor) -> torch.Tensor:
        if len(args) != len(static_in):
            raise ValueError(f"expected {len(static_in)} inputs, got {len(args)}")
        for dst, src in zip(static_in, args):
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(f"input {tuple(src.shape)} {src.dtype} differs from the captured "
                                 f"{tuple(dst.shape)} {dst.dtype}")
            dst.copy_(src)
        graph.replay()
        return static_out

    return replay
