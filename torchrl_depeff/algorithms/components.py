"""The strategies a :class:`~torchrl_depeff.algorithms.loop.DeploymentLoop` is built from.

Shared by BREMEN, MUSBO and MB2PO (their own strategies live in their modules):

* collect: :class:`RealEnvDeployments` (frozen policy in the real env, gate, exploration hook),
  :class:`OfflineDataset` (Alg. 2 / MB2PO: a fixed dataset, stored once);
* fit: :class:`EnsembleFit` (any :class:`~torchrl_depeff.modules.DynamicsEnsemble` with its
  :class:`~torchrl_depeff.trainers.EnsembleTrainer`);
* pretrain: :class:`BehaviourCloning` (BREMEN eq. 3 and the Alg. 1 l. 6 re-initialisation, with
  a pluggable per-sample weighting, MUSBO eq. 11);
* optimize: :class:`ImaginaryTRPO` (BREMEN eq. 2 + 4: a loss factory, a rollout labeller,
  per-batch metrics, the App. E penalties);
* evaluate: :class:`RealEnvEvaluation` (policy mean in a separate real env; extra analyses).

Each strategy reads the loop's shared objects (``loop.actor``, ``loop.buffers``,
``loop.deployment``, ``loop.models``, ``loop.deployed_policy``, ``loop.reference_policy``) and
keeps its own state in ``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

import copy
import hashlib
import math
from typing import Any, Callable, Protocol, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl._utils import logger as torchrl_logger
from torchrl.envs import EnvBase, TransformedEnv
from torchrl.envs.transforms import Compose
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives.utils import ValueEstimators

from torchrl_depeff.collectors.deployment import DeploymentCollector, freeze_policy, policy_hash
from torchrl_depeff.collectors.gate import DeploymentGate
from torchrl_depeff.data.datasets import validate_offline_dataset
from torchrl_depeff.data.episodes import completed_episode_returns, episode_start_states
from torchrl_depeff.envs.model_env import EnsembleModelEnv, _deterministic_call
from torchrl_depeff.envs.penalties import HardUncertaintyPenalty, SoftUncertaintyPenalty
from torchrl_depeff.envs.vector import NativeVectorEnv
from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.modules.baselines import LinearFeatureBaseline
from torchrl_depeff.modules.distributions import mean_policy_kl as _mean_policy_kl
from torchrl_depeff.objectives.bc import train_bc
from torchrl_depeff.objectives.trpo import TRPOLoss, trpo_step
from torchrl_depeff.optim.trust_region import ConjugateGradientTrustRegion
from torchrl_depeff.trainers.dynamics import EnsembleTrainer

__all__ = [
    "BehaviourCloning",
    "EnsembleFit",
    "ExplorationStrategy",
    "ImaginaryTRPO",
    "OfflineDataset",
    "RealEnvDeployments",
    "RealEnvEvaluation",
    "mean_policy_kl",
    "sample_states",
]


# ====================================================================
# Small shared helpers
# --------------------------------------------------------------------


def mean_policy_kl(p: nn.Module, q: nn.Module, states: TensorDictBase) -> float:
    """Mean ``KL(p || q)`` of two actors over ``states`` (BREMEN Fig. 4 / Fig. 13), as a float.

    :func:`torchrl_depeff.modules.mean_policy_kl` (closed form, or Monte-Carlo for e.g. ``TanhNormal``).
    """
    with torch.no_grad():
        return float(_mean_policy_kl(p, q, states))


def sample_states(
    data: TensorDictBase, seed: int, max_states: int = 5000, device: torch.device | str = "cpu"
) -> TensorDict:
    """Up to ``max_states`` observations of ``data`` drawn without replacement with ``seed``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.components import sample_states
        >>> data = TensorDict(observation=torch.arange(10.0).unsqueeze(-1), batch_size=[10])
        >>> sample_states(data, seed=0, max_states=3).shape
        torch.Size([3])
    """
    n = data.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(n, max_states)].to(device)
    return TensorDict({"observation": data["observation"][idx]}, batch_size=[idx.numel()])


def _dataset(loop: Any, which: str | int = "all") -> TensorDict:
    return loop.buffers.as_tensordict(which).to(loop.device)


def kl_states(loop: Any, which: str = "latest") -> TensorDict:
    """The states on which the loop measures policy KLs (gate, Fig. 4): 5000 of ``which`` data."""
    return sample_states(_dataset(loop, which), loop.config.seed + 7919 * (loop.deployment + 1), device=loop.device)


def fingerprint(data: TensorDictBase) -> str:
    """A sha256 of a TensorDict's keys, shapes, dtypes and values (dataset identity on resume).

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.components import fingerprint
        >>> a = TensorDict(x=torch.zeros(3), batch_size=[3])
        >>> fingerprint(a) == fingerprint(a.clone()), fingerprint(a) == fingerprint(a + 1)
        (True, False)
    """
    h = hashlib.sha256()
    for key in sorted(data.keys(include_nested=True, leaves_only=True), key=str):
        value = data.get(key).detach().cpu().contiguous()
        h.update(f"{key}|{tuple(value.shape)}|{value.dtype}".encode())
        h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


# ====================================================================
# collect
# --------------------------------------------------------------------


class ExplorationStrategy(Protocol):
    """Deployment-time exploration (collect phase), e.g. MUSBO eq. (22).

    ``module(loop)`` returns ``(module, exploration_type)``: a module appended after the frozen
    policy (or ``None``) and the exploration type the policy is run with. ``metrics(loop)`` is
    called after the deployment is stored.
    """

    def module(self, loop: Any) -> tuple[nn.Module | None, ExplorationType]: ...

    def metrics(self, loop: Any) -> dict[str, float]: ...


class RealEnvDeployments:
    """Collect phase of BREMEN Alg. 1 l. 3: deploy a frozen copy of the policy, store ``B`` rows.

    From the second deployment on the :class:`~torchrl_depeff.collectors.DeploymentGate` checks
    the candidate against the deployed policy on the latest data's states; on failure the run
    stops (:class:`~torchrl_depeff.collectors.DeploymentRefused`) or the last policy is
    redeployed (``on_fail="fallback"``). The frozen copy and its version live in a
    :class:`~torchrl_depeff.collectors.DeploymentCollector`. A deployment already on disk (a run
    killed after writing it) is reused after checking that the same policy collected it.

    Args:
        env (EnvBase | Callable[[], EnvBase]): the real env (or a factory for worker processes).
        actor (nn.Module): the learner's policy (its initial weights are deployment 0's).

    Keyword Args:
        size (int): ``B`` transitions per deployment.
        gate (DeploymentGate): the pre-deployment checks.
        seed (int): deployment ``k`` collects with seed ``seed + 1000 * (k + 1)``.
        exploration (ExplorationStrategy, optional): deployment-time exploration.
        progress (bool): collection progress bar.
        **collect_kwargs: forwarded to :func:`~torchrl_depeff.collectors.collect_deployment`
            (``frames_per_batch``, ``collector``, ``num_workers``, ``max_retries``, ...).
    """

    def __init__(
        self,
        env: EnvBase | Callable[[], EnvBase],
        actor: nn.Module,
        *,
        size: int,
        gate: DeploymentGate,
        seed: int,
        exploration: ExplorationStrategy | None = None,
        progress: bool = False,
        **collect_kwargs: Any,
    ) -> None:
        self.env = env
        self.size = int(size)
        self.gate = gate
        self.seed = int(seed)
        self.exploration = exploration
        self.collector = DeploymentCollector(_cpu_copy(actor), env, progress=progress, **collect_kwargs)
        self.deployed = False  # becomes True once deployment 0 ran

    @property
    def deployed_policy(self) -> nn.Module | None:
        """The frozen policy of the last deployment (``None`` before the first)."""
        return self.collector.frozen_policy if self.deployed else None

    @property
    def policy_version(self) -> int:
        return self.collector.policy_version

    def collect(self, loop: Any) -> dict[str, float]:
        k = loop.deployment
        saved = self.collector.state_dict()
        gate_info: dict[str, float] = {}
        if self.deployed:
            report = self.gate.check(loop.actor, self.collector.frozen_policy.to(loop.device), kl_states(loop))
            self.collector.frozen_policy.to("cpu")
            gate_info = {"gate/passed": float(report.passed)}
            if report.kl is not None:
                gate_info["gate/kl"] = report.kl
            if report.fallback:
                torchrl_logger.warning(f"deployment {k}: gate refused the new policy, redeploying the last one")
            else:
                self.collector.deploy(_cpu_copy(loop.actor))
        try:
            digest = self.collector.policy_hash
            if loop.buffers.num_deployments > k:
                meta = loop.buffers.metadata(k)
                if meta.get("policy_hash") != digest:
                    raise RuntimeError(
                        f"deployment {k} on disk was collected by policy {meta.get('policy_hash')!r}, "
                        f"but this run would deploy {digest!r}: the data directory belongs to another run"
                    )
                torchrl_logger.info(f"deployment {k} already on disk (resumed run): not collected again")
                n = int(meta["num_rows"])
            else:
                module, exploration_type = (None, ExplorationType.RANDOM)
                if self.exploration is not None:
                    module, exploration_type = self.exploration.module(loop)
                data, info = self.collector.collect(
                    self.size, deployment=k, seed=self.seed + 1000 * (k + 1), exploration=module,
                    exploration_type=exploration_type,
                )
                loop.buffers.add_deployment(data, policy_version=self.collector.policy_version, metadata=info)
                n = data.shape[0]
            if n != self.size:
                raise RuntimeError(f"deployment {k} holds {n} transitions, expected {self.size}")
        except BaseException:
            self.collector.load_state_dict(saved)
            raise
        self.deployed = True
        returns = completed_episode_returns(loop.buffers.as_tensordict("latest"))
        out = {
            **gate_info,
            "deployment/policy_version": float(self.collector.policy_version),
            "deployment/return_mean": float(returns.mean()) if returns.numel() else math.nan,
            "deployment/episodes": float(returns.numel()),
        }
        if self.exploration is not None:
            out.update(self.exploration.metrics(loop))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"collector": self.collector.state_dict(), "deployed": self.deployed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.collector.load_state_dict(state["collector"])
        self.deployed = bool(state["deployed"])


def _cpu_copy(module: nn.Module) -> nn.Module:
    """``module`` itself on CPU, or a CPU deep copy of it (collection runs on CPU)."""
    param = next(iter(module.parameters()), None)
    if param is None or param.device.type == "cpu":
        return module
    return copy.deepcopy(module).to("cpu")


class OfflineDataset:
    """Collect phase of BREMEN Alg. 2 and MB2PO: store a fixed dataset once as deployment 0.

    The dataset is validated (keys, NaN/inf) and stored with policy version ``-1`` (not collected
    by this run) and its :func:`fingerprint`; a rerun on the same directory with a different
    dataset is refused, naming both fingerprints.

    Args:
        dataset (TensorDictBase): transitions ``[N]`` (``observation``, ``action``, ``("next", ...)``).

    Keyword Args:
        source (str): a label stored in the metadata (e.g. a file path). Defaults to ``"offline"``.
    """

    def __init__(self, dataset: TensorDictBase, *, source: str = "offline") -> None:
        validate_offline_dataset(dataset)
        self.dataset = dataset.reshape(-1)
        self.fingerprint = fingerprint(self.dataset)
        self.source = str(source)
        self.deployed_policy = None

    def collect(self, loop: Any) -> dict[str, float]:
        if loop.deployment != 0:
            raise RuntimeError("an offline dataset is a single 'deployment': the run is finished")
        if loop.buffers.num_deployments:
            meta = loop.buffers.metadata(0)
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"{loop.buffers.root} already holds a dataset (fingerprint "
                    f"{meta.get('fingerprint')!r}, source {meta.get('source')!r}, "
                    f"{meta.get('num_rows')} rows) that differs from the one given (fingerprint "
                    f"{self.fingerprint!r}, source {self.source!r}, {self.dataset.shape[0]} rows): "
                    "use a new run directory for a new dataset"
                )
        else:
            loop.buffers.add_deployment(
                self.dataset, policy_version=-1,
                metadata={"source": self.source, "fingerprint": self.fingerprint},
            )
        return {"deployment/samples": float(len(loop.buffers))}

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "source": self.source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to resume a run of another dataset (``ValueError`` naming both fingerprints)."""
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"the checkpoint's run used dataset {state.get('source')!r} (fingerprint {state.get('fingerprint')!r}), "
                f"not the one given ({self.source!r}, fingerprint {self.fingerprint!r}): use a new run directory "
                "for a new dataset"
            )


