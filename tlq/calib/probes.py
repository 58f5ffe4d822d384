"""Reading a decoder layer from the inside: a linear's inputs, and a block's output with a
linear group's weights replaced (the block-output loss of AWQ's scale search, AutoAWQ's
`module2inspect`)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tlq.adapters import LinearGroup, ModelAdapter, get_submodule
from tlq.calib.capture import to_device
from tlq.calib.rss import trim_heap_every
from tlq.calib.timing import timed


class _Stop(Exception):
    pass


def _run_until(layer: nn.Module, module: nn.Module, hook, hidden: list[torch.Tensor], kwargs: list[dict],
               device: str) -> None:
    """Run `layer` on every sample until `module` is called (`hook` sees its call, then the forward stops)."""
    def stop(mod, args, kw):
        hook(args, kw)
        raise _Stop

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs):
                try:
                    layer(h.to(device), **to_device(kw, device))
                except _Stop:
                    pass
                trim_heap_every(h.shape[-2])
    finally:
        handle.remove()


def collect_inputs(layer: nn.Module, module_name: str, hidden: list[torch.Tensor], kwargs: list[dict],
                   device: str) -> torch.Tensor:
    """[sum T, K] inputs of `module_name` over all samples (the forward stops right after)."""
    store = []

    def keep(args, kw):
        x = args[0] if args else next(iter(kw.values()))
        store.append(x.detach().reshape(-1, x.shape[-1]).float().cpu())

    with timed("statistics"):
        _run_until(layer, get_submodule(layer, module_name), keep, hidden, kwargs, device)
        return torch.cat(store)


def inspected_block(adapter: ModelAdapter, group: LinearGroup) -> str | None:
    """The block whose output scores `group`'s scale search: its attention / MLP module when the group
    is the first of that block in forward order (it reads the block's input: q/k/v, gate/up),
    else None (o_proj, down_proj: their own output, as in AutoAWQ)."""
    first = next(g for g in adapter.linear_groups if g.block == group.block)
    return getattr(adapter, f"{group.block}_module") if first == group else None


class BlockProbe:
    """One block of `layer` (e.g. self_attn) run on its captured per-sample calls, with the
    linears `names` swapped for given weights (scale_search.BlockOutput)."""

    def __init__(self, layer: nn.Module, block: str, names: tuple[str, ...], hidden: list[torch.Tensor],
                 kwargs: list[dict], device: str):
        self.block = get_submodule(layer, block)
        self.linears = [get_submodule(layer, n) for n in names]
        self.calls: list[tuple[tuple, dict]] = []
        _run_until(layer, self.block, lambda args, kw: self.calls.append((args, kw)), hidden, kwargs, device)

    def __call__(self, weights: list[torch.Tensor],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        saved = [lin.weight.data for lin in self.linears]
        hooks = []
        try:
            for lin, W in zip(self.linears, weights):
                lin.weight.data = W.to(device=lin.weight.device, dtype=lin.weight.dtype)
            if transform is not None:
                hooks = [lin.register_forward_pre_hook(lambda m, a: (transform(a[0]),) + tuple(a[1:]))
                         for lin in self.linears]
            with torch.no_grad():
                outs = [self.block(*args, **kw) for args, kw in self.calls]
        finally:
            for lin, W in zip(self.linears, saved):
                lin.weight.data = W
            for h in hooks:
                h.remove()
        outs = [o[0] if isinstance(o, tuple) else o for o in outs]
        return torch.cat([o.reshape(-1, o.shape[-1]).float() for o in outs])
