"""Dynamics-ensemble losses: BREMEN eq. (1) MSE and the Gaussian NLL of probabilistic ensembles."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.objectives.common import LossModule

from torchrl_depeff.modules.ensemble import DynamicsEnsemble

__all__ = ["EnsembleDynamicsLoss"]

_LOG_2PI = math.log(2 * math.pi)


class EnsembleDynamicsLoss(LossModule):
    r"""Per-member regression loss of a :class:`~torchrl_depeff.modules.DynamicsEnsemble`.

    Presented in BREMEN https://arxiv.org/abs/2006.03647 (eq. (1), deterministic models) and
    used with probabilistic ensembles by MUSBO (App. F) and MB2PO (PETS-style Gaussian NLL,
    Chua et al. 2018, https://arxiv.org/abs/1805.12114).

    Both losses are computed in the *normalised* target space (``target_normalizer`` applied to
    ``[next_obs - obs, reward]``), so every target dimension weighs the same whatever its units;
    BREMEN eq. (1) is written on raw states, we follow the common practice of its code base and
    of MBPO/PETS of normalising targets.

    * ``"mse"`` (BREMEN eq. (1)): per member
      :math:`\frac{1}{|D|}\sum \frac{1}{2}\|y - \hat{f}_{\phi_i}(s, a)\|_2^2`, i.e. half the
      squared error **summed** over target dimensions and averaged over rows.
    * ``"nll"``: Gaussian negative log-likelihood with diagonal covariance, summed over target
      dimensions and averaged over rows, including the :math:`\frac{1}{2}\log 2\pi` constant:
      :math:`\frac{1}{2}\sum_d [(y_d-\mu_d)^2 e^{-\ell_d} + \ell_d + \log 2\pi]`, plus
      ``logvar_bound_coef * (sum(max_logvar_i) - sum(min_logvar_i))`` per member (PETS App. A.1).

    ``loss_dynamics`` is the **sum** over members of the per-member mean losses, so each member's
    gradient is that of its own loss, independent of ``E``.

    The input TensorDict is either ``[*B]`` (the same rows for all members) or ``[E, *B]``
    (per-member minibatches, member-first). With ``member_first=None`` (default) a batch with at
    least 2 dims whose first dim equals ``E`` is treated as per-member; pass ``member_first``
    explicitly if a shared batch can start with ``E``.

    Args:
        ensemble (DynamicsEnsemble): the model.

    Keyword Args:
        loss_type (str, optional): ``"mse"`` or ``"nll"``. Defaults to ``"mse"``; ``"nll"``
            needs a probabilistic ensemble.
        logvar_bound_coef (float, optional): weight of the log-variance bound penalty (NLL only).
            Defaults to ``0.01``.
        member_first (bool, optional): see above. Defaults to ``None`` (infer).
        check_finite (bool, optional): raise ``ValueError`` naming the key on NaN/inf inputs.
            Costs one device sync per call; :class:`~torchrl_depeff.trainers.EnsembleTrainer`
            checks its data once and turns it off. Defaults to ``True``.

    Outputs:
        ``"loss_dynamics"`` (scalar, differentiable), detached ``"member_loss"`` ``[E]`` (the
        per-member data term: MSE or NLL, bound penalty excluded) and ``"mse"`` ``[E]`` (mean
        squared error per element in normalised space).

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
        >>> from torchrl_depeff.objectives.dynamics import EnsembleDynamicsLoss
        >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16,), probabilistic=True)
        >>> loss = EnsembleDynamicsLoss(model, loss_type="nll")
        >>> td = TensorDict({"observation": torch.randn(8, 3), "action": torch.randn(8, 2),
        ...                  ("next", "observation"): torch.randn(8, 3)}, [8])
        >>> out = loss(td)
        >>> sorted(out.keys())
        ['loss_dynamics', 'member_loss', 'mse']
        >>> out["member_loss"].shape
        torch.Size([4])
        >>> out["loss_dynamics"].backward()
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable tensordict keys.

        Attributes:
            observation (NestedKey): current observation. Defaults to ``"observation"``.
            action (NestedKey): action. Defaults to ``"action"``.
            next_observation (NestedKey): next observation. Defaults to ``("next", "observation")``.
            reward (NestedKey): reward (read only if the ensemble predicts rewards).
                Defaults to ``("next", "reward")``.
        """

        observation: NestedKey = "observation"
        action: NestedKey = "action"
        next_observation: NestedKey = ("next", "observation")
        reward: NestedKey = ("next", "reward")

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    ensemble_network: DynamicsEnsemble
    ensemble_network_params: TensorDictBase
    target_ensemble_network_params: TensorDictBase

    def __init__(
        self,
        ensemble: DynamicsEnsemble,
        loss_type: str = "mse",
        logvar_bound_coef: float = 0.01,
        *,
        member_first: bool | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(ensemble, DynamicsEnsemble):
            raise TypeError(f"ensemble must be a DynamicsEnsemble, got {type(ensemble).__name__}")
        if loss_type not in ("mse", "nll"):
            raise ValueError(f"loss_type must be 'mse' or 'nll', got {loss_type!r}")
        if loss_type == "nll" and not ensemble.probabilistic:
            raise ValueError("loss_type='nll' needs a probabilistic ensemble (probabilistic=False given)")
        if logvar_bound_coef < 0:
            raise ValueError(f"logvar_bound_coef must be >= 0, got {logvar_bound_coef}")
        self.convert_to_functional(ensemble, "ensemble_network")
        self.loss_type = loss_type
        self.logvar_bound_coef = float(logvar_bound_coef)
        self.member_first = member_first
        self.check_finite = bool(check_finite)
        self.num_members = ensemble.num_members

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    def _get_finite(self, td: TensorDictBase, key: NestedKey) -> torch.Tensor:
        value = td.get(key, None)
        if value is None:
            raise KeyError(f"EnsembleDynamicsLoss: key {key!r} not found in the input tensordict")
        if not self.check_finite:
            return value
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"EnsembleDynamicsLoss: {bad} non-finite (NaN/inf) values in {key!r}")
        return value

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Compute the loss; the input tensordict is not modified."""
        k = self.tensor_keys
        net = self.ensemble_network
        obs = self._get_finite(tensordict, k.observation)
        act = self._get_finite(tensordict, k.action)
        next_obs = self._get_finite(tensordict, k.next_observation)
        reward = self._get_finite(tensordict, k.reward) if net.predict_reward else None
        member_first = self.member_first
        if member_first is None:
            member_first = tensordict.batch_dims >= 2 and tensordict.batch_size[0] == self.num_members
        with self.ensemble_network_params.to_module(net):
            mean, log_var = net.forward_normalized(obs, act, member_first=member_first)
            target = net.normalized_target(obs, next_obs, reward)
            sq = (mean - target).pow(2)  # [E, *B, d]
            reduce_dims = tuple(range(1, sq.dim()))
            mse = sq.mean(reduce_dims)  # [E]
            if self.loss_type == "mse":
                # BREMEN eq. (1): 1/2 ||y - f_i(s, a)||^2, averaged over rows
                member_loss = 0.5 * sq.sum(-1).mean(reduce_dims[:-1])
                total = member_loss
            else:
                # Gaussian NLL (PETS eq. 2), + PETS App. A.1 log-variance bound penalty
                nll = 0.5 * (sq * torch.exp(-log_var) + log_var + _LOG_2PI).sum(-1)
                member_loss = nll.mean(reduce_dims[:-1])
                bound = net.max_logvar.sum((1, 2)) - net.min_logvar.sum((1, 2))  # [E]
                total = member_loss + self.logvar_bound_coef * bound
        return TensorDict(
            {
                "loss_dynamics": total.sum(),
                "member_loss": member_loss.detach(),
                "mse": mse.detach(),
            },
            batch_size=[],
        )
