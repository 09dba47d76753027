"""Checkpoint validation for adaq's sm_89 kernels and the VRAM budget of serving it (`adaq validate`)."""

from adaq.formats.shapes import ModelShape
from adaq.validate.budget import Budget, Gpu, WeightBytes, estimate_weight_bytes, plan
from adaq.validate.tensors import Finding
from adaq.validate.validator import ValidationReport, check_checkpoint, validate_checkpoint

__all__ = ["Budget", "Finding", "Gpu", "ModelShape", "ValidationReport", "WeightBytes", "check_checkpoint",
           "estimate_weight_bytes", "plan", "validate_checkpoint"]
