"""TLQ: Token-level Importance-aware Layer-wise Quantization for vision-language models.

Python API (tlq/api.py): `tlq.calibrate(model, out=..., method=..., scheme=..., calib=...)`
and `tlq.verify(checkpoint)`.
"""

__version__ = "0.1.0"

from tlq.api import calibrate, verify  # after __version__, which the internals read

__all__ = ["__version__", "calibrate", "verify"]
