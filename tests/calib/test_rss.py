"""tlq/calib/rss.py: measured memory, records and heap helpers."""
import json


def test_memory_record_and_heap_helpers(tmp_path, monkeypatch):
    from tlq.calib import rss
    monkeypatch.delenv("TLQ_RSS_TRACE", raising=False)
    rss.start_of_calibration()  # notes the start RSS, sets the mmap threshold (glibc)
    rss.trim_heap()
    rss.write_memory_record(tmp_path / "rec", 1, {"rank": 1})
    data = json.loads((tmp_path / "rec" / "rank1.json").read_text())
    # the peak (ru_maxrss) and the start (/proc) are rounded separately: equal figures may differ by 0.1
    assert data["rank"] == 1 and 0 < data["start_rss_mb"] <= data["peak_rss_mb"] + 1
    assert data["peak_rss_mb"] >= rss.rss_mb() * 0.5  # same units (MiB) as the current RSS
    assert [p.name for p in (tmp_path / "rec").iterdir()] == ["rank1.json"]  # no temporary file left


def test_resident_memory_by_kind(tmp_path):
    """Anonymous and file-backed pages apart: a mapped file's pages count as file, not anon."""
    import torch

    from tlq.calib import rss
    parts = rss.rss_parts_mb()
    assert set(parts) == {"anon", "file", "shmem"} and parts["anon"] > 0
    path = tmp_path / "t.pt"
    torch.save(torch.ones(16 * 2**20, dtype=torch.uint8), path)
    mapped = torch.load(path, mmap=True, weights_only=True)
    before = rss.rss_parts_mb()
    assert int(mapped.sum()) == 16 * 2**20  # touches every page
    after = rss.rss_parts_mb()
    assert after["file"] - before["file"] > 12 and after["anon"] - before["anon"] < 8


def test_cpu_kernel_caches_are_bounded_unless_the_user_chose(monkeypatch):
    import os

    from tlq.calib import rss
    for name in rss.CPU_KERNEL_CACHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "0")
    rss.bound_cpu_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(rss.CPU_KERNEL_CACHES["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
    assert os.environ["LRU_CACHE_CAPACITY"] == "0"


def test_a_pass_trims_the_heap_once_per_trim_tokens(monkeypatch):
    from tlq.calib import rss
    trims = []
    monkeypatch.setattr(rss, "trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(rss, "TRIM_TOKENS", 300)
    monkeypatch.setitem(rss._TRIMMED, "tokens", 0)
    for _ in range(7):  # samples of 100 tokens: a trim after the 3rd and the 6th
        rss.trim_heap_every(100)
    assert len(trims) == 2
    rss.trim_heap_every(2000)  # one long sample: one trim, and the count starts again
    rss.trim_heap_every(100)
    assert len(trims) == 3
