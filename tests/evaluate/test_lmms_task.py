"""`tlq lmms-task`: the local lmms-eval task, loaded by lmms-eval's own task code (no server)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tlq.cli import app
from tlq.errors import TLQError
from tlq.evaluate.data import load_questions
from tlq.evaluate.lmms_task import write_lmms_task
from tlq.evaluate.metrics import exact_match


def _write_questions(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_records_keep_turns_parts_order_and_copy_images(bundled_calib, tmp_path):
    yaml_path = write_lmms_task(bundled_calib, tmp_path / "task", "my_task")
    assert yaml_path == tmp_path / "task" / "my_task.yaml"
    records = [json.loads(ln) for ln in (tmp_path / "task" / "my_task.jsonl").read_text().splitlines()]
    items = load_questions(bundled_calib)
    assert [r["id"] for r in records] == [it.id for it in items]
    for rec, item in zip(records, items):
        assert rec["answer"] == item.reference
        sent = item.openai_messages()  # what tlq eval sends: roles and part order must be the same
        assert [t["role"] for t in rec["turns"]] == [m["role"] for m in sent]
        for turn, msg in zip(rec["turns"], sent):
            parts = msg["content"] if isinstance(msg["content"], list) else [{"type": "text"}]
            assert turn["parts"] == ["image" if p["type"] == "image_url" else "text" for p in parts]
        assert len(rec["images"]) == len(item.sample.image_paths)
        for copied, original in zip(rec["images"], item.sample.image_paths):
            assert (tmp_path / "task" / copied).read_bytes() == original.read_bytes()
    text = yaml_path.read_text()
    assert "dataset_path: json" in text and str(tmp_path / "task" / "my_task.jsonl") in text
    assert "metric: exact_match" in text and "!function my_task_utils.doc_to_messages" in text


def test_bad_names_and_files_are_tlq_errors(bundled_calib, tmp_path):
    with pytest.raises(TLQError, match="letters, digits and _"):
        write_lmms_task(bundled_calib, tmp_path, "my-task")
    bad = _write_questions(tmp_path / "q.jsonl", [{"id": "x", "messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TLQError):
        write_lmms_task(bad, tmp_path / "t")


def test_cli_writes_the_task(bundled_calib, tmp_path):
    res = CliRunner().invoke(app, ["lmms-task", str(bundled_calib), "--out", str(tmp_path / "t"),
                                   "--name", "cli_task", "--max-samples", "3"])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "t" / "cli_task.jsonl").read_text().splitlines()) == 3
    assert "--include_path" in res.output and "cli_task" in res.output


def test_lmms_eval_loads_the_task_and_scores_with_tlqs_rule(bundled_calib, tmp_path, lmms_eval_installed,
                                                          monkeypatch):
    """lmms-eval's own YAML loader and messages task: the exact messages, images and scores."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.utils import load_yaml_config
    from PIL import Image

    task = ConfigurableMessagesTask(config=load_yaml_config(str(write_lmms_task(bundled_calib, tmp_path / "t"))))
    docs = task.test_docs()
    items = load_questions(bundled_calib)
    assert len(docs) == len(items)
    for doc, item in zip(docs, items):
        messages = task.doc_to_messages(doc)
        sent = item.openai_messages()
        assert [m["role"] for m in messages] == [m["role"] for m in sent]
        for got, want in zip(messages, sent):
            want_parts = want["content"] if isinstance(want["content"], list) else [
                {"type": "text", "text": want["content"]}]
            assert [c["type"] for c in got["content"]] == [
                "image" if p["type"] == "image_url" else "text" for p in want_parts]
            assert [c["text"] for c in got["content"] if c["type"] == "text"] == [
                p["text"] for p in want_parts if p["type"] == "text"]
        images = [c["url"] for m in messages for c in m["content"] if c["type"] == "image"]
        for img, path in zip(images, item.sample.image_paths):
            assert list(img.getdata()) == list(Image.open(path).convert("RGB").getdata())
        assert task.doc_to_target(doc) == item.reference
        for guess in (item.reference, item.reference.upper() + ".", "", "the " + item.reference, "A"):
            assert task.process_results(doc, [guess]) == {"exact_match": float(exact_match(guess, item.reference))}
