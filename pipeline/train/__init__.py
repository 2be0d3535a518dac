"""Training: GANTask (the engine), EMA, checkpoints, kimg-driven callbacks and the `train` entry point."""

from pipeline.train.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from pipeline.train.run import TrainResult, train
from pipeline.train.task import GANTask

__all__ = [
    "GANTask",
    "TrainResult",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
