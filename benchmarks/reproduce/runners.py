"""How each kind of reproduction job runs (in a worker process): build the loop, run it, report."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torchrl_depeff.algorithms import BREMEN, BREMENConfig, MB2PO, MB2POConfig, MUSBO, MUSBOConfig
from torchrl_depeff.algorithms.mb2po import make_native_env
from torchrl_depeff.data import load_behaviour_dataset

__all__ = ["RUNNERS"]

History = list[dict[str, float]]


def _bremen(job: Any, run_dir: Path) -> tuple[History, dict[str, Any]]:
    return BREMEN(BREMENConfig.from_dict(job.config), run_dir=run_dir).run(), {}


def _musbo(job: Any, run_dir: Path) -> tuple[History, dict[str, Any]]:
    return MUSBO(MUSBOConfig.from_dict(job.config), run_dir=run_dir).run(), {}


def _bremen_offline(job: Any, run_dir: Path) -> tuple[History, dict[str, Any]]:
    data = load_behaviour_dataset(job.extra["dataset"])
    algo = BREMEN(BREMENConfig.from_dict(job.config), run_dir=run_dir, dataset=data,
                  dataset_source=str(job.extra["dataset"]))
    return algo.run(), {}


def _mb2po(job: Any, run_dir: Path) -> tuple[History, dict[str, Any]]:
    cfg = MB2POConfig.from_dict(job.config)
    data = load_behaviour_dataset(job.extra["dataset"])
    algo = MB2PO(cfg, dataset=data, dataset_source=str(job.extra["dataset"]), run_dir=run_dir,
                 eval_env=make_native_env(cfg.task))
    history = algo.run()
    s = algo.summary()
    return history, {"awac_score": s["awac_score"], "awac_return": s["awac_return"]}


RUNNERS: dict[str, Callable[[Any, Path], tuple[History, dict[str, Any]]]] = {
    "bremen": _bremen,
    "musbo": _musbo,
    "bremen_offline": _bremen_offline,
    "mb2po": _mb2po,
}
