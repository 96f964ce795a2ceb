"""Compute: dequant kernels, the streaming MoE forward per model family, generation."""
from .dequant import dequantize
from .loader import load_model

__all__ = ["dequantize", "load_model"]
