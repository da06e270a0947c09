"""envs of torchrl_depeff."""
from __future__ import annotations
