"""Data-free quantization methods: one protocol (:class:`Method`), one registry (:data:`METHODS`).

Importing this package registers the built-in methods. Each owns its math only; none sees real data.
"""

from dfq.methods import adadfq, cle, gdfq, gptq, recon, squant, zaq, zeroq  # noqa: F401  (registers methods)
from dfq.methods.adadfq import AdaDFQConfig, AdaSGConfig
from dfq.methods.base import (
    DEFAULT_METHOD,
    METHODS,
    Method,
    MethodContext,
    create_method,
    list_methods,
    method_class,
    method_of_config,
    register_method,
)
from dfq.methods.cle import CLEConfig
from dfq.methods.game import GameConfig, GameMethod, Outputs
from dfq.methods.gdfq import GDFQConfig
from dfq.methods.gptq import GPTQConfig
from dfq.methods.recon import ReconConfig
from dfq.methods.squant import SQuantConfig
from dfq.methods.zaq import ZAQConfig
from dfq.methods.zeroq import ZeroQConfig

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "AdaDFQConfig",
    "AdaSGConfig",
    "CLEConfig",
    "GDFQConfig",
    "GPTQConfig",
    "GameConfig",
    "GameMethod",
    "Method",
    "MethodContext",
    "Outputs",
    "ReconConfig",
    "SQuantConfig",
    "ZAQConfig",
    "ZeroQConfig",
    "create_method",
    "list_methods",
    "method_class",
    "method_of_config",
    "register_method",
]
