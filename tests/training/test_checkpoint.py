"""Checkpoint files: atomic writes, the manifest written last, optimizer state round trips."""

import json

import pytest
import torch

from training.checkpoint import (CheckpointStore, atomic_write_bytes, optimizer_from_tensors,
                                 optimizer_to_tensors)


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")
    atomic_write_bytes(p, b"new contents")
    assert p.read_bytes() == b"new contents"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_manifest_records_offsets_and_points_at_its_state(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.latest() is None
    m = store.write(None, {"w": torch.ones(3)}, {"k": "v"}, {("hw.examples", 0): 17}, table_version=5)
    latest = store.latest()
    assert latest == m and latest.offsets_by_partition() == {("hw.examples", 0): 17}
    tensors, meta = store.load_state(latest)
    assert torch.equal(tensors["w"], torch.ones(3)) and meta == {"k": "v"}


def test_only_the_current_and_previous_state_files_are_kept(tmp_path):
    store = CheckpointStore(tmp_path)
    for i in range(4):
        store.write(None, {"w": torch.full((2,), float(i))}, {}, {("t", 0): i}, table_version=i)
    states = sorted(p.name for p in tmp_path.glob("state-*.safetensors"))
    assert states == ["state-00000003.safetensors", "state-00000004.safetensors"]
    assert store.latest().seq == 4


def test_a_corrupt_manifest_is_an_error_not_a_silent_fresh_start(tmp_path):
    (tmp_path / "MANIFEST.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        CheckpointStore(tmp_path).latest()


def test_a_manifest_naming_a_missing_state_file_is_an_error(tmp_path):
    store = CheckpointStore(tmp_path)
    m = store.write(None, {"w": torch.ones(1)}, {}, {}, table_version=0)
    (tmp_path / m.state_file).unlink()
    with pytest.raises(ValueError, match="missing"):
        store.latest()


def test_adam_state_round_trips_so_training_continues_identically():
    torch.manual_seed(0)
    def make():
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 1)
        return lin, torch.optim.Adam(lin.parameters(), lr=0.1)
    a, opt_a = make()
    x = torch.randn(16, 4)
    for _ in range(3):
        opt_a.zero_grad(); a(x).pow(2).mean().backward(); opt_a.step()
    tensors, meta = optimizer_to_tensors(opt_a)
    json.loads(meta)
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    optimizer_from_tensors(opt_b, tensors, meta)
    for lin, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad(); lin(x).pow(2).mean().backward(); opt.step()
    assert torch.equal(a.weight, b.weight)
