"""dfq: data-free quantization of neural networks."""

__version__ = "0.1.0"
