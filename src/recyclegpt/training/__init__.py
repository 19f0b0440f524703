"""Joint training (full model + recyclable module) and module-only training on a frozen model."""

from .joint import JointModel, agreement
from .loop import TrainOptions, read_metrics, train

__all__ = ["JointModel", "agreement", "TrainOptions", "read_metrics", "train"]
