"""Deployment: ONNX export of quantized models, ONNX Runtime execution and parity checks."""

from dfq.export.onnx import build_onnx, export_onnx

__all__ = ["build_onnx", "export_onnx"]
