"""Bad inputs to the losses, the trust-region optimiser, the KL helper and the gate.

Each case asserts the exception type and that the message names the bad value (or key).
"""
from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Bounded
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives.utils import ValueEstimators

from torchrl_depeff.collectors.gate import DeploymentGate
from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.modules.distributions import mean_policy_kl
from torchrl_depeff.modules.mixture import make_gmm_actor
from torchrl_depeff.objectives import AWACLoss, train_bc, trpo_step, TRPOLoss, UncertaintyWeight, WeightedBCLoss
from torchrl_depeff.optim import ConjugateGradientTrustRegion

OBS, ACT = 3, 2


def _actor(seed=0):
    torch.manual_seed(seed)
    return make_gaussian_actor(OBS, ACT, num_cells=(8,), learn_sigma=True)


def _batch(actor, n=16):
    with torch.no_grad():
        td = actor(TensorDict(observation=torch.randn(n, OBS), batch_size=[n]))
    td["advantage"] = torch.randn(n, 1)
    return td


def _qnet(action_key="action"):
    return ValueOperator(MLP(in_features=OBS + ACT, out_features=1, num_cells=[8]), in_keys=["observation", action_key])


CONSTRUCTION = [
    (lambda: TRPOLoss(_actor(), reduction="max"), ValueError, "'max'"),
    (lambda: TRPOLoss(_actor(), entropy_coeff=-1.0), ValueError, "-1.0"),
    (lambda: TRPOLoss(_actor(), entropy_coeff=float("inf")), ValueError, "inf"),
    (lambda: TRPOLoss(_actor(), kl_to_reference_mode="value"), ValueError, "'value'"),
    (lambda: TRPOLoss(_actor(), kl_to_reference_coef=0.25), ValueError, "0.25"),
    (lambda: TRPOLoss(_actor(), samples_mc_kl=0), ValueError, "got 0"),
    (lambda: TRPOLoss(_actor(), sample_weight_normalization="sum"), ValueError, "'sum'"),
    (lambda: TRPOLoss(_actor(), critic_coeff=0.5), ValueError, "0.5"),
    (lambda: TRPOLoss(TensorDictModule(nn.Linear(OBS, ACT), ["observation"], ["action"])), TypeError, "TensorDictModule"),
    (lambda: ConjugateGradientTrustRegion(TRPOLoss(_actor()), max_kl=float("nan")), ValueError, "nan"),
    (lambda: ConjugateGradientTrustRegion(TRPOLoss(_actor()), fisher="exact"), ValueError, "'exact'"),
    (lambda: ConjugateGradientTrustRegion(TRPOLoss(_actor()), cg_iters=2.5), ValueError, "2.5"),
    (lambda: ConjugateGradientTrustRegion(torch.zeros(3, requires_grad=True)), TypeError, "single tensor"),
    (lambda: AWACLoss(_actor(), _qnet(), awac_lambda=0.0), ValueError, "0.0"),
    (lambda: AWACLoss(_actor(), _qnet(), target="max"), ValueError, "'max'"),
    (lambda: AWACLoss(_actor(), _qnet(), num_value_samples=True), ValueError, "True"),
    (lambda: AWACLoss(_actor(), _qnet(), max_weight=float("nan")), ValueError, "nan"),
    (lambda: WeightedBCLoss(_actor(), loss_type="l3"), ValueError, "'l3'"),
    (lambda: UncertaintyWeight(alpha=-2.0), ValueError, "-2.0"),
    (lambda: DeploymentGate(max_kl=0.1, kl_num_samples=0), ValueError, "got 0"),
]


@pytest.mark.parametrize("build, exc, match", CONSTRUCTION, ids=[m for _, _, m in CONSTRUCTION])
def test_bad_construction(build, exc, match):
    with pytest.raises(exc) as info:
        build()
    assert match in str(info.value)


def test_nan_advantage_named_by_check_inputs_and_trpo_step():
    loss = TRPOLoss(_actor())
    td = _batch(loss.actor_network)
    td["advantage"][2] = float("nan")
    with pytest.raises(ValueError, match="advantage"):
        loss.check_inputs(td)
    with pytest.raises(ValueError, match="advantage"):
        trpo_step(loss, ConjugateGradientTrustRegion(loss), td)


