"""Deployment: ONNX export of quantized models, ONNX Runtime execution and parity checks."""

from dfq.export.onnx import build_onnx, write_onnx

__all__ = ["build_onnx", "write_onnx"]
