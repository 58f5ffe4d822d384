"""Qwen2-VL and Qwen2.5-VL (transformers >= 5 layout: model.language_model / model.visual)."""
from tlq.adapters.base import QWEN2_DECODER_GROUPS, ModelAdapter

QWEN2_VL = ModelAdapter(
    name="qwen2-vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    embed_tokens="model.language_model.embed_tokens",
    vision_modules=("model.visual",),  # the patch merger (projector) lives inside `visual`
    ignore=("visual", "lm_head"),
    image_token_attrs=("image_token_id",),
    linear_groups=QWEN2_DECODER_GROUPS,
    checkpoint_layer_prefixes=("model.language_model.layers", "model.layers"),
)
