"""TLQ: Token-level Importance-aware Layer-wise Quantization for vision-language models."""

__version__ = "0.1.0"
