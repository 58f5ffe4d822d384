import json

import pytest
from PIL import Image

from tlq.data.calib import bundled_calibration_path, load_calibration
from tlq.data.make_bundled import write_bundled
from tlq.errors import CalibrationDataError, TLQError


def _img_turn(question="What is it?", answer="A red square."):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def calib_dir(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "img" / "red.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def test_good_file_loads(calib_dir):
    path = _write(calib_dir / "c.jsonl", [
        {"id": "a", "images": ["img/red.png"], "messages": _img_turn(), "question_type": "color"},
        "",  # blank lines are skipped
        {"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
    ])
    samples = load_calibration(path)
    assert [s.id for s in samples] == ["a", "c:3"]
    assert samples[0].image_paths == [(calib_dir / "img" / "red.png").resolve()]
    assert samples[0].image_paths[0].is_absolute() and samples[0].question_type == "color"
    assert samples[1].image_paths == [] and samples[1].question_type is None
    assert samples[0].answer == "A red square." and samples[1].answer == "4"
    assert len(samples[0].sha256) == 64 and samples[0].sha256 != samples[1].sha256
    assert [s.id for s in load_calibration(path, max_samples=1)] == ["a"]
    # the digest covers the image bytes, not only the line
    before = samples[0].sha256
    Image.new("RGB", (40, 30), (0, 0, 200)).save(calib_dir / "img" / "red.png")
    assert load_calibration(path)[0].sha256 != before


def test_every_bad_line_is_reported_with_its_line_number(calib_dir):
    good = {"images": ["img/red.png"], "messages": _img_turn()}
    path = _write(calib_dir / "bad.jsonl", [
        good,                                                                     # 1
        '{"messages": [',                                                         # 2 bad JSON
        {"images": ["img/missing.png"], "messages": _img_turn()},                 # 3 missing image
        {"images": ["img/broken.png"], "messages": _img_turn()},                  # 4 unreadable image
        {"images": ["img/red.png"], "messages": _img_turn()[:1]},                 # 5 no assistant last
        {"images": ["img/red.png"], "messages": _img_turn(answer="  ")},          # 6 empty answer
        {"images": [], "messages": _img_turn()},                                  # 7 image count mismatch
        {"messages": [{"role": "robot", "content": "hi"},
                      {"role": "assistant", "content": "ok"}]},                    # 8 unknown role
        {"id": "dup", "messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a"}]},        # 9
        {"id": "dup", "messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a"}]},        # 10 duplicate id
    ])
    with pytest.raises(CalibrationDataError) as info:
        load_calibration(path)
    problems = info.value.problems
    by_line = {}
    for file, line, problem in problems:
        assert file == str(path)
        by_line.setdefault(line, []).append(problem)
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 10]
    expected = {2: "invalid JSON", 3: "missing.png", 4: "not a readable image", 5: "last message",
                6: "empty text", 7: "1 image part(s) in messages but 0 image(s)", 8: "unknown role",
                10: "duplicate id"}
    for line, needle in expected.items():
        assert any(needle in p for p in by_line[line]), (line, by_line[line])
    assert "bad.jsonl:3:" in str(info.value) and "docs/calibration-data.md" in str(info.value)


def test_missing_or_empty_file_is_a_tlq_error(tmp_path):
    with pytest.raises(TLQError, match="nope.jsonl not found"):
        load_calibration(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(TLQError, match="empty.jsonl holds no samples"):
        load_calibration(tmp_path / "empty.jsonl")


def test_bundled_set_loads_and_is_small(bundled_calib, tmp_path):
    samples = load_calibration(bundled_calib)
    assert 28 <= len(samples) <= 40
    with_images = [s for s in samples if s.image_paths]
    assert len(with_images) >= 20 and len(samples) - len(with_images) >= 5
    sizes = {Image.open(s.image_paths[0]).size for s in with_images}
    assert min(min(sz) for sz in sizes) >= 56 and max(max(sz) for sz in sizes) <= 160 and len(sizes) >= 4
    bundle = bundled_calibration_path().parent
    assert sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) < 300_000
    # the committed set is what the generator writes (regenerate with python -m tlq.data.make_bundled)
    regenerated = write_bundled(tmp_path / "b")
    assert regenerated.read_text() == bundled_calib.read_text()
    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == \
        sorted(p.name for p in (bundle / "images").iterdir())
