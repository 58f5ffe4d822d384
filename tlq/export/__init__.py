"""Exports of TLQ checkpoints to formats other tools load (compressed-tensors for stock vLLM)."""
from tlq.export.compressed_tensors import export_compressed_tensors

FORMATS = {"compressed-tensors": export_compressed_tensors}

__all__ = ["FORMATS", "export_compressed_tensors"]
