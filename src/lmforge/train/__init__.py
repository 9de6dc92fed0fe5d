"""The one trainer: config, loop, precision, checkpoints, metrics."""
from .config import TrainConfig
from .run import run_training
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "run_training"]
