"""Analysis metrics (MUSBO Table 1, Fig. 6) and their plots."""
from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from tensordict import TensorDict
from torchrl.record.loggers import CSVLogger

from torchrl_depeff.metrics import (
    deployment_metrics,
    energy_distance,
    METRIC_NAMES,
    novelty_score,
    trajectory_mse,
)
from torchrl_depeff.metrics_plots import plot_metrics, read_scalar_csv
from torchrl_depeff.modules.ensemble import DynamicsEnsemble


# ---------------------------------------------------------------- novelty
def _novelty_reference(new: torch.Tensor, prev: torch.Tensor) -> float:
    total = 0.0
    for s in new.tolist():
        best = -2.0
        for p in prev.tolist():
            dot = sum(a * b for a, b in zip(s, p))
            norm = math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(b * b for b in p))
            best = max(best, dot / norm)
        total += best
    return total / len(new)


def test_novelty_is_one_for_identical_batches_and_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(300, 6)
    assert float(novelty_score(x, x)) == pytest.approx(1.0, abs=1e-6)
    # identical states inside a larger previous buffer: still 1
    assert float(novelty_score(x[:50], torch.cat([torch.randn(500, 6), x]))) == pytest.approx(1.0, abs=1e-6)
    new, prev = torch.randn(40, 6), torch.randn(70, 6)
    ref = _novelty_reference(new, prev)
    assert float(novelty_score(new, prev, chunk_size=16)) == pytest.approx(ref, abs=1e-5)
    assert float(novelty_score(new, prev)) == pytest.approx(ref, abs=1e-5)
    assert ref < 0.99  # random directions are novel


def test_novelty_orders_batches_and_reads_tensordicts():
    torch.manual_seed(0)
    prev = torch.randn(200, 3).abs()  # positive orthant
    near = prev[:100] + 0.01 * torch.randn(100, 3)
    far = -torch.randn(100, 3).abs()  # opposite orthant: novel
    td_prev = TensorDict(observation=prev, batch_size=[200])
    td_near = TensorDict(observation=near, batch_size=[100])
    s_near = float(novelty_score(td_near, td_prev))
    s_far = float(novelty_score(far, td_prev))
    assert s_near > 0.99 and s_far < 0.5
    # multi-dim batches are flattened into states
    assert float(novelty_score(near.reshape(10, 10, 3), prev)) == pytest.approx(s_near, abs=1e-6)


