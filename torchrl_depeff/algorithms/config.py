"""Configuration building blocks shared by BREMEN, MUSBO and MB2PO.

Every algorithm config is a tree of small dataclasses with **one vocabulary**: the dynamics
ensemble is always a :class:`ModelConfig` (``num_members``, ``num_cells``, ``lr``,
``batch_size``, ``max_epochs``, ``patience``, ``holdout_ratio``, ...), whether it is BREMEN's
``model``, MUSBO's ``labeler`` or MB2PO's ``model``; the deployment loop's outer settings are a
:class:`DeploymentConfig`; and so on. The same dataclasses are Hydra structured configs: the
examples register them in Hydra's ``ConfigStore`` (:mod:`torchrl_depeff.algorithms.hydra`), so a
command-line override is type-checked against these fields (``bremen.trpo.max_kl=abc`` and
unknown keys are refused by OmegaConf) and the values are then range-checked here.

Each paper table (BREMEN Table 4, MUSBO Table 2, MB2PO App. 7.3) lives exactly once, in its
algorithm's module, as the paper prints it (one row per task, the paper's column names) together
with the map from those columns to config paths (:func:`apply_table_row`).

Validation raises ``ValueError`` naming the full path of the bad value (``trpo.max_kl must be a
finite number > 0, got -1.0``); unknown keys raise ``KeyError`` naming them.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

from torchrl_depeff.trainers.dynamics import MATMUL_PRECISIONS

__all__ = [
    "BCConfig",
    "ConfigBase",
    "DeploymentConfig",
    "EvalConfig",
    "ImaginationConfig",
    "ModelConfig",
    "PolicyConfig",
    "Section",
    "TRPOConfig",
    "apply_preset",
    "apply_table_row",
]

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "silu")

T = TypeVar("T", bound="Section")

#: path of the section being built by :meth:`Section.from_dict` (for error messages)
_BUILD_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("config_prefix", default="")


# ====================================================================
# Checks
# --------------------------------------------------------------------


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_int(value: Any, path: str, *, minimum: int = 1) -> None:
    """``value`` is an ``int`` (not a ``bool``) ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{path} must be an int >= {minimum}, got {value!r}")


def check_float(
    value: Any,
    path: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> None:
    """``value`` is a finite real number (not a ``bool``) in the given open/closed bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (gt is None or value > gt) and (ge is None or value >= ge)
    ok = ok and (lt is None or value < lt) and (le is None or value <= le)
    if not ok:
        bounds = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "",
                  f"< {lt}" if lt is not None else "", f"<= {le}" if le is not None else ""]
        what = " and ".join(b for b in bounds if b)
        raise ValueError(f"{path} must be a finite number{' ' + what if what else ''}, got {value!r}")


def check_bool(value: Any, path: str) -> None:
    """``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"{path} must be a bool, got {value!r}")


