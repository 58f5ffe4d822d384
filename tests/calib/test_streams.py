"""Hidden-state streams spilled to the work folder above --host-memory: same checkpoint, same resume."""
import torch
from calibrate_cli import calibrate_cli

import tlq
from tlq.calib.streams import SampleStore, StreamFolder, should_spill, stream_bytes
from tlq.multirank.writer import tensor_hashes


def test_store_round_trip_on_disk_and_in_ram(tmp_path):
    tensors = [torch.randn(1, n, 8, dtype=torch.bfloat16) for n in (3, 5, 2)]
    for folder in (None, tmp_path / "s"):
        store = SampleStore.from_tensors(tensors, folder)
        assert len(store) == 3 and store.spilled == (folder is not None)
        assert all(torch.equal(a, b) for a, b in zip(store, tensors))
        assert [t.shape[-2] for t in store[1:]] == [5, 2]
    again = SampleStore.reopen(tmp_path / "s", 3)
    assert torch.equal(again[2], tensors[2])
    streams = StreamFolder(tmp_path)
    streams.new("a").append(tensors[0])
    streams.keep_only({"a"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_entry_streams_keep_the_float_path_apart(tmp_path):
    """A pipeline stage starts from different quantized and float streams: both survive spilling."""
    from tlq.calib.layer_loop import spill_entry_streams
    one, two = torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 2.0)
    h_q, h_fp = [one], [two]
    q, fp = spill_entry_streams(h_q, h_fp, StreamFolder(tmp_path))
    assert torch.equal(q[0], one) and torch.equal(fp[0], two) and q.spilled and fp.spilled
    assert h_q == [] and h_fp == []  # the lists the caller passed hold nothing in RAM any more
    same_q, same_fp = spill_entry_streams([one], [one], StreamFolder(tmp_path / "first"))  # same tensors
    assert same_q is same_fp


def test_spill_decision():
    """The streams may take half of --host-memory in RAM (the rest is what never spills)."""
    assert stream_bytes(1000, 256, torch.bfloat16) == 4 * 1000 * 256 * 2
    assert stream_bytes(1000, 256, torch.float32, streams=1) == 1000 * 256 * 4
    four = stream_bytes(262144, 8192, torch.bfloat16)  # 72B, 256 x 1024 tokens: 16 GiB
    assert should_spill(four, 16.0) is True
    assert should_spill(four, 32.0) is False  # exactly the share: not above it
    assert should_spill(four + 1, 32.0) is True
    assert should_spill(1, 0.0) is True


def test_take_moves_a_list_to_disk_and_empties_it(tmp_path):
    tensors = [torch.randn(1, 3, 4), torch.randn(1, 2, 4)]
    held = list(tensors)
    assert StreamFolder(None).take(held, "x") is held and len(held) == 2  # RAM: unchanged
    store = StreamFolder(tmp_path).take(held, "x")
    assert store.spilled and held == [] and all(torch.equal(a, b) for a, b in zip(store, tensors))
    assert StreamFolder(tmp_path).take(store, "y") is store  # spilled already
    assert StreamFolder(None).new("z") == []


def test_spilled_run_gives_the_same_checkpoint_and_resumes(qwen2_vl_dir, tmp_path):
    ram = tlq.calibrate(qwen2_vl_dir, out=tmp_path / "ram", method="tlq", scheme="w4a16", max_samples=3,
                        progress=False)
    flags = ("--method", "tlq", "--scheme", "w4a16", "--max-samples", "3", "--host-memory", "0")
    killed = calibrate_cli(qwen2_vl_dir, tmp_path / "disk", *flags, die_after_layer=0)
    assert killed.returncode == 17, killed.stderr
    spilled = tmp_path / ".disk.work" / "streams"
    assert sorted(p.name for p in spilled.iterdir()) == ["L0000-fp", "L0000-q"]
    assert len(list((spilled / "L0000-q").iterdir())) == 3
    resumed = calibrate_cli(qwen2_vl_dir, tmp_path / "disk", *flags)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    assert tensor_hashes(tmp_path / "disk") == tensor_hashes(ram)
    assert not (tmp_path / ".disk.work").exists()


def test_another_runs_spilled_streams_are_cleared(tmp_path):
    """A work folder left by a killed spilled run of other settings holds stream folders: a new run
    clears them (it used to stop with IsADirectoryError)."""
    from tlq.calib.layer_loop import WorkFolder
    old = WorkFolder(tmp_path / "w", {"run": 1})
    old.open(False)
    StreamFolder(old.path / "streams").new("L0000-q").append(torch.ones(1, 2, 3))
    assert WorkFolder(tmp_path / "w", {"run": 2}).open(True) == 0
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["run.json"]


def test_spilled_run_keeps_no_entry_stream_in_ram(qwen2_vl_dir, tmp_path, monkeypatch):
    """Above the streams' share the captured hidden states go to files before the gradient pass:
    the pass and the loop read them from there, and no sample still holds its own copy."""
    from tlq.calib import phases
    from tlq.calib.streams import SampleStore
    seen = {}
    real = phases.token_gradients

    def spy(model, adapter, samples, *args, entry=None, **kwargs):
        seen.update(store=isinstance(entry, SampleStore) and entry.spilled,
                    held=[s.hidden is not None for s in samples])
        return real(model, adapter, samples, *args, entry=entry, **kwargs)

    monkeypatch.setattr(phases, "token_gradients", spy)
    ram = tlq.calibrate(qwen2_vl_dir, out=tmp_path / "ram", method="tlq", scheme="w4a16", max_samples=3,
                        progress=False)
    assert seen == {"store": False, "held": [False] * 3}  # in RAM: the loop's list, not the samples'
    disk = tlq.calibrate(qwen2_vl_dir, out=tmp_path / "disk", method="tlq", scheme="w4a16", max_samples=3,
                         progress=False, host_memory=0)
    assert seen == {"store": True, "held": [False] * 3}
    assert tensor_hashes(disk) == tensor_hashes(ram)