# ====================================================================
# fit
# --------------------------------------------------------------------


class EnsembleFit:
    """Fit phase: refit an ensemble on all data so far (warm start), BREMEN Alg. 1 l. 4 / eq. (1).

    Args:
        ensemble (DynamicsEnsemble): the ensemble.
        trainer (EnsembleTrainer): its fit routine (Adam state and counters kept across fits).

    Keyword Args:
        prefix (str): metric prefix. Defaults to ``"model"``.
        per_member (bool): also log ``{prefix}/holdout_loss_m{i}``. Defaults to ``True``.
    """

    def __init__(self, ensemble: DynamicsEnsemble, trainer: EnsembleTrainer, *, prefix: str = "model",
                 per_member: bool = True) -> None:
        self.ensemble = ensemble
        self.trainer = trainer
        self.prefix = prefix
        self.per_member = per_member
        self.fitted = False

    def fit(self, loop: Any) -> dict[str, float]:
        result = self.trainer.fit(_dataset(loop, "all"))
        self.fitted = True
        p = self.prefix
        out = {f"{p}/holdout_loss": float(result.holdout_loss.mean()), f"{p}/epochs": float(result.epochs)}
        if self.per_member:
            for i, v in enumerate(result.holdout_loss.tolist()):
                out[f"{p}/holdout_loss_m{i}"] = v
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ensemble": self.ensemble.state_dict(), "trainer": self.trainer.state_dict(), "fitted": self.fitted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ensemble.load_state_dict(state["ensemble"])
        self.trainer.load_state_dict(state["trainer"])
        self.fitted = bool(state["fitted"])


