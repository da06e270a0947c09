"""Tests for AWACLoss (MB2PO Sec. 4.2 / Nair et al. 2020)."""
from __future__ import annotations

import math
import time

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, TensorDictModule, set_interaction_type
from torch import nn
from torchrl.modules import MLP, IndependentNormal, ProbabilisticActor, ValueOperator
from torchrl.objectives import HardUpdate, SoftUpdate
from torchrl.objectives.utils import ValueEstimators

from torchrl_depeff.modules.mixture import make_gmm_actor
from torchrl_depeff.objectives.awac import AWACLoss

OBS, ACT = 3, 2


class _GaussianNet(nn.Module):
    """Stand-in for engineer C's Gaussian actor: loc = tanh(mlp(s)), learned state-free scale."""

    def __init__(self, obs_dim: int, act_dim: int, scale: float = 0.5) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(obs_dim, 16), nn.Tanh(), nn.Linear(16, act_dim))
        self.log_scale = nn.Parameter(torch.full((act_dim,), math.log(scale)))

    def forward(self, obs):
        loc = torch.tanh(self.mlp(obs))
        return loc, self.log_scale.exp().expand_as(loc)


def _gaussian_actor(seed=0, scale=0.5):
    torch.manual_seed(seed)
    module = TensorDictModule(_GaussianNet(OBS, ACT, scale), in_keys=["observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(
        module, in_keys=["loc", "scale"], distribution_class=IndependentNormal, return_log_prob=True
    )


def _qnet(seed=0):
    torch.manual_seed(seed)
    return ValueOperator(MLP(in_features=OBS + ACT, out_features=1, num_cells=[16]), in_keys=["observation", "action"])


class _QuadraticQ(nn.Module):
    """Q(s, a) = -||a - c||^2 with a learnable centre ``c`` (known values for hand computation)."""

    def __init__(self, act_dim: int) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs, action):
        return -(action - self.c).pow(2).sum(-1, keepdim=True) + 0.0 * obs.sum(-1, keepdim=True)


def _loss(seed=0, actor=None, **kwargs):
    actor = actor if actor is not None else _gaussian_actor(seed)
    return AWACLoss(actor, _qnet(seed + 100), **kwargs)


def _data(batch=(8,), seed=1, terminated=None):
    g = torch.Generator().manual_seed(seed)
    term = torch.rand(*batch, 1, generator=g) < 0.3 if terminated is None else torch.full((*batch, 1), terminated)
    return TensorDict(
        {
            "observation": torch.randn(*batch, OBS, generator=g),
            "action": torch.rand(*batch, ACT, generator=g) * 1.8 - 0.9,
            "next": {
                "observation": torch.randn(*batch, OBS, generator=g),
                "reward": torch.randn(*batch, 1, generator=g),
                "done": term.clone(),
                "terminated": term,
            },
        },
        batch_size=batch,
    )


def _quadratic_loss(centres, gamma=None, **kwargs):
    loss = AWACLoss(
        _gaussian_actor(0),
        TensorDictModule(_QuadraticQ(ACT), in_keys=["observation", "action"], out_keys=["state_action_value"]),
        num_qvalue_nets=len(centres),
        **kwargs,
    )
    if gamma is not None:
        loss.make_value_estimator(ValueEstimators.TD0, gamma=gamma)
    with torch.no_grad():
        loss.qvalue_network_params["module", "c"].copy_(torch.tensor(centres))
        loss.target_qvalue_network_params["module", "c"].copy_(torch.tensor(centres) * 0.5)
    return loss


def _quad_q(centres, action):  # [E, *B]
    return torch.stack([-(action - torch.tensor(c)).pow(2).sum(-1) for c in centres])


