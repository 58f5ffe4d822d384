"""Writer and reader of packed TLQ checkpoints (docs/format.md).

The writer is atomic: it fills a hidden temporary sibling folder and renames it into
place only when every file and the manifest are complete. The reader verifies the
manifest's hashes and every quantized layer's tensor names, dtypes and shapes before
anything is loaded, and raises `CheckpointError` naming the file or tensor at fault.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tlq import __version__
from tlq.atomic import disk_full_guard, write_json_atomic
from tlq.errors import CheckpointError, TLQError
from tlq.format.packing import pack, packed_length, unpack
from tlq.format.quant_config import FORMAT_VERSION, QUANT_METHOD, QuantizationConfig
from tlq.quant.qparams import QuantizedWeight, n_groups

MANIFEST = "tlq_manifest.json"
REPORT = "tlq_report.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 4 * 2**30
# Files of the source model that the writer replaces rather than copies.
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
_REPLACED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", MANIFEST, REPORT}


# -- tensors of one quantized linear ------------------------------------------------
def pack_linear(qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stored tensors (suffix -> tensor) of one quantized linear, GPTQ layout."""
    out = {
        "qweight": pack(qw.codes.t().contiguous(), qw.bits, dim=0),
        "scales": qw.scales.t().contiguous().to(scale_dtype),
    }
    if qw.zeros is not None:
        out["qzeros"] = pack(qw.zeros.t().contiguous(), qw.bits, dim=1)
    if qw.g_idx is not None:
        out["g_idx"] = qw.g_idx.to(torch.int32).contiguous()
    return out


def unpack_linear(tensors: dict[str, torch.Tensor], shape: tuple[int, int], bits: int,
                  group_size: int) -> QuantizedWeight:
    n, k = shape
    codes = unpack(tensors["qweight"], bits, k, dim=0).t().contiguous()
    scales = tensors["scales"].float().t().contiguous()
    zeros = None
    if "qzeros" in tensors:
        zeros = unpack(tensors["qzeros"], bits, n, dim=1).t().contiguous()
    return QuantizedWeight(codes, scales, zeros, bits, group_size, tensors.get("g_idx"))


