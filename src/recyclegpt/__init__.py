"""RecycleGPT: an autoregressive language model with a recyclable module (Yang et al., 2023,
arXiv 2308.03421), with the paper's alternating `recycle` decoding and a lossless `verify` mode."""

from .api import RecycleGPT
from .config import Config, ModelConfig, ModuleConfig, TrainConfig, preset
from .errors import RecycleError
from .model import FullModel
from .module import RecyclableModule

__all__ = ["RecycleGPT", "Config", "ModelConfig", "ModuleConfig", "TrainConfig", "preset", "RecycleError",
           "FullModel", "RecyclableModule"]
__version__ = "0.1.0"
