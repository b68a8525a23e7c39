"""An alignment training pipeline: SFT -> reward model -> best-of-n -> DPO, from one recipe."""

__version__ = "0.1.0"