def check_choice(value: Any, path: str, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{path} must be one of {list(choices)}, got {value!r}")


def check_cells(value: Any, path: str) -> tuple[int, ...]:
    """Hidden sizes: a non-empty sequence of ints >= 1, returned as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{path} must be a non-empty sequence of ints >= 1, got {value!r}")
    for c in value:
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"{path} must be a non-empty sequence of ints >= 1, got {value!r}")
    return tuple(value)


# ====================================================================
# Base classes
# --------------------------------------------------------------------


def _is_section_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


class Section:
    """A validated config dataclass; sub-sections are nested dataclass fields.

    ``validate(prefix)`` checks this section's own values and then every sub-section under its
    field name, so errors name the full path (``labeler.lr``).
    """

    def __post_init__(self) -> None:
        self.validate(_BUILD_PREFIX.get())

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError`` naming the first bad value (``prefix`` is this section's path)."""
        self._check(prefix)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value.validate(_path(prefix, f.name))

    def _check(self, prefix: str) -> None:  # overridden by the sections
        pass

    # ------------------------------------------------------------------ dict round trip
    def to_dict(self) -> dict[str, Any]:
        """Nested dict of the fields (tuples as lists), as stored in checkpoints.

        Examples:
            >>> from torchrl_depeff.algorithms.config import ModelConfig
            >>> ModelConfig(num_cells=(8,)).to_dict()["num_cells"]
            [8]
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                out[f.name] = value.to_dict()
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any], *, prefix: str = "") -> T:
        """Build from a nested dict (e.g. :meth:`to_dict` output or a Hydra node), naming unknown keys.

        Examples:
            >>> from torchrl_depeff.algorithms.config import ModelConfig
            >>> ModelConfig.from_dict({"num_members": 3}).num_members
            3
            >>> ModelConfig.from_dict({"members": 3})
            Traceback (most recent call last):
            ...
            KeyError: "unknown config keys ['members'] (valid: ['activation', 'batch_size', 'holdout_ratio', 'lr', 'matmul_precision', 'max_epochs', 'num_cells', 'num_elites', 'num_members', 'patience', 'predict_reward', 'probabilistic', 'weight_decay'])"
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"{prefix or cls.__name__} must be a mapping, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise KeyError(f"unknown config keys {[_path(prefix, k) for k in unknown]} (valid: {sorted(known)})")
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            tp = hints.get(name)
            if _is_section_type(tp) and not isinstance(value, (Mapping, tp)):
                raise TypeError(
                    f"{_path(prefix, name)} must be a mapping of {tp.__name__} fields, got {type(value).__name__} {value!r}"
                )
            if _is_section_type(tp) and isinstance(value, Mapping):
                default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else tp()
                merged = {**default.to_dict(), **value}
                kwargs[name] = tp.from_dict(merged, prefix=_path(prefix, name))
            else:
                kwargs[name] = value
        token = _BUILD_PREFIX.set(prefix)
        try:
            return cls(**kwargs)
        finally:
            _BUILD_PREFIX.reset(token)

    # ------------------------------------------------------------------ overrides
    def override(self: T, values: Mapping[str, Any] | None = None, **kwargs: Any) -> T:
        """A copy with dotted-path overrides, e.g. ``{"trpo.max_kl": 0.05}`` (validated).

        Keyword arguments name top-level fields (``seed=1``) or whole sections given as dicts
        (``trpo={"max_kl": 0.05}``, merged into the current section).

        Examples:
            >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
            >>> cfg = BREMENConfig().override({"trpo.max_kl": 0.05}, seed=3)
            >>> cfg.trpo.max_kl, cfg.seed
            (0.05, 3)
            >>> BREMENConfig().override({"trpo.kl": 0.05})
            Traceback (most recent call last):
            ...
            KeyError: "unknown config key 'trpo.kl': 'kl' is not a field of TRPOConfig"
        """
        tree = self.to_dict()
        for key, value in {**(values or {}), **kwargs}.items():
            parts = key.split(".")
            node: Any = tree
            owner: Any = type(self)
            for i, part in enumerate(parts):
                names = {f.name for f in fields(owner)}
                if part not in names:
                    raise KeyError(
                        f"unknown config key {key!r}: {part!r} is not a field of {owner.__name__}"
                    )
                tp = typing.get_type_hints(owner)[part]
                if i == len(parts) - 1:
                    if _is_section_type(tp) and isinstance(value, Mapping):
                        node[part] = {**node[part], **value}
                    else:
                        node[part] = list(value) if isinstance(value, tuple) else value
                else:
                    if not _is_section_type(tp):
                        raise KeyError(f"unknown config key {key!r}: {part!r} is not a section")
                    node = node[part]
                    owner = tp
        return type(self).from_dict(tree)


def apply_preset(cfg: T, preset: str, presets: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any]) -> T:
    """``cfg`` with the dotted overrides of ``presets[preset]`` (``"paper"``: none), then ``overrides``.

    Examples:
        >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
        >>> from torchrl_depeff.algorithms.config import apply_preset
        >>> apply_preset(BREMENConfig(), "fast", {"fast": {"trpo.iterations": 5}}, {}).trpo.iterations
        5
    """
    if preset != "paper":
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; valid presets are {['paper', *presets]}")
        cfg = cfg.override(presets[preset])
    return cfg.override(overrides) if overrides else cfg


def apply_table_row(cfg: T, row: Mapping[str, Any], columns: Mapping[str, str | Sequence[str]]) -> T:
    """``cfg`` with the values of one paper-table row written to their config paths.

    Args:
        cfg: the config to update.
        row (Mapping): ``{column: value}`` as printed in the paper.
        columns (Mapping): ``{column: config path}`` (or several paths).

    Examples:
        >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
        >>> from torchrl_depeff.algorithms.config import apply_table_row
        >>> apply_table_row(BREMENConfig(), {"delta": 0.05}, {"delta": "trpo.max_kl"}).trpo.max_kl
        0.05
    """
    values: dict[str, Any] = {}
    for column, value in row.items():
        if column not in columns:
            raise KeyError(f"table column {column!r} has no config path (known: {sorted(columns)})")
        paths = columns[column]
        for path in [paths] if isinstance(paths, str) else paths:
            values[path] = value
    return cfg.override(values)


