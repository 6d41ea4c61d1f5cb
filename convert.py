"""
Weights in other code bases' layouts. Wan's original release, CausVid and Self Forcing name the
transformer's parameters the original Wan way (`blocks.0.self_attn.q.weight`), often behind wrapper
prefixes (`model.`, FSDP's, torch.compile's); causal_wan.py's names are diffusers'. The key map is
diffusers' own (scripts/convert_wan_to_diffusers.py) and round-trips.
"""
import re

# original Wan / CausVid / Self Forcing key -> diffusers key (from diffusers'
# scripts/convert_wan_to_diffusers.py). Original norm3 (the affine cross-attn norm) is
# diffusers' norm2; original norm1/norm2 have no parameters.
ORIGINAL_TO_DIFFUSERS = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    (".modulation", ".scale_shift_table"),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    (".norm3.", ".norm2."),
    (".self_attn.o.", ".attn1.to_out.0."),
    (".cross_attn.o.", ".attn2.to_out.0."),
    (".self_attn.norm_", ".attn1.norm_"),
    (".cross_attn.norm_", ".attn2.norm_"),
] + [(f".{a}.{p}.", f".{b}.to_{p}.") for a, b in [("self_attn", "attn1"), ("cross_attn", "attn2")] for p in "qkv"]

# wrappers other code bases put around the keys (Self Forcing: "model.", FSDP, compile, DDP)
WRAPPER_PREFIXES = re.compile(r"^(model\.|module\.|_orig_mod\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.)+")


def _rename(key, pairs):
    """Apply the first matching pair; a pattern without a leading '.' only matches at the start."""
    for old, new in pairs:
        if (old in key) if old.startswith(".") else key.startswith(old):
            return key.replace(old, new, 1)
    return key


def original_to_diffusers(state_dict):
    """Map an original-layout Wan state dict (optionally wrapped, e.g. Self Forcing's
    `model.blocks.0.self_attn.q.weight`) to diffusers names."""
    out = {}
    for key, value in state_dict.items():
        key = WRAPPER_PREFIXES.sub("", key.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", ""))
        out[_rename(key, ORIGINAL_TO_DIFFUSERS)] = value
    return out


def diffusers_to_original(state_dict):
    return {_rename(k, [(new, old) for old, new in ORIGINAL_TO_DIFFUSERS]): v for k, v in state_dict.items()}


def is_original_layout(state_dict):
    return any(".self_attn." in k or k.endswith("head.modulation") for k in state_dict)
