"""Calibration data: the JSONL format (docs/calibration-data.md), the bundled set, model inputs."""
from tlq.data.calib import CalibSample, bundled_calibration_path, load_calibration

__all__ = ["CalibSample", "bundled_calibration_path", "load_calibration"]
