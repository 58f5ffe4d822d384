"""Per-rank shards, assembled into one checkpoint folder by rank 0 (docs/format.md layout).

Every rank writes its own tensors (its layers' packed linears and float tensors, rank 0 the
vision side, the last rank the head) as hidden `.rank<r>-<j>.safetensors` files into one shared
temporary folder next to the output (ranks must share that file system), hashing them itself.
Rank 0 then numbers all shards `model-<k>-of-<K>.safetensors` in rank order (a rename: hashes
stay valid), writes the index, config, report and, last, the manifest, and renames the folder
into place. Until that rename nothing exists at the output path; a crash leaves only the hidden
temporary folder, which has no manifest and which rank 0 removes when it stops on an error.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from tlq.atomic import write_json_atomic
from tlq.calib.assemble import checkpoint_config
from tlq.format.checkpoint import (
    INDEX,
    check_output_dir,
    copy_model_files,
    finish_folder,
    sha256_file,
    shard_tensors,
    swap_into_place,
)
from tlq.model_io import SourceModel


def temp_folder(out: Path, run_id: str) -> Path:
    out = Path(out).resolve()
    return out.parent / f".{out.name}.tmp-{run_id}"


def write_shards(tmp: Path, rank: int, tensors: dict[str, torch.Tensor]) -> list[dict]:
    """Write this rank's shard files; returns [{file, sha256, tensors}] for rank 0."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = []
    for j, shard in enumerate(shard_tensors(tensors)):
        name = f".rank{rank:05d}-{j:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        files.append({"file": name, "sha256": sha256_file(tmp / name), "tensors": sorted(shard)})
    return files


def remove_own_shards(tmp: Path, rank: int) -> None:
    for f in tmp.glob(f".rank{rank:05d}-*.safetensors"):
        f.unlink(missing_ok=True)


def finalize(tmp: Path, out: Path, source: SourceModel, shards: list[list[dict]], layers: dict, method: str,
             scheme, act_order: bool, calibration: dict, report: dict, overwrite: bool) -> Path:
    """Rank 0: number the shards, write index, config, report, manifest; rename into place."""
    out = Path(out).resolve()
    every = [f for rank_files in shards for f in rank_files]
    files, weight_map = {}, {}
    for k, f in enumerate(every, 1):
        name = f"model-{k:05d}-of-{len(every):05d}.safetensors"
        os.replace(tmp / f["file"], tmp / name)
        files[name] = f["sha256"]
        weight_map.update({t: name for t in f["tensors"]})
    write_json_atomic(tmp / INDEX, {"metadata": {}, "weight_map": weight_map})
    files[INDEX] = sha256_file(tmp / INDEX)
    copy_model_files(source.path, tmp)
    finish_folder(tmp, files, checkpoint_config(source, scheme, method, act_order), layers, calibration, report)
    check_output_dir(out, overwrite)
    swap_into_place(tmp, out)
    return out


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every tensor (dtype, shape, bytes) of a checkpoint, whatever its sharding: a
    multi-rank checkpoint is identical to the single-process one when these are equal."""
    import hashlib

    from safetensors import safe_open
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key).contiguous()
                h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                out[key] = h.hexdigest()
    return out
