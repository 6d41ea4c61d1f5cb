# PATCH (reward-forcing tests): upstream also imports the switch/streaming/self-forcing training
# pipelines (not vendored)
from .causal_inference import CausalInferencePipeline
from .interactive_causal_inference import InteractiveCausalInferencePipeline

__all__ = ['CausalInferencePipeline', 'InteractiveCausalInferencePipeline']
