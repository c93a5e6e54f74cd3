"""Data-driven quantization: GPTQ (Frantar et al., 2022) and SpQR (Dettmers et al., 2023)."""
from __future__ import annotations

from lowbit.calibrate.data import calibration_batches
from lowbit.calibrate.gptq import gptq_quantize
from lowbit.calibrate.spqr import spqr_quantize

__all__ = ["calibration_batches", "gptq_quantize", "spqr_quantize"]

