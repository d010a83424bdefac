"""Hippocrates: train and evaluate medical LLMs (CPT -> SFT -> RLAIF/DPO -> evaluation)."""

__version__ = "0.1.0"
