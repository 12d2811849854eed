"""Data-free quantization methods. Each owns its math only; none sees real data.

Importing this package registers every generator-based method.
"""

from dfq.methods import adadfq, gdfq, zaq  # noqa: F401  (registers methods)
from dfq.methods.base import GameMethod, Outputs, create_method, list_methods, method_class, register_method
from dfq.methods.zeroq import ZeroQConfig, distill_inputs, zeroq

__all__ = [
    "GameMethod",
    "Outputs",
    "ZeroQConfig",
    "create_method",
    "distill_inputs",
    "list_methods",
    "method_class",
    "register_method",
    "zeroq",
]
