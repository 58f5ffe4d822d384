"""The checkpoint's `quantization_config` (config.json), one dataclass for writer and plugin.

`tlq calibrate` writes `QuantizationConfig.to_dict()`; the vLLM plugin (vllm_plugin/spec.py)
and `tlq export` read `QuantizationConfig.from_dict()`, which refuses what no reader can serve
with a `CheckpointError` naming the field and the fix. No vLLM import. docs/format.md has the
table of fields; each has one spelling, on disk and in code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tlq.adapters import ADAPTERS
from tlq.errors import CheckpointError

QUANT_METHOD = "tlq"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
ACT_BITS = (8, 16)
# What a checkpoint without an `ignore` list leaves unquantized: every adapter's vision side and head.
DEFAULT_IGNORE = tuple(dict.fromkeys(f for adapter in ADAPTERS.values() for f in adapter.ignore))
# Spellings of format-version-1 checkpoints written before the field names were unified.
_OLD_SPELLINGS = {"desc_act": "act_order"}


@dataclass(frozen=True)
class QuantizationConfig:
    """Numerics of every quantized linear of one checkpoint.

    Attributes:
        scheme: registry name (`w4a16`, ...), for messages and provenance.
        bits: weight code width (2, 3, 4 or 8).
        group_size: input channels per scale group; -1 = one group per output channel.
        sym: True = offset 2**(bits-1), no qzeros; False = per-group zero points.
        act_bits: 16 = weight-only; 8 = per-token dynamic symmetric int8 activations (w4a8).
        act_order: the quantized linears carry `g_idx` (GPTQ act-order): groups are not contiguous
            in K. Always False for per-channel scales (one group: nothing to reorder, no g_idx).
        method: calibration method that produced the weights (provenance).
        ignore: module-name fragments left unquantized (matched as whole dot-separated runs).
        format_version: docs/format.md version of the checkpoint.
        tool_version: tlq version that wrote it.
    """

    scheme: str
    bits: int
    group_size: int
    sym: bool
    act_bits: int = 16
    act_order: bool = False
    method: str | None = None
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    format_version: int = FORMAT_VERSION
    tool_version: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "act_order", bool(self.act_order) and self.group_size != -1)

    @classmethod
    def from_scheme(cls, scheme, method: str, act_order: bool, ignore, tool_version: str) -> QuantizationConfig:
        """What the writer stores for a tlq.schemes.QuantScheme."""
        return cls(scheme.name, scheme.bits, scheme.group_size, scheme.symmetric, scheme.act_bits, act_order,
                   method, tuple(ignore), FORMAT_VERSION, tool_version).validate()

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, **asdict(self), "ignore": list(self.ignore)}

    @classmethod
    def from_dict(cls, cfg: dict) -> QuantizationConfig:
        """Parse and check config.json's quantization_config."""
        if cfg.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise CheckpointError(f"quantization_config.quant_method is {cfg.get('quant_method')!r}, "
                                  f"not {QUANT_METHOD!r}")
        version = cfg.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format version {version} is newer than this tlq reads "
                                  f"({FORMAT_VERSION}); upgrade tlq")
        cfg = {_OLD_SPELLINGS.get(k, k): v for k, v in cfg.items()}
        missing = [k for k in ("bits", "group_size", "sym") if k not in cfg]
        if missing:
            raise CheckpointError(f"quantization_config lacks {', '.join(missing)}; re-create the checkpoint "
                                  "with `tlq calibrate`")
        bits, act_bits = int(cfg["bits"]), int(cfg.get("act_bits", 16))
        return cls(scheme=str(cfg.get("scheme", f"w{bits}a{act_bits}")), bits=bits,
                   group_size=int(cfg["group_size"]), sym=bool(cfg["sym"]), act_bits=act_bits,
                   act_order=bool(cfg.get("act_order", False)), method=cfg.get("method"),
                   ignore=tuple(cfg.get("ignore", DEFAULT_IGNORE)), format_version=int(version),
                   tool_version=cfg.get("tool_version")).validate()

    def validate(self) -> QuantizationConfig:
        """Refuse settings the format cannot represent or no kernel serves; returns self."""
        where = f"scheme {self.scheme}"
        if self.bits not in SUPPORTED_BITS:
            raise CheckpointError(f"{where}: {self.bits}-bit weights are not supported; use one of "
                                  f"{SUPPORTED_BITS} bits")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise CheckpointError(f"{where}: group size {self.group_size} is not supported; use one of "
                                  f"{SUPPORTED_GROUP_SIZES} (-1 = per channel)")
        if self.act_bits not in ACT_BITS:
            raise CheckpointError(f"{where}: act_bits {self.act_bits} is not supported; use 16 "
                                  "(weight-only) or 8 (w4a8)")
        if self.act_bits == 8 and (self.bits != 4 or not self.sym or self.group_size != -1):
            raise CheckpointError(f"{where}: int8 activations are served with symmetric per-channel int4 "
                                  f"weights only (got {self.bits}-bit, group {self.group_size}, "
                                  f"{'sym' if self.sym else 'asym'}); re-quantize with --scheme w4a8")
        return self

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        extra = " act-order" if self.act_order else ""
        return f"{self.scheme} ({self.bits}-bit {g} {'sym' if self.sym else 'asym'}{extra})"
