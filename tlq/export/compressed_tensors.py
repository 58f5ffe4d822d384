"""Export a TLQ checkpoint to the compressed-tensors format that stock vLLM loads without the plugin.

Only the schemes stock vLLM (0.32) has kernels for are exported; the rest are refused with the
reason and the alternative (serve the TLQ checkpoint with the `tlq` plugin):

| TLQ scheme | compressed-tensors format | stock vLLM scheme / kernel |
| --- | --- | --- |
| 4-bit weight-only, sym or asym, any group | pack-quantized (uint4b8 / uint4 + zero points) | CompressedTensorsWNA16: Marlin (CUDA), CPUWNA16 (CPU) |
| 8-bit weight-only, symmetric | pack-quantized (uint8b128) | CompressedTensorsWNA16: Marlin (CUDA); no CPU kernel |
| w4a8 (int4 per-channel sym, int8 per-token dynamic activations) | int-quantized | CompressedTensorsW4A8Int |

Mapping (exact, no requantization): compressed-tensors stores signed codes q - 2**(b-1) and signed
zero points z - 2**(b-1), and its packer adds 2**(b-1) back, so the packed words hold TLQ's
unsigned codes and zero points; the dequantized weights are bit-identical.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from tlq.errors import TLQError
from tlq.format.quant_config import QuantizationConfig

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
EXPORT_MANIFEST = "tlq_export_manifest.json"


def _ct():
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise TLQError("the compressed-tensors package is not installed; `pip install compressed-tensors` "
                       "(vLLM installs it) and run the export again") from None
    return compressed_tensors.__version__, pack_to_int32


def export_format(qcfg: dict) -> str:
    """The compressed-tensors format for a TLQ quantization_config, or TLQError saying why not."""
    bits, sym, act_bits = qcfg["bits"], qcfg["sym"], qcfg.get("act_bits", 16)
    plugin = "serve the TLQ checkpoint itself with vLLM and the tlq plugin instead"
    if QuantizationConfig.from_dict(qcfg).act_order:
        raise TLQError("act-order checkpoints (g_idx) cannot be exported: vLLM 0.32's compressed-tensors "
                       f"loader no longer supports group activation ordering; {plugin}")
    if act_bits == 8:
        return INT_QUANTIZED
    if bits == 4:
        return PACK_QUANTIZED
    if bits == 8 and sym:
        return PACK_QUANTIZED
    why = ("stock vLLM has no kernel for asymmetric 8-bit weights" if bits == 8
           else f"stock vLLM kernels take 4- and 8-bit codes, not {bits}-bit")
    raise TLQError(f"scheme {qcfg.get('scheme')} ({bits}-bit {'sym' if sym else 'asym'}) cannot be exported "
                   f"to compressed-tensors: {why}; {plugin}")


def ignore_patterns(fragments) -> list[str]:
    """compressed-tensors regexes matching each TLQ ignore fragment as a whole dot-separated run."""
    return [f"re:^(.*\\.)?{re.escape(f)}(\\..*)?$" for f in fragments]


def quantization_config(qcfg: dict, fmt: str, ct_version: str) -> dict:
    g = qcfg["group_size"]
    weights = {"num_bits": qcfg["bits"], "type": "int", "symmetric": bool(qcfg["sym"]),
               "strategy": "channel" if g == -1 else "group", "group_size": None if g == -1 else g,
               "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    acts = None
    if fmt == INT_QUANTIZED:
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
                "block_structure": None, "dynamic": True, "actorder": None, "observer": None,
                "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": fmt}},
        "ignore": ignore_patterns(qcfg.get("ignore", [])),
        "kv_cache_scheme": None, "global_compression_ratio": None, "version": ct_version,
    }


def layer_tensors(qw, fmt: str, scale_dtype: torch.dtype, pack_to_int32) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors (suffix -> tensor) of one quantized linear (QuantizedWeight)."""
    offset = 2 ** (qw.bits - 1)
    signed = (qw.codes - offset).to(torch.int8)  # [N, K]
    scales = qw.scales.to(scale_dtype).contiguous()  # [N, groups]
    if fmt == INT_QUANTIZED:
        return {"weight": signed.contiguous(), "weight_scale": scales}
    out = {"weight_packed": pack_to_int32(signed, qw.bits).contiguous(), "weight_scale": scales,
           "weight_shape": torch.tensor(list(qw.codes.shape), dtype=torch.int64)}
    if qw.zeros is not None:
        out["weight_zero_point"] = pack_to_int32((qw.zeros - offset).to(torch.int8), qw.bits, packed_dim=0)
    return out


def export_compressed_tensors(ckpt: Path, out: Path, overwrite: bool = False) -> Path:
    """Write `out`, a compressed-tensors copy of the verified TLQ checkpoint `ckpt`."""
    from tlq.format.checkpoint import (
        MANIFEST,
        CheckpointContent,
        check_output_dir,
        load_tensors,
        unpack_linear,
        verify_checkpoint,
        write_checkpoint,
    )
    info = verify_checkpoint(ckpt)
    fmt = export_format(info.quant_config)  # refuse before any work
    check_output_dir(Path(out), overwrite)
    ct_version, pack_to_int32 = _ct()
    tensors = load_tensors(info)
    for layer, linfo in info.quantized_layers.items():
        parts = {s: tensors.pop(f"{layer}.{s}") for s in ("qweight", "scales", "qzeros", "g_idx")
                 if f"{layer}.{s}" in tensors}
        qw = unpack_linear(parts, tuple(linfo["shape"]), linfo["bits"], linfo["group_size"])
        for suffix, t in layer_tensors(qw, fmt, info.scale_dtype, pack_to_int32).items():
            tensors[f"{layer}.{suffix}"] = t
    config = copy.deepcopy(info.config)
    config["quantization_config"] = quantization_config(info.quant_config, fmt, ct_version)
    provenance = {"exported_from": str(Path(ckpt).resolve()), "format": f"compressed-tensors {fmt}",
                  "source_files": info.manifest.get("files"), "source_scheme": info.quant_config.get("scheme")}
    path = write_checkpoint(Path(out), info.path, CheckpointContent(tensors, config, {}, provenance),
                            overwrite=overwrite)
    (path / MANIFEST).replace(path / EXPORT_MANIFEST)  # not a TLQ checkpoint: keep hashes under another name
    return path
