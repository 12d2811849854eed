"""Data-free quantization methods. Each owns its math only; none sees real data."""

from dfq.methods.zeroq import ZeroQConfig, distill_inputs, zeroq

__all__ = ["ZeroQConfig", "distill_inputs", "zeroq"]
