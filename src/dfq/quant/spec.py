"""Typed descriptions of a quantization scheme (no tensors, no state)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dfq.errors import DFQError

__all__ = ["VALID_BITS", "Granularity", "QuantSpec", "check_bits"]

# 2-8 bits are real low-bit settings; 16 and 32 exist to check that quantization
# at (near) float precision changes nothing.
VALID_BITS = frozenset({2, 3, 4, 5, 6, 7, 8, 16, 32})


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"  # along axis 0 (output channels of a weight)


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit-width, with a message a user can act on."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise DFQError(f"{what} must be an integer from 2 to 8 (16 and 32 are accepted as no-op checks), got {bits!r}")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        bits: bit-width of the integer grid.
        symmetric: zero point fixed at 0 (signed narrow grid, or unsigned when
            the range is non-negative) instead of an affine min/max grid.
        granularity: one range per tensor or per output channel.
        deploy: integer-runtime semantics (the deploy protocol): ``x / scale`` as ONNX
            ``QuantizeLinear`` computes it rather than ``x * (1 / scale)`` as the papers and
            ``torch.fake_quantize_*`` do, signed weight grids, and activation steps kept
            off exact ties (see ``ActQuantizer.qparams``).
    """

    bits: int
    symmetric: bool = False
    granularity: Granularity = Granularity.PER_TENSOR
    deploy: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        object.__setattr__(self, "granularity", Granularity(self.granularity))

    @property
    def is_noop(self) -> bool:
        """32-bit "quantization" is the identity: float32 has only 24 mantissa bits."""
        return self.bits >= 32
