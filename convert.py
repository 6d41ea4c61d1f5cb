"""
Weights on disk other than the diffusers folder a user downloads (which causal_wan.from_pretrained loads):
our training checkpoints (the generator inside, and which kind), other code bases' releases and a tiny
random Wan written as a diffusers folder for --tiny and the tests; and a trained generator exported as a
diffusers `transformer/` folder of safetensors, which WanTransformer3DModel.from_pretrained and every --checkpoint
and --init here load:

    python convert.py export --checkpoint runs/reward/ckpt.pt --out runs/reward/transformer   # its EMA, fp32
    python sample.py --checkpoint runs/reward/transformer --prompt "..."                      # the same video

Wan's original release, CausVid, Self Forcing and the releases built on its code (LongLive, Reward Forcing by Lu
et al., Causal Forcing) name the transformer's parameters the original Wan way (`blocks.0.self_attn.q.weight`), often
behind wrapper prefixes (`model.`, FSDP's, torch.compile's); causal_wan.py's names are diffusers'. The key map is
diffusers' own (scripts/convert_wan_to_diffusers.py) and round-trips. A PEFT LoRA (LongLive's lora.pt) is merged
into the loaded weights (merge_lora).
"""
import argparse
import json
import os
import re
import sys

import torch

import causal_wan as cw
import common
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

def check_checkpoint(path, what):
    """Before anything loads: a checkpoint file, or an exported generator (a folder of safetensors, or one file)."""
    if os.path.isdir(path):
        exported_files(path, what)
    else:
        common.check_file(path, what)


def load_checkpoint(path, mmap=False):
    """torch.load of a checkpoint, turning a missing or corrupt file into a one-line error.
    mmap=True reads tensors only when touched (e.g. to look at its 'args' alone). An exported generator (a folder
    or a .safetensors file: export below) reads as {'exported': its weights, 'args': {'generator': its kind}}."""
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return load_exported(path)
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
    if "exported" in ckpt:  # one set of weights: the ones it was exported from
        return dict(ckpt["exported"])
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
# a PEFT LoRA merged into a generator (LongLive v1.0: longlive_base.pt + lora.pt)

LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(\.[\w-]+)?\.weight")  # an adapter name may follow lora_A


def load_lora(path):
    """The generator's LoRA weights in a file: LongLive's lora.pt ({'generator_lora': ..., 'critic_lora': ...}, as
    peft.get_peft_model_state_dict writes them) or a bare dict of them."""
    ckpt = load_checkpoint(path, mmap=True)  # mmap: the critic's LoRA in the same file is never read
    lora = ckpt.get("generator_lora", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(lora, dict) or not lora or not all(torch.is_tensor(v) for v in lora.values()):
        raise UserError(f"--lora '{path}' holds no LoRA weights (expected 'generator_lora' or a dict of tensors)")
    return lora


@torch.no_grad()
def merge_lora(model, lora, alpha=None, name="--lora"):
    """W += (alpha / r) B @ A for each LoRA pair (A [r, in], B [out, r]) on the model's linear weights, merged in
    fp32: what peft computes unmerged, y = W x + b + (alpha / r) B (A x), and what its merge_and_unload stores (its
    default scaling; not rsLoRA's alpha / sqrt(r)). Keys as peft writes them, 'base_model.model.<module>.lora_A.weight',
    the module in the original Wan names (LongLive's) or diffusers'. alpha None: alpha = r (LongLive: 256 = r).
    Every module must be a linear layer of the model: otherwise one line says which."""
    pairs, params = {}, dict(model.named_parameters())
    for key, value in lora.items():
        m = LORA_KEY.fullmatch(key)
        if m is None:
            raise UserError(f"{name}: '{key}' is not a LoRA weight ('<module>.lora_A.weight' / '.lora_B.weight')")
        module = m["module"].removeprefix("base_model.model.")
        (target,) = original_to_diffusers({module + ".weight": None})
        pairs.setdefault(target, {})[m["ab"]] = value
    for target, ab in pairs.items():
        missing = {"A", "B"} - set(ab)
        if missing or target not in params:
            what = f"has no lora_{missing.pop()}" if missing else "is not a weight of the generator"
            raise UserError(f"{name}: the LoRA of '{target}' {what}")
        W, A, B = params[target], ab["A"].float(), ab["B"].float()
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != W.shape:
            raise UserError(f"{name}: the LoRA of '{target}' (B {list(B.shape)} @ A {list(A.shape)}) does not fit "
                            f"its weight {list(W.shape)}")
        rank = A.shape[0]
        W.copy_(W.float() + ((rank if alpha is None else alpha) / rank) * (B @ A))
    return model


# -----------------------------------------------------------------------------
# a generator as a diffusers transformer folder of safetensors (`python convert.py export`)

EXPORT_FILE = "diffusion_pytorch_model.safetensors"  # the name diffusers' save_pretrained gives one shard


def exported_files(path, what="checkpoint"):
    """The safetensors files of an exported generator: `path` itself, or those of the folder (or of its
    transformer/ subfolder, a whole diffusers-format Wan)."""
    if os.path.isfile(path):
        return [path]
    folder = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{what} '{path}' is a folder without .safetensors weights: give a checkpoint file, or a "
                        f"generator exported with `python convert.py export`")
    return files