class TestAWACLoss:
    def test_output_keys(self):
        out = _loss()(_data())
        expected = {"loss_actor", "loss_qvalue", "weight_mean", "weight_max", "clamp_fraction",
                    "advantage_mean", "q_value_mean", "target_value_mean"}
        assert set(out.keys()) == expected
        for key in expected:
            if not key.startswith("loss"):
                assert not out[key].requires_grad

    def test_set_keys_rejects_unknown(self):
        with pytest.raises(ValueError, match="not_a_key"):
            _loss().set_keys(not_a_key="x")

    def test_set_keys_reward(self):
        td = _data()
        td["next", "shaped_reward"] = td["next", "reward"] + 1.0
        loss = _loss(num_value_samples=1)
        loss.set_keys(reward="shaped_reward")
        torch.manual_seed(3)
        a = loss.qvalue_loss(td)[1]["target_value_mean"]
        ref = _loss(num_value_samples=1)
        torch.manual_seed(3)
        b = ref.qvalue_loss(td)[1]["target_value_mean"]
        torch.testing.assert_close(a, b + 1.0)

    @pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
    def test_reduction_shapes(self, reduction):
        out = _loss(reduction=reduction)(_data(batch=(4, 5)))
        shape = (4, 5) if reduction == "none" else ()
        assert out["loss_actor"].shape == shape and out["loss_qvalue"].shape == shape

    def test_state_dict_roundtrip(self):
        a, b, td = _loss(seed=0), _loss(seed=1), _data()
        torch.manual_seed(5)
        out_a = a(td)
        torch.manual_seed(5)
        assert not torch.allclose(out_a["loss_qvalue"], b(td)["loss_qvalue"])
        b.load_state_dict(a.state_dict())
        torch.manual_seed(5)
        out_b = b(td)
        for key in ("loss_actor", "loss_qvalue", "weight_mean"):
            torch.testing.assert_close(out_a[key], out_b[key])

    @pytest.mark.parametrize("actor_kind", ["gaussian", "gmm"])
    def test_input_untouched(self, actor_kind):
        actor = _gaussian_actor() if actor_kind == "gaussian" else make_gmm_actor(OBS, ACT, num_cells=(16,))
        td = _data()
        before = td.clone()
        _loss(actor=actor)(td)
        assert set(td.keys(True, True)) == set(before.keys(True, True))
        assert (td == before).all()

    @pytest.mark.parametrize("actor_kind", ["gaussian", "gmm"])
    def test_gradient_isolation(self, actor_kind):
        actor = _gaussian_actor() if actor_kind == "gaussian" else make_gmm_actor(OBS, ACT, num_cells=(16,))
        loss, td = _loss(actor=actor), _data()
        loss.actor_loss(td)[0].backward()
        assert all(p.grad is None for p in loss.qvalue_network_params.values(True, True))
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.actor_network_params.values(True, True))
        loss.zero_grad(set_to_none=True)
        loss.qvalue_loss(td)[0].backward()
        assert all(p.grad is None for p in loss.actor_network_params.values(True, True))
        for p in loss.qvalue_network_params.values(True, True):
            assert p.grad is not None
            assert (p.grad.flatten(1).abs().sum(1) > 0).all()  # every member gets a gradient
        assert all(p.grad is None for p in loss.target_qvalue_network_params.values(True, True))

    @pytest.mark.parametrize("critic_kernel", ["vmap", "loop"])
    def test_forward_gradient_isolation(self, critic_kernel):
        # forward shares the dataset-pair critic pass between the two losses: the actor's
        # copy must stay detached, and the TD loss must still reach every member
        loss, td = _loss(actor=make_gmm_actor(OBS, ACT, num_cells=(16,)), critic_kernel=critic_kernel), _data()
        loss(td)["loss_actor"].backward()
        assert all(p.grad is None for p in loss.qvalue_network_params.values(True, True))
        assert all(p.grad is not None for p in loss.actor_network_params.values(True, True))
        loss.zero_grad(set_to_none=True)
        loss(td)["loss_qvalue"].backward()
        assert all(p.grad is None for p in loss.actor_network_params.values(True, True))
        for p in loss.qvalue_network_params.values(True, True):
            assert (p.grad.flatten(1).abs().sum(1) > 0).all()

    def test_forward_equals_separate_losses(self):
        loss, td = _loss(num_qvalue_nets=3), _data(batch=(4, 5))
        torch.manual_seed(11)
        out = loss(td)
        torch.manual_seed(11)
        actor, info_a = loss.actor_loss(td)
        qvalue, info_q = loss.qvalue_loss(td)
        torch.testing.assert_close(out["loss_actor"], actor)
        torch.testing.assert_close(out["loss_qvalue"], qvalue)
        torch.testing.assert_close(out["advantage_mean"], info_a["advantage_mean"])
        torch.testing.assert_close(out["q_value_mean"], info_q["q_value_mean"])

    def test_critic_kernels_agree(self):
        # 3 critics initialised differently: a member mix-up between kernels would change
        # the per-member TD gradients (and the min aggregation)
        loop, vmap = _loss(num_qvalue_nets=3, critic_kernel="loop"), _loss(num_qvalue_nets=3, critic_kernel="vmap")
        vmap.load_state_dict(loop.state_dict())
        td = _data(batch=(4, 5))
        grads = []
        for loss in (loop, vmap):
            torch.manual_seed(7)
            out = loss(td)
            (out["loss_actor"] + out["loss_qvalue"]).backward()
            grads.append(out)
            members = loss._qvalues(td.select("observation"), td["action"], loss.qvalue_network_params)
            assert members.shape == (3, 4, 5)
            grads.append(members.detach())
        torch.testing.assert_close(grads[1], grads[3])
        for key in ("loss_actor", "loss_qvalue", "weight_mean", "target_value_mean"):
            torch.testing.assert_close(grads[0][key], grads[2][key])
        for name in ("actor_network_params", "qvalue_network_params"):
            for (key, a), b in zip(getattr(loop, name).items(True, True), getattr(vmap, name).values(True, True)):
                torch.testing.assert_close(a.grad, b.grad, msg=f"{name} {key}")

    def test_critic_members_initialised_differently(self):
        loss = _loss()
        w = loss.qvalue_network_params["module", "0", "weight"]
        assert w.shape[0] == 2 and not torch.allclose(w[0], w[1])

    @pytest.mark.parametrize("target", ["min", "quantile"])
    def test_weights_match_hand_computation(self, target):
        centres = [[0.2, -0.1], [0.5, 0.3], [-0.4, 0.0]]
        kw = dict(awac_lambda=0.5, max_weight=2.0, num_value_samples=4, target=target, target_quantile=0.3)
        loss = _quadratic_loss(centres, reduction="none", **kw)
        td = _data(batch=(16,))
        torch.manual_seed(7)
        out = loss.actor_loss(td)[0]
        # by hand
        dist = loss.actor_network.get_dist(td.select("observation").copy())
        torch.manual_seed(7)
        pi_a = dist.sample((4,))
        agg = (lambda q: q.min(0).values) if target == "min" else (lambda q: torch.quantile(q, 0.3, dim=0))
        q = agg(_quad_q(centres, td["action"]))
        v = torch.stack([agg(_quad_q(centres, pi_a[i])) for i in range(4)]).mean(0)
        w = torch.exp((q - v) / 0.5).clamp_max(2.0)
        expected = -w * dist.log_prob(td["action"])
        torch.testing.assert_close(out, expected)
        assert (w == 2.0).any() and (w < 2.0).any()  # the clamp is exercised both ways
        info = loss.actor_loss(td)[1]
        assert info["weight_max"] <= 2.0

    def test_weight_sign_prefers_high_q_actions(self):
        # one critic centred at +0.5: dataset actions near +0.5 get larger weights than those near -0.5
        loss = _quadratic_loss([[0.5, 0.5]], reduction="none", max_weight=1e6, num_value_samples=32)
        td = _data(batch=(2,))
        td["action"] = torch.tensor([[0.5, 0.5], [-0.5, -0.5]])
        # identical states so that V(s) is the same for both rows
        td["observation"] = td["observation"][:1].expand(2, OBS).clone()
        log_prob = loss.actor_network.get_dist(td.select("observation").copy()).log_prob(td["action"])
        w = -loss.actor_loss(td)[0] / log_prob
        assert w[0] > w[1] * 2

    def test_qvalue_loss_matches_hand_computation(self):
        centres = [[0.2, -0.1], [0.5, 0.3]]
        loss = _quadratic_loss(centres, reduction="none", gamma=0.9)
        td = _data(batch=(16,))
        torch.manual_seed(11)
        out, info = loss.qvalue_loss(td)
        dist = loss.actor_network.get_dist(td["next"].select("observation").copy())
        torch.manual_seed(11)
        a_next = dist.sample()
        target_centres = [[c * 0.5 for c in row] for row in centres]
        q_next = _quad_q(target_centres, a_next).min(0).values  # target params, clipped double-Q
        y = td["next", "reward"].squeeze(-1) + 0.9 * (~td["next", "terminated"].squeeze(-1)).float() * q_next
        expected = (_quad_q(centres, td["action"]) - y).pow(2).sum(0)
        torch.testing.assert_close(out, expected)
        assert td["next", "terminated"].any() and not td["next", "terminated"].all()

    def test_terminal_target_is_reward(self):
        loss = _loss(reduction="none")
        td = _data(terminated=True)
        _, info = loss.qvalue_loss(td)
        torch.testing.assert_close(info["target_value_mean"], td["next", "reward"].mean())

    def test_quantile_zero_equals_min(self):
        td = _data()
        torch.manual_seed(2)
        a = _loss(target="quantile", target_quantile=0.0, num_qvalue_nets=4)(td)
        torch.manual_seed(2)
        b = _loss(target="min", num_qvalue_nets=4)(td)
        torch.testing.assert_close(a["loss_qvalue"], b["loss_qvalue"])
        torch.testing.assert_close(a["loss_actor"], b["loss_actor"])

    def test_target_params_and_updaters(self):
        loss, td = _loss(), _data(batch=(32,))
        online = loss.qvalue_network_params
        target = loss.target_qvalue_network_params
        assert (online.data == target).all()
        updater = SoftUpdate(loss, tau=0.25)
        optim = torch.optim.Adam(loss.qvalue_network_params.values(True, True), lr=1e-2)
        for _ in range(3):
            optim.zero_grad()
            loss.qvalue_loss(td)[0].backward()
            optim.step()
        assert not (online.data == target).all()
        before = target.clone()
        updater.step()
        expected = before.apply(lambda t, o: 0.75 * t + 0.25 * o, online.data)
        torch.testing.assert_close(target.to_dict(), expected.to_dict())
        # target changes the loss (the target critics are really used)
        hard = HardUpdate(loss, value_network_update_interval=1)
        hard.step()
        assert (online.data == target).all()

    def test_bad_input_raises(self):
        # validation is explicit (check_inputs, one host sync); forward never syncs
        for key in [("next", "reward"), "observation", "action", ("next", "observation")]:
            td = _data()
            td[key][0] = float("nan")
            with pytest.raises(ValueError, match=str(key[-1] if isinstance(key, tuple) else key)):
                _loss().check_inputs(td)
        with pytest.raises(KeyError, match="terminated"):
            _loss()(_data().exclude(("next", "terminated")))
        with pytest.raises(KeyError, match="terminated"):
            _loss().check_inputs(_data().exclude(("next", "terminated")))

    def test_gamma_through_value_estimator_and_deprecated_ctor(self):
        centres = [[0.2, -0.1], [0.5, 0.3]]
        td = _data(batch=(16,))
        new = _quadratic_loss(centres, reduction="none", gamma=0.9)
        with pytest.warns(FutureWarning, match="make_value_estimator"):
            old = AWACLoss(
                _gaussian_actor(0),
                TensorDictModule(_QuadraticQ(ACT), in_keys=["observation", "action"], out_keys=["state_action_value"]),
                num_qvalue_nets=2, reduction="none", gamma=0.9,
            )
        old.load_state_dict(new.state_dict())
        for loss in (new, old):
            assert float(loss.value_estimator.gamma) == pytest.approx(0.9)
        torch.manual_seed(4)
        a = new.qvalue_loss(td)[0]
        torch.manual_seed(4)
        b = old.qvalue_loss(td)[0]
        torch.testing.assert_close(a, b)
        with pytest.warns(FutureWarning, match="check_inputs"):
            _loss(check_inputs=False)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"awac_lambda": 0.0}, "awac_lambda"),
            ({"awac_lambda": -1.0}, "awac_lambda"),
            ({"max_weight": 0.0}, "max_weight"),
            ({"target": "max"}, "target"),
            ({"target_quantile": 1.5}, "target_quantile"),
            ({"num_value_samples": 0}, "num_value_samples"),
            ({"gamma": 1.5}, "gamma"),
            ({"awac_lambda": float("nan")}, "awac_lambda"),
            ({"num_qvalue_nets": 0}, "num_qvalue_nets"),
            ({"reduction": "max"}, "reduction"),
            ({"critic_kernel": "bmm"}, "critic_kernel"),
        ],
    )
    def test_bad_args(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            _loss(**kwargs)

    def test_actor_without_get_dist_rejected(self):
        det = TensorDictModule(nn.Linear(OBS, ACT), in_keys=["observation"], out_keys=["action"])
        with pytest.raises(TypeError, match="get_dist"):
            AWACLoss(det, _qnet())


def _bandit_data(n: int, g: torch.Generator) -> TensorDict:
    """1-step contextual bandit: r = -||a - a*(s)||^2, a*(s) = 0.8 * tanh(s[:2])."""
    obs = torch.randn(n, OBS, generator=g)
    best = 0.8 * torch.tanh(obs[:, :ACT])
    expert = (best + 0.1 * torch.randn(n, ACT, generator=g)).clamp(-0.99, 0.99)
    rand = torch.rand(n, ACT, generator=g) * 1.98 - 0.99
    use_expert = torch.rand(n, 1, generator=g) < 0.25
    action = torch.where(use_expert, expert, rand)
    reward = -(action - best).pow(2).sum(-1, keepdim=True)
    term = torch.ones(n, 1, dtype=torch.bool)
    return TensorDict(
        {
            "observation": obs,
            "action": action,
            "next": {"observation": obs.clone(), "reward": reward, "done": term, "terminated": term},
        },
        batch_size=[n],
    )


@pytest.fixture
def _one_thread():
    # small nets: 2 intra-op threads on a shared 2-core machine are ~7x slower than one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_bandit(awac_lambda: float, steps: int = 600) -> tuple[float, float, float, float]:
    """Train AWAC on the bandit; returns (learned, dataset, random) mean rewards and seconds."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = _bandit_data(4000, g)
    actor = make_gmm_actor(OBS, ACT, num_components=3, num_cells=(64, 64))
    qnet = ValueOperator(MLP(in_features=OBS + ACT, out_features=1, num_cells=[64, 64]), in_keys=["observation", "action"])
    loss = AWACLoss(actor, qnet, awac_lambda=awac_lambda, num_value_samples=4, check_inputs=False)
    optim = torch.optim.Adam(loss.parameters(), lr=3e-3)
    updater = SoftUpdate(loss, tau=0.05)
    start = time.perf_counter()
    for _ in range(steps):
        batch = data[torch.randint(0, 4000, (256,), generator=g)]
        out = loss(batch)
        optim.zero_grad()
        (out["loss_actor"] + out["loss_qvalue"]).backward()
        optim.step()
        updater.step()
    elapsed = time.perf_counter() - start
    test = _bandit_data(2000, g)
    best = 0.8 * torch.tanh(test["observation"][:, :ACT])
    with torch.no_grad(), set_interaction_type(InteractionType.DETERMINISTIC):
        act = actor(test.select("observation").copy())["action"]
    learned = -(act - best).pow(2).sum(-1).mean().item()
    dataset = data["next", "reward"].mean().item()
    random = -(torch.rand(2000, ACT, generator=g) * 2 - 1 - best).pow(2).sum(-1).mean().item()
    return learned, dataset, random, elapsed


def test_awac_learns_contextual_bandit(_one_thread):
    """AWAC on a 25 % expert / 75 % uniform dataset beats the data's average behaviour."""
    learned, dataset, random, elapsed = _train_bandit(awac_lambda=0.1)
    # rewards are <= 0; measured: learned -0.004, dataset -0.886, random -1.163 in ~13 s
    assert learned > 0.1 * dataset, (learned, dataset, random, elapsed)
    assert learned > 0.1 * random, (learned, dataset, random, elapsed)


@pytest.mark.slow
def test_awac_weighting_beats_plain_cloning(_one_thread):
    """With lambda -> inf the weights are ~1 (plain BC of the mixed data); lambda = 0.1 must be better."""
    awac, *_ = _train_bandit(awac_lambda=0.1)
    bc_like, *_ = _train_bandit(awac_lambda=1e4)
    assert awac > 0.5 * bc_like, (awac, bc_like)
