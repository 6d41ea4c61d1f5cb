# PATCH (reward-forcing tests): upstream also imports t5, tokenizers and vae (not vendored)
from .attention import flash_attention
from .model import WanModel

__all__ = ['WanModel', 'flash_attention']
