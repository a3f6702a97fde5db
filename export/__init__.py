"""Deployment exports of SSDD: ONNX graphs (ONNX Runtime), TensorRT engines, Triton Inference Server repositories.

Installed as `ssdd_runtime.export`. Heavy packages (onnx, onnxruntime, onnxscript, tensorrt) are imported only by
the functions that need them.
"""
from ssdd_runtime.export.onnx import convert_to_fp16, convert_to_graph_noise, export_onnx, verify_onnx
from ssdd_runtime.export.tensorrt import TensorRTDecoder, TensorRTRunner, build_engine, make_profile, trtexec_command
from ssdd_runtime.export.triton_repo import write_triton_repo

__all__ = ["export_onnx", "verify_onnx", "convert_to_fp16", "convert_to_graph_noise", "make_profile",
           "trtexec_command", "build_engine", "TensorRTRunner", "TensorRTDecoder", "write_triton_repo"]