# ====================================================================
# pretrain
# --------------------------------------------------------------------


class BCWeighting(Protocol):
    """Per-sample BC weights (e.g. MUSBO eq. 11): ``(data, weight_key | None, metrics)``."""

    def __call__(self, loop: Any, data: TensorDictBase) -> tuple[TensorDictBase, str | None, dict[str, float]]: ...


class BehaviourCloning:
    """Pretrain phase of BREMEN Alg. 1 l. 5-6: BC (eq. 3), then ``pi_theta0 = Normal(pi_beta_hat, sigma)``.

    Args:
        make_actor (Callable[[], nn.Module]): builds a fresh BC policy network (mean only).

    Keyword Args:
        lr, batch_size, holdout_ratio, max_epochs, patience: the eq. (3) fit.
        data (str): ``"latest"`` (Alg. 1) or ``"all"``.
        sigma (float): std of the re-initialised policy (and of the frozen BC policy).
        reinit (bool): copy the BC mean into the learner (``False``: ME-TRPO keeps its policy).
        weighting (BCWeighting, optional): per-sample weights (MUSBO eq. 11).
        seed (int): deployment ``k`` fits with seed ``seed + k``.
    """

    def __init__(
        self,
        make_actor: Callable[[], nn.Module],
        *,
        lr: float,
        batch_size: int,
        holdout_ratio: float,
        max_epochs: int,
        patience: int,
        data: str,
        sigma: float,
        reinit: bool,
        weighting: BCWeighting | None = None,
        seed: int = 0,
    ) -> None:
        self.make_actor = make_actor
        self.fit_kwargs = dict(lr=lr, batch_size=batch_size, holdout_ratio=holdout_ratio,
                               max_epochs=max_epochs, patience=patience)
        self.data = data
        self.sigma = float(sigma)
        self.reinit = bool(reinit)
        self.weighting = weighting
        self.seed = int(seed)
        self.bc_actor: nn.Module | None = None

    def run(self, loop: Any) -> dict[str, float]:
        data = _dataset(loop, self.data)
        validate_offline_dataset(data)
        weight_key, out = None, {}
        if self.weighting is not None:
            data, weight_key, out = self.weighting(loop, data)
        bc = self.make_actor().to(loop.device)
        bc_net = bc.module[0].module
        if getattr(bc_net, "normalize_observations", False):
            # input statistics of the data BC clones (the reference code normalises policy inputs)
            bc_net.set_observation_stats(data["observation"])
            learner = loop.actor.module[0].module
            if not self.reinit and bool((learner.obs_scale == 1).all() and (learner.obs_loc == 0).all()):
                learner.set_observation_stats(data["observation"])  # no re-init: set once, then kept
        info = train_bc(bc, data, loss_type="mse", weight_key=weight_key, seed=self.seed + loop.deployment,
                        **self.fit_kwargs)
        bc.module[0].module.set_sigma(self.sigma)
        self.bc_actor = freeze_policy(bc)
        if self.reinit:
            # pi_theta0 = Normal(pi_beta_hat, sigma), BREMEN Alg. 1 line 6 (sigma: see BREMENConfig)
            net = loop.actor.module[0].module
            net.load_mean_from(bc.module[0].module)
            net.set_sigma(self.sigma)
        out.update({"bc/holdout_loss": float(info["holdout_loss"]), "bc/epochs": float(info["epochs"])})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"bc_actor": None if self.bc_actor is None else self.bc_actor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["bc_actor"] is None:
            self.bc_actor = None
            return
        module = freeze_policy(self.make_actor())
        module.load_state_dict(state["bc_actor"])
        self.bc_actor = module


