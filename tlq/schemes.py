"""Quantization schemes: a registry of named weight/activation settings.

A scheme fixes the numerics; a *method* (rtn, gptq, tlq, ...) decides how the
weights are chosen under it. `--group-size` and `--sym/--asym` on the CLI may
override a scheme's defaults where the scheme allows it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from tlq.errors import TLQError
from tlq.quant.qparams import SymmetricGrid


@dataclass(frozen=True)
class QuantScheme:
    """Numerics of one quantization setting.

    Attributes:
        name: registry name written to config.json (`w4a16`, ...).
        bits: weight bits (2, 3, 4 or 8).
        group_size: input-channel group size for weight scales; -1 = per output channel.
        symmetric: True = no zero points (code offset 2**(bits-1)); False = per-group zero points.
        act_bits: 16 = weight-only; 8 = per-token dynamic symmetric int8 activations.
        grid: how a symmetric group's absmax becomes its scale (tlq.quant.qparams.SymmetricGrid);
            not part of the stored format, so a calibration run sets it from its method
            (MethodSpec.grid); asymmetric schemes ignore it.
    """

    name: str
    bits: int
    group_size: int
    symmetric: bool
    act_bits: int = 16
    grid: SymmetricGrid = SymmetricGrid.FULL

    @property
    def weight_only(self) -> bool:
        return self.act_bits >= 16

    def with_overrides(self, group_size: int | None = None, symmetric: bool | None = None) -> QuantScheme:
        if self.act_bits == 8 and group_size not in (None, -1):
            raise TLQError(f"scheme {self.name} uses per-channel weights; drop --group-size "
                           "(int8 activation kernels take per-channel scales only)")
        return replace(self,
                       group_size=self.group_size if group_size is None else group_size,
                       symmetric=self.symmetric if symmetric is None else symmetric)

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.name} (int{self.bits} weights {g} {'sym' if self.symmetric else 'asym'}, " \
               f"{'int8 per-token activations' if self.act_bits == 8 else 'fp activations'})"


SCHEMES: dict[str, QuantScheme] = {
    s.name: s for s in (
        QuantScheme("w2a16", bits=2, group_size=64, symmetric=False),
        QuantScheme("w3a16", bits=3, group_size=128, symmetric=False),
        QuantScheme("w4a16", bits=4, group_size=128, symmetric=True),
        QuantScheme("w4a8", bits=4, group_size=-1, symmetric=True, act_bits=8),
        QuantScheme("w8a16", bits=8, group_size=128, symmetric=True),
    )
}


def get_scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name.lower()]
    except KeyError:
        raise TLQError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None
