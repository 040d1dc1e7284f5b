"""Calibration for quantized inference: activation statistics, SmoothQuant factors and
low-rank KV-cache bases."""

from .calibrate import Calibration, calibrate, smoothquant_factors
from .lowrank import LowRankBases, calibrate_lowrank
from .persist import CheckpointError, load_quantized, save_quantized

__all__ = [
    "Calibration",
    "CheckpointError",
    "LowRankBases",
    "calibrate",
    "calibrate_lowrank",
    "load_quantized",
    "save_quantized",
    "smoothquant_factors",
]