def test_missing_old_distribution_parameter_named():
    loss = TRPOLoss(_actor())
    with pytest.raises(KeyError, match="scale"):
        loss(_batch(loss.actor_network).exclude("scale"))


def test_foreign_parameters_refused_by_trpo_step():
    actor = _actor()
    loss = TRPOLoss(actor)
    opt = ConjugateGradientTrustRegion(copy.deepcopy(actor).parameters())
    with pytest.raises(ValueError, match=r"actor_network_params.*|\(2, 8\)") as info:
        trpo_step(loss, opt, _batch(actor))
    assert "(2, 8)" in str(info.value)  # names the shapes of the tensors that are not the loss's


def test_trpo_step_needs_a_scalar_loss():
    loss = TRPOLoss(_actor(), reduction="none")
    with pytest.raises(ValueError, match="'none'"):
        trpo_step(loss, ConjugateGradientTrustRegion(loss), _batch(loss.actor_network))


def test_reward_mode_refuses_a_precomputed_advantage():
    loss = TRPOLoss(_actor(), kl_to_reference_coef=0.1, reference_actor=_actor(1), kl_to_reference_mode="reward")
    td = _batch(loss.actor_network)
    with pytest.raises(ValueError, match="'advantage'"):
        loss(td)


def test_unknown_fisher_method_named():
    loss = TRPOLoss(_actor())
    td = _batch(loss.actor_network)
    with pytest.raises(ValueError, match="'hessian'"):
        loss.make_fisher_vector_product(td, list(loss.actor_network_params.values(True, True)), method="hessian")


def test_awac_action_key_not_read_by_critic_named():
    loss = AWACLoss(make_gmm_actor(OBS, ACT, num_cells=(8,)), _qnet())
    with pytest.raises(ValueError, match="'act'"):
        loss.set_keys(action="act")


def test_awac_unsupported_estimator_named():
    loss = AWACLoss(_actor(), _qnet())
    with pytest.raises(NotImplementedError, match="GAE"):
        loss.make_value_estimator(ValueEstimators.GAE)


def test_weighted_bc_weight_shape_named():
    loss = WeightedBCLoss(_actor(), weight_key="w")
    td = TensorDict(observation=torch.randn(6, OBS), action=torch.rand(6, ACT), w=torch.rand(6, 3), batch_size=[6])
    with pytest.raises(ValueError, match=r"\(6, 3\)"):
        loss(td)


def test_train_bc_bad_holdout_ratio_named():
    td = TensorDict(observation=torch.randn(6, OBS), action=torch.rand(6, ACT), batch_size=[6])
    with pytest.raises(ValueError, match="1.0"):
        train_bc(_actor(), td, holdout_ratio=1.0)


def test_mean_policy_kl_bad_arguments_named():
    s = TensorDict(observation=torch.randn(4, OBS), batch_size=[4])
    with pytest.raises(ValueError, match="got 0"):
        mean_policy_kl(_actor(), _actor(1), s, num_samples=0)
    with pytest.raises(TypeError, match="dict"):
        mean_policy_kl(_actor(), _actor(1), {"observation": torch.randn(4, OBS)})
    with pytest.raises(TypeError, match="TensorDictModule"):
        mean_policy_kl(TensorDictModule(nn.Linear(OBS, ACT), ["observation"], ["loc"]), _actor(), s)


def test_gate_policy_without_outputs_named():
    gate = DeploymentGate(max_kl=None, action_spec=Bounded(-1.0, 1.0, shape=(ACT,)))
    silent = TensorDictModule(nn.Linear(OBS, ACT), ["observation"], ["mean_action"])
    with pytest.raises(KeyError, match="'action'"):
        gate.check(silent, None, TensorDict(observation=torch.randn(4, OBS), batch_size=[4]))


def test_train_bc_on_empty_data_is_named():
    from tensordict import TensorDict

    from torchrl_depeff.modules import make_gaussian_actor
    from torchrl_depeff.objectives import train_bc

    empty = TensorDict({"observation": torch.zeros(0, 3), "action": torch.zeros(0, 2)}, [0])
    with pytest.raises(ValueError, match=r"empty data \(batch_size=\[0\]\)"):
        train_bc(make_gaussian_actor(3, 2, num_cells=(4,)), empty)