class ConfigBase(Section):
    """Top-level algorithm config: adds legacy flat-key support to :meth:`from_dict`.

    ``_LEGACY_KEYS`` maps the flat field names of torchrl_depeff 0.1 (``max_kl``,
    ``ensemble_size``, ...) to their new dotted paths; a flat dict using them is still accepted,
    with a ``FutureWarning`` naming the new paths.
    """

    _LEGACY_KEYS: typing.ClassVar[dict[str, str | tuple[str, ...]]] = {}

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any], *, prefix: str = "") -> T:
        legacy = {k: v for k, v in values.items() if k in cls._LEGACY_KEYS}
        if legacy:
            mapped = {}
            for key, value in legacy.items():
                paths = cls._LEGACY_KEYS[key]
                for path in (paths,) if isinstance(paths, str) else paths:
                    mapped[path] = value
            warnings.warn(
                f"flat {cls.__name__} keys are deprecated: "
                + ", ".join(f"{k} -> {cls._LEGACY_KEYS[k]}" for k in sorted(legacy)),
                FutureWarning,
                stacklevel=2,
            )
            rest = {k: v for k, v in values.items() if k not in legacy}
            return cls.from_dict(rest, prefix=prefix).override(mapped)
        return super().from_dict(values, prefix=prefix)


# ====================================================================
# Sections
# --------------------------------------------------------------------


@dataclass
class ModelConfig(Section):
    """A dynamics (or labeler) ensemble and how it is fitted (BREMEN eq. 1, App. F.1).

    Defaults are BREMEN's (App. F.1: 5 deterministic members, 2 x 1024 ReLU, Adam 1e-3, batch
    1000... the fit's 85/15 holdout split with early stopping).

    Args:
        num_members (int): ensemble size (BREMEN's ``K``, MB2PO's ``N``). Defaults to 5.
        num_cells (tuple of int): hidden sizes. Defaults to ``(1024, 1024)``.
        activation (str): ``"relu"``, ``"tanh"`` or ``"silu"`` (swish). Defaults to ``"relu"``.
        probabilistic (bool): Gaussian heads (PNN) instead of deterministic ones. Defaults to ``False``.
        predict_reward (bool): a reward head. Defaults to ``False``.
        num_elites (int, optional): elite members (``None``: all). Defaults to ``None``.
        lr (float): Adam learning rate. Defaults to ``1e-3``.
        weight_decay (float): Adam weight decay. Defaults to 0.
        batch_size (int): minibatch per member. Defaults to 1000.
        max_epochs (int): epoch cap of one fit. Defaults to 200.
        patience (int): early-stopping patience (epochs). Defaults to 5.
        holdout_ratio (float): holdout fraction in ``[0, 1)``. Defaults to 0.15.
        matmul_precision (str, optional): float32 matrix-product precision of the fit on CPU:
            ``"bf16"`` (bfloat16 factors, float32 accumulation, on AMX / AVX512-BF16 CPUs:
            1.4-1.8x faster fits, see :class:`~torchrl_depeff.trainers.EnsembleTrainer`),
            ``"ieee"`` (float32) or ``None`` (torch's global setting). Imaginary rollouts and the
            policy updates are not affected. Defaults to ``None``.

    Examples:
        >>> from torchrl_depeff.algorithms.config import ModelConfig
        >>> ModelConfig(num_members=3, num_elites=4)
        Traceback (most recent call last):
        ...
        ValueError: num_elites must be <= num_members (3), got 4
    """

    num_members: int = 5
    num_cells: tuple[int, ...] = (1024, 1024)
    activation: str = "relu"
    probabilistic: bool = False
    predict_reward: bool = False
    num_elites: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1000
    max_epochs: int = 200
    patience: int = 5
    holdout_ratio: float = 0.15
    matmul_precision: str | None = None

    def _check(self, prefix: str) -> None:
        self.num_cells = check_cells(self.num_cells, _path(prefix, "num_cells"))
        for name in ("num_members", "batch_size", "max_epochs", "patience"):
            check_int(getattr(self, name), _path(prefix, name))
        if self.num_elites is not None:
            check_int(self.num_elites, _path(prefix, "num_elites"))
            if self.num_elites > self.num_members:
                raise ValueError(
                    f"{_path(prefix, 'num_elites')} must be <= num_members ({self.num_members}), "
                    f"got {self.num_elites}"
                )
        check_choice(self.activation, _path(prefix, "activation"), ACTIVATIONS)
        check_bool(self.probabilistic, _path(prefix, "probabilistic"))
        check_bool(self.predict_reward, _path(prefix, "predict_reward"))
        check_float(self.lr, _path(prefix, "lr"), gt=0)
        check_float(self.weight_decay, _path(prefix, "weight_decay"), ge=0)
        check_float(self.holdout_ratio, _path(prefix, "holdout_ratio"), ge=0, lt=1)
        if self.matmul_precision is not None:
            check_choice(self.matmul_precision, _path(prefix, "matmul_precision"), MATMUL_PRECISIONS)


