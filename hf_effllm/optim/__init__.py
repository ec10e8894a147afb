"""Optimizers for ``transformers.Trainer``; importing this package registers ``optim="muon"``.

Example:
    >>> import hf_effllm
    >>> args = TrainingArguments("out", optim="muon", optim_args="momentum=0.95")  # doctest: +SKIP
"""

from __future__ import annotations

from .muon import Muon, MuonConfig, classify_parameters, register_trainer_optimizer
from .newton_schulz import NS_COEFFICIENTS, newton_schulz

register_trainer_optimizer()

__all__ = [
    "NS_COEFFICIENTS",
    "Muon",
    "MuonConfig",
    "classify_parameters",
    "newton_schulz",
    "register_trainer_optimizer",
]
