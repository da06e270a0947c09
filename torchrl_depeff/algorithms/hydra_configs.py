"""Hydra structured configs of the three algorithms, generated from the library's one copy.

:func:`register_configs` stores in Hydra's ``ConfigStore`` (nothing is written to disk):

* ``schema/<algo>``: the config dataclass itself (:class:`~torchrl_depeff.algorithms.BREMENConfig`,
  ``MUSBOConfig``, ``MB2POConfig``), so every command-line override is type-checked against its
  fields (``bremen.trpo.max_kl=abc`` and unknown keys are refused by OmegaConf) and the values
  are range-checked when the node becomes a dataclass (``OmegaConf.to_object``);
* ``table/<algo>_<preset>_<task>[_<budget>|_<dataset>]``: the full config of a preset, built by
  the library from the paper table (BREMEN Table 4, MUSBO Table 2, MB2PO App. 7.3) and our presets;
* ``variant/<name>``: the ablations of BREMEN (:data:`~torchrl_depeff.algorithms.VARIANTS`) and
  MUSBO (:data:`~torchrl_depeff.algorithms.MUSBO_VARIANTS`);
* ``task/<name>``, ``preset/<name>``, ``budget/<name>``, ``dataset/<name>``: the choices the
  examples interpolate in their defaults lists (``table: bremen_${preset}_${task}``).

Examples:
    >>> from hydra import compose, initialize_config_dir
    >>> from omegaconf import OmegaConf
    >>> from torchrl_depeff.algorithms.hydra_configs import register_configs, EXAMPLES_DIR
    >>> register_configs()
    >>> with initialize_config_dir(str(EXAMPLES_DIR / "bremen"), version_base="1.3"):
    ...     cfg = compose("config", overrides=["task=hopper", "preset=paper", "bremen.trpo.max_kl=0.01"])
    >>> algo_cfg = OmegaConf.to_object(cfg.bremen)
    >>> algo_cfg.trpo.iterations, algo_cfg.trpo.max_kl, algo_cfg.task
    (6000, 0.01, 'hopper')
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from torchrl_depeff.algorithms.bremen import BREMENConfig, PRESETS, VARIANTS
from torchrl_depeff.algorithms.mb2po import DATASETS, MB2PO_PRESETS, MB2POConfig
from torchrl_depeff.algorithms.musbo import BUDGETS, MUSBO_PAPER_HYPERPARAMETERS, MUSBO_PRESETS, MUSBO_VARIANTS, MUSBOConfig
from torchrl_depeff.envs.tasks import TASK_NAMES

__all__ = ["EXAMPLES_DIR", "register_configs"]

#: the repository's ``examples/`` directory (hydra ``config_path`` of the example scripts)
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

_REGISTERED = False


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in overrides.items():
        node = out
        *heads, leaf = path.split(".")
        for head in heads:
            node = node.setdefault(head, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return out


def register_configs() -> None:
    """Store the schemas, preset tables and variants in Hydra's ``ConfigStore`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    cs = ConfigStore.instance()
    cs.store(group="schema", name="bremen", node=BREMENConfig, package="bremen")
    cs.store(group="schema", name="musbo", node=MUSBOConfig, package="musbo")
    cs.store(group="schema", name="mb2po", node=MB2POConfig, package="mb2po")
    for task in TASK_NAMES:
        cs.store(group="task", name=task, node={"name": task})
    for preset in ("paper", *PRESETS):
        cs.store(group="preset", name=preset, node={"name": preset})
        for task in TASK_NAMES:
            cs.store(group="table", name=f"bremen_{preset}_{task}", package="bremen",
                     node=BREMENConfig.preset(task, preset).to_dict())
    for budget in BUDGETS:
        cs.store(group="budget", name=budget, node={"name": budget})
        for preset in ("paper", *MUSBO_PRESETS):
            for task in MUSBO_PAPER_HYPERPARAMETERS:
                cs.store(group="table", name=f"musbo_{preset}_{task}_{budget}", package="musbo",
                         node=MUSBOConfig.preset(task, preset, budget=budget).to_dict())
    for dataset in DATASETS:
        cs.store(group="dataset", name=dataset, node={"name": dataset})
        for preset in ("paper", *MB2PO_PRESETS):
            for task in ("halfcheetah", "hopper", "walker2d"):
                cs.store(group="table", name=f"mb2po_{preset}_{task}_{dataset}", package="mb2po",
                         node=MB2POConfig.preset(task, dataset, preset).to_dict())
    for name, overrides in VARIANTS.items():
        cs.store(group="variant", name=name, package="bremen", node={**_nested(overrides), "name": name})
    for name, overrides in MUSBO_VARIANTS.items():
        cs.store(group="variant", name=name, package="musbo", node={**_nested(overrides), "name": name})
    _REGISTERED = True
