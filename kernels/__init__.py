"""Fused inference ops of the SSDD decoder, each a dispatch function ending in its PyTorch reference.

Installed as `ssdd_runtime.kernels`. One kernel family per file: `attention.py` (windowed relative-position
attention), `group_norm.py` (adaptive GroupNorm + SiLU), `layer_norm.py` (AdaLN and the affine
LayerNorm). `_dispatch.py` holds the Triton-or-reference switch and `Launch`; `aot.py` compiles every launch the
CUDA launchers would make for sm_80/sm_90 without a GPU (the compile gate and the static report).
"""
from ssdd_runtime.kernels.attention import relative_position_bias, window_attention, window_attention_ref
from ssdd_runtime.kernels.group_norm import ada_group_norm, ada_group_norm_ref
from ssdd_runtime.kernels.layer_norm import (ada_layer_norm, ada_layer_norm_ref, affine_layer_norm,
                                             affine_layer_norm_ref)

__all__ = ["window_attention", "window_attention_ref", "relative_position_bias", "ada_group_norm",
           "ada_group_norm_ref", "ada_layer_norm", "ada_layer_norm_ref", "affine_layer_norm",
           "affine_layer_norm_ref"]
