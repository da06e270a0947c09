"""Fault tests: committed deployments damaged on disk are detected by name on reload.

Three deployments are committed, then one of them is damaged in a different way per test
(a column file truncated, bytes flipped in place, a file deleted, ``metadata.json`` damaged).
Reloading names the damaged deployment, the file and the problem; with ``on_damaged="skip"`` the
other deployments still load with their exact content, and nothing on disk is changed by loading.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from tensordict import TensorDict

from torchrl_depeff.data.deployments import (
    DamagedDeploymentError,
    DeploymentReplayBuffers,
    INTEGRITY_VERSION,
    verify_deployment,
)


def make_transitions(n: int, obs_dim: int = 3, act_dim: int = 2, offset: float = 0.0) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(n, obs_dim) + offset,
            "action": torch.rand(n, act_dim) * 2 - 1,
            "next": {
                "observation": torch.randn(n, obs_dim),
                "reward": torch.randn(n, 1),
                "done": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


def tree_hashes(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def run(tmp_path):
    """Three committed deployments of 20, 30, 40 rows; returns (root, their contents)."""
    bufs = DeploymentReplayBuffers(tmp_path)
    contents = []
    for k, n in enumerate((20, 30, 40)):
        bufs.add_deployment(make_transitions(n, offset=100.0 * k), policy_version=k)
        contents.append(bufs.as_tensordict(k))
    return tmp_path, contents


def truncate_column(path):
    column = path / "storage" / "observation.memmap"
    column.write_bytes(column.read_bytes()[:-12])
    return "storage/observation.memmap", "size"


def flip_bytes(path):
    column = path / "storage" / "next" / "reward.memmap"
    data = bytearray(column.read_bytes())
    data[4:8] = bytes(b ^ 0xFF for b in data[4:8])  # same size, different content
    column.write_bytes(bytes(data))
    return "storage/next/reward.memmap", "SHA-256"


def delete_file(path):
    (path / "storage" / "action.memmap").unlink()
    return "storage/action.memmap", "missing"


def empty_metadata(path):
    (path / "metadata.json").write_bytes(b"")
    return "metadata.json", "unreadable"


def delete_metadata(path):
    (path / "metadata.json").unlink()
    return "metadata.json", "missing"


DAMAGES = [truncate_column, flip_bytes, delete_file, empty_metadata, delete_metadata]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("victim", [0, 1, 2])
def test_damage_detected_by_name_and_others_still_load(run, damage, victim):
    root, contents = run
    where, problem = damage(root / f"deployment_{victim:04d}")
    before = tree_hashes(root)

    with pytest.raises(DamagedDeploymentError, match=rf"deployment_{victim:04d}: {where}: .*{problem}") as info:
        DeploymentReplayBuffers(root)
    assert [d.deployment for d in info.value.damage] == [victim]
    assert info.value.damage[0].where == where
    assert "restore the directory" in str(info.value)  # says what to do

    bufs = DeploymentReplayBuffers(root, on_damaged="skip")
    survivors = [k for k in range(3) if k != victim]
    assert bufs.deployment_ids == survivors and bufs.num_deployments == 2
    assert [d.path.name for d in bufs.damaged] == [f"deployment_{victim:04d}"]
    for position, k in enumerate(survivors):
        loaded = bufs.as_tensordict(position)
        for key in contents[k].keys(True, True):
            assert torch.equal(loaded[key], contents[k][key]), (k, key)
    assert set(bufs.sample(500)["deployment"].unique().tolist()) == set(survivors)  # never the damaged one
    # appending next to a damaged deployment is refused, and nothing on disk changed
    with pytest.raises(ValueError, match=rf"deployment_{victim:04d}.*skipped"):
        bufs.add_deployment(make_transitions(5), policy_version=3)
    assert tree_hashes(root) == before


def test_every_damaged_deployment_is_listed(run):
    root, _ = run
    truncate_column(root / "deployment_0000")
    delete_file(root / "deployment_0002")
    with pytest.raises(DamagedDeploymentError) as info:
        DeploymentReplayBuffers(root)
    assert [str(d) for d in info.value.damage] == [
        "deployment_0000: storage/observation.memmap: size 228 bytes, 240 recorded at commit (truncated or overwritten)",
        "deployment_0002: storage/action.memmap: file is missing",
    ]
    assert DeploymentReplayBuffers(root, on_damaged="skip").deployment_ids == [1]


def test_verify_deployment_reports_each_file(run):
    root, _ = run
    path = root / "deployment_0001"
    assert verify_deployment(path) == []
    truncate_column(path)
    flip_bytes(path)
    delete_file(path)
    assert sorted(d.where for d in verify_deployment(path)) == [
        "storage/action.memmap", "storage/next/reward.memmap", "storage/observation.memmap",
    ]


def test_metadata_records_integrity(run):
    root, contents = run
    meta = json.loads((root / "deployment_0001" / "metadata.json").read_text())
    assert meta["integrity"] == INTEGRITY_VERSION and meta["num_rows"] == 30
    assert meta["specs"]["observation"] == {"shape": [3], "dtype": "float32"}
    assert meta["specs"]["next/done"] == {"shape": [1], "dtype": "bool"}
    files = meta["files"]
    assert files["storage/observation.memmap"]["size"] == 30 * 3 * 4
    column = root / "deployment_0001" / "storage" / "observation.memmap"
    assert files["storage/observation.memmap"]["sha256"] == hashlib.sha256(column.read_bytes()).hexdigest()
    assert "metadata.json" not in files


def test_tampered_specs_in_metadata_detected(run):
    root, _ = run
    meta_path = root / "deployment_0001" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["specs"]["observation"]["shape"] = [4]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DamagedDeploymentError, match=r"deployment_0001: observation: stored as .*\[3\].*\[4\]"):
        DeploymentReplayBuffers(root)


def _make_legacy(path):
    """Rewrite a deployment's metadata as the version before integrity records wrote it."""
    meta_path = path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for key in ("integrity", "files", "specs"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta, indent=1))


