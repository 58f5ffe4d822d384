"""The generated QA task, its JSONL splits, and the training encoder (benchmarks/fixtures, quality_lib/encoding)."""
import io
import itertools
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds `benchmarks`

from benchmarks.fixtures import tasks
from benchmarks.quality_lib.encoding import collate, encode_conversation, homogeneous_batches
from tlq.data.calib import load_calibration
from tlq.data.processing import encode_sample


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_stream_is_deterministic_and_cycles_every_question_type():
    a = list(itertools.islice(tasks.sample_stream(7), 2 * len(tasks.TYPE_CYCLE)))
    b = list(itertools.islice(tasks.sample_stream(7), 2 * len(tasks.TYPE_CYCLE)))
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    assert all(_png(x.image) == _png(y.image) for x, y in zip(a, b) if x.image is not None)
    assert {s.question_type for s in a} == set(tasks.IMAGE_TYPES + tasks.TEXT_TYPES)
    assert all(s.needs_image == (s.question_type in tasks.IMAGE_TYPES) for s in a)
    other = list(itertools.islice(tasks.sample_stream(8), len(tasks.TYPE_CYCLE)))
    assert [s.answer for s in other] != [s.answer for s in a[:len(other)]]


def test_scene_questions_are_unambiguous_and_right():
    objects = [("circle", "red", (0, 0)), ("circle", "blue", (1, 1)), ("square", "red", (2, 2))]
    qs = tasks.scene_questions(objects)
    assert qs["color"] == [("What colour is the square?", "red")]          # two circles: no colour question
    assert qs["shape"] == [("Which shape is blue?", "circle")]            # two red things: no shape question
    assert ("Where is the red circle?", "top left") in qs["position"] and len(qs["position"]) == 3
    assert dict(qs["count"]) == {"How many circles are there?": "2", "How many squares are there?": "1"}


def test_count_scenes_hold_one_to_six_like_objects_in_distinct_cells():
    rnd = random.Random(0)
    sizes = Counter()
    for _ in range(60):
        objects = tasks.count_scene(rnd)
        cells = [o[2] for o in objects]
        assert len(set(cells)) == len(cells) and len({o[:2] for o in objects}) == 1
        sizes[len(objects)] += 1
        _, question, answer = tasks.TASKS["count"](rnd)
        assert question.startswith("How many") and 1 <= int(answer) <= 6
    assert sorted(sizes) == [1, 2, 3, 4, 5, 6]


def test_text_task_answers():
    rnd = random.Random(3)
    for _ in range(30):
        _, q, a = tasks.task_add(rnd)
        x, y = [int(t) for t in q.rstrip("?").split() if t.isdigit()]
        assert int(a) == x + y
        _, q, a = tasks.task_larger(rnd)
        assert int(a) == max(int(t.strip(",?")) for t in q.split()[-3::2])


def test_fact_questions_follow_the_table_and_splits_ask_about_disjoint_people():
    table = {name: (number, colour) for name, number, colour in tasks.FACTS}
    assert len(table) == tasks.FACT_PEOPLE and tasks.fact_table() == tasks.FACTS  # fixed, unique names
    asked = {}
    for group in ("calib", "val", "test"):
        people = set()
        for s in itertools.islice(tasks.sample_stream(11, group=group), 40 * len(tasks.TYPE_CYCLE)):
            if s.question_type in tasks.FACT_TYPES:
                name = s.question.rstrip("?").split()[-1]
                assert s.answer == table[name][0 if s.question_type == "fact_number" else 1]
                people.add(name)
        asked[group] = people
    assert not (asked["calib"] & asked["val"]) and not (asked["val"] & asked["test"])
    assert not (asked["calib"] & asked["test"]) and all(len(p) > 40 for p in asked.values())
    convs = itertools.islice(tasks.training_conversations(0, False, 5, fact_share=1.0), 300)
    trained = {m["content"][0]["text"].rstrip("?").split()[-1] for msgs, _ in convs for m in msgs
               if m["role"] == "user"}
    assert len(trained & asked["test"]) > 40  # training covers the test people


