"""Data-free mixed precision: per-tensor sensitivities on a synthetic pool, an exact integer program for the
bits under size and bit-operation budgets, and the allocation handed to any method as per-layer overrides."""

from dfq.mixed.allocate import Allocation, MixedConfig, allocate, parse_bops, parse_size, parse_uniform, tensors_of
from dfq.mixed.sensitivity import Sensitivity, measure_sensitivity
from dfq.mixed.solve import Problem, solve
from dfq.mixed.tensors import Choice, ModelTensors, bits_of, cost_summary, model_tensors

__all__ = [
    "Allocation",
    "Choice",
    "MixedConfig",
    "ModelTensors",
    "Problem",
    "Sensitivity",
    "allocate",
    "bits_of",
    "cost_summary",
    "measure_sensitivity",
    "model_tensors",
    "parse_bops",
    "parse_size",
    "parse_uniform",
    "solve",
    "tensors_of",
]
