"""A local lmms-eval task from a QA JSONL (the calibration format), so nothing comes from a hub.

    tlq lmms-task test.jsonl --out tasks/ --name tlq_qa
    python -m lmms_eval --model openai_compatible --include_path tasks/ --tasks tlq_qa ...

Written in lmms-eval's own task format (a YAML beside a Python module of its functions):

    <out>/<name>.yaml       dataset_path json, local data_files {test: <name>.jsonl}, generate_until,
                            doc_to_visual / doc_to_text / doc_to_target / doc_to_messages, the
                            exact_match metric (mean)
    <out>/<name>_utils.py   those functions; process_results scores with tlq.evaluate.metrics.exact_match,
                            the scorer of `tlq eval` and the quality benchmark (one rule everywhere)
    <out>/<name>.jsonl      one record per question: id, question_type, question (the last user text),
                            answer, images, turns (each prompt turn's role and its order of image and
                            text parts)
    <out>/<name>_images/    the question images, copied (the folder is self-contained)

Chat models (`openai_compatible` among them) send doc_to_messages: every prompt turn (system,
earlier user and assistant turns) with its image and text parts in the question file's order,
exactly what `tlq eval` sends. Without it lmms-eval would send one user turn with every image first
(`_auto_doc_to_messages`), and the fixtures ask some questions text first. Simple models get
doc_to_visual + doc_to_text (the last user text).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tlq.atomic import write_file_atomic
from tlq.errors import TLQError

DEFAULT_NAME = "tlq_qa"
MAX_NEW_TOKENS = 32  # tlq eval's default answer budget: the same questions get the same answers

_YAML = """\
# lmms-eval task written by `tlq lmms-task` from {source}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function {name}_utils.doc_to_visual
doc_to_text: !function {name}_utils.doc_to_text
doc_to_target: !function {name}_utils.doc_to_target
doc_to_messages: !function {name}_utils.doc_to_messages
process_results: !function {name}_utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_UTILS = '''\
"""Functions of the lmms-eval task {name} (written by `tlq lmms-task`; needs tlq importable)."""
from pathlib import Path

from PIL import Image

from tlq.evaluate.metrics import exact_match

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    """Every prompt turn, its image and text parts in the question file's order."""
    images, messages = iter(doc_to_visual(doc)), []
    for turn in doc["turns"]:
        texts = iter(turn["texts"])
        messages.append({{"role": turn["role"], "content": [
            {{"type": "image", "url": next(images)}} if kind == "image" else {{"type": "text", "text": next(texts)}}
            for kind in turn["parts"]]}})
    return messages


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    return {{"exact_match": float(exact_match(results[0], doc["answer"]))}}
'''


def _turn(message: dict) -> dict:
    content = message["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    return {"role": message["role"], "parts": ["image" if p.get("type") == "image" else "text" for p in parts],
            "texts": [p["text"] for p in parts if p.get("type") != "image"]}


def _record(sample, number: int, images_dir: str) -> dict:
    """One task record from a validated calibration sample: the prompt turns, the images, the answer."""
    turns = [_turn(m) for m in sample.messages[:-1]]
    images = [f"{images_dir}/{number:05d}-{i}{Path(p).suffix}" for i, p in enumerate(sample.image_paths)]
    return {"id": sample.id, "question_type": sample.question_type or "",
            "question": "\n".join(turns[-1]["texts"]), "answer": sample.answer, "images": images, "turns": turns}


def write_lmms_task(data: Path, out: Path, name: str = DEFAULT_NAME, max_samples: int | None = None) -> Path:
    """Write the task `name` for the questions of `data` into `out`; returns the YAML's path."""
    from tlq.data.calib import load_calibration
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise TLQError(f"task name {name!r} must be letters, digits and _ (it names a Python module), "
                       "e.g. tlq_qa")
    samples = load_calibration(Path(data), max_samples=max_samples)
    out = Path(out).resolve()
    images_dir = f"{name}_images"
    records = [_record(s, n, images_dir) for n, s in enumerate(samples)]
    (out / images_dir).mkdir(parents=True, exist_ok=True)
    for sample, rec in zip(samples, records):
        for src, dst in zip(sample.image_paths, rec["images"]):
            shutil.copyfile(src, out / dst)
    write_file_atomic(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_file_atomic(out / f"{name}_utils.py", _UTILS.format(name=name))
    yaml_path = out / f"{name}.yaml"
    write_file_atomic(yaml_path, _YAML.format(name=name, source=Path(data).resolve(), data=out / f"{name}.jsonl",
                                              max_new_tokens=MAX_NEW_TOKENS))
    return yaml_path