def expected_shapes(info: dict, scale_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Suffix -> (shape, dtype) that a quantized layer described by `info` must have."""
    n, k = info["shape"]
    bits, g = info["bits"], info["group_size"]
    ng = n_groups(k, g)
    shapes = {"qweight": ((packed_length(k, bits), n), torch.int32), "scales": ((ng, n), scale_dtype)}
    if not info["sym"]:
        shapes["qzeros"] = ((ng, packed_length(n, bits)), torch.int32)
    if info.get("act_order"):
        shapes["g_idx"] = ((k,), torch.int32)
    return shapes


# -- hashing and atomic files ------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless `overwrite` (called before any work starts)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TLQError(f"output folder {out_dir} already exists; choose another --out or pass --overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise TLQError(f"output path {out_dir} is a file, not a folder; choose another --out")


def shard_tensors(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split a state dict (sorted by name) into shards of at most MAX_SHARD_BYTES."""
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    return shards


@dataclass
class CheckpointContent:
    """Everything a checkpoint folder holds besides the copied tokenizer/processor files.

    Attributes:
        tensors: the full state dict: float tensors as is, quantized linears as packed tensors.
        config: the model config dict, including `quantization_config`.
        quantized_layers: module name -> {"shape": [N, K], "bits", "group_size", "sym", "act_order"}.
        calibration: provenance (method, scheme, seed, samples with hashes, token statistics).
        report: per-layer error/time/memory table, or None.
    """

    tensors: dict[str, torch.Tensor]
    config: dict
    quantized_layers: dict[str, dict]
    calibration: dict
    report: dict | None = None


def layer_entry(qw: QuantizedWeight) -> dict:
    """The manifest's `quantized_layers` entry of one quantized linear."""
    return {"shape": list(qw.shape), "bits": qw.bits, "group_size": qw.group_size,
            "sym": qw.zeros is None, "act_order": qw.g_idx is not None}


def new_temp_folder(out_dir: Path) -> Path:
    """A hidden sibling of `out_dir` to build a checkpoint in (readable like a normal folder)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    return tmp


def copy_model_files(source_dir: Path, folder: Path) -> None:
    """Tokenizer, processor, chat template, generation config...: every file but weights and configs."""
    for item in sorted(Path(source_dir).iterdir()):
        if item.is_file() and item.name not in _REPLACED and not item.name.endswith(_WEIGHT_FILES):
            shutil.copy2(item, folder / item.name)


def finish_folder(folder: Path, files: dict[str, str], config: dict, quantized_layers: dict,
                  calibration: dict, report: dict | None) -> None:
    """Write config, report and, last, the manifest (a folder without it is not a checkpoint).

    `files` maps the tensor files already in `folder` to their sha256; config.json is added.
    """
    write_json_atomic(folder / "config.json", config)
    files["config.json"] = sha256_file(folder / "config.json")
    if report is not None:
        write_json_atomic(folder / REPORT, report)
    manifest = {
        "format_version": FORMAT_VERSION, "tool": "tlq", "tool_version": __version__,
        "files": files, "quantized_layers": quantized_layers, "calibration": calibration,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_json_atomic(folder / MANIFEST, manifest)


def write_checkpoint(out_dir: Path, source_dir: Path, content: CheckpointContent, overwrite: bool = False) -> Path:
    """Write a self-contained checkpoint folder atomically; returns its path."""
    out_dir, source_dir = Path(out_dir).resolve(), Path(source_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_folder(out_dir)
    try:
        with disk_full_guard(out_dir.parent, lambda: folder_bytes(source_dir) + tensor_bytes(content.tensors)):
            _fill_checkpoint(tmp, source_dir, content)
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _fill_checkpoint(tmp: Path, source_dir: Path, content: CheckpointContent) -> None:
    copy_model_files(source_dir, tmp)
    shards = shard_tensors(content.tensors)
    files = {}
    if len(shards) == 1:
        save_file(shards[0], tmp / WEIGHTS, metadata={"format": "pt"})
        files[WEIGHTS] = sha256_file(tmp / WEIGHTS)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            files[name] = sha256_file(tmp / name)
            weight_map.update({t: name for t in shard})
        write_json_atomic(tmp / INDEX, {"metadata": {}, "weight_map": weight_map})
        files[INDEX] = sha256_file(tmp / INDEX)
    finish_folder(tmp, files, content.config, content.quantized_layers, content.calibration, content.report)


def write_report(folder: Path, report: dict) -> None:
    """tlq_report.json into a finished checkpoint (it is not in the manifest: a run writes it last,
    once its write time is known)."""
    write_json_atomic(Path(folder) / REPORT, report)


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename a finished folder to `out_dir`, replacing an older one only now that the new is complete."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


# -- reading and verification ---------------------------------------------------
@dataclass
class CheckpointInfo:
    path: Path
    config: dict
    quant_config: dict
    manifest: dict

    @property
    def quantized_layers(self) -> dict[str, dict]:
        return self.manifest["quantized_layers"]

    @property
    def quantization(self) -> QuantizationConfig:
        """The parsed, checked quantization_config."""
        return QuantizationConfig.from_dict(self.quant_config)

    @property
    def scale_dtype(self) -> torch.dtype:
        return dtype_of(self.config)

    def tensor_files(self) -> list[Path]:
        return [self.path / f for f in self.manifest["files"] if f.endswith(".safetensors")]


def dtype_of(config: dict) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or config.get("text_config", {}).get("dtype") \
        or "bfloat16"
    return getattr(torch, str(name).replace("torch.", ""))


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {what}; re-create the checkpoint with `tlq calibrate`") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                              "the file is damaged, re-create the checkpoint") from None


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    """Config, quantization config and manifest, without hashing (cheap)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    config = _load_json(path / "config.json", "the model config")
    qcfg = config.get("quantization_config")
    if not qcfg or qcfg.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a TLQ checkpoint (config.json has no quantization_config "
                              f"with quant_method {QUANT_METHOD!r}); quantize it with `tlq calibrate` first")
    try:
        QuantizationConfig.from_dict(qcfg)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    manifest = _load_json(path / MANIFEST, "the integrity manifest")
    return CheckpointInfo(path, config, qcfg, manifest)


def verify_checkpoint(path: Path, check_hashes: bool = True) -> CheckpointInfo:
    """Full integrity check: file hashes, every quantized tensor present with the right shape."""
    info = read_checkpoint_info(path)
    for name, digest in info.manifest.get("files", {}).items():
        f = info.path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete, re-create or re-copy it")
        if check_hashes and sha256_file(f) != digest:
            raise CheckpointError(f"{f} does not match its sha256 in {MANIFEST} (truncated or altered); "
                                  "re-copy or re-create the checkpoint")
    headers = {}
    for f in info.tensor_files():
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    headers[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as exc:  # safetensors raises its own error types on damaged headers
            raise CheckpointError(f"{f} cannot be read as safetensors ({exc}); re-create the checkpoint") from None
    dtype_names = {torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    for layer, linfo in info.quantized_layers.items():
        for suffix, (shape, dtype) in expected_shapes(linfo, info.scale_dtype).items():
            key = f"{layer}.{suffix}"
            if key not in headers:
                raise CheckpointError(f"tensor {key} is missing from {info.path}; re-create the checkpoint")
            if headers[key] != (shape, dtype_names[dtype]):
                raise CheckpointError(f"tensor {key} has shape {list(headers[key][0])} {headers[key][1]}, "
                                      f"expected {list(shape)} {dtype_names[dtype]}; re-create the checkpoint")
    return info


def load_tensors(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in info.tensor_files():
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                tensors[key] = st.get_tensor(key)
    return tensors


def dequantized_state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """Float state dict (the reference weights) rebuilt from a verified checkpoint."""
    tensors = load_tensors(info)
    dtype = info.scale_dtype
    for layer, linfo in info.quantized_layers.items():
        parts = {s: tensors.pop(f"{layer}.{s}") for s in ("qweight", "scales", "qzeros", "g_idx")
                 if f"{layer}.{s}" in tensors}
        qw = unpack_linear(parts, tuple(linfo["shape"]), linfo["bits"], linfo["group_size"])
        tensors[f"{layer}.weight"] = qw.dequantize(dtype)
    return tensors
