"""The one episode segmentation (``torchrl_depeff.data.episodes``) against the three copies it replaces.

``_ref_*`` below are the implementations that lived in ``algorithms/common.py``
(``episode_start_states``, ``completed_episode_returns``) and ``metrics.py``
(``_trajectory_windows``) before the merge, kept verbatim as references: on the data those
callers see, the new functions give the same values, and ``trajectory_windows`` consumes the RNG
identically (same windows for the same generator state).
"""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

import torchrl_depeff.algorithms as algorithms
from torchrl_depeff.data import episodes
from torchrl_depeff.data.episodes import (
    completed_episode_returns,
    episode_index,
    episode_start_states,
    trajectory_windows,
)


# ----------------------------------------------------------------------------- references
def _ref_episode_start_states(data):
    data = data.reshape(-1)
    n = data.shape[0]
    obs = data.get("observation")
    traj = data.get(("collector", "traj_ids"), None)
    if traj is not None:
        ids = traj.reshape(n).long()
        dep = data.get("deployment", None)
        key = torch.stack([dep.reshape(n).long(), ids], -1) if dep is not None else ids.unsqueeze(-1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        positions = torch.arange(n, device=obs.device)
        first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=obs.device)
        first = first.scatter_reduce(0, inverse, positions, reduce="amin")
        first = first.sort().values
    else:
        done = data.get(("next", "done")).reshape(n)
        start = torch.zeros(n, dtype=torch.bool, device=obs.device)
        start[0] = True
        start[1:] = done[:-1]
        first = start.nonzero().squeeze(-1)
    return TensorDict({"observation": obs[first]}, batch_size=[first.numel()])


def _ref_completed_episode_returns(data):
    data = data.reshape(-1)
    done = data.get(("next", "done")).reshape(-1)
    reward = data.get(("next", "reward")).reshape(-1)
    traj = data.get(("collector", "traj_ids"), None)
    if traj is None:
        episode = torch.cat([done.new_zeros(1, dtype=torch.long), done[:-1].long().cumsum(0)])
    else:
        _, episode = torch.unique(traj.reshape(-1), return_inverse=True)
    n = int(episode.max()) + 1
    sums = torch.zeros(n, dtype=reward.dtype).index_add_(0, episode, reward)
    ended = torch.zeros(n, dtype=torch.long).index_add_(0, episode, done.long()) > 0
    return sums[ended]


def _ref_trajectory_windows(data, horizon, max_windows, generator):
    data = data.reshape(-1)
    n = data.shape[0]
    traj = data.get(("collector", "traj_ids"), None)
    if traj is None:
        traj = torch.cat([torch.zeros(1, dtype=torch.long), data.get(("next", "done")).reshape(n)[:-1].long().cumsum(0)])
    traj = traj.reshape(n).long()
    order = torch.sort(traj, stable=True).indices
    sorted_ids = traj[order]
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    starts = torch.nonzero(new).squeeze(-1)
    seg = torch.cumsum(new.long(), 0) - 1
    pos = torch.arange(n) - starts[seg]
    lengths = torch.diff(torch.cat([starts, torch.tensor([n])]))
    ok = (pos % horizon == 0) & (pos + horizon <= lengths[seg])
    first = torch.nonzero(ok).squeeze(-1)
    if first.numel() == 0:
        return None
    pick = first[torch.randperm(first.numel(), generator=generator)[:max_windows]]
    idx = order[pick.unsqueeze(-1) + torch.arange(horizon)]
    return data[idx]


# ----------------------------------------------------------------------------- data
def batched_collector_rows(num_envs: int, steps: int, seed: int, deployment: int | None = None) -> TensorDict:
    """Rows as a TorchRL collector writes them for a batched env: ``[num_envs, T]`` flattened time-major,
    episodes of random lengths, trajectory ids increasing per new episode."""
    g = torch.Generator().manual_seed(seed)
    done = torch.rand(num_envs, steps, generator=g) < 0.15
    done[:, -1] |= torch.rand(num_envs, generator=g) < 0.5  # some episodes cut by the end of the batch
    # trajectory ids: env e's k-th episode
    ep_in_env = torch.cat([torch.zeros(num_envs, 1, dtype=torch.long), done[:, :-1].long().cumsum(1)], 1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), (ep_in_env[:, -1] + 1).cumsum(0)[:-1]])
    traj = ep_in_env + offsets.unsqueeze(1)
    td = TensorDict(
        {
            "observation": torch.randn(num_envs, steps, 3, generator=g),
            "action": torch.randn(num_envs, steps, 2, generator=g),
            ("collector", "traj_ids"): traj,
            ("next", "done"): done.unsqueeze(-1),
            ("next", "reward"): torch.randn(num_envs, steps, 1, generator=g),
        },
        batch_size=[num_envs, steps],
    )
    td = td.transpose(0, 1).reshape(-1)  # time-major: rows of one env interleaved with the others
    if deployment is not None:
        td.set("deployment", torch.full((td.shape[0],), deployment, dtype=torch.long))
    return td


def offline_rows(n: int, seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(n, 3, generator=g),
            ("next", "done"): (torch.rand(n, 1, generator=g) < 0.1),
            ("next", "reward"): torch.randn(n, 1, generator=g),
        },
        batch_size=[n],
    )


