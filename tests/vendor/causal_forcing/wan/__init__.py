# PATCH (reward-forcing tests): upstream imports configs, distributed, modules, WanI2V, WanT2V here
# (text encoder / VAE / CUDA-only code); the tests import wan.modules.causal_model directly.
