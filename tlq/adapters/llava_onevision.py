"""LLaVA-OneVision: SigLIP vision tower + 2-layer MLP projector + Qwen2 language model."""
from tlq.adapters.base import QWEN2_DECODER_GROUPS, ModelAdapter

LLAVA_ONEVISION = ModelAdapter(
    name="llava-onevision",
    model_types=("llava_onevision",),
    decoder_layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    embed_tokens="model.language_model.embed_tokens",
    vision_modules=("model.vision_tower", "model.multi_modal_projector"),
    ignore=("vision_tower", "multi_modal_projector", "lm_head"),
    image_token_attrs=("image_token_id", "image_token_index"),
    linear_groups=QWEN2_DECODER_GROUPS,
    checkpoint_layer_prefixes=("model.language_model.layers", "language_model.model.layers"),
)
