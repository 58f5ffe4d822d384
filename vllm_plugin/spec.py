"""What a TLQ checkpoint asks the plugin to serve, parsed and checked without importing vLLM.

`ServeSpec.from_quant_config` reads config.json's `quantization_config` (docs/format.md) and
refuses anything the plugin cannot serve with a `CheckpointError` naming the field and the fix.
Row splits that cut a packed run or a scale group are served with row windows (vllm_plugin/params.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tlq.errors import CheckpointError

FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (-1, 32, 64, 128)
DEFAULT_IGNORE = ("visual", "vision_tower", "multi_modal_projector", "lm_head")


@dataclass(frozen=True)
class ServeSpec:
    """Numerics of every quantized linear of one checkpoint.

    Attributes:
        scheme: registry name (`w4a16`, ...), for messages only.
        bits: weight code width (2, 3, 4 or 8).
        group_size: input channels per scale group; -1 = one group per output channel.
        sym: True = offset 2**(bits-1), no qzeros; False = per-group zero points.
        act_bits: 16 = weight-only; 8 = per-token dynamic symmetric int8 activations (w4a8).
        desc_act: checkpoint carries `g_idx` (act-order): groups are not contiguous in K.
        ignore: module-name fragments left unquantized (matched as whole dot-separated runs).
    """

    scheme: str
    bits: int
    group_size: int
    sym: bool
    act_bits: int = 16
    desc_act: bool = False
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)

    @classmethod
    def from_quant_config(cls, cfg: dict) -> ServeSpec:
        if cfg.get("quant_method", "tlq") != "tlq":
            raise CheckpointError(f"quantization_config.quant_method is {cfg.get('quant_method')!r}, not 'tlq'")
        version = cfg.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format version {version} is newer than this plugin reads "
                                  f"({FORMAT_VERSION}); upgrade tlq")
        missing = [k for k in ("bits", "group_size", "sym") if k not in cfg]
        if missing:
            raise CheckpointError(f"quantization_config lacks {', '.join(missing)}; re-create the checkpoint "
                                  "with `tlq calibrate`")
        spec = cls(scheme=str(cfg.get("scheme", f"w{cfg['bits']}a{cfg.get('act_bits', 16)}")),
                   bits=int(cfg["bits"]), group_size=int(cfg["group_size"]), sym=bool(cfg["sym"]),
                   act_bits=int(cfg.get("act_bits", 16)), desc_act=bool(cfg.get("desc_act", False)),
                   ignore=tuple(cfg.get("ignore", DEFAULT_IGNORE)))
        spec.validate()
        return spec

    def validate(self) -> None:
        where = f"scheme {self.scheme}"
        if self.bits not in SUPPORTED_BITS:
            raise CheckpointError(f"{where}: {self.bits}-bit weights cannot be served; the plugin serves "
                                  f"{SUPPORTED_BITS} bits")
        if self.group_size not in SUPPORTED_GROUPS:
            raise CheckpointError(f"{where}: group size {self.group_size} cannot be served; use one of "
                                  f"{SUPPORTED_GROUPS} (-1 = per channel)")
        if self.act_bits not in (8, 16):
            raise CheckpointError(f"{where}: act_bits {self.act_bits} cannot be served; use 16 "
                                  "(weight-only) or 8 (w4a8)")
        if self.act_bits == 8 and (self.bits != 4 or not self.sym or self.group_size != -1):
            raise CheckpointError(f"{where}: int8 activations are served with symmetric per-channel int4 "
                                  f"weights only (got {self.bits}-bit, group {self.group_size}, "
                                  f"{'sym' if self.sym else 'asym'}); re-quantize with --scheme w4a8")

    @property
    def act_order(self) -> bool:
        """g_idx only matters when there is more than one group per row."""
        return self.desc_act and self.group_size != -1

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        extra = " act-order" if self.act_order else ""
        return f"{self.scheme} ({self.bits}-bit {g} {'sym' if self.sym else 'asym'}{extra})"


def is_ignored(prefix: str, fragments) -> bool:
    """True when a fragment matches a whole dot-separated run of `prefix` (tlq.adapters rule)."""
    from tlq.adapters import is_ignored as _is_ignored
    return _is_ignored(prefix, fragments)


def check_group_divides(prefix: str, k: int, spec: ServeSpec) -> None:
    if spec.group_size != -1 and k % spec.group_size:
        raise CheckpointError(f"layer {prefix}: group size {spec.group_size} does not divide its {k} input "
                              "channels (docs/format.md requires it); re-quantize with a group size that does")
