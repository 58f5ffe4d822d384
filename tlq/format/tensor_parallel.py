"""How a row-parallel layer's packed tensors divide over tensor-parallel ranks (no vLLM import).

A row-parallel linear (o_proj, down_proj) gives rank r the input channels [r*k_part, (r+1)*k_part).
On disk, codes are packed in runs of 32 along K and scales come in groups of `group_size` channels.
When k_part is a multiple of `row_unit` (whole runs and whole groups) each rank simply takes its
slice. When it is not (Qwen2-VL-72B: intermediate 29568 at TP=8 is 3696 per rank, 28.875 groups of
128), rank r takes the *window* of whole units that covers its slice:

    start = floor(r*k_part / unit) * unit,  end = ceil((r+1)*k_part / unit) * unit

and its input x [.., k_part] is padded with `pad_front` zeros before and `pad_back` after, so the
kernel sees K' = end - start channels whose groups are the checkpoint's own groups. The padded
channels multiply zeros: the result is exact, at the cost of computing K'/k_part of the work on
those layers and storing a few neighbouring codes twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tlq.format.packing import RUN

SERVABLE_GROUP_SIZES = (128, 64, 32)  # group sizes the serving kernels take, largest first
ROW_PARALLEL_SUFFIXES = ("o_proj", "down_proj", "out_proj", "fc2")  # linears vLLM splits along K


def row_unit(group_size: int, act_order: bool = False) -> int:
    """K per rank must be a multiple of this for a plain slice: whole packed runs, whole scale groups.

    Per-channel and act-order scales are replicated on every rank, so only the packed runs count.
    """
    if group_size == -1 or act_order:
        return RUN
    return math.lcm(RUN, group_size)


@dataclass(frozen=True)
class RowWindow:
    """The whole units (channels [start, start+length)) that cover one rank's input slice.

    Attributes:
        start: first input channel of the window (a multiple of the unit).
        length: channels in the window (a multiple of the unit).
        pad_front: window channels before the rank's slice (x is padded with this many zeros).
        pad_back: window channels after the rank's slice.
    """

    start: int
    length: int
    pad_front: int
    pad_back: int

    @property
    def padded(self) -> bool:
        return bool(self.pad_front or self.pad_back)

    def groups(self, group_size: int) -> tuple[int, int]:
        """(first group, number of groups) of the window; the window holds whole groups."""
        return self.start // group_size, self.length // group_size


def row_window(k_part: int, rank: int, unit: int) -> RowWindow:
    """The window of whole `unit`s covering rank `rank`'s slice of k_part input channels."""
    first, last = rank * k_part, (rank + 1) * k_part
    start = first // unit * unit
    end = -(-last // unit) * unit
    return RowWindow(start, end - start, first - start, end - last)


def misaligned(k: int, tp: int, group_size: int, act_order: bool = False) -> bool:
    """True when a row split of k channels over tp ranks cuts a packed run or a scale group."""
    return tp > 1 and k % tp == 0 and (k // tp) % row_unit(group_size, act_order) != 0


def whole_group_sizes(k_values, tp: int) -> list[int]:
    """The servable group sizes that split every K in `k_values` into whole groups at TP=tp."""
    return [g for g in SERVABLE_GROUP_SIZES
            if all(k % tp == 0 and (k // tp) % row_unit(g) == 0 for k in k_values)]


def tp_advice(layer_inputs: dict[str, int], tp: int, group_size: int) -> str | None:
    """One warning naming the layers whose per-rank input is not whole groups at TP=tp, or None.

    `layer_inputs` maps a linear's name to its input size K; only row-parallel linears split K.
    """
    layer_inputs = {name: k for name, k in layer_inputs.items()
                    if name.rsplit(".", 1)[-1] in ROW_PARALLEL_SUFFIXES}
    cut = {name: k for name, k in layer_inputs.items() if misaligned(k, tp, group_size)}
    if not cut:
        return None
    kinds = sorted({(name.rsplit(".", 1)[-1], k) for name, k in cut.items()})
    what = ", ".join(f"{kind} ({k} inputs -> {k // tp} per rank)" for kind, k in kinds)
    fits = whole_group_sizes(layer_inputs.values(), tp)
    offer = (f"--group-size {fits[0]} splits every layer into whole groups at TP={tp}" if fits else
             f"no servable group size ({', '.join(map(str, SERVABLE_GROUP_SIZES))}) splits them whole at TP={tp}")
    return (f"at tensor-parallel size {tp}, group size {group_size} does not split {what} into whole groups; "
            f"the tlq plugin serves these layers exactly with padded group windows (a little extra work on "
            f"them); {offer}")
