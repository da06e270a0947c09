"""MUSBO uncertainty labeler: eq. (9) labels, eq. (11) BC weights, eq. (12) rollout labels, eq. (22)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from torchrl_depeff.modules.actors import make_gaussian_actor, UncertaintyActionNoise
from torchrl_depeff.trainers import EnsembleTrainer
from torchrl_depeff.modules.labeler import (
    bc_weights,
    disagreement_weight,
    expected_sq_error,
    ExplorationUncertainty,
    LabelerDisagreement,
    pair_sq_disagreement,
    support_from_predictions,
    UncertaintyLabeler,
)
from torchrl_depeff.objectives.bc import train_bc, WeightedBCLoss
from torchrl_depeff.objectives.uw_trpo import UncertaintyWeightedTRPOLoss

OBS, ACT = 2, 1


def _set_member_outputs(labeler: UncertaintyLabeler, deltas: torch.Tensor, raw_logvar: float = -30.0) -> None:
    """Make member k predict ``next = obs + deltas[k]`` for every input (identity normalisers)."""
    last = labeler.ensemble.network.layers[-1]
    K, d = deltas.shape
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.cat([deltas, torch.full((K, d), raw_logvar)], -1).unsqueeze(1))


def _small_labeler(K: int = 3, **kwargs) -> UncertaintyLabeler:
    return UncertaintyLabeler(OBS, ACT, num_members=K, num_cells=(8,), **kwargs)


# ---------------------------------------------------------------- eq. (9)
def test_support_matches_eq9_by_hand_including_clip():
    # K=3 members, B=4 rows, d=2; ground truth next state is 0
    preds = torch.tensor(
        [
            [[0.1, 0.2], [1.0, 1.0], [0.0, 0.0], [3.0, 0.0]],
            [[0.3, 0.0], [0.5, 0.5], [2.0, 0.0], [0.0, 2.0]],
            [[0.0, 0.6], [2.0, 0.0], [0.0, 0.1], [1.5, 0.0]],
        ]
    )
    s_next = torch.zeros(4, 2)
    # squared errors e[k, b]
    e = [[0.05, 2.0, 0.0, 9.0], [0.09, 0.5, 4.0, 4.0], [0.36, 4.0, 0.01, 2.25]]
    clip = [[min(max(v, 0.0), 1.0) for v in row] for row in e]
    eq = [max(1 - clip[k][b] for k in range(3)) for b in range(4)]
    assert eq == pytest.approx([0.95, 0.5, 1.0, 0.0])
    text = [1 - max(clip[k][b] for k in range(3)) for b in range(4)]
    assert text == pytest.approx([0.64, 0.0, 0.0, 0.0])
    torch.testing.assert_close(support_from_predictions(preds, s_next).squeeze(-1), torch.tensor(eq))
    torch.testing.assert_close(
        support_from_predictions(preds, s_next, member_reduction="max_error").squeeze(-1), torch.tensor(text)
    )
    # the clip keeps U in [0, 1] even for huge errors, and exact predictions give exactly 1
    big = support_from_predictions(torch.full((2, 5, 2), 1e6), torch.zeros(5, 2))
    assert torch.equal(big, torch.zeros(5, 1))
    assert torch.equal(support_from_predictions(torch.zeros(2, 5, 2), torch.zeros(5, 2)), torch.ones(5, 1))


def test_support_rejects_bad_input():
    with pytest.raises(ValueError, match="member_reduction"):
        support_from_predictions(torch.zeros(2, 3, 2), torch.zeros(3, 2), member_reduction="min")
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        support_from_predictions(torch.zeros(2, 3, 2), torch.zeros(3, 3))


def test_labeler_forward_is_eq9_on_member_means():
    labeler = _small_labeler(K=3)
    _set_member_outputs(labeler, torch.tensor([[0.5, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    obs = torch.randn(5, OBS)
    # next = obs + (0.5, 0.1): squared errors 0.01, 3.61, 0.81 -> equation: 0.99, max_error: 0
    td = TensorDict(
        {"observation": obs, "action": torch.randn(5, ACT), ("next", "observation"): obs + torch.tensor([0.5, 0.1])},
        [5],
    )
    out = labeler(td.clone())["uncertainty"]
    torch.testing.assert_close(out, torch.full((5, 1), 0.99))
    labeler.member_reduction = "max_error"
    torch.testing.assert_close(labeler(td.clone())["uncertainty"], torch.zeros(5, 1))
    # chunking gives the same labels as one call
    labeler.member_reduction = "equation"
    labeler.chunk_size = 2
    torch.testing.assert_close(labeler(td.clone())["uncertainty"], out)


def test_labeler_config_follows_app_f_and_validates():
    labeler = UncertaintyLabeler(3, 2)  # paper defaults
    assert labeler.num_members == 3 and labeler.ensemble.probabilistic
    assert [layer.out_features for layer in labeler.ensemble.network.layers][:2] == [1024, 1024]
    # a pure module: MUSBO App. F's fit settings live in the config (MUSBOConfig.labeler)
    from torchrl_depeff.algorithms.musbo import MUSBOConfig

    fit = MUSBOConfig().labeler
    assert (fit.num_members, fit.patience, fit.holdout_ratio, fit.lr, fit.batch_size) == (3, 3, 0.15, 1e-3, 256)
    with pytest.raises(AttributeError, match="EnsembleTrainer"):
        labeler.fit(TensorDict({}, []))
    with pytest.raises(TypeError, match="no longer fits itself"):
        UncertaintyLabeler(3, 2, lr=1e-3)
    with pytest.raises(ValueError, match=r"K >= 2.*got 1"):
        UncertaintyLabeler(3, 2, num_members=1)
    with pytest.raises(ValueError, match="member_reduction"):
        _small_labeler(member_reduction="avg")
    td = TensorDict(observation=torch.randn(4, OBS), action=torch.randn(4, ACT), batch_size=[4])
    with pytest.raises(KeyError, match=r"\('next', 'observation'\)"):
        _small_labeler()(td)


@pytest.fixture
def one_thread():
    # tiny networks: a second thread only adds contention on the shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_labeler_fit_gives_higher_support_in_distribution(one_thread):
    torch.manual_seed(0)
    labeler = UncertaintyLabeler(OBS, ACT, num_members=3, num_cells=(32, 32))
    trainer = EnsembleTrainer(labeler.ensemble, loss_type="nll", max_epochs=20, batch_size=64, patience=3)

    def data(n, shift):
        obs = torch.rand(n, OBS) + shift
        act = torch.rand(n, ACT) * 2 - 1
        nxt = obs + torch.cat([act, torch.sin(3 * obs[:, :1])], -1)
        return TensorDict({"observation": obs, "action": act, ("next", "observation"): nxt}, [n])

    result = trainer.fit(data(600, 0.0))
    assert result.holdout_loss.shape == (3,)
    u_in = labeler(data(500, 0.0))["uncertainty"].mean()
    u_out = labeler(data(500, 4.0))["uncertainty"].mean()  # far outside the training region
    assert u_in > 0.9
    assert u_out < u_in - 0.4


# ---------------------------------------------------------------- eq. (11)
def test_bc_weights_hand_computed_and_errors():
    td = TensorDict(uncertainty=torch.tensor([0.2, 0.6, 1.0]), batch_size=[3])
    out = bc_weights(td, weight_key="w")
    torch.testing.assert_close(out["w"], torch.tensor([[0.2], [0.6], [1.0]]))
    torch.testing.assert_close(bc_weights(td, normalize=True)["bc_weight"], torch.tensor([[1 / 3], [1.0], [5 / 3]]))
    with pytest.raises(KeyError, match="'uncertainty'"):
        bc_weights(TensorDict(other=torch.ones(3), batch_size=[3]))
    with pytest.raises(KeyError, match="'my_u'"):
        bc_weights(td, uncertainty_key="my_u")
    with pytest.raises(ValueError, match=r"\[0, 1\].*1\.5"):
        bc_weights(TensorDict(uncertainty=torch.tensor([[0.5], [1.5]]), batch_size=[2]))
    with pytest.raises(ValueError, match="shape"):
        bc_weights(TensorDict(uncertainty=torch.ones(3, 2), batch_size=[3]))


def test_weighted_bc_loss_and_gradients_flow_only_into_the_policy():
    torch.manual_seed(0)
    labeler = _small_labeler()
    _set_member_outputs(labeler, torch.tensor([[0.0, 0.0], [0.3, 0.0], [1.0, 1.0]]))
    n = 6
    obs = torch.randn(n, OBS, requires_grad=True)
    shift = torch.tensor([[0.0, 0.0], [0.0, 0.5], [2.0, 0.0], [0.1, 0.0], [0.0, 0.0], [5.0, 5.0]])
    data = TensorDict(
        {"observation": obs, "action": torch.randn(n, ACT), ("next", "observation"): obs.detach() + shift}, [n]
    )
    data["next", "observation"].requires_grad_(True)  # even a differentiable target gives a constant label
    labeler(data)
    assert not data["uncertainty"].requires_grad
    bc_weights(data)
    w = data["bc_weight"]
    assert not w.requires_grad
    # eq. (9) by hand: best member errors 0, 0.25, 1.0 (member 1: (2-0.3)^2=2.89; member 3: 1+1=2), 0.01, 0, >1
    torch.testing.assert_close(w.squeeze(-1), torch.tensor([1.0, 0.75, 0.0, 0.99, 1.0, 0.0]))
    actor = TensorDictModule(torch.nn.Linear(OBS, ACT), in_keys=["observation"], out_keys=["loc"])
    loss = WeightedBCLoss(actor, weight_key="bc_weight")(data)["loss_weighted_bc"]
    # MUSBO eq. (11): 1/|D| sum U * 1/2 ||a - pi(s)||^2
    pred = actor.module(obs)
    manual = (w.squeeze(-1) * 0.5 * (data["action"] - pred).pow(2).sum(-1)).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert actor.module.weight.grad is not None and actor.module.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in labeler.parameters())
    # rows with weight 0 send no gradient: perturbing their action leaves the gradient unchanged
    g = actor.module.weight.grad.clone()
    actor.module.weight.grad = None
    data2 = data.clone()
    data2["action"][w.squeeze(-1) == 0] += 100.0
    WeightedBCLoss(actor, weight_key="bc_weight")(data2)["loss_weighted_bc"].backward()
    torch.testing.assert_close(actor.module.weight.grad, g)


def test_train_bc_with_eq11_weights_ignores_zero_support_rows():
    torch.manual_seed(0)
    n = 600
    obs = torch.randn(n, OBS)
    good = torch.arange(n) % 2 == 0
    action = torch.where(good[:, None], obs[:, :1] * 0.5, torch.full((n, 1), 3.0))
    data = TensorDict({"observation": obs, "action": action, "uncertainty": good.float()[:, None]}, [n])
    bc_weights(data)
    actor = TensorDictModule(torch.nn.Linear(OBS, ACT), in_keys=["observation"], out_keys=["loc"])
    train_bc(actor, data, lr=2e-2, max_epochs=60, weight_key="bc_weight")
    test_obs = torch.randn(200, OBS)
    err = (actor.module(test_obs) - test_obs[:, :1] * 0.5).abs().max()
    assert err < 0.05  # unweighted BC would be pulled towards 3.0 by half the rows


# ---------------------------------------------------------------- eq. (12)-(13)
def test_pair_sq_disagreement_and_weight_by_hand():
    preds = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[1.0, 2.0], [1.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]]])  # [3, 2, 2]
    torch.testing.assert_close(pair_sq_disagreement(preds, 0, 1), torch.tensor([[5.0], [0.0]]))
    torch.testing.assert_close(pair_sq_disagreement(preds, 0, 2), torch.tensor([[9.0], [2.0]]))
    # per-row members: row 0 uses (1, 2), row 1 uses (2, 0)
    d2 = pair_sq_disagreement(preds, torch.tensor([1, 2]), torch.tensor([2, 0]))
    torch.testing.assert_close(d2, torch.tensor([[8.0], [2.0]]))
    with pytest.raises(ValueError, match="3"):
        pair_sq_disagreement(preds, 0, 3)
    w = disagreement_weight(torch.tensor([0.0, 5.0, 9.0]))  # alpha = 0.028 (MUSBO App. F)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(-0.14), math.exp(-0.252)]))
    with pytest.raises(ValueError, match="-0.5"):
        disagreement_weight(torch.ones(2), alpha=-0.5)
    with pytest.raises(ValueError, match="-0.5"):
        UncertaintyWeightedTRPOLoss(make_gaussian_actor(OBS, ACT, num_cells=(4,)), alpha=-0.5)


def _all_pair_d2(preds: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    K = preds.shape[0]
    return {(i, j): pair_sq_disagreement(preds, i, j) for i, j in itertools.permutations(range(K), 2)}


@pytest.mark.parametrize("kernel", ["grouped", "all_members"])
@pytest.mark.parametrize("pair", ["per_trajectory", "per_row", "per_call"])
def test_labeler_disagreement_uses_one_sampled_pair(pair, kernel):
    torch.manual_seed(0)
    labeler = _small_labeler(K=3)
    # distinct members with pairwise distances that identify the pair: d2 = 1, 4, 9
    _set_member_outputs(labeler, torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 3.0]]))
    N, T = 64, 5
    td = TensorDict({"observation": torch.randn(N, T, OBS), "action": torch.randn(N, T, ACT)}, [N, T])
    out = LabelerDisagreement(labeler, pair=pair, generator=torch.Generator().manual_seed(1), kernel=kernel)(td)
    d2 = out["uncertainty"]
    assert d2.shape == (N, T, 1) and not d2.requires_grad
    # |0-1|^2, |1-2|^2, |0-2|^2 (up to rounding of obs + delta), snapped to the exact values
    candidates = torch.tensor([1.0, 9.0, 10.0])
    nearest = (d2 - candidates).abs().argmin(-1)
    torch.testing.assert_close(d2.squeeze(-1), candidates[nearest], atol=1e-5, rtol=0)
    values = candidates[nearest]
    if pair == "per_trajectory":
        assert bool((values == values[:, :1]).all())  # constant along time
        assert values[:, 0].unique().numel() == 3  # but differs across trajectories
    elif pair == "per_row":
        assert bool((values != values[:, :1]).any())
    else:
        assert values.unique().numel() == 1


@pytest.mark.parametrize("kernel", ["grouped", "all_members"])
def test_labeler_disagreement_matches_member_predictions(kernel):
    torch.manual_seed(0)
    labeler = _small_labeler(K=4)  # random (untrained) network: a real check of the gather
    labeler.chunk_size = 7  # several chunks
    td = TensorDict({"observation": torch.randn(20, OBS), "action": torch.randn(20, ACT)}, [20])
    label = LabelerDisagreement(labeler, pair="per_row", generator=torch.Generator().manual_seed(3), kernel=kernel)
    d2 = label(td.clone())["uncertainty"]
    i, j = LabelerDisagreement(labeler, generator=torch.Generator().manual_seed(3)).sample_pair((20,))
    loc = labeler.ensemble.predict(td["observation"], td["action"]).loc  # [4, 20, 2]
    rows = torch.arange(20)
    expected = (loc[i, rows] - loc[j, rows]).pow(2).sum(-1, keepdim=True)
    torch.testing.assert_close(d2, expected)


def test_sample_pair_uniform_over_ordered_pairs():
    label = LabelerDisagreement(_small_labeler(K=3), generator=torch.Generator().manual_seed(0))
    i, j = label.sample_pair((60000,))
    assert bool((i != j).all())
    counts = torch.bincount(i * 3 + j, minlength=9).float() / 60000
    for a, b in itertools.permutations(range(3), 2):
        assert abs(float(counts[a * 3 + b]) - 1 / 6) < 0.01
    with pytest.raises(ValueError, match="'fast'"):
        LabelerDisagreement(_small_labeler(), kernel="fast")
    with pytest.raises(ValueError, match="'per_step'"):
        LabelerDisagreement(_small_labeler(), pair="per_step")
    with pytest.raises(TypeError, match="UncertaintyLabeler"):
        LabelerDisagreement(torch.nn.Linear(2, 2))


def test_uw_trpo_reads_labels_weights_and_no_gradient_reaches_labeler():
    torch.manual_seed(0)
    labeler = _small_labeler(K=3)
    _set_member_outputs(labeler, torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 3.0]]))
    actor = make_gaussian_actor(OBS, ACT, num_cells=(8,), learn_sigma=True, sigma=0.5)
    obs = torch.randn(32, OBS, requires_grad=True)
    with torch.no_grad():
        td = actor(TensorDict(observation=obs.detach(), batch_size=[32]))
    td["observation"] = obs
    td["advantage"] = torch.randn(32, 1)
    LabelerDisagreement(labeler, pair="per_row", generator=torch.Generator().manual_seed(0))(td)
    loss = UncertaintyWeightedTRPOLoss(actor, alpha=0.1, reduction="none", normalize_advantage=False)
    w = loss.uncertainty_weight(td)
    torch.testing.assert_close(w, torch.exp(-0.1 * td["uncertainty"].squeeze(-1)))
    torch.testing.assert_close(w, disagreement_weight(td["uncertainty"].squeeze(-1), alpha=0.1))
    out = loss(td)
    # ratio is 1 at the old policy: the surrogate per row is -A * w (eq. 13)
    torch.testing.assert_close(out["loss_objective"], -td["advantage"].squeeze(-1) * w)
    out["loss_objective"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())
    assert all(p.grad is None for p in labeler.parameters())
    # missing entry: the loss names the key
    del td["uncertainty"]
    with pytest.raises(KeyError, match="'uncertainty'"):
        loss(td)


# ---------------------------------------------------------------- eq. (22)
def test_expected_sq_error_by_hand():
    loc = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 2.0]]])  # K=3, B=1, d=2
    scale = torch.tensor([[[0.1, 0.1]], [[0.2, 0.0]], [[0.0, 0.3]]])
    aleatoric = (0.02 + 0.04 + 0.09) / 3
    # member 0: (0 + 1 + 4)/3; member 1: (1 + 0 + 5)/3; member 2: (4 + 5 + 0)/3
    expected = torch.tensor([5 / 3, 2.0, 3.0]) + aleatoric
    torch.testing.assert_close(expected_sq_error(loc, scale).flatten(), expected)


def test_exploration_noise_has_labeler_variance():
    labeler = _small_labeler(K=3)
    _set_member_outputs(labeler, torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.4]]))
    n = 40000
    obs = torch.randn(n, OBS)
    td = TensorDict(observation=obs, action=torch.zeros(n, ACT), batch_size=[n])
    ExplorationUncertainty(labeler, mode="error")(td)
    pred = labeler.ensemble.predict(obs[:1], torch.zeros(1, ACT))
    # expected errors per member (aleatoric part ~e^-10 per dim): 0.0667, 0.08, 0.1067 -> best member
    e = expected_sq_error(pred.loc, pred.scale).amin(0).item()
    assert e == pytest.approx(0.2 / 3, abs=1e-3)
    torch.testing.assert_close(td["uncertainty"], torch.full((n, 1), e))
    support = ExplorationUncertainty(labeler, mode="support")(td.clone())["uncertainty"]
    torch.testing.assert_close(support, torch.full((n, 1), 1 - e))
    # eq. (22): a + const + N(0, U), variance const_std^2 + U (fixed seed, 40k samples)
    noise = UncertaintyActionNoise(const_std=0.1, generator=torch.Generator().manual_seed(0))
    a = noise(td)["action"]
    var = float(a.var())
    assert abs(var - (0.01 + e)) < 0.03 * (0.01 + e) + 1e-3
    assert abs(float(a.mean())) < 0.01
    with pytest.raises(ValueError, match="'loud'"):
        ExplorationUncertainty(labeler, mode="loud")
    with pytest.raises(TypeError, match="UncertaintyLabeler"):
        ExplorationUncertainty(torch.nn.Linear(2, 2))
    with pytest.raises(KeyError, match="'action'"):
        ExplorationUncertainty(labeler)(TensorDict(observation=obs[:3], batch_size=[3]))


def test_pipeline_on_model_env_rollout(one_thread):
    """Labeler fit -> eq. (9)/(11) on real data -> eq. (12) labels on an imaginary rollout -> UW-TRPO."""
    from torchrl.data import Bounded, Unbounded

    from torchrl_depeff.envs.model_env import EnsembleModelEnv
    from torchrl_depeff.modules.ensemble import DynamicsEnsemble

    torch.manual_seed(0)
    obs = torch.randn(300, OBS)
    act = torch.rand(300, ACT) * 2 - 1
    real = TensorDict({"observation": obs, "action": act, ("next", "observation"): obs + 0.1 * act}, [300])
    labeler = _small_labeler()
    EnsembleTrainer(labeler.ensemble, loss_type="nll", max_epochs=5).fit(real)
    bc_weights(labeler(real))
    assert real["bc_weight"].shape == (300, 1)
    actor = make_gaussian_actor(OBS, ACT, num_cells=(8,))
    env = EnsembleModelEnv(
        DynamicsEnsemble(OBS, ACT, num_members=2, num_cells=(8,)),
        observation_spec=Unbounded(OBS), action_spec=Bounded(-1.0, 1.0, (ACT,)),
        reward_fn=lambda o, a, n: -n.pow(2).sum(-1, keepdim=True),
        start_states=real.select("observation"), batch_size=4,
    )
    with torch.no_grad():
        rollout = env.rollout(6, actor)
    LabelerDisagreement(labeler, generator=torch.Generator().manual_seed(0))(rollout)
    d2 = rollout["uncertainty"]
    assert d2.shape == (4, 6, 1) and bool((d2 >= 0).all())
    rollout["advantage"] = torch.randn(4, 6, 1)
    out = UncertaintyWeightedTRPOLoss(actor)(rollout)
    torch.testing.assert_close(out["uncertainty_weight"], torch.exp(-0.028 * d2).mean())


def test_exploration_without_aleatoric_part_uses_member_disagreement_only():
    labeler = _small_labeler(K=3)
    # same member means as above, but a large predicted variance on every dim
    _set_member_outputs(labeler, torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.4]]), raw_logvar=0.0)
    obs = torch.randn(16, OBS)
    td = TensorDict(observation=obs, action=torch.zeros(16, ACT), batch_size=[16])
    pred = labeler.ensemble.predict(obs[:1], torch.zeros(1, ACT))
    aleatoric = pred.scale.pow(2).sum(-1).mean().item()
    assert aleatoric > 0.1  # the variance term is not negligible here
    with_var = ExplorationUncertainty(labeler, mode="error")(td.clone())["uncertainty"]
    epistemic = ExplorationUncertainty(labeler, mode="error", aleatoric=False)
    without = epistemic(td.clone())["uncertainty"]
    # best member's mean disagreement (0.2/3), with and without the predicted variance, clipped
    torch.testing.assert_close(without, torch.full((16, 1), 0.2 / 3))
    expected = min(1.0, expected_sq_error(pred.loc, pred.scale).amin(0).item())
    torch.testing.assert_close(with_var, torch.full((16, 1), expected))
    assert expected > 0.2 / 3 + 0.1


def test_exploration_default_is_eq22_as_printed():
    labeler = _small_labeler(K=3)
    _set_member_outputs(labeler, torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.4]]))
    td = TensorDict(observation=torch.randn(8, OBS), action=torch.zeros(8, ACT), batch_size=[8])
    default = ExplorationUncertainty(labeler)(td.clone())["uncertainty"]
    error = ExplorationUncertainty(labeler, mode="error")(td.clone())["uncertainty"]
    torch.testing.assert_close(default, 1 - error)  # U_hat = 1 - clip(e), eq. (9)/(22)
