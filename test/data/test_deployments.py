"""Tests for DeploymentReplayBuffers: persistence, atomic writes, tagging, sampling."""
from __future__ import annotations

import json
import re

import pytest
import torch
from tensordict import TensorDict

from torchrl_depeff.data.deployments import DeploymentReplayBuffers, validate_transitions


def make_transitions(n: int, obs_dim: int = 3, act_dim: int = 2, offset: float = 0.0, batch=None):
    shape = (n,) if batch is None else tuple(batch)
    return TensorDict(
        {
            "observation": torch.randn(*shape, obs_dim) + offset,
            "action": torch.rand(*shape, act_dim) * 2 - 1,
            "next": {
                "observation": torch.randn(*shape, obs_dim),
                "reward": torch.randn(*shape, 1),
                "done": torch.zeros(*shape, 1, dtype=torch.bool),
                "terminated": torch.zeros(*shape, 1, dtype=torch.bool),
            },
        },
        batch_size=shape,
    )


class TestDeploymentReplayBuffers:
    def test_tags_sizes_and_latest(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path, batch_size=8)
        d0, d1 = make_transitions(10), make_transitions(7, offset=100.0)
        assert bufs.add_deployment(d0, policy_version=3) == 0
        assert bufs.add_deployment(d1, policy_version=5) == 1
        assert bufs.num_deployments == 2 and len(bufs) == 17
        latest = bufs.latest()[:]
        assert len(bufs.latest()) == 7
        assert (latest["deployment"] == 1).all() and (latest["policy_version"] == 5).all()
        torch.testing.assert_close(latest["observation"], d1["observation"])
        full = bufs.as_tensordict("all")
        assert full["deployment"].dtype == torch.int64 and full["deployment"].shape == (17,)
        assert full["deployment"].tolist() == [0] * 10 + [1] * 7
        assert full["policy_version"].tolist() == [3] * 10 + [5] * 7
        torch.testing.assert_close(bufs.as_tensordict(0)["action"], d0["action"])
        # caller's data untouched
        assert "deployment" not in d0.keys()

    def test_batched_input_is_flattened(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path)
        data = make_transitions(0, batch=(4, 5))
        bufs.add_deployment(data, policy_version=0)
        assert len(bufs) == 20
        torch.testing.assert_close(bufs.as_tensordict()["observation"], data["observation"].reshape(20, 3))

    def test_persist_and_reload_identically(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path)
        bufs.add_deployment(make_transitions(12), policy_version=0, metadata={"policy_hash": "h0"})
        bufs.add_deployment(make_transitions(9), policy_version=1, metadata={"policy_hash": "h1"})
        before = bufs.as_tensordict("all")
        del bufs
        again = DeploymentReplayBuffers(tmp_path)
        assert again.num_deployments == 2 and len(again) == 21
        after = again.as_tensordict("all")
        assert set(before.keys(True, True)) == set(after.keys(True, True))
        for key in before.keys(True, True):
            assert torch.equal(before[key], after[key]), key
        meta = again.metadata(1)
        assert meta["policy_hash"] == "h1" and meta["num_rows"] == 9 and meta["policy_version"] == 1
        assert "created_unix" in meta and meta["shapes"]["observation"] == [3]
        # and adding after reload continues the numbering
        assert again.add_deployment(make_transitions(3), policy_version=2) == 2
        assert (tmp_path / "deployment_0002" / "metadata.json").exists()

    def test_interrupted_write_leaves_no_partial_deployment(self, tmp_path, monkeypatch):
        bufs = DeploymentReplayBuffers(tmp_path)
        bufs.add_deployment(make_transitions(5), policy_version=0)
        original = DeploymentReplayBuffers._write

        def crash(self, tmp, data, meta):
            original(self, tmp, data, meta)  # data fully on disk in the temp dir...
            raise KeyboardInterrupt("killed mid-write")  # ...but killed before the rename

        monkeypatch.setattr(DeploymentReplayBuffers, "_write", crash)
        with pytest.raises(KeyboardInterrupt):
            bufs.add_deployment(make_transitions(6), policy_version=1)
        monkeypatch.setattr(DeploymentReplayBuffers, "_write", original)
        assert bufs.num_deployments == 1 and len(bufs) == 5
        assert not (tmp_path / "deployment_0001").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["deployment_0000"]
        assert bufs.add_deployment(make_transitions(4), policy_version=1) == 1
        assert DeploymentReplayBuffers(tmp_path).as_tensordict("latest")["policy_version"].tolist() == [1] * 4

    def test_leftover_temp_dir_from_hard_crash_is_never_loaded(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path)
        bufs.add_deployment(make_transitions(5), policy_version=0)
        # a hard kill (no exception handler ran) leaves a temp dir with partial content
        leftover = tmp_path / ".tmp-deployment_0001-999-deadbeef"
        (leftover / "storage").mkdir(parents=True)
        (leftover / "metadata.json").write_text(json.dumps({"num_rows": 100}))
        again = DeploymentReplayBuffers(tmp_path)
        assert again.num_deployments == 1 and len(again) == 5
        assert not leftover.exists()
        assert again.add_deployment(make_transitions(2), policy_version=1) == 1

    def test_sample_uniform_over_rows_and_latest(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path, batch_size=16)
        bufs.add_deployment(make_transitions(30, offset=0.0), policy_version=0)
        bufs.add_deployment(make_transitions(10, offset=1000.0), policy_version=1)
        s = bufs.sample(4000, generator=torch.Generator().manual_seed(0))
        assert s.batch_size == (4000,)
        frac1 = (s["deployment"] == 1).float().mean().item()
        assert abs(frac1 - 0.25) < 0.03  # 10 of 40 rows
        # rows are consistent (observation matches its deployment tag: no member mix-up)
        assert ((s["observation"].mean(-1) > 500) == (s["deployment"] == 1)).all()
        assert s["deployment"][:200].unique().numel() == 2  # order not sorted by deployment
        latest = bufs.sample(64, which="latest")
        assert (latest["deployment"] == 1).all()
        assert bufs.sample()["observation"].shape == (16, 3)
        with pytest.raises(ValueError, match="nope"):
            bufs.sample(which="nope")

    def test_all_view(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path, batch_size=32)
        bufs.add_deployment(make_transitions(30), policy_version=0)
        assert len(bufs.all()) == 30
        bufs.add_deployment(make_transitions(10), policy_version=1)
        bufs.add_deployment(make_transitions(10), policy_version=2)  # 32 % 3 != 0 must still work
        out = bufs.all().sample()
        assert out["deployment"].numel() == 32
        assert set(out["deployment"].reshape(-1).tolist()) <= {0, 1, 2}
        # buffer probability proportional to size: deployment 0 holds 30 of 50 rows
        view = bufs.all()
        big = torch.cat([view.sample()["deployment"].reshape(-1) for _ in range(60)])
        assert abs((big == 0).float().mean().item() - 0.6) < 0.05

    def test_sample_paths_have_the_same_shapes(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path, batch_size=128)
        bufs.add_deployment(make_transitions(300), policy_version=0)
        single = bufs.all().sample()
        bufs.add_deployment(make_transitions(200), policy_version=1)
        ensemble, direct, latest = bufs.all().sample(), bufs.sample(), bufs.latest().sample()
        for key in direct.keys(True, True):
            if key != "index":  # the ensemble's index also names the buffer
                shapes = {tuple(td[key].shape) for td in (single, ensemble, direct, latest)}
                assert len(shapes) == 1, (key, shapes)
        assert ensemble.batch_size == direct.batch_size == (128,)
        assert ensemble["deployment"].shape == (128,)
        sample, info = bufs.all().sample(return_info=True)
        assert sample.batch_size == (128,) and info.batch_size == (128,)

    @pytest.mark.parametrize("batch", [(0,), (0, 4), (3, 0)])
    def test_empty_data_refused(self, tmp_path, batch):
        bufs = DeploymentReplayBuffers(tmp_path)
        with pytest.raises(ValueError, match=re.escape(f"data is empty (batch_size={tuple(batch)})")):
            bufs.add_deployment(make_transitions(0, batch=batch), policy_version=0)
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize(
        "key,err",
        [("action", KeyError), (("next", "reward"), KeyError), (("next", "done"), KeyError)],
    )
    def test_missing_key_named(self, tmp_path, key, err):
        bufs = DeploymentReplayBuffers(tmp_path)
        with pytest.raises(err, match=str(key[-1] if isinstance(key, tuple) else key)):
            bufs.add_deployment(make_transitions(4).exclude(key), policy_version=0)
        assert bufs.num_deployments == 0 and list(tmp_path.iterdir()) == []

    def test_nonfinite_named(self, tmp_path):
        data = make_transitions(4)
        data["next", "reward"][2] = float("inf")
        with pytest.raises(ValueError, match="reward"):
            DeploymentReplayBuffers(tmp_path).add_deployment(data, policy_version=0)
        data = make_transitions(4)
        data["next", "observation"][0, 1] = float("nan")
        with pytest.raises(ValueError, match="observation"):
            validate_transitions(data)

    def test_errors(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path)
        with pytest.raises(ValueError, match="no deployment"):
            bufs.latest()
        with pytest.raises(TypeError, match="TensorDictBase"):
            bufs.add_deployment({"observation": torch.zeros(3)}, policy_version=0)
        with pytest.raises(ValueError, match="batch_size"):
            DeploymentReplayBuffers(tmp_path, batch_size=0)
        bufs.add_deployment(make_transitions(3), policy_version=0)
        with pytest.raises(IndexError, match="5"):
            bufs.metadata(5)