def test_novelty_errors():
    with pytest.raises(ValueError, match="features"):
        novelty_score(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(KeyError, match="'obs'"):
        novelty_score(TensorDict(observation=torch.randn(3, 2), batch_size=[3]), torch.randn(3, 2), key="obs")
    with pytest.raises(ValueError, match="empty"):
        novelty_score(torch.randn(0, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        novelty_score(torch.randn(3, 2), torch.randn(3, 2), chunk_size=0)


# ---------------------------------------------------------------- energy distance
def _energy_reference(x: list[list[float]], y: list[list[float]]) -> float:
    def dist(a, b):
        return math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))

    exy = sum(dist(a, b) for a in x for b in y) / (len(x) * len(y))
    exx = sum(dist(a, b) for a in x for b in x) / (len(x) ** 2)
    eyy = sum(dist(a, b) for a in y for b in y) / (len(y) ** 2)
    return 2 * exy - exx - eyy


def test_energy_distance_matches_direct_reference():
    torch.manual_seed(0)
    x, y = torch.randn(37, 4), torch.randn(23, 4) + 0.5
    ref = _energy_reference(x.tolist(), y.tolist())
    d2 = energy_distance(x, y, squared=True, chunk_size=10)  # blocks do not align with sizes
    assert d2.dtype == torch.float64
    assert float(d2) == pytest.approx(ref, rel=1e-9)
    assert float(energy_distance(x, y)) == pytest.approx(math.sqrt(ref), rel=1e-9)
    # symmetric
    assert float(energy_distance(y, x, squared=True)) == pytest.approx(ref, rel=1e-9)


def test_energy_distance_agrees_with_scipy_in_1d():
    torch.manual_seed(0)
    x, y = torch.randn(50), torch.randn(80) * 2 + 1
    expected = scipy.stats.energy_distance(x.double().numpy(), y.double().numpy())
    assert float(energy_distance(x, y)) == pytest.approx(expected, rel=1e-9)


def test_energy_distance_zero_for_identical_and_grows_with_shift():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    assert float(energy_distance(x, x)) == 0.0
    assert float(energy_distance(x, x.clone(), chunk_size=7)) == 0.0
    d = [float(energy_distance(x, x + shift)) for shift in (0.1, 0.5, 2.0)]
    assert 0 < d[0] < d[1] < d[2]
    # rollouts [N, T, d] are compared as sets of states; TensorDicts are read at ``key``
    ro = TensorDict(observation=x.reshape(8, 8, 3), batch_size=[8, 8])
    assert float(energy_distance(ro, x + 0.5)) == pytest.approx(d[1], rel=1e-12)
    with pytest.raises(ValueError, match="features"):
        energy_distance(torch.randn(3, 2), torch.randn(3, 3))


# ---------------------------------------------------------------- trajectory MSE
def _linear_trajectories(N=5, T=4, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs0 = torch.randn(N, d, generator=g)
    actions = torch.randn(N, T, d, generator=g)
    states = [obs0]
    for t in range(T):
        states.append(0.9 * states[-1] + actions[:, t])
    states = torch.stack(states, 1)  # [N, T+1, d]
    return TensorDict(
        {"observation": states[:, :-1], "action": actions, ("next", "observation"): states[:, 1:]}, [N, T]
    )


def test_trajectory_mse_by_hand_open_loop():
    traj = _linear_trajectories()
    torch.testing.assert_close(trajectory_mse(lambda s, a: 0.9 * s + a, traj), torch.zeros(4))
    # wrong model s' = s + a: the model feeds back its own states (open loop), so the error
    # compounds; reference computed step by step
    s_hat = traj["observation"][:, 0]
    expected = []
    for t in range(4):
        s_hat = s_hat + traj["action"][:, t]
        expected.append(float((s_hat - traj["next", "observation"][:, t]).pow(2).mean()))
    torch.testing.assert_close(trajectory_mse(lambda s, a: s + a, traj), torch.tensor(expected))
    # a one-step (teacher-forced) evaluation would differ from step 2 on: open loop is what we measure
    one_step = ((traj["observation"] + traj["action"] - traj["next", "observation"]).pow(2).mean((0, 2)))
    assert not torch.allclose(one_step[1:], torch.tensor(expected[1:]))
    # single trajectory [T]
    torch.testing.assert_close(trajectory_mse(lambda s, a: s + a, traj[0]).shape, torch.Size([4]))


def test_trajectory_mse_masks_steps_after_done():
    traj = _linear_trajectories(N=2, T=4)
    done = torch.zeros(2, 4, 1, dtype=torch.bool)
    done[0, 1] = True  # trajectory 0 ends at step 1: steps 2, 3 excluded for it
    traj["next", "done"] = done
    traj["next", "observation"][0, 2:] = 1e6  # garbage after the end must not count
    mse = trajectory_mse(lambda s, a: s + a, traj)
    full = trajectory_mse(lambda s, a: s + a, traj[1:])
    torch.testing.assert_close(mse[2:], full[2:])
    assert bool(torch.isfinite(mse).all())
    traj["next", "done"][1, 0] = True
    assert torch.isnan(trajectory_mse(lambda s, a: s + a, traj)[2:]).all()


@torch.no_grad()
def _reference_rollout_mse(ens, traj, member):
    s_hat, out = traj["observation"][:, 0], []
    for t in range(traj.shape[1]):
        loc = ens.predict(s_hat, traj["action"][:, t]).loc
        s_hat = loc.mean(0) if member == "mean" else loc[member]
        out.append(float((s_hat - traj["next", "observation"][:, t]).pow(2).mean()))
    return torch.tensor(out)


def test_trajectory_mse_with_ensemble_uses_member_means():
    torch.manual_seed(0)
    ens = DynamicsEnsemble(2, 2, num_members=3, num_cells=(8,))
    traj = _linear_trajectories()
    mse_mean = trajectory_mse(ens, traj)
    torch.testing.assert_close(mse_mean, _reference_rollout_mse(ens, traj, "mean"))
    mse_2 = trajectory_mse(ens, traj, member=2)
    torch.testing.assert_close(mse_2, _reference_rollout_mse(ens, traj, 2))
    assert not torch.allclose(mse_2, mse_mean)  # the member index is honoured
    assert not mse_mean.requires_grad
    with pytest.raises(ValueError, match="member"):
        trajectory_mse(ens, traj, member=3)
    with pytest.raises(KeyError, match="'action'"):
        trajectory_mse(ens, traj.exclude("action"))
    with pytest.raises(TypeError, match="model"):
        trajectory_mse(42, traj)


def test_trajectory_mse_accepts_model_env():
    from torchrl.data import Bounded, Unbounded

    from torchrl_depeff.envs.model_env import EnsembleModelEnv

    torch.manual_seed(0)
    ens = DynamicsEnsemble(2, 2, num_members=3, num_cells=(8,), probabilistic=True)
    env = EnsembleModelEnv(
        ens, observation_spec=Unbounded(2), action_spec=Bounded(-1.0, 1.0, (2,)),
        reward_fn=lambda o, a, n: -n.pow(2).sum(-1, keepdim=True),
        start_states=TensorDict({"observation": torch.randn(10, 2)}, [10]), batch_size=4,
    )
    traj = _linear_trajectories()
    torch.testing.assert_close(trajectory_mse(env, traj), trajectory_mse(ens, traj))


def test_deployment_metrics_compute_and_log(tmp_path):
    traj = _linear_trajectories(N=6, T=5)
    traj["next", "done"] = torch.zeros(6, 5, 1, dtype=torch.bool)
    traj["next", "done"][0, 2] = True  # steps 3, 4 of trajectory 0 are excluded
    model = lambda s, a: s + a  # noqa: E731
    prev = torch.randn(50, 2)
    logger = CSVLogger("musbo", log_dir=str(tmp_path))
    out = deployment_metrics(new_batch=traj, previous_data=prev, model=model, real_trajectories=traj,
                             logger=logger, step=3)
    assert set(out) == {"novelty", "energy_distance", "trajectory_mse"}
    assert out["novelty"] == pytest.approx(float(novelty_score(traj["observation"], prev)))
    # energy distance between the open-loop model states and the real next states, valid steps only
    s_hat, preds = traj["observation"][:, 0], []
    for t in range(5):
        s_hat = s_hat + traj["action"][:, t]
        preds.append(s_hat)
    preds = torch.stack(preds, 1)
    valid = torch.ones(6, 5, dtype=torch.bool)
    valid[0, 3:] = False
    expected = float(energy_distance(preds[valid], traj["next", "observation"][valid]))
    assert out["energy_distance"] == pytest.approx(expected, rel=1e-9)
    assert out["trajectory_mse"] == pytest.approx(float(trajectory_mse(model, traj).mean()), rel=1e-6)
    for key, name in METRIC_NAMES.items():
        steps, values = read_scalar_csv(tmp_path / "musbo", name)
        assert steps == [3.0] and values[0] == pytest.approx(out[key])
    # only what the inputs allow
    assert set(deployment_metrics(new_batch=prev, previous_data=prev)) == {"novelty"}


# ---------------------------------------------------------------- plots
def test_read_scalar_csv_and_plot(tmp_path):
    for algo, values in (("bremen", [0.97, 0.91, 0.89]), ("musbo", [0.99, 0.96, 0.94])):
        logger = CSVLogger(algo, log_dir=str(tmp_path))
        for k, v in enumerate(values, start=2):
            logger.log_scalar(METRIC_NAMES["novelty"], v, step=k)
        logger.log_scalar(METRIC_NAMES["energy_distance"], 1.0, step=1)
    # a resumed run re-logs a step: the last value wins
    logger.log_scalar(METRIC_NAMES["novelty"], 0.5, step=3)
    steps, values = read_scalar_csv(tmp_path / "musbo", METRIC_NAMES["novelty"])
    assert steps == [2.0, 3.0, 4.0] and values == [0.99, 0.5, 0.94]
    assert read_scalar_csv(tmp_path / "musbo", "metrics/absent") == ([], [])
    out = plot_metrics(
        {"BREMEN": tmp_path / "bremen", "MUSBO": tmp_path / "musbo", "MOPO": tmp_path / "missing"},
        tmp_path / "plots" / "metrics.png",
    )
    assert out.is_file() and out.stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="none of the metrics"):
        plot_metrics({"X": tmp_path / "missing"}, tmp_path / "x.png")
    bad = tmp_path / "bad" / "scalars" / "metrics"
    bad.mkdir(parents=True)
    (bad / "novelty.csv").write_text("1,2,3\n")
    with pytest.raises(ValueError, match="step,value"):
        read_scalar_csv(tmp_path / "bad", "metrics/novelty")
