"""`TLQLinearMethod`: declares a TLQ linear's checkpoint tensors, then hands the layer to a backend.

create_weights   -> params.create_tlq_params (GPTQ layout, TP-aware vLLM parameter classes)
process_weights  -> unpack what was loaded, backends.choose (kernel or torch fallback), record
                    the choice on the config for the once-per-model summary
apply            -> the chosen backend's apply (no logging, traceable by torch.compile)
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method

from vllm_plugin import backends
from vllm_plugin.params import create_tlq_params
from vllm_plugin.spec import ServeSpec, check_group_divides
from vllm_plugin.weights import LoadedWeight, unpack_codes


@register_weight_loader_v2_supported_method
class TLQLinearMethod(LinearMethodBase):
    """One instance per quantized linear (vLLM asks the config once per layer)."""

    def __init__(self, spec: ServeSpec, prefix: str, recorder):
        self.spec = spec
        self.prefix = prefix
        self.recorder = recorder  # TLQConfig: collects the per-layer choices for one summary log
        self.backend = None

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        check_group_divides(self.prefix, input_size, self.spec)
        create_tlq_params(layer, self.spec, input_size_per_partition, output_partition_sizes, input_size,
                          params_dtype, extra_weight_attrs.get("weight_loader"))
        layer.tlq_shape = (input_size, output_size)
        layer.tlq_partition = (input_size_per_partition, tuple(output_partition_sizes))
        self.recorder.layer_created(self.prefix)

    def loaded_weight(self, layer: torch.nn.Module) -> LoadedWeight:
        """What the loader put in the layer's parameters, unpacked to codes and zero points."""
        k_part, shard_sizes = layer.tlq_partition
        if layer.tlq_window is not None:  # a row window of whole groups around this rank's slice
            k_part = layer.tlq_window.length
        codes = unpack_codes(layer.qweight.data, self.spec.bits, k_part)
        zeros = None
        if hasattr(layer, "qzeros") and layer.qzeros is not None:
            zeros = layer.qzeros.data
        g_idx = layer.g_idx.data.long() if self.spec.act_order else None
        return LoadedWeight(codes=codes, scales=layer.scales.data, zeros=zeros, bits=self.spec.bits,
                            group_size=self.spec.group_size, g_idx=g_idx, shard_sizes=tuple(shard_sizes))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        k_full, n_full = layer.tlq_shape
        job = backends.LayerJob(self.loaded_weight(layer), self.spec, self.prefix, k_full, n_full,
                                layer.tlq_window)
        self.backend, served = backends.choose(layer, job)
        self.recorder.layer_served(self.prefix, served)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.backend.apply(layer, x, bias)

