# PATCH (reward-forcing tests): upstream also imports the bidirectional and training pipelines (not vendored)
from .causal_inference import CausalInferencePipeline

__all__ = ['CausalInferencePipeline']