def load_exported(path):
    """{'exported': the weights (diffusers names), 'args': {'generator': 'causal' or 'bidirectional'}} of a
    generator in safetensors; its kind comes from the file's metadata (written by export; a diffusers transformer
    of another origin is causal)."""
    from safetensors import safe_open
    if not os.path.exists(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    state_dict, kind = {}, "causal"
    for file in exported_files(path):
        try:
            with safe_open(file, "pt") as f:
                kind = (f.metadata() or {}).get("generator", kind)
                state_dict.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:
            raise UserError(f"'{file}' is not a readable safetensors file "
                            f"({type(e).__name__}: {str(e)[:100]})") from None
    sd = original_to_diffusers(state_dict) if is_original_layout(state_dict) else state_dict
    return {"exported": sd, "args": {"generator": kind}}


def export(args):
    """`python convert.py export`: the generator of --checkpoint (its EMA unless --no-ema) with --model's config,
    as OUT/config.json (WanTransformer3DModel's) + OUT/diffusion_pytorch_model.safetensors, in --dtype. Each file is
    written aside and renamed; the safetensors metadata records the kind of generator and where it came from."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file
    check_checkpoint(args.checkpoint, "--checkpoint")
    cw.check_model(args.model)
    ckpt = load_checkpoint(args.checkpoint)
    kind, cfg = generator_kind(ckpt), cw.read_wan_config(cw.resolve_folder(args.model, "transformer", "--model"))
    model = cw.CausalWan(cfg)
    load_generator_weights(model, args.checkpoint, use_ema=not args.no_ema, kind=kind)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    state_dict = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    common.check_output_folder(args.out, "--out")
    with torch.device("meta"):
        config = dict(WanTransformer3DModel(**cfg.to_diffusers()).config)
    metadata = {"format": "pt", "generator": kind, "source": os.path.abspath(args.checkpoint),
                "weights": "model" if args.no_ema else "ema", "step": str(ckpt.get("step", ""))}
    weights, config_path = os.path.join(args.out, EXPORT_FILE), os.path.join(args.out, "config.json")
    for path, write in [(weights, lambda tmp: save_file(state_dict, tmp, metadata=metadata)),
                        (config_path, lambda tmp: open(tmp, "w").write(json.dumps(config, indent=2) + "\n"))]:
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"could not write {path} ({e.strerror}): {common.no_room(path)}") from None
        finally:
            common._remove(tmp)
    print(f"wrote {args.out}: the {kind} generator of {args.checkpoint} ({metadata['weights']} weights, "
          f"{args.dtype}, {sum(v.numel() for v in state_dict.values()) / 1e6:.1f}M parameters)")


def parse_args(argv=None):
    p = common.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a generator as a diffusers transformer folder of safetensors")
    e.add_argument("--checkpoint", required=True, help="a checkpoint of this repo (or Self Forcing's .pt)")
    e.add_argument("--out", required=True, help="the folder to write config.json and the safetensors into")
    e.add_argument("--model", default=cw.DEFAULT_MODEL, help="the diffusers-format Wan whose config it has")
    e.add_argument("--no-ema", action="store_true", help="the checkpoint's raw weights instead of its EMA")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the weights' dtype (fp32)")
    return p.parse_args(argv)


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


if __name__ == "__main__":
    common.run_script(export, parse_args)
