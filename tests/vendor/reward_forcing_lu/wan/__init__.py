# PATCH (reward-forcing tests): upstream imports configs, distributed, WanI2V and WanT2V (not vendored)
