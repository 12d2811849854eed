"""dfq: data-free quantization of neural networks.

Example:
    >>> import torch, dfq
    >>> from dfq.models import create_model
    >>> result = dfq.quantize(create_model("resnet20a_cifar10"), dfq.QuantConfig(wbits=8, abits=8),
    ...                       dfq.methods.ZeroQConfig(steps=2, num_samples=4), progress=False)
    >>> result.summary["method"]
    'zeroq'
"""

__version__ = "0.2.0"

from dfq import calibration, methods
from dfq.api import QuantizationResult, quantize, run
from dfq.deploy import export_onnx, synthesize
from dfq.methods import list_methods, register_method
from dfq.mixed import MixedConfig
from dfq.models import create_model, list_models
from dfq.quant import QuantConfig

__all__ = [
    "MixedConfig",
    "QuantConfig",
    "QuantizationResult",
    "__version__",
    "calibration",
    "create_model",
    "export_onnx",
    "list_methods",
    "list_models",
    "methods",
    "quantize",
    "register_method",
    "run",
    "synthesize",
]
