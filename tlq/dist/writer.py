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

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tlq.calib.assemble import quantization_config
from tlq.dist.stage_model import LoadRecord, read_tensors
from tlq.format.checkpoint import (
    INDEX,
    CheckpointContent,
    check_output_dir,
    copy_model_files,
    finish_folder,
    layer_entry,
    pack_linear,
    sha256_file,
    shard_tensors,
    swap_into_place,
    write_checkpoint,
    write_json_atomic,
)
from tlq.format.packing import RUN
from tlq.model_io import SourceModel
from tlq.quant.qparams import QuantizedWeight

# Codes packed at a time: tlq.format.packing.pack holds ~64 bytes of int64 scratch per code, so a
# whole linear at once costs 64x its weight count (185 MiB for one 2816 x 1024 down_proj).
PACK_CHUNK = 1 << 20

def temp_folder(out: Path, run_id: str) -> Path:
    out = Path(out).resolve()
    return out.parent / f".{out.name}.tmp-{run_id}"


@dataclass
class PackedLinear:
    """One quantized linear as stored (suffix -> tensor) and its manifest entry."""

    tensors: dict[str, torch.Tensor]
    info: dict


def packer(scale_dtype: torch.dtype):
    """`run_layer_loop(keep=)`: pack each layer as soon as it is calibrated, so a process holds
    int4 codes (0.5 byte per weight) instead of int32 ones (4 bytes) until it writes."""
    def pack(quantized: dict[str, QuantizedWeight]) -> dict[str, PackedLinear]:
        return {name: PackedLinear(pack_rows(qw, scale_dtype), layer_entry(qw)) for name, qw in quantized.items()}
    return pack


def pack_rows(qw: QuantizedWeight, scale_dtype: torch.dtype, chunk: int = PACK_CHUNK) -> dict[str, torch.Tensor]:
    """`pack_linear`, a block of output rows at a time (bounded scratch), same tensors: every
    stored tensor is [*, N] with output rows as columns; blocks of a multiple of RUN rows keep
    qzeros' words (packed along N) whole."""
    n, k = qw.shape
    rows = max(RUN, chunk // max(k, 1) // RUN * RUN)
    if rows >= n:
        return pack_linear(qw, scale_dtype)
    cut = lambda t, a: None if t is None else t[a:a + rows]
    parts = [pack_linear(QuantizedWeight(qw.codes[a:a + rows], qw.scales[a:a + rows], cut(qw.zeros, a), qw.bits,
                                         qw.group_size, qw.g_idx), scale_dtype) for a in range(0, n, rows)]
    return {key: parts[0][key] if key == "g_idx" else torch.cat([p[key] for p in parts], dim=1)
            for key in parts[0]}


def checkpoint_config(source: SourceModel, scheme, method: str, act_order: bool) -> dict:
    """The source's config.json with the quantization_config of this checkpoint."""
    config = copy.deepcopy(source.config)
    config["quantization_config"] = quantization_config(scheme, method, act_order, source.adapter.ignore)
    return config


def write_packed_model(source: SourceModel, out: Path, scheme, method: str, packed: dict[str, PackedLinear],
                       float_overrides: dict[str, torch.Tensor], calibration: dict, report: dict, act_order: bool,
                       overwrite: bool) -> Path:
    """One process's checkpoint from layers packed as they finished (calib/pipeline.py): the
    float tensors are read again from disk, so the model need not be in memory meanwhile."""
    tensors, layers = rank_tensors(source, set(source.tensor_shapes()), packed, float_overrides, LoadRecord())
    content = CheckpointContent(tensors, checkpoint_config(source, scheme, method, act_order), layers, calibration,
                                report)
    return write_checkpoint(out, source.path, content, overwrite=overwrite)


def rank_tensors(source: SourceModel, disk_names: set[str], packed: dict[str, PackedLinear],
                 float_overrides: dict[str, torch.Tensor], record: LoadRecord) -> tuple[dict, dict]:
    """This rank's stored tensors (float ones read again from disk, linears packed) and the
    manifest entries of its quantized layers; the same assembly as calib/assemble.py, on a share."""
    packed = {source.to_disk_name(m): p for m, p in packed.items()}
    tensors = read_tensors(source, disk_names - {f"{n}.weight" for n in packed}, record)
    for name, value in float_overrides.items():
        disk = source.to_disk_name(name)
        tensors[disk] = value.to(tensors[disk].dtype)
    for name, p in packed.items():
        tensors.update({f"{name}.{suffix}": t for suffix, t in p.tensors.items()})
    return tensors, {name: p.info for name, p in packed.items()}


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