_KILL_SCRIPT = """
import sys, time
import torch
from tensordict import TensorDict
from torchrl_depeff.data.deployments import DeploymentReplayBuffers

original = DeploymentReplayBuffers._write

def slow_write(self, tmp, data, meta):
    original(self, tmp, data, meta)
    print("WRITTEN", flush=True)  # the temp dir holds the data; rename not done yet
    time.sleep(60)

DeploymentReplayBuffers._write = slow_write
n = 50
td = TensorDict({"observation": torch.randn(n, 3), "action": torch.randn(n, 2),
    "next": {"observation": torch.randn(n, 3), "reward": torch.randn(n, 1),
             "done": torch.zeros(n, 1, dtype=torch.bool),
             "terminated": torch.zeros(n, 1, dtype=torch.bool)}}, batch_size=[n])
DeploymentReplayBuffers(sys.argv[1]).add_deployment(td, policy_version=1)
"""


def test_sigkill_mid_write_leaves_no_partial_deployment(tmp_path):
    import subprocess
    import sys

    bufs = DeploymentReplayBuffers(tmp_path)
    bufs.add_deployment(make_transitions(5), policy_version=0)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        lines = iter(proc.stdout.readline, "")  # "" once the child exits
        assert any(line.strip() == "WRITTEN" for line in lines)
    finally:
        proc.kill()  # SIGKILL: no cleanup handler runs
        proc.wait(timeout=30)
    assert any(p.name.startswith(".tmp-deployment_0001") for p in tmp_path.iterdir())
    again = DeploymentReplayBuffers(tmp_path)
    assert again.num_deployments == 1 and len(again) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployment_0000"]
    assert again.add_deployment(make_transitions(4), policy_version=1) == 1
    assert len(DeploymentReplayBuffers(tmp_path)) == 9