@dataclass
class PolicyConfig(Section):
    """BREMEN's Gaussian policy ``tanh(mu(s)) + N(0, sigma^2)`` (App. F.1-F.2).

    Args:
        num_cells (tuple of int): hidden sizes. Defaults to ``(200, 200)`` (App. F.1).
        activation (str): hidden activation. Defaults to ``"relu"`` (the reference configs').
        sigma (float): stationary noise std (App. F.2). Defaults to 0.1.
        learn_sigma (bool): learned state-independent std instead. Defaults to ``False``.
        normalize_observations (bool): normalise the policy's inputs with the mean and std of the
            behaviour-cloning data, refreshed at every BC re-initialisation (BREMEN's reference
            code normalises policy inputs; the paper does not mention it). Defaults to ``False``.
    """

    num_cells: tuple[int, ...] = (200, 200)
    activation: str = "relu"
    sigma: float = 0.1
    learn_sigma: bool = False
    normalize_observations: bool = False

    def _check(self, prefix: str) -> None:
        self.num_cells = check_cells(self.num_cells, _path(prefix, "num_cells"))
        check_choice(self.activation, _path(prefix, "activation"), ACTIVATIONS)
        check_float(self.sigma, _path(prefix, "sigma"), gt=0)
        check_bool(self.learn_sigma, _path(prefix, "learn_sigma"))
        check_bool(self.normalize_observations, _path(prefix, "normalize_observations"))


@dataclass
class DeploymentConfig(Section):
    """The outer loop: how many deployments, how large, and how they are collected (Alg. 1 l. 3).

    Args:
        num_deployments (int): ``I`` of Alg. 1. Defaults to 5.
        size (int): ``B``, real transitions per deployment. Defaults to 200 000.
        frames_per_batch (int): collector batch. Defaults to 1000.
        num_envs (int): sub-envs stepped together per collector process. Defaults to 1.
        collector (str): ``"single"``, ``"multisync"`` or ``"ray"``. Defaults to ``"single"``.
        num_workers (int): collector processes (``multisync``/``ray``). Defaults to 1.
        gate_max_kl (float, optional): deployment-gate bound on ``KL(new || deployed)``.
        gate_on_fail (str): ``"raise"`` or ``"fallback"`` (redeploy the last policy).
    """

    num_deployments: int = 5
    size: int = 200_000
    frames_per_batch: int = 1000
    num_envs: int = 1
    collector: str = "single"
    num_workers: int = 1
    gate_max_kl: float | None = None
    gate_on_fail: str = "raise"

    def _check(self, prefix: str) -> None:
        for name in ("num_deployments", "size", "frames_per_batch", "num_envs", "num_workers"):
            check_int(getattr(self, name), _path(prefix, name))
        check_choice(self.collector, _path(prefix, "collector"), ("single", "multisync", "ray"))
        check_choice(self.gate_on_fail, _path(prefix, "gate_on_fail"), ("raise", "fallback"))
        if self.gate_max_kl is not None:
            check_float(self.gate_max_kl, _path(prefix, "gate_max_kl"), gt=0)


