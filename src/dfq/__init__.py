"""dfq: data-free quantization of neural networks.

Example:
    >>> import dfq
    >>> from dfq.models import create_model
    >>> p = create_model("resnet20a_cifar10")
    >>> q, summary = dfq.quantize(p, method="zeroq", wbits=8, abits=8, progress=False,
    ...                           **{"zeroq.steps": 2, "zeroq.num_samples": 4})
"""

__version__ = "0.1.0"

from dfq.api import quantize

__all__ = ["__version__", "quantize"]