# ====================================================================
# optimize
# --------------------------------------------------------------------

LossFactory = Callable[[nn.Module, nn.Module, nn.Module | None], TRPOLoss]
RolloutLabeller = Callable[[TensorDictBase], TensorDictBase]
BatchMetrics = Callable[[TRPOLoss, TensorDictBase], dict[str, float]]


def trpo_loss_factory(*, normalize_advantage: bool, explicit_kl_coef: float = 0.0,
                      explicit_kl_mode: str = "reward") -> LossFactory:
    """The BREMEN eq. (4) loss (with the explicit-KL ablation when ``explicit_kl_coef > 0``).

    ``explicit_kl_mode``: ``"reward"`` (BREMEN's reference code, sec. 5.3 "KL penalty on value":
    ``alpha * KL(pi_k || pi_beta)`` subtracted from the rewards before GAE) or ``"surrogate"``
    (eq. (6) read literally), see :class:`~torchrl_depeff.objectives.TRPOLoss`.
    """

    def make(actor: nn.Module, baseline: nn.Module, reference: nn.Module | None) -> TRPOLoss:
        kwargs: dict[str, Any] = {}
        if explicit_kl_coef > 0:
            if reference is None:
                raise RuntimeError("the explicit-KL ablation needs the BC policy: run the pretrain phase first")
            kwargs = dict(kl_to_reference_coef=explicit_kl_coef, reference_actor=reference,
                          kl_to_reference_mode=explicit_kl_mode)
        return TRPOLoss(actor, baseline, normalize_advantage=normalize_advantage, **kwargs)

    return make


