"""lmforge: one native-PyTorch toolkit from checkpoint to a cheap-to-run model."""

__version__ = "0.1.0"
