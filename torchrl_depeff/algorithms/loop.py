"""One deployment loop for BREMEN, MUSBO and MB2PO, built by composition.

A deployment-efficient run repeats five phases per deployment (BREMEN Alg. 1, MUSBO Alg. 1,
MB2PO Alg. 1 with a single, offline "deployment"):

``collect`` -> ``fit`` -> ``pretrain`` -> ``optimize`` -> ``evaluate``

:class:`DeploymentLoop` owns their order, the deployment counter, checkpoint/resume (after every
phase, and inside long phases), logging and the history of per-deployment metrics. What each
phase *does* is given to it as small strategy objects:

* ``source`` (collect): :class:`~torchrl_depeff.algorithms.components.RealEnvDeployments` (a
  frozen copy of the policy in the real env, behind the deployment gate, optionally with an
  exploration strategy) or :class:`~torchrl_depeff.algorithms.components.OfflineDataset`;
* ``models`` (fit): named model fits, e.g. the dynamics ensemble (and MUSBO's labeler);
* ``initializer`` (pretrain): BC re-initialisation (with an optional per-sample weighting) or
  AWAC pre-training;
* ``improver`` (optimize): TRPO on imaginary rollouts (loss factory, rollout labeller) or MB2PO's
  conservative fine-tuning (with its real/model data mixing);
* ``evaluator`` (evaluate): real-env returns plus optional analysis metrics.

Every strategy has ``run(loop) -> dict[str, float]`` (``fit(loop)`` for models, ``collect(loop)``
for sources) and ``state_dict()`` / ``load_state_dict()``; it reads what it needs from the loop
(``loop.actor``, ``loop.buffers``, ``loop.deployment``, ``loop.models``, ...).

Phase methods can be called one by one, in order, from a user's own loop. Each call runs its
phase, stores its metrics, advances the phase pointer and checkpoints. Calling a phase that this
deployment already ran (e.g. after a resume) returns its stored metrics without running it again;
calling one whose predecessors have not run raises ``RuntimeError`` naming the missing phase.
:meth:`DeploymentLoop.end_deployment` closes a deployment (history, logging, counters).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torchrl._utils import logger as torchrl_logger

from torchrl_depeff.algorithms.common import config_diff
from torchrl_depeff.data.deployments import DeploymentReplayBuffers
from torchrl_depeff.io import atomic_save, load_checkpoint, write_json_atomic

__all__ = ["DeploymentLoop", "PHASES", "CHECKPOINT_FORMAT"]

PHASES: tuple[str, ...] = ("collect", "fit", "pretrain", "optimize", "evaluate")

#: version of the checkpoint layout written by :meth:`DeploymentLoop.state_dict`
CHECKPOINT_FORMAT = 2


class DeploymentLoop:
    """The deployment loop (see the module doc): phases, gate, checkpoints, logging, history.

    Algorithms (:class:`~torchrl_depeff.algorithms.BREMEN`, ``MUSBO``, ``MB2PO``) are
    configurations of this class: they build the strategies from their config and pass them in.

    Args:
        config: the algorithm config (stored in checkpoints; a resumed run must match it).

    Keyword Args:
        actor (nn.Module): the policy that is trained and deployed.
        buffers (DeploymentReplayBuffers): the on-disk data of the run.
        source: collect-phase strategy (``collect(loop) -> metrics``).
        models (Mapping[str, Any]): fit-phase strategies (``fit(loop) -> metrics``), run in order.
        initializer: pretrain-phase strategy (``run(loop) -> metrics``), or ``None``.
        improver: optimize-phase strategy (``run(loop) -> metrics``), or ``None``.
        evaluator: evaluate-phase strategy (``run(loop) -> metrics``), or ``None``.
        num_deployments (int): deployments of a full :meth:`run`.
        run_dir (str | Path, optional): if given, ``checkpoint.pt`` is written there after every
            phase and ``metrics.json`` after every deployment, and :meth:`resume` reads them.
        checkpoint_fn (Callable[[DeploymentLoop], None], optional): called at every checkpoint
            (in addition to ``run_dir``'s file).
        logger (torchrl Logger, optional): receives every metric (``log_scalar``).
        progress (bool): tqdm bars in the strategies. Defaults to ``False``.
        device (torch.device | str): device of the learner (policy, models). Defaults to CPU.
        name (str): algorithm name stored in checkpoints. Defaults to the class name.

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms import BREMEN, BREMENConfig
        >>> cfg = BREMENConfig.tiny()
        >>> loop = BREMEN(cfg, run_dir=tempfile.mkdtemp())
        >>> _ = loop.collect(); _ = loop.fit_model(); _ = loop.pretrain()
        >>> _ = loop.optimize_policy(); _ = loop.evaluate()
        >>> metrics = loop.end_deployment()
        >>> metrics["deployment/count"], loop.deployment, loop.phase
        (1, 1, 'collect')
    """

    def __init__(
        self,
        config: Any,
        *,
        actor: torch.nn.Module,
        buffers: DeploymentReplayBuffers,
        source: Any,
        models: Mapping[str, Any],
        initializer: Any | None,
        improver: Any | None,
        evaluator: Any | None,
        num_deployments: int,
        run_dir: str | Path | None = None,
        checkpoint_fn: Callable[[DeploymentLoop], None] | None = None,
        logger: Any | None = None,
        progress: bool = False,
        device: torch.device | str = "cpu",
        name: str | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.actor = actor
        self.buffers = buffers
        self.source = source
        self.models = dict(models)
        self.initializer = initializer
        self.improver = improver
        self.evaluator = evaluator
        self.num_deployments = int(num_deployments)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.checkpoint_fn = checkpoint_fn
        self.logger = logger
        self.progress = bool(progress)
        self.name = name or type(self).__name__
        self.deployment = 0
        self.phase = PHASES[0]
        self.history: list[dict[str, float]] = []
        self._phase_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint_path(self) -> Path | None:
        """``run_dir/checkpoint.pt`` (``None`` without a ``run_dir``)."""
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path | None:
        """``run_dir/metrics.json``: one entry per finished deployment."""
        return None if self.run_dir is None else self.run_dir / "metrics.json"

    # ------------------------------------------------------------------ context for strategies
    @property
    def deployed_policy(self) -> torch.nn.Module | None:
        """The frozen copy currently deployed in the real env (``None`` before the first)."""
        return getattr(self.source, "deployed_policy", None)

    @property
    def reference_policy(self) -> torch.nn.Module | None:
        """The frozen behaviour-cloned policy of this deployment (``None`` before BC / without BC)."""
        return getattr(self.initializer, "bc_actor", None)

    @property
    def metrics(self) -> dict[str, float]:
        """Metrics of the current deployment so far (all phases run)."""
        out: dict[str, float] = {}
        for phase in PHASES:
            out.update(self._phase_metrics.get(phase, {}))
        return out

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Send scalars to the logger (if any)."""
        if self.logger is None:
            return
        for key, value in values.items():
            self.logger.log_scalar(key, float(value), step=step)

    def checkpoint(self) -> None:
        """Write ``run_dir/checkpoint.pt`` atomically (if ``run_dir``) and call ``checkpoint_fn``."""
        if self.checkpoint_path is not None:
            atomic_save(self.state_dict(), self.checkpoint_path)
        if self.checkpoint_fn is not None:
            self.checkpoint_fn(self)

    # ------------------------------------------------------------------ phases
    def _run_phase(self, phase: str, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        current = PHASES.index(self.phase)
        index = PHASES.index(phase)
        if index < current:
            torchrl_logger.info(
                f"{self.name}: phase {phase!r} of deployment {self.deployment} already ran (resumed run)"
            )
            return dict(self._phase_metrics.get(phase, {}))
        if index > current:
            raise RuntimeError(
                f"{self.name}: phase {phase!r} of deployment {self.deployment} cannot run before "
                f"phase {self.phase!r} (order: {' -> '.join(PHASES)})"
            )
        t0 = time.perf_counter()
        metrics = dict(fn() or {})
        metrics[f"time/{phase}_s"] = time.perf_counter() - t0
        self._phase_metrics[phase] = metrics
        self.phase = PHASES[index + 1] if index + 1 < len(PHASES) else "done"
        self.checkpoint()
        return dict(metrics)

    def collect(self) -> dict[str, float]:
        """Collect phase: the source's new data (a deployment, or the offline dataset)."""
        return self._run_phase("collect", lambda: self.source.collect(self))

    def fit_model(self) -> dict[str, float]:
        """Fit phase: every model strategy, in order, on the data so far."""

        def fit() -> dict[str, float]:
            out: dict[str, float] = {}
            for model in self.models.values():
                out.update(model.fit(self))
            return out

        return self._run_phase("fit", fit)

    def pretrain(self) -> dict[str, float]:
        """Pretrain phase: behaviour cloning / policy re-initialisation, or AWAC pre-training."""
        return self._run_phase("pretrain", lambda: self.initializer.run(self) if self.initializer else {})

    def optimize_policy(self) -> dict[str, float]:
        """Optimize phase: policy optimisation on model data (TRPO, MB2PO fine-tuning)."""
        return self._run_phase("optimize", lambda: self.improver.run(self) if self.improver else {})

    def evaluate(self) -> dict[str, float]:
        """Evaluate phase: real-env returns of the policy and analysis metrics (not a deployment)."""
        return self._run_phase("evaluate", lambda: self.evaluator.run(self) if self.evaluator else {})

    def end_deployment(self) -> dict[str, float]:
        """Close the deployment: its metrics go to :attr:`history`, the logger and ``metrics.json``.

        Returns the deployment's metrics (every phase's, plus ``deployment/count`` and
        ``deployment/samples``).
        """
        if self.phase != "done":
            raise RuntimeError(
                f"{self.name}: deployment {self.deployment} is not finished: phase {self.phase!r} has not run"
            )
        metrics = self.metrics
        metrics["deployment/count"] = self.deployment + 1
        metrics["deployment/samples"] = len(self.buffers)
        self.history.append(metrics)
        self.log(metrics, step=len(self.buffers))
        self.deployment += 1
        self._phase_metrics = {}
        self.phase = PHASES[0]
        for strategy in (self.source, *self.models.values(), self.initializer, self.improver, self.evaluator):
            reset = getattr(strategy, "end_deployment", None)
            if reset is not None:
                reset(self)
        if self.metrics_path is not None:
            write_json_atomic(self.history, self.metrics_path)
        self.checkpoint()
        return metrics

    def deployment_step(self) -> dict[str, float]:
        """Run (or finish, after a resume) one deployment: the five phases, then :meth:`end_deployment`."""
        self.collect()
        self.fit_model()
        self.pretrain()
        self.optimize_policy()
        self.evaluate()
        return self.end_deployment()

    def run(self) -> list[dict[str, float]]:
        """Deployments until ``num_deployments`` are done; returns :attr:`history`."""
        while self.deployment < self.num_deployments:
            self.deployment_step()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def _strategies(self) -> dict[str, Any]:
        out = {"source": self.source, "initializer": self.initializer, "improver": self.improver,
               "evaluator": self.evaluator}
        out.update({f"model.{k}": v for k, v in self.models.items()})
        return {k: v for k, v in out.items() if v is not None and hasattr(v, "state_dict")}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; the data stays in :attr:`buffers` on disk.

        Only tensors, numbers, strings, lists and dicts: loadable with
        ``torch.load(..., weights_only=True)``.
        """
        return {
            "format": CHECKPOINT_FORMAT,
            "algorithm": self.name,
            "config": self.config.to_dict(),
            "counters": {
                "deployment": self.deployment,
                "phase": self.phase,
                "num_deployments_on_disk": self.buffers.num_deployments,
            },
            "phase_metrics": {k: dict(v) for k, v in self._phase_metrics.items()},
            "history": [dict(h) for h in self.history],
            "actor": self.actor.state_dict(),
            "strategies": {k: v.state_dict() for k, v in self._strategies().items()},
            "rng": {"torch": torch.get_rng_state()},
        }

    #: config paths that may differ between a checkpoint and the resuming run (run extensions)
    resumable_changes: tuple[str, ...] = ("deployment.num_deployments",)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; refuses a checkpoint of another algorithm or config.

        A config field the checkpoint lacks (added to the config class after it was written)
        counts as the field's default: a run saved before the field existed resumes when the
        current value is that default.

        Raises:
            ValueError: the checkpoint was written by another algorithm, another config (the
                differing keys are named) or an older checkpoint format.
            RuntimeError: fewer deployments on disk than the checkpoint expects.
        """
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint format {state.get('format', 1)!r} is not {CHECKPOINT_FORMAT}: it was written by "
                "torchrl_depeff 0.1, whose runs cannot be resumed by this version. Start a new run "
                "directory; the deployments of the old run can still be read with "
                "DeploymentReplayBuffers(<old run>/deployments) (e.g. for an offline run)."
            )
        if state["algorithm"] != self.name:
            raise ValueError(f"checkpoint was written by {state['algorithm']}, not {self.name}")
        diff = config_diff(_flatten(state["config"]), _flatten(self.config.to_dict()),
                           ignore=self.resumable_changes, defaults=_class_defaults(self.config))
        if diff:
            raise ValueError(
                "checkpoint was written with a different config; differing keys (saved -> current): "
                + ", ".join(f"{k}={v[0]!r}->{v[1]!r}" for k, v in diff.items())
            )
        counters = state["counters"]
        if self.buffers.num_deployments < counters["num_deployments_on_disk"]:
            raise RuntimeError(
                f"checkpoint expects {counters['num_deployments_on_disk']} deployments on disk, "
                f"found {self.buffers.num_deployments} under {self.buffers.root}"
            )
        self.actor.load_state_dict(state["actor"])
        strategies = self._strategies()
        missing = sorted(set(strategies) - set(state["strategies"]))
        if missing:
            raise ValueError(f"checkpoint has no state for {missing}")
        for key, strategy in strategies.items():
            strategy.load_state_dict(state["strategies"][key])
        self.deployment = int(counters["deployment"])
        self.phase = str(counters["phase"])
        self._phase_metrics = {k: dict(v) for k, v in state["phase_metrics"].items()}
        self.history = [dict(h) for h in state["history"]]
        torch.set_rng_state(state["rng"]["torch"])

    def resume(self) -> bool:
        """Load ``run_dir/checkpoint.pt`` if it exists; returns whether a run was resumed."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        self.load_state_dict(load_checkpoint(path))
        torchrl_logger.info(
            f"{self.name}: resumed {self.run_dir} at deployment {self.deployment}, phase {self.phase!r}"
        )
        return True


def _class_defaults(config: Any) -> dict[str, Any]:
    """Flat default values of ``config``'s class (``{}`` when it cannot be built without arguments)."""
    try:
        default = type(config)()
    except TypeError:
        return {}
    return _flatten(default.to_dict())


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out

