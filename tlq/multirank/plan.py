"""Which rank holds what: contiguous decoder-layer stages, and the owner of every tensor."""
from __future__ import annotations

from tlq.adapters import ModelAdapter
from tlq.errors import TLQError


def split_layers(layer_bytes: list[int], first_extra: int, last_extra: int, world: int) -> list[range]:
    """Contiguous stages, at least one layer each: the largest rank's weight bytes as small as
    possible, then the ranks as even as possible (least sum of squares under that maximum).

    Rank 0 also holds `first_extra` (vision tower, projector, embeddings), the last rank
    `last_extra` (final norm, lm_head). Two exact dynamic programmes over split points (L x N is tiny).
    """
    n = len(layer_bytes)
    if not 1 <= world <= n:
        raise TLQError(f"cannot split {n} decoder layers over {world} ranks; use --nproc between 1 and {n}")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(stage: int, i: int, j: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == world - 1 else 0)
        return prefix[j] - prefix[i] + extra

    def solve(combine, allowed) -> tuple[float, list[list[int]]]:
        # best[k][j]: best value splitting layers [0, j) into k stages; cut[k][j]: where stage k-1 starts
        best = [[float("inf")] * (n + 1) for _ in range(world + 1)]
        cut = [[0] * (n + 1) for _ in range(world + 1)]
        best[0][0] = 0
        for k in range(1, world + 1):
            for j in range(k, n - (world - k) + 1):
                for i in range(k - 1, j):
                    c = cost(k - 1, i, j)
                    if allowed(c) and combine(best[k - 1][i], c) < best[k][j]:
                        best[k][j], cut[k][j] = combine(best[k - 1][i], c), i
        return best[world][n], cut

    largest, _ = solve(max, lambda c: True)
    _, cut = solve(lambda acc, c: acc + c * c, lambda c: c <= largest)
    ranges, j = [], n
    for k in range(world, 0, -1):
        ranges.append(range(cut[k][j], j))
        j = cut[k][j]
    return ranges[::-1]


def layer_index(module_name: str, adapter: ModelAdapter) -> int | None:
    """Decoder layer a module/tensor name belongs to (transformers spelling), or None."""
    prefix = adapter.decoder_layers + "."
    if not module_name.startswith(prefix):
        return None
    return int(module_name[len(prefix):].split(".", 1)[0])


def owner(module_name: str, adapter: ModelAdapter, stages: list[range]) -> int:
    """Rank that loads and writes a tensor: its layer's stage; final norm and lm_head go to
    the last rank; everything else (vision tower, projector, embeddings) to rank 0."""
    index = layer_index(module_name, adapter)
    if index is not None:
        return next(r for r, s in enumerate(stages) if index in s)
    return len(stages) - 1 if is_head(module_name, adapter) else 0


def is_head(module_name: str, adapter: ModelAdapter) -> bool:
    """Final norm or lm_head (the last rank's extra tensors)."""
    return any(module_name == p or module_name.startswith(p + ".") for p in (adapter.final_norm, adapter.lm_head))


def tensor_bytes(model) -> dict[str, int]:
    """Bytes of every state-dict tensor of a (meta) model, tied duplicates included."""
    return {k: v.numel() * v.element_size() for k, v in model.state_dict(keep_vars=True).items()}


def plan_stages(sizes: dict[str, int], adapter: ModelAdapter, world: int) -> list[range]:
    """Stages for `world` ranks from tensor name -> bytes (module spelling)."""
    layers: dict[int, int] = {}
    first = last = 0
    for name, nbytes in sizes.items():
        index = layer_index(name, adapter)
        if index is not None:
            layers[index] = layers.get(index, 0) + nbytes
        elif is_head(name, adapter):
            last += nbytes
        else:
            first += nbytes
    return split_layers([layers[i] for i in range(len(layers))], first, last, world)