CASES = {
    "collector": lambda s: batched_collector_rows(4, 50, s),
    "collector_one_deployment": lambda s: batched_collector_rows(3, 40, s, deployment=2),
    "offline": lambda s: offline_rows(300, s),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
class TestReproducesTheOldCopies:
    def test_start_states(self, case, seed):
        data = CASES[case](seed)
        assert torch.equal(episode_start_states(data)["observation"], _ref_episode_start_states(data)["observation"])

    def test_completed_returns(self, case, seed):
        data = CASES[case](seed)
        torch.testing.assert_close(completed_episode_returns(data), _ref_completed_episode_returns(data))

    @pytest.mark.parametrize("horizon,max_windows", [(1, 7), (3, 10), (5, 1000), (200, 4)])
    def test_windows_and_rng(self, case, seed, horizon, max_windows):
        data = CASES[case](seed)
        g_new, g_old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        new = trajectory_windows(data, horizon, max_windows, g_new)
        old = _ref_trajectory_windows(data, horizon, max_windows, g_old)
        assert (new is None) == (old is None)
        if new is not None:
            assert new.batch_size == old.batch_size
            for key in old.keys(True, True):
                assert torch.equal(new[key], old[key]), key
        # the generators are left in the same state: later draws are unchanged too
        assert torch.equal(torch.rand(5, generator=g_new), torch.rand(5, generator=g_old))


class TestEpisodeIndex:
    def test_deployments_separate_restarting_ids(self):
        a = batched_collector_rows(2, 20, 0, deployment=0)
        b = batched_collector_rows(2, 20, 1, deployment=1)  # traj ids restart at 0
        both = torch.cat([a, b], 0)
        index = episode_index(both)
        assert index.shape == (80,) and index.dtype == torch.long
        assert set(index[:40].tolist()).isdisjoint(index[40:].tolist())
        starts = episode_start_states(both)["observation"]
        assert starts.shape[0] == int(index.max()) + 1
        assert starts.shape[0] == episode_start_states(a).shape[0] + episode_start_states(b).shape[0]

    def test_rows_of_one_episode_stay_inside_windows(self):
        data = batched_collector_rows(4, 60, 3)
        index = episode_index(data)
        data.set("row", torch.arange(data.shape[0]))
        w = trajectory_windows(data, 4, 1000, torch.Generator().manual_seed(0))
        rows = w["row"]
        assert (index[rows] == index[rows[:, :1]]).all()  # one episode per window
        assert (rows.diff(dim=1) > 0).all()  # in time order

    def test_done_in_row_order(self):
        done = torch.tensor([0, 0, 1, 1, 0, 1, 0]).bool().unsqueeze(-1)
        td = TensorDict({("next", "done"): done}, [7])
        assert episode_index(td).tolist() == [0, 0, 0, 1, 2, 2, 3]

    def test_batched_input_flattened(self):
        done = torch.zeros(2, 3, 1, dtype=torch.bool)
        done[0, 1] = True
        td = TensorDict({("next", "done"): done, "observation": torch.arange(6.0).reshape(2, 3, 1)}, [2, 3])
        assert episode_index(td).tolist() == [0, 0, 1, 1, 1, 1]
        assert episode_start_states(td)["observation"].squeeze(-1).tolist() == [0.0, 2.0]

    def test_unfinished_episodes_have_no_return(self):
        td = TensorDict({("next", "reward"): torch.ones(4, 1), ("next", "done"): torch.zeros(4, 1, dtype=torch.bool)}, [4])
        assert completed_episode_returns(td).numel() == 0


class TestBadInputs:
    def test_no_segmentation_keys(self):
        with pytest.raises(KeyError, match=r"neither \('collector', 'traj_ids'\) nor \('next', 'done'\)"):
            episode_index(TensorDict({"observation": torch.zeros(3, 1)}, [3]))

    def test_empty(self):
        empty = offline_rows(0, 0)
        assert episode_index(empty).numel() == 0
        assert completed_episode_returns(empty).numel() == 0
        assert trajectory_windows(empty, 2, 3) is None
        with pytest.raises(ValueError, match="empty data"):
            episode_start_states(empty)

    @pytest.mark.parametrize("horizon", [0, -1, 2.5, True])
    def test_bad_horizon(self, horizon):
        with pytest.raises(ValueError, match=rf"horizon must be an int >= 1, got {horizon!r}"):
            trajectory_windows(offline_rows(10, 0), horizon, 3)

    def test_bad_max_windows_and_type(self):
        with pytest.raises(ValueError, match="max_windows must be an int >= 1, got 0"):
            trajectory_windows(offline_rows(10, 0), 2, 0)
        with pytest.raises(TypeError, match="TensorDictBase, got dict"):
            episode_index({"observation": torch.zeros(3)})

    def test_missing_reward(self):
        with pytest.raises(KeyError, match="reward"):
            completed_episode_returns(TensorDict({("next", "done"): torch.zeros(3, 1, dtype=torch.bool)}, [3]))


def test_algorithms_reexport():
    assert algorithms.episode_start_states is episodes.episode_start_states
    assert algorithms.completed_episode_returns is episodes.completed_episode_returns
