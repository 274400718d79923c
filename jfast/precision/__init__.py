"""Precision: policies (which dtype parameters, computation and outputs live in) and loss scales for float16."""

from jfast.precision.loss_scale import (
  DynamicLossScale,
  LossScale,
  NoOpLossScale,
  StaticLossScale,
  all_finite,
  get_loss_scale,
  resolve_loss_scale,
  select_tree,
)
from jfast.precision.policy import PRESETS, Policy, get_policy

__all__ = [
  "PRESETS",
  "DynamicLossScale",
  "LossScale",
  "NoOpLossScale",
  "Policy",
  "StaticLossScale",
  "all_finite",
  "get_loss_scale",
  "get_policy",
  "resolve_loss_scale",
  "select_tree",
]