def test_splits_load_as_calibration_data_and_subsets_depend_on_the_seed(tmp_path):
    paths = tasks.write_eval_data(tmp_path, tasks.TaskConfig(n_test=28, n_val=16, n_calib_pool=20))
    assert len(load_calibration(paths["val"])) == 16
    test = load_calibration(paths["test"])
    assert len(test) == 28 and {s.question_type for s in test} == set(tasks.TYPE_CYCLE)
    assert all(len(s.image_paths) == (s.question_type in tasks.IMAGE_TYPES) for s in test)
    pool = load_calibration(paths["calib"])
    assert not {s.sha256 for s in pool} & {s.sha256 for s in test}
    a = load_calibration(tasks.draw_calibration_subset(paths["calib"], tmp_path / "sub" / "a.jsonl", 8, seed=0))
    b = load_calibration(tasks.draw_calibration_subset(paths["calib"], tmp_path / "sub" / "b.jsonl", 8, seed=1))
    again = tasks.draw_calibration_subset(paths["calib"], tmp_path / "sub" / "c.jsonl", 8, seed=0)
    assert [s.id for s in a] != [s.id for s in b]
    assert [s.id for s in a] == [json.loads(ln)["id"] for ln in again.read_text().splitlines()]
    assert all(p.is_absolute() and p.is_file() for s in a for p in s.image_paths)
    with pytest.raises(ValueError):
        tasks.draw_calibration_subset(paths["calib"], tmp_path / "x.jsonl", 21, seed=0)


def test_training_conversations_ask_several_questions_about_one_image():
    convs = list(itertools.islice(tasks.training_conversations(0, True), 40))
    assert all(img is not None for _, img in convs)
    assert max(sum(m["role"] == "assistant" for m in msgs) for msgs, _ in convs) > 1
    assert all(sum(p.get("type") == "image" for m in msgs for p in m["content"]) == 1 for msgs, _ in convs)
    texts = list(itertools.islice(tasks.training_conversations(0, False), 10))
    assert all(img is None for _, img in texts)


def test_single_turn_labels_equal_encode_sample_and_multi_turn_labels_every_answer(tiny_model_dir, tmp_path):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    path = tasks.write_split(tmp_path, "t", 14, seed=5)
    for sample in load_calibration(path):
        ref = encode_sample(processor, sample)
        images = [Image.open(p).convert("RGB") for p in sample.image_paths]
        mine = encode_conversation(processor, sample.messages, images)
        assert torch.equal(mine["input_ids"], ref["input_ids"]) and torch.equal(mine["labels"], ref["labels"])
    msgs, img = next(iter(tasks.training_conversations(1, True, max_turns=4)))
    while sum(m["role"] == "assistant" for m in msgs) < 2:
        msgs, img = next(iter(tasks.training_conversations(len(msgs) + 7, True)))
    enc = encode_conversation(processor, msgs, [img])
    labelled = processor.tokenizer.decode(enc["labels"][0][enc["labels"][0] != -100])
    answers = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
    assert labelled == "".join(a + processor.tokenizer.eos_token for a in answers)


def test_collate_pads_right_and_refuses_mixed_batches(qwen2_vl_dir):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(qwen2_vl_dir)
    samples = list(itertools.islice(tasks.sample_stream(2), len(tasks.TYPE_CYCLE)))
    enc = [encode_conversation(processor, s.messages(), [s.image] if s.image else []) for s in samples]
    flags = [s.needs_image for s in samples]
    batches = homogeneous_batches(flags, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    assert all(len({flags[i] for i in b}) == 1 and len(b) <= 4 for b in batches)
    batch = collate([enc[i] for i in batches[0]], processor.tokenizer.pad_token_id)
    lengths = [enc[i]["input_ids"].shape[1] for i in batches[0]]
    assert batch["input_ids"].shape == (len(lengths), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape[0] == sum(enc[i]["pixel_values"].shape[0] for i in batches[0])
    mixed = [enc[flags.index(True)], enc[flags.index(False)]]
    with pytest.raises(ValueError, match="mixes"):
        collate(mixed, processor.tokenizer.pad_token_id)
