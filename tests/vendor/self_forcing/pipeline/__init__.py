# PATCH (reward-forcing tests): upstream's __init__ also imports the four inference pipelines;
# only the training pipeline is vendored.
from .self_forcing_training import SelfForcingTrainingPipeline

__all__ = [
    "SelfForcingTrainingPipeline"
]
