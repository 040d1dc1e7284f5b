"""Calibration for quantized inference: activation statistics and SmoothQuant factors."""

from .calibrate import Calibration, calibrate, smoothquant_factors
from .persist import load_quantized, save_quantized

__all__ = ["Calibration", "calibrate", "load_quantized", "save_quantized", "smoothquant_factors"]
