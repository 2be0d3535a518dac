"""Training: GANTask (the engine), the gradient-sync strategies, EMA, kimg-driven callbacks, `init=` and the
`train` entry point. Checkpoint files are `pipeline.checkpoint` (re-exported here for convenience)."""

from pipeline.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
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