@dataclass
class BCConfig(Section):
    """Behaviour cloning of the latest deployment and the policy re-initialisation (eq. 3, Alg. 1 l. 5-6).

    Args:
        lr (float): Adam learning rate (App. F.1: 5e-4).
        batch_size (int): minibatch (App. F.1: 256).
        max_epochs (int): epoch cap. Defaults to 100.
        patience (int): early-stopping patience. Defaults to 3.
        holdout_ratio (float): holdout fraction. Defaults to 0.15.
        data (str): ``"latest"`` (Alg. 1: the last deployment) or ``"all"``.
        reinit (bool): re-initialise the policy from BC after every deployment (``False``: the
            ME-TRPO ablation). Defaults to ``True``.
        init_sigma (float, optional): policy std after the re-init; ``None`` keeps
            ``policy.sigma`` (see :mod:`~torchrl_depeff.algorithms.bremen`).
    """

    lr: float = 5e-4
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 3
    holdout_ratio: float = 0.15
    data: str = "latest"
    reinit: bool = True
    init_sigma: float | None = None

    def _check(self, prefix: str) -> None:
        for name in ("batch_size", "max_epochs", "patience"):
            check_int(getattr(self, name), _path(prefix, name))
        check_float(self.lr, _path(prefix, "lr"), gt=0)
        check_float(self.holdout_ratio, _path(prefix, "holdout_ratio"), ge=0, lt=1)
        check_choice(self.data, _path(prefix, "data"), ("latest", "all"))
        check_bool(self.reinit, _path(prefix, "reinit"))
        if self.init_sigma is not None:
            check_float(self.init_sigma, _path(prefix, "init_sigma"), gt=0)


@dataclass
class ImaginationConfig(Section):
    """The imaginary MDP of eq. (2): rollout horizon, member selection, start states, penalty.

    Args:
        rollout_length (int): imaginary rollout horizon. Defaults to 250.
        member_selection (str): ``"per_step"`` (eq. 2 / BREMEN's code), ``"per_sample"``,
            ``"per_trajectory"`` or ``"mean"``.
        start_states (str): ``"first"`` (episode starts of the data), ``"reset"`` (fresh real
            resets, BREMEN's code) or ``"all"`` (any data state).
        num_reset_states (int): pool size for ``start_states="reset"``. Defaults to 1000.
        penalty (str): ``"none"``, ``"mopo"`` (soft, App. E) or ``"morel"`` (hard, App. E).
        mopo_coef (float): soft-penalty coefficient (App. E: 0.1).
        morel_threshold (float), morel_reward (float): hard penalty (App. E: 3.0, -5.0).
    """

    rollout_length: int = 250
    member_selection: str = "per_step"
    start_states: str = "first"
    num_reset_states: int = 1000
    penalty: str = "none"
    mopo_coef: float = 0.1
    morel_threshold: float = 3.0
    morel_reward: float = -5.0

    def _check(self, prefix: str) -> None:
        check_int(self.rollout_length, _path(prefix, "rollout_length"))
        check_int(self.num_reset_states, _path(prefix, "num_reset_states"))
        check_choice(self.member_selection, _path(prefix, "member_selection"),
                     ("per_step", "per_sample", "per_trajectory", "mean"))
        check_choice(self.start_states, _path(prefix, "start_states"), ("first", "reset", "all"))
        check_choice(self.penalty, _path(prefix, "penalty"), ("none", "mopo", "morel"))
        check_float(self.mopo_coef, _path(prefix, "mopo_coef"), ge=0)
        check_float(self.morel_threshold, _path(prefix, "morel_threshold"), gt=0)
        check_float(self.morel_reward, _path(prefix, "morel_reward"))


