"""Constructed blocks the reference comparisons run on."""
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding


def decoder_layer(seed=0, T=48):
    """A float32 Qwen2 decoder layer (GQA, 64 wide) with outlier input channels, and its input."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_hidden_layers=1, vocab_size=32, attn_implementation="sdpa")
    layer = Qwen2DecoderLayer(cfg, 0).eval().requires_grad_(False)
    for p in layer.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.1)
    layer.input_layernorm.weight.uniform_(0.5, 1.5)
    layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    layer.input_layernorm.weight[[3, 17]] *= 8.0  # outlier channels of the q/k/v input
    layer.post_attention_layernorm.weight[[5, 40]] *= 8.0
    hidden = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(seed + 1))
    rope = Qwen2RotaryEmbedding(cfg)
    position_embeddings = rope(hidden, torch.arange(T)[None])
    return layer, hidden, {"position_embeddings": position_embeddings, "attention_mask": None}
