"""Deployment loops built by composition: BREMEN (Alg. 1 and 2), MUSBO and MB2PO.

:class:`DeploymentLoop` owns the phases (collect -> fit -> pretrain -> optimize -> evaluate),
checkpoints, resume and logging; :class:`BREMEN`, :class:`MUSBO` and :class:`MB2PO` are
configurations of it built from the strategies of :mod:`~torchrl_depeff.algorithms.components`.
"""
from __future__ import annotations

from torchrl_depeff.algorithms.bremen import (
    BREMEN,
    BREMENConfig,
    PAPER_HYPERPARAMETERS,
    PRESETS,
    TABLE4_COLUMNS,
    VARIANTS,
)
from torchrl_depeff.algorithms.common import (
    atomic_save,
    completed_episode_returns,
    config_diff,
    episode_start_states,
    load_checkpoint,
    write_json_atomic,
)
from torchrl_depeff.algorithms.components import (
    BehaviourCloning,
    EnsembleFit,
    ImaginaryTRPO,
    OfflineDataset,
    RealEnvDeployments,
    RealEnvEvaluation,
    trpo_loss_factory,
)
from torchrl_depeff.algorithms.config import (
    BCConfig,
    DeploymentConfig,
    EvalConfig,
    ImaginationConfig,
    ModelConfig,
    PolicyConfig,
    TRPOConfig,
)
from torchrl_depeff.algorithms.loop import DeploymentLoop, PHASES
from torchrl_depeff.algorithms.mb2po import (
    MB2PO,
    MB2PO_PAPER_HYPERPARAMETERS,
    MB2POConfig,
)
from torchrl_depeff.algorithms.musbo import (
    BUDGETS,
    deployment_analysis,
    MUSBO,
    MUSBO_PAPER_HYPERPARAMETERS,
    MUSBO_VARIANTS,
    MUSBOConfig,
)

__all__ = [
    "BCConfig",
    "BREMEN",
    "BREMENConfig",
    "BUDGETS",
    "BehaviourCloning",
    "DeploymentConfig",
    "DeploymentLoop",
    "EnsembleFit",
    "EvalConfig",
    "ImaginaryTRPO",
    "ImaginationConfig",
    "MB2PO",
    "MB2POConfig",
    "MB2PO_PAPER_HYPERPARAMETERS",
    "MUSBO",
    "MUSBOConfig",
    "MUSBO_PAPER_HYPERPARAMETERS",
    "MUSBO_VARIANTS",
    "ModelConfig",
    "OfflineDataset",
    "PAPER_HYPERPARAMETERS",
    "PHASES",
    "PRESETS",
    "PolicyConfig",
    "RealEnvDeployments",
    "RealEnvEvaluation",
    "TABLE4_COLUMNS",
    "TRPOConfig",
    "VARIANTS",
    "atomic_save",
    "completed_episode_returns",
    "config_diff",
    "deployment_analysis",
    "episode_start_states",
    "load_checkpoint",
    "trpo_loss_factory",
    "write_json_atomic",
]
