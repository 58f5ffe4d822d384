"""tlq/calib/rss.py: measured memory, records and heap helpers."""
import json


def test_memory_record_and_heap_helpers(tmp_path, monkeypatch):
    from tlq.calib import rss
    monkeypatch.delenv("TLQ_RSS_TRACE", raising=False)
    rss.start_of_calibration()  # notes the start RSS, sets the mmap threshold (glibc)
    rss.trim_heap()
    rss.write_memory_record(tmp_path / "rec", 1, {"rank": 1})
    data = json.loads((tmp_path / "rec" / "rank1.json").read_text())
    assert data["rank"] == 1 and 0 < data["start_rss_mb"] <= data["peak_rss_mb"]
    assert data["peak_rss_mb"] >= rss.rss_mb() * 0.5  # same units (MiB) as the current RSS
    assert [p.name for p in (tmp_path / "rec").iterdir()] == ["rank1.json"]  # no temporary file left