def test_legacy_deployments_load_unverified(run, caplog):
    root, contents = run
    for k in range(3):
        _make_legacy(root / f"deployment_{k:04d}")
    bufs = DeploymentReplayBuffers(root)
    assert bufs.num_deployments == 3 and bufs.unverified == [0, 1, 2]
    assert torch.equal(bufs.as_tensordict(1)["observation"], contents[1]["observation"])
    # a damaged legacy column is still caught by the shape check where it changes the size
    assert bufs.add_deployment(make_transitions(4), policy_version=3) == 3
    assert DeploymentReplayBuffers(root).unverified == [0, 1, 2]  # the new one is verified


def test_legacy_deployment_with_wrong_shapes_detected(run):
    root, _ = run
    path = root / "deployment_0002"
    _make_legacy(path)
    meta = json.loads((path / "metadata.json").read_text())
    meta["shapes"]["action"] = [5]
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DamagedDeploymentError, match=r"deployment_0002: action: stored as"):
        DeploymentReplayBuffers(root)


class TestSpecMismatchOnAppend:
    @pytest.mark.parametrize(
        "data,match",
        [
            (make_transitions(6, obs_dim=4), r"key 'observation': shape \[4\] dtype float32 in the new data, shape \[3\]"),
            (make_transitions(6, act_dim=1), r"key 'action': shape \[1\]"),
            (make_transitions(6).exclude(("next", "done")).set(("next", "done"), torch.zeros(6, 1)),
             r"key 'next/done': shape \[1\] dtype float32 in the new data, shape \[1\] dtype bool"),
            (make_transitions(6).set("extra", torch.zeros(6)), r"keys not in the run's deployments: \['extra'\]"),
            (make_transitions(6).set(("next", "terminated"), torch.zeros(6, 1, dtype=torch.bool)),
             r"keys not in the run's deployments: \['next/terminated'\]"),
            (make_transitions(6).double(), r"dtype float64"),
        ],
    )
    def test_refused_and_disk_unchanged(self, run, data, match):
        root, _ = run
        before = tree_hashes(root)
        bufs = DeploymentReplayBuffers(root)
        with pytest.raises(ValueError, match=match):
            bufs.add_deployment(data, policy_version=3)
        assert tree_hashes(root) == before and bufs.num_deployments == 3

    def test_missing_key_named(self, tmp_path):
        bufs = DeploymentReplayBuffers(tmp_path)
        bufs.add_deployment(make_transitions(5).set("extra", torch.zeros(5)), policy_version=0)
        with pytest.raises(ValueError, match=r"keys missing from the new data: \['extra'\]"):
            bufs.add_deployment(make_transitions(5), policy_version=1)
