"""What the ONNX export's graph walk keeps for each traced tensor."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QTensor", "Value"]


@dataclass
class QTensor:
    """An integer tensor and the per-tensor grid it lives on."""

    name: str
    scale: float
    scale_name: str
    zp_name: str


@dataclass
class Value:
    """What an fx node computed: a float tensor, an integer one, or both."""

    float_name: str | None = None
    q: QTensor | None = None
