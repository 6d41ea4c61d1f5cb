"""
Weights on disk other than the diffusers folder a user downloads (which causal_wan.from_pretrained loads):
our training checkpoints (the generator inside, and which kind), other code bases' releases and a tiny
random Wan written as a diffusers folder for --tiny and the tests.

Wan's original release, CausVid and Self Forcing name the transformer's parameters the original Wan way
(`blocks.0.self_attn.q.weight`), often behind wrapper prefixes (`model.`, FSDP's, torch.compile's);
causal_wan.py's names are diffusers'. The key map is diffusers' own (scripts/convert_wan_to_diffusers.py)
and round-trips.
"""
import os
import re
import sys

import torch

from causal_wan import WanConfig
from common import UserError

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
        key = key.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")
        key = WRAPPER_PREFIXES.sub("", key)
        out[_rename(key, ORIGINAL_TO_DIFFUSERS)] = value
    return out


def diffusers_to_original(state_dict):
    return {_rename(k, [(new, old) for old, new in ORIGINAL_TO_DIFFUSERS]): v for k, v in state_dict.items()}


def is_original_layout(state_dict):
    return any(".self_attn." in k or k.endswith("head.modulation") for k in state_dict)


# -----------------------------------------------------------------------------
# our checkpoints, and the generator inside any checkpoint

def load_checkpoint(path, mmap=False):
    """torch.load of a checkpoint, turning a missing or corrupt file into a one-line error.
    mmap=True reads tensors only when touched (e.g. to look at its 'args' alone)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' is not a readable torch checkpoint "
                        f"({type(e).__name__}: {str(e)[:100]})") from None


def generator_state_dict(ckpt, use_ema=True):
    """The generator weights (diffusers names) inside a checkpoint dict: ours ({'model', 'ema',
    ...}), Self Forcing's ({'generator', 'generator_ema'}), or a bare state dict in either layout."""
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint holds a {type(ckpt).__name__}, not a dict of weights")
    for key in (["ema", "generator_ema"] if use_ema else []) + ["model", "generator"]:
        if isinstance(ckpt.get(key), dict):
            sd = ckpt[key]
            if use_ema and key in ("model", "generator"):  # e.g. Self Forcing's ode_init.pt
                print(f"note: the checkpoint has no EMA weights; using its '{key}' weights", file=sys.stderr)
            break
    else:
        sd = ckpt
    if not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError("checkpoint holds no generator weights (expected 'ema'/'model' or 'generator_ema'/'generator')")
    return original_to_diffusers(sd) if is_original_layout(sd) else dict(sd)


def generator_kind(ckpt):
    """'bidirectional' for distill_dmd.py's 4-step bidirectional model (its args say so), else 'causal'."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    return args.get("generator", "causal") if isinstance(args, dict) else "causal"


def load_generator_weights(model, path, use_ema=True, kind="causal"):
    """Load the generator weights of the checkpoint at `path` into model (strict), or say in one
    line why they do not fit. kind: the generator the caller runs; distill_dmd.py records
    'bidirectional' for its 4-step bidirectional model, every other checkpoint is causal."""
    ckpt = load_checkpoint(path)
    saved = generator_kind(ckpt)
    if saved != kind:
        hint = " (the bidirectional 4-step model is train_ode.py's --teacher)" if saved == "bidirectional" else ""
        raise UserError(f"checkpoint '{path}' holds a {saved} generator, but a {kind} one is needed here" + hint)
    state_dict = generator_state_dict(ckpt, use_ema)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint '{path}' does not fit the model ({' '.join(str(e).split())[:200]})") from None
    return model


# -----------------------------------------------------------------------------
# a tiny random Wan in the real on-disk format, for tests and CPU demos (--tiny)

def make_tiny_wan(folder, seed=0):
    """Write a random-init tiny Wan as a diffusers-format folder (model_index.json, transformer/,
    vae/, text_encoder/, tokenizer/, scheduler/) with the real libraries' save_pretrained, so
    that --tiny runs exactly the loading code a user with real weights runs. Returns folder."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    import string

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    cfg = WanConfig.tiny()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)  # character-level Unigram vocab
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=8, d_ff=64,
                                               num_layers=2, num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, z_dim=16)
    transformer = WanTransformer3DModel(**cfg.to_diffusers())
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)
    tmp = folder.rstrip("/") + f".tmp{os.getpid()}"
    pipe.save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    try:
        os.rename(tmp, folder)  # atomic: a half-written tiny model never looks complete
    except OSError:  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_model_dir():
    """Where --tiny keeps its tiny Wan (built once, then reused)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "reward_forcing", "tiny_wan")