class ImaginaryTRPO:
    """Optimize phase of BREMEN Alg. 1 l. 7-9: ``T`` TRPO iterations on imaginary rollouts.

    Every iteration rolls the policy out in the imaginary MDP of eq. (2) (optionally labelled by
    ``rollout_labeller``, e.g. MUSBO eq. 12), computes GAE with the linear baseline and takes one
    trust-region step of the loss built by ``loss_factory`` (eq. 4, eq. 6, MUSBO eq. 13); the
    baseline is then refitted on the rollouts (rllab / BREMEN reference order). Resumable: the
    loop checkpoints every ``checkpoint_interval`` iterations.

    Args:
        task (TaskSpec): reward, termination and dims of the imaginary MDP.
        ensemble (DynamicsEnsemble): the dynamics model.

    Keyword Args:
        trpo (TRPOConfig), imagination (ImaginationConfig): settings.
        real_env (EnvBase | Callable): source of the specs (and of reset states for
            ``start_states="reset"``).
        loss_factory (LossFactory): ``(actor, baseline, reference) -> TRPOLoss``.
        rollout_labeller (RolloutLabeller, optional): applied to every imaginary batch.
        batch_metrics (BatchMetrics, optional): extra per-iteration metrics.
        seed (int): seed of the model env's generator (``seed + 1``) and of reset pools.
        log_interval (int), checkpoint_interval (int): in iterations.
        make_env (Callable[[str], EnvBase]): real-env factory (``start_states="reset"``).
        eval_every (int, optional): evaluate the policy with the loop's evaluator before
            iterations ``0, n, 2n, ...`` of the phase and return the values as
            ``curve/eval_return_it{k}`` (real-env episodes, not deployments; deterministic policy,
            so the imaginary batches and the TRPO steps are the same as without). ``None``: never.
    """

    def __init__(
        self,
        task: Any,
        ensemble: DynamicsEnsemble,
        *,
        trpo: Any,
        imagination: Any,
        real_env: EnvBase | Callable[[], EnvBase],
        loss_factory: LossFactory,
        rollout_labeller: RolloutLabeller | None = None,
        batch_metrics: BatchMetrics | None = None,
        seed: int = 0,
        log_interval: int = 50,
        checkpoint_interval: int = 100,
        make_env: Callable[[str], EnvBase] | None = None,
        device: torch.device | str = "cpu",
        eval_every: int | None = None,
    ) -> None:
        if eval_every is not None and (not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 1):
            raise ValueError(f"eval_every must be None or an int >= 1, got {eval_every!r}")
        self.eval_every = eval_every
        self.curve: dict[int, float] = {}
        self.task = task
        self.ensemble = ensemble
        self.trpo = trpo
        self.imagination = imagination
        self.real_env = real_env
        self.loss_factory = loss_factory
        self.rollout_labeller = rollout_labeller
        self.batch_metrics = batch_metrics
        self.seed = int(seed)
        self.log_interval = int(log_interval)
        self.checkpoint_interval = int(checkpoint_interval)
        self.make_env = make_env
        self.device = torch.device(device)
        self.baseline = LinearFeatureBaseline(task.observation_dim, time_key="model_step_count").to(self.device)
        self.model_generator = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        self.iteration = 0
        self.total_iterations = 0
        self.model_env: EnvBase | None = None

    # ------------------------------------------------------------------ imaginary MDP
    def start_state_pool(self, loop: Any) -> torch.Tensor:
        """Start states of the imaginary rollouts (``imagination.start_states``)."""
        mode = self.imagination.start_states
        if mode == "first":
            return episode_start_states(_dataset(loop, "all"))["observation"]
        if mode == "all":
            return _dataset(loop, "all")["observation"]
        # "reset": fresh resets of the real env (BREMEN's reference code)
        env = self.make_env(self.task.name)
        env.set_seed(self.seed + 31 * (loop.deployment + 1))
        return torch.stack([env.reset()["observation"] for _ in range(self.imagination.num_reset_states)]).to(self.device)

    def make_model_env(self, loop: Any, start_states: torch.Tensor | None = None) -> EnvBase:
        """The imaginary MDP of eq. (2), with the App. E penalty transform when configured."""
        imag = self.imagination
        if start_states is None:
            start_states = self.start_state_pool(loop)
        uncertainty = {"none": (), "mopo": ("ensemble_std",), "morel": ("disagreement",)}[imag.penalty]
        penalty = None
        if imag.penalty == "mopo":
            penalty = SoftUncertaintyPenalty(imag.mopo_coef, uncertainty_key="model_ensemble_std")
        elif imag.penalty == "morel":
            penalty = HardUncertaintyPenalty(imag.morel_threshold, imag.morel_reward)
        real = self.real_env if isinstance(self.real_env, EnvBase) else self.make_env(self.task.name)
        # the App. E penalty is fused into the env's step (same numbers as the TransformedEnv
        # wrapper, and the env keeps its fast rollout loop)
        env: EnvBase = EnsembleModelEnv.from_env(
            real,
            self.ensemble,
            task=self.task,
            start_states=TensorDict({"observation": start_states}, [start_states.shape[0]]),
            batch_size=self.trpo.batch_size // imag.rollout_length,
            member_selection=imag.member_selection,
            max_episode_steps=imag.rollout_length,
            uncertainty=uncertainty,
            penalty=penalty,
            device=self.device,
            generator=self.model_generator,
        )
        self.model_env = env
        return env

    def imaginary_rollout(self, actor: nn.Module) -> TensorDictBase:
        """Eq. (2): ``trpo.batch_size // rollout_length`` rollouts of ``rollout_length`` steps."""
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            return self.model_env.rollout(
                self.imagination.rollout_length, actor, break_when_any_done=False, auto_cast_to_device=False,
            )

    # ------------------------------------------------------------------ TRPO
    def make_loss(self, loop: Any) -> tuple[TRPOLoss, ConjugateGradientTrustRegion]:
        """The loss of ``loss_factory`` with GAE (Table 4 gamma/lambda) and its trust region."""
        cfg = self.trpo
        loss = self.loss_factory(loop.actor, self.baseline, loop.reference_policy)
        loss.make_value_estimator(ValueEstimators.GAE, gamma=cfg.gamma, lmbda=cfg.gae_lambda)
        optim = ConjugateGradientTrustRegion(
            loss, max_kl=cfg.max_kl, damping=cfg.cg_damping,
            cg_iters=cfg.cg_iterations, backtrack_iters=cfg.line_search_steps,
            accept_ratio=cfg.accept_ratio, check_kl=cfg.check_kl,
        )
        return loss, optim

    def iterate(self, loop: Any, loss: TRPOLoss, optim: ConjugateGradientTrustRegion) -> dict[str, float]:
        """Alg. 1 lines 8-9: one imaginary batch, GAE with the linear baseline, one eq. (4) step."""
        rollout = self.imaginary_rollout(loop.actor)
        if self.rollout_labeller is not None:
            rollout = self.rollout_labeller(rollout)
        if loss.kl_to_reference_mode == "reward" and float(loss.kl_to_reference_coef) > 0:
            # BREMEN sec. 5.3 as its reference code: the KL penalty is part of the reward the
            # advantages and the baseline see
            rollout = loss.penalize_reward(rollout)
        info = trpo_step(loss, optim, rollout)
        self.baseline.fit(rollout, gamma=self.trpo.gamma)
        ret = rollout.get(("next", "reward")).sum(-2).mean()
        out = {
            "train/imaginary_return": float(ret),
            "train/trpo_kl": float(info["kl"]),
            "train/trpo_accepted": float(info["accepted"]),
            "train/trpo_improvement": float(info["improvement"]),
        }
        if self.batch_metrics is not None:
            out.update(self.batch_metrics(loss, rollout))
        return out

    def run(self, loop: Any) -> dict[str, float]:
        total = self.trpo.iterations
        self.make_model_env(loop)
        loss, optim = self.make_loss(loop)
        states = kl_states(loop, "latest")
        bar = None
        if loop.progress:
            import tqdm

            bar = tqdm.tqdm(total=total, initial=self.iteration, desc=f"TRPO (deployment {loop.deployment})", unit="it")
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        try:
            while self.iteration < total:
                if self.eval_every is not None and self.iteration % self.eval_every == 0 and self.iteration not in self.curve:
                    self.evaluate_during(loop)
                stats = self.iterate(loop, loss, optim)
                window.append(stats)
                self.iteration += 1
                self.total_iterations += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(imag_return=f"{stats['train/imaginary_return']:.1f}", kl=f"{stats['train/trpo_kl']:.3g}")
                if self.iteration % self.log_interval == 0 or self.iteration == total:
                    last = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    last["train/trpo_accept_rate"] = last.pop("train/trpo_accepted")
                    deployed = loop.deployed_policy
                    last["train/kl_to_deployed"] = (
                        mean_policy_kl(loop.actor, deployed.to(loop.device), states) if deployed is not None else math.nan
                    )
                    if deployed is not None:
                        deployed.to("cpu")
                    if loop.reference_policy is not None:
                        last["train/kl_to_bc"] = mean_policy_kl(loop.actor, loop.reference_policy, states)
                    loop.log(last, self.total_iterations)
                    window = []
                if self.iteration % self.checkpoint_interval == 0 and self.iteration < total:
                    loop.checkpoint()
        finally:
            if bar is not None:
                bar.close()
        last["model/invalid_predictions"] = float(int(self.model_env.num_invalid))
        last.update({f"curve/eval_return_it{k}": v for k, v in sorted(self.curve.items())})
        return last

    def evaluate_during(self, loop: Any) -> float:
        """Real-env return of the current policy mean before iteration :attr:`iteration` (``eval_every``)."""
        if loop.evaluator is None:
            raise RuntimeError("evaluation.every_iterations needs the loop's evaluator (evaluation.episodes > 0)")
        returns, _ = loop.evaluator.returns(loop.actor)
        value = float(returns.mean())
        self.curve[self.iteration] = value
        loop.log({"eval/return_mean_during_optimize": value}, self.total_iterations)
        return value

    def end_deployment(self, loop: Any) -> None:
        self.iteration = 0
        self.model_env = None
        self.curve = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline.state_dict(),
            "iteration": self.iteration,
            "total_iterations": self.total_iterations,
            "model_generator": self.model_generator.get_state(),
            "curve": {str(k): v for k, v in self.curve.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline.load_state_dict(state["baseline"])
        self.curve = {int(k): float(v) for k, v in state.get("curve", {}).items()}
        self.iteration = int(state["iteration"])
        self.total_iterations = int(state["total_iterations"])
        self.model_generator.set_state(state["model_generator"])
        self.model_env = None


# ====================================================================
# evaluate
# --------------------------------------------------------------------


def _single_native_env(env: EnvBase) -> NativeVectorEnv | None:
    # a one-copy NativeVectorEnv, bare or in a plain TransformedEnv without transforms
    # (make_vector_env(task, 1)): its steps can run without tensordicts
    base = env
    if type(env) is TransformedEnv:
        if type(env.transform) is not Compose or len(env.transform) > 0:
            return None
        base = env.base_env
    if type(base) is not NativeVectorEnv or tuple(base.batch_size) != (1,):
        return None
    return base


class RealEnvEvaluation:
    """Evaluate phase: undiscounted real-env returns of the policy (not a deployment; nothing stored).

    Episode ``i`` is seeded with ``seed + 10_000 + i``; the policy runs with
    ``ExplorationType.DETERMINISTIC`` (its mean) unless ``deterministic=False``. With
    ``make_batched_env`` the episodes run side by side in one batched env (its copy ``i``
    seeded with ``seed + 10_000 + i``), in one rollout that stops when every copy is done; each
    return is summed up to its copy's first ``done`` (later rows belong to auto-reset episodes
    and are dropped). The start states, the env steps and the sums are those of the episodes run
    one after the other (equal bit for bit for a row-wise policy,
    ``test/algorithms/test_evaluation.py``), but an MLP policy's matmul over ``episodes`` rows
    rounds differently from one row, and MuJoCo locomotion amplifies that: over 1000 HalfCheetah
    steps a trained policy's returns move by as much as their seed-to-seed spread (e.g. 869 /
    2615 one by one, 812 / 2759 batched). It is off by default, so that the package's recorded
    results stay comparable. Sampling policies (``deterministic=False``) draw their noise in
    another order either way.

    One episode at a time on a one-copy :class:`~torchrl_depeff.envs.vector.NativeVectorEnv`
    (``make_vector_env(task, 1)``, bare or in a ``TransformedEnv`` without transforms; BREMEN's
    and MUSBO's default) with a deterministic probabilistic actor of plain networks (e.g.
    :func:`~torchrl_depeff.modules.actors.make_gaussian_actor`), the episode runs without
    tensordicts: the actor's deterministic call on the observation tensor, the env's
    :meth:`~torchrl_depeff.envs.vector.NativeVectorEnv.step_tensors`, the same reset, stop rule
    and reward sum as ``env.rollout``, so the returns are bit for bit the rollout's (tested);
    the log-probability the rollout would compute and discard is skipped. Measured with
    BREMEN's 64-64 actor on HalfCheetah, 2 cores (``benchmarks/bench_evaluation.py``): 2 episodes
    0.31 s against 1.44 s for ``make_env`` and 0.64 s batched; 5 episodes 0.82 s, 3.97 s and
    0.85 s. Any other env or policy runs ``env.rollout``.

    Args:
        make_env (Callable[[], EnvBase]): builds the evaluation env (called once, lazily); used
            when ``make_batched_env`` is not given.

    Keyword Args:
        episodes (int): episodes per evaluation (0 disables the returns).
        max_steps (int): step cap per episode.
        seed (int): base seed.
        deterministic (bool): policy mean instead of samples. Defaults to ``True``.
        score_fn (Callable[[float], float], optional): extra ``eval/normalized_score`` of the
            mean return (e.g. the D4RL score).
        analyses (Sequence[Callable[[loop], dict]], optional): extra metrics (MUSBO sec. 5).
        reward_key (str): the reward entry summed into the returns: ``"reward"`` (default; the
            task reward of :func:`~torchrl_depeff.envs.make_env` / ``make_vector_env``) or e.g.
            ``"env_reward"`` (the gymnasium env's own reward, which
            :class:`~torchrl_depeff.envs.vector.NativeVectorEnv` keeps: MB2PO's D4RL scores).
        make_batched_env (Callable[[int], EnvBase], optional): builds ``n`` copies of the
            evaluation env as one env of batch size ``[n]`` whose ``set_seed(s)`` seeds copy ``i``
            with ``s + i`` (e.g. ``functools.partial(make_vector_env, task)``); called once,
            lazily, with ``n = episodes``.

    Examples:
        >>> import functools
        >>> from torchrl_depeff.algorithms.components import RealEnvEvaluation
        >>> from torchrl_depeff.envs import make_env, make_vector_env
        >>> from torchrl_depeff.modules.actors import make_gaussian_actor
        >>> actor = make_gaussian_actor(17, 6, num_cells=(8,))
        >>> one_by_one = RealEnvEvaluation(lambda: make_env("halfcheetah"), episodes=2, max_steps=20, seed=0)
        >>> batched = RealEnvEvaluation(lambda: make_env("halfcheetah"), episodes=2, max_steps=20, seed=0,
        ...                             make_batched_env=functools.partial(make_vector_env, "halfcheetah"))
        >>> torch.allclose(one_by_one.returns(actor)[0], batched.returns(actor)[0], rtol=1e-3, atol=1e-2)
        True
    """

    def __init__(
        self,
        make_env: Callable[[], EnvBase],
        *,
        episodes: int,
        max_steps: int,
        seed: int,
        deterministic: bool = True,
        score_fn: Callable[[float], float] | None = None,
        analyses: Sequence[Callable[[Any], dict[str, float]]] = (),
        make_batched_env: Callable[[int], EnvBase] | None = None,
        reward_key: str = "reward",
    ) -> None:
        if not isinstance(reward_key, str):
            raise TypeError(f"reward_key must be a str, got {reward_key!r}")
        self.reward_key = reward_key
        self._make_env = make_env
        self._env: EnvBase | None = None
        self._make_batched_env = make_batched_env
        self._batched_env: EnvBase | None = None
        self.episodes = int(episodes)
        self.max_steps = int(max_steps)
        self.seed = int(seed)
        self.deterministic = bool(deterministic)
        self.score_fn = score_fn
        self.analyses = list(analyses)

    @property
    def env(self) -> EnvBase:
        if self._env is None:
            self._env = self._make_env()
        return self._env

    def returns(self, policy: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``episodes`` returns and lengths of ``policy`` (run on CPU), each ``[episodes]``."""
        policy = _cpu_copy(policy)
        kind = ExplorationType.DETERMINISTIC if self.deterministic else ExplorationType.RANDOM
        if self._make_batched_env is not None and self.episodes > 0:
            return self._batched_returns(policy, kind)
        env = self.env
        native = _single_native_env(env)
        act = (_deterministic_call(policy) if native is not None and self.deterministic
               and self.reward_key in ("reward", "env_reward") else None)
        returns, lengths = [], []
        for ep in range(self.episodes):
            env.set_seed(self.seed + 10_000 + ep)
            with torch.no_grad(), set_exploration_type(kind):
                if act is not None:
                    reward = self._plain_episode(env, native, act)
                    length = reward.shape[1]
                else:
                    td = env.rollout(self.max_steps, policy, break_when_any_done=True)
                    reward, length = self._reward(td), td.shape[-1]
            returns.append(reward.sum())
            lengths.append(length)
        return torch.stack(returns), torch.tensor(lengths, dtype=torch.float32)

    def _reward(self, td: TensorDictBase) -> torch.Tensor:
        reward = td.get(("next", self.reward_key), None)
        if reward is None:
            raise KeyError(
                f"RealEnvEvaluation: reward_key {self.reward_key!r} is not an entry of the env's steps "
                f"(next entries: {sorted(str(k) for k in td.get('next').keys())})"
            )
        return reward

    def _plain_episode(self, env: EnvBase, native: NativeVectorEnv, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The rewards ``[1, T, 1]`` of ``env.rollout(max_steps, policy, break_when_any_done=True)``
        on a one-copy :class:`~torchrl_depeff.envs.vector.NativeVectorEnv`, without tensordicts.

        The same reset, the same actions (the policy's deterministic call on the same
        observations), the same env steps and rewards, stopped at the first ``done`` or after
        ``max_steps``: equal bit for bit to the rollout (``test/algorithms/test_evaluation.py``).
        """
        obs = env.reset().get("observation")
        env_reward = self.reward_key == "env_reward"
        rewards = []
        for _ in range(self.max_steps):
            obs, reward, gym_reward, terminated, truncated = native.step_tensors(obs, act(obs))
            rewards.append(gym_reward if env_reward else reward)
            if bool(terminated | truncated):  # the real env's numpy flags: no device sync
                break
        return torch.stack(rewards, 1)

    def _batched_returns(self, policy: nn.Module, kind: ExplorationType) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batched_env is None:
            env = self._make_batched_env(self.episodes)
            if tuple(env.batch_size) != (self.episodes,):
                raise ValueError(
                    f"make_batched_env({self.episodes}) built an env of batch size {list(env.batch_size)}, "
                    f"expected [{self.episodes}]"
                )
            self._batched_env = env
        env = self._batched_env
        env.set_seed(self.seed + 10_000)  # copy i: seed + 10_000 + i, as the sequential episode i
        with torch.no_grad(), set_exploration_type(kind):
            td = env.rollout(self.max_steps, policy, break_when_any_done=False, break_when_all_done=True)
        done = td.get(("next", "done")).reshape(self.episodes, -1)
        reward = self._reward(td).reshape(self.episodes, -1)
        steps = done.shape[-1]
        # each episode ends at its first done (or after max_steps)
        ends = torch.where(done.any(-1), done.int().argmax(-1), steps - 1).tolist()
        # summed row by row over the same contiguous slice as the sequential episode (same float sum)
        returns = torch.stack([reward[i, : end + 1].sum() for i, end in enumerate(ends)])
        return returns, torch.tensor([end + 1 for end in ends], dtype=torch.float32)

    def run(self, loop: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.episodes > 0:
            r, lengths = self.returns(loop.actor)
            out = {
                "eval/return_mean": float(r.mean()),
                "eval/return_std": float(r.std(correction=0)),
                "eval/episodes": float(self.episodes),
                "eval/episode_length": float(lengths.mean()),
            }
            if self.score_fn is not None:
                out["eval/normalized_score"] = float(self.score_fn(out["eval/return_mean"]))
        for analysis in self.analyses:
            out.update(analysis(loop))
        return out


__all__ += ["BCWeighting", "LossFactory", "RolloutLabeller", "fingerprint", "kl_states", "trpo_loss_factory"]