@dataclass
class TRPOConfig(Section):
    """TRPO on imaginary rollouts (eq. 4), its GAE and the explicit-KL ablation (eq. 6).

    Args:
        enabled (bool): run policy optimisation (``False``: the recursive-BC baseline).
        iterations (int): ``T``, TRPO iterations per deployment (Table 4).
        batch_size (int): imaginary transitions per iteration (App. F.1: 50 000); the model env
            runs ``batch_size // imagination.rollout_length`` rollouts in parallel.
        max_kl (float): ``delta`` of eq. (4) (Table 4).
        gamma (float), gae_lambda (float): discount and GAE lambda (Table 4).
        cg_iterations (int), cg_damping (float): conjugate gradient (10, 0.1).
        check_kl (bool): reject line-search steps violating ``max_kl`` (BREMEN's code does not).
        line_search_steps (int), accept_ratio (float): backtracking (10, 0.1).
        normalize_advantage (bool): standardise advantages. Defaults to ``True``.
        explicit_kl_coef (float): ``alpha`` of the explicit-KL ablation; 0 disables.
        explicit_kl_mode (str): ``"reward"`` (default: BREMEN's reference code, sec. 5.3 "KL penalty
            on value": ``alpha KL(pi_k || pi_beta)`` subtracted from the rewards before GAE) or
            ``"surrogate"`` (eq. (6) read literally: ``E[ratio (A - alpha KL(pi_theta || pi_beta))]``).
    """

    enabled: bool = True
    iterations: int = 2000
    batch_size: int = 50_000
    max_kl: float = 0.1
    gamma: float = 0.99
    gae_lambda: float = 0.95
    cg_iterations: int = 10
    cg_damping: float = 0.1
    check_kl: bool = True
    line_search_steps: int = 10
    accept_ratio: float = 0.1
    normalize_advantage: bool = True
    explicit_kl_coef: float = 0.0
    explicit_kl_mode: str = "reward"

    def _check(self, prefix: str) -> None:
        check_choice(self.explicit_kl_mode, _path(prefix, "explicit_kl_mode"), ("reward", "surrogate"))
        for name in ("iterations", "batch_size", "cg_iterations", "line_search_steps"):
            check_int(getattr(self, name), _path(prefix, name))
        check_float(self.max_kl, _path(prefix, "max_kl"), gt=0)
        check_float(self.gamma, _path(prefix, "gamma"), ge=0, le=1)
        check_float(self.gae_lambda, _path(prefix, "gae_lambda"), ge=0, le=1)
        check_float(self.cg_damping, _path(prefix, "cg_damping"), ge=0)
        check_float(self.accept_ratio, _path(prefix, "accept_ratio"), gt=0, lt=1)
        check_float(self.explicit_kl_coef, _path(prefix, "explicit_kl_coef"), ge=0)
        for name in ("enabled", "check_kl", "normalize_advantage"):
            check_bool(getattr(self, name), _path(prefix, name))


@dataclass
class EvalConfig(Section):
    """Real-env evaluation of the policy mean after each deployment (not a deployment).

    Args:
        episodes (int): episodes per evaluation; 0 disables. Defaults to 3 (the reference code's
            ``num_path_onpol``).
        max_steps (int, optional): episode cap (default: the task's).
        every_iterations (int, optional): also evaluate *during* the optimize phase, before TRPO
            iterations ``0, n, 2n, ...`` (BREMEN Fig. 14 plots offline returns against policy
            iterations); each value is returned as ``curve/eval_return_it{k}`` (``k`` iterations
            done, ``k = 0``: the re-initialised policy) and the end of the phase is the deployment's
            ``eval/return_mean``. ``None`` (default): only after the phase.
        batched (bool): run the episodes side by side in one batched env
            (:func:`~torchrl_depeff.envs.make_vector_env`, copy ``i`` seeded as episode ``i``;
            :class:`~torchrl_depeff.algorithms.components.RealEnvEvaluation`'s
            ``make_batched_env``): the same start states and env steps, but the policy's matmul
            over ``episodes`` rows rounds differently from one row, which moves chaotic returns
            (HalfCheetah) by up to their seed-to-seed spread. No faster than the default
            one-at-a-time episodes, which run without tensordicts (2 HalfCheetah episodes 0.64 s
            batched against 0.31 s, 5 episodes 0.85 s against 0.82 s, 2 cores,
            ``benchmarks/bench_evaluation.py``). Defaults to ``False``.
    """

    episodes: int = 3
    max_steps: int | None = None
    every_iterations: int | None = None
    batched: bool = False
    #: ``every_iterations`` with ``episodes = 0`` is refused (it would evaluate nothing)
    _every_needs_episodes: ClassVar[bool] = True

    def _check(self, prefix: str) -> None:
        check_int(self.episodes, _path(prefix, "episodes"), minimum=0)
        check_bool(self.batched, _path(prefix, "batched"))
        if self.max_steps is not None:
            check_int(self.max_steps, _path(prefix, "max_steps"))
        if self.every_iterations is not None:
            check_int(self.every_iterations, _path(prefix, "every_iterations"))
            if self.episodes == 0 and self._every_needs_episodes:
                raise ValueError(f"{_path(prefix, 'every_iterations')}={self.every_iterations} needs "
                                 f"{_path(prefix, 'episodes')} > 0, got 0")
