"""Reference loader: a float transformers model rebuilt from a packed checkpoint.

This is the ground truth the vLLM plugin is compared against, and how `tlq eval` measures
a checkpoint on the transformers side.
"""
from __future__ import annotations

import copy
from pathlib import Path

from tlq.format.checkpoint import CheckpointContent, verify_checkpoint, write_checkpoint

_QUANT_FILES = ("tlq_manifest.json", "tlq_report.json")


def write_dequantized(ckpt: Path, out: Path, overwrite: bool = False) -> Path:
    """A normal Hugging Face folder (float weights, no quantization_config) that transformers
    and vLLM load as a float model. Written atomically like every checkpoint."""
    from tlq.format.checkpoint import MANIFEST, dequantized_state_dict
    info = verify_checkpoint(ckpt)
    tensors = dequantized_state_dict(info)
    config = copy.deepcopy(info.config)
    config.pop("quantization_config", None)
    provenance = {"dequantized_from": str(Path(ckpt).resolve()), "source_manifest": info.manifest.get("files")}
    out = write_checkpoint(out, info.path, CheckpointContent(tensors, config, {}, provenance), overwrite=overwrite)
    # A dequantized folder is a float model; keep the manifest (integrity of its own files) under another name
    (out / MANIFEST).rename(out / "tlq_dequantized_manifest.json")
    return out


def load_dequantized(ckpt: Path, device: str = "cpu"):
    """(model, processor) with the checkpoint's dequantized weights, in transformers."""
    import tempfile

    from transformers import AutoModelForImageTextToText, AutoProcessor
    with tempfile.TemporaryDirectory(prefix="tlq-deq-") as tmp:
        folder = write_dequantized(ckpt, Path(tmp) / "model")
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto").eval().to(device)
        processor = AutoProcessor.from_pretrained(folder)
    return model, processor
