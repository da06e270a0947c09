"""The atomic writer and checkpoint reader of :mod:`torchrl_depeff.io`: every damaged case named."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import torchrl_depeff.algorithms as algorithms
import torchrl_depeff.algorithms.common as common
from torchrl_depeff import io
from torchrl_depeff.io import (
    atomic_save,
    atomic_write_text,
    CheckpointError,
    load_checkpoint,
    previous_path,
    write_json_atomic,
)


def _state(step: int) -> dict:
    return {"w": torch.arange(1000.0) + step, "step": step, "name": "x", "nested": {"a": [1, 2]}}


class TestAtomicSave:
    def test_roundtrip_and_no_temp_left(self, tmp_path):
        path = atomic_save(_state(1), tmp_path / "sub" / "checkpoint.pt")
        state = load_checkpoint(path)
        assert state["step"] == 1 and torch.equal(state["w"], torch.arange(1000.0) + 1)
        assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]

    def test_keeps_previous(self, tmp_path):
        path = tmp_path / "checkpoint.pt"
        atomic_save(_state(1), path)
        atomic_save(_state(2), path)
        atomic_save(_state(3), path)
        assert load_checkpoint(path)["step"] == 3
        assert load_checkpoint(previous_path(path))["step"] == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.prev"]

    def test_keep_previous_off(self, tmp_path):
        path = tmp_path / "c.pt"
        atomic_save(_state(1), path, keep_previous=False)
        atomic_save(_state(2), path, keep_previous=False)
        assert not previous_path(path).exists()

    def test_failing_save_leaves_old_file(self, tmp_path):
        path = tmp_path / "c.pt"
        atomic_save(_state(1), path)
        before = path.read_bytes()
        with pytest.raises(Exception):
            atomic_save({"f": lambda x: x}, path)  # not picklable
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]

    def test_directory_destination_refused(self, tmp_path):
        with pytest.raises(IsADirectoryError, match=str(tmp_path)):
            atomic_save(_state(1), tmp_path)

    def test_reexports(self):
        assert algorithms.atomic_save is io.atomic_save and common.atomic_save is io.atomic_save
        assert algorithms.load_checkpoint is io.load_checkpoint
        assert algorithms.write_json_atomic is io.write_json_atomic


class TestDamagedCheckpoints:
    def test_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nope.pt"):
            load_checkpoint(tmp_path / "nope.pt")

    def test_zero_bytes(self, tmp_path):
        path = tmp_path / "checkpoint.pt"
        path.write_bytes(b"")
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt \(0 bytes\) is damaged.*empty.*remove it"):
            load_checkpoint(path)

    def test_truncated(self, tmp_path):
        path = atomic_save(_state(1), tmp_path / "checkpoint.pt")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=rf"checkpoint\.pt \({len(data) // 2} bytes\) is damaged"):
            load_checkpoint(path)

    def test_corrupted(self, tmp_path):
        path = atomic_save(_state(1), tmp_path / "checkpoint.pt")
        data = bytearray(path.read_bytes())
        data[: 64] = bytes(64)  # zip header gone
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt .* is damaged"):
            load_checkpoint(path)

    def test_not_a_torch_file(self, tmp_path):
        path = tmp_path / "checkpoint.pt"
        path.write_text("hello")
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt \(5 bytes\)"):
            load_checkpoint(path)

    def test_pickled_objects_refused(self, tmp_path):
        path = tmp_path / "checkpoint.pt"
        torch.save({"obj": torch.nn.Linear(1, 1)}, path)  # a module is not weights_only-loadable
        with pytest.raises(CheckpointError, match="checkpoint.pt"):
            load_checkpoint(path)

    def test_is_a_value_error(self, tmp_path):
        path = tmp_path / "c.pt"
        path.write_bytes(b"")
        with pytest.raises(ValueError):
            load_checkpoint(path)

    def test_falls_back_to_previous_with_warning(self, tmp_path):
        path = tmp_path / "checkpoint.pt"
        atomic_save(_state(1), path)
        atomic_save(_state(2), path)
        data = path.read_bytes()
        path.write_bytes(data[:100])
        with pytest.warns(RuntimeWarning, match=r"checkpoint\.pt \(100 bytes\) is damaged.*checkpoint\.pt\.prev"):
            state = load_checkpoint(path)
        assert state["step"] == 1
        assert path.read_bytes() == data[:100]  # nothing is rewritten by loading

    def test_falls_back_when_newest_missing(self, tmp_path):
        path = tmp_path / "checkpoint.pt"
        atomic_save(_state(1), path)
        atomic_save(_state(2), path)
        path.unlink()
        with pytest.warns(RuntimeWarning, match="missing"):
            assert load_checkpoint(path)["step"] == 1

    def test_no_fallback_when_disabled(self, tmp_path):
        path = tmp_path / "checkpoint.pt"
        atomic_save(_state(1), path)
        atomic_save(_state(2), path)
        path.write_bytes(b"")
        with pytest.raises(CheckpointError, match="0 bytes"):
            load_checkpoint(path, fallback=False)

    def test_both_damaged_named(self, tmp_path):
        path = tmp_path / "checkpoint.pt"
        atomic_save(_state(1), path)
        atomic_save(_state(2), path)
        path.write_bytes(b"")
        previous_path(path).write_bytes(b"xx")
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt \(0 bytes\).*checkpoint\.pt\.prev \(2 bytes\)"):
            load_checkpoint(path)


class TestText:
    def test_json_nan_and_replace(self, tmp_path):
        path = tmp_path / "m.json"
        write_json_atomic([{"a": 1.0}], path)
        write_json_atomic([{"a": float("nan"), "b": float("inf")}], path)
        loaded = json.loads(path.read_text())
        assert math.isnan(loaded[0]["a"]) and loaded[0]["b"] == math.inf
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]

    def test_unserialisable_json_leaves_old_file(self, tmp_path):
        path = write_json_atomic({"a": 1}, tmp_path / "m.json")
        with pytest.raises(TypeError, match="object"):
            write_json_atomic({"a": object()}, path)
        assert json.loads(path.read_text()) == {"a": 1}
        assert os.listdir(tmp_path) == ["m.json"]

    def test_bytes(self, tmp_path):
        path = io.atomic_write_bytes(b"\x00\x01", tmp_path / "f.bin")
        assert path.read_bytes() == b"\x00\x01"
        with pytest.raises(TypeError, match="got str"):
            io.atomic_write_bytes("text", path)
        assert path.read_bytes() == b"\x00\x01" and os.listdir(tmp_path) == ["f.bin"]

    def test_text(self, tmp_path):
        path = atomic_write_text("abc", tmp_path / "d" / "t.txt")
        assert path.read_text() == "abc"
        with pytest.raises(TypeError, match="bytes"):
            atomic_write_text(b"abc", path)
        assert path.read_text() == "abc"
