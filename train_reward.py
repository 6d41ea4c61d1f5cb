"""
Stage 3 of Reward Forcing (the paper's contribution, section 3.2): fine-tune the ODE-initialized
causal generator so that the LAST frame of the video it rolls out by itself scores high under a
differentiable image reward (ImageReward): L_reward(theta) = -E_z[ R(x_T) ], x_{1:T} = G_theta(z).
No teacher and no critic: the generator, the Wan VAE (to reach pixels) and a frozen reward model.

    # CPU demo with a tiny random Wan and a tiny random ImageReward (built once in ~/.cache/reward_forcing)
    python train_reward.py --tiny --out runs/reward_tiny
    python train_reward.py --tiny --out runs/reward_tiny --resume --max-steps 40

    # one GPU (the global batch of 8 by gradient accumulation)
    python train_reward.py --init runs/ode/ckpt.pt --prompts prompts.txt --out runs/reward

    # 8 GPUs (FSDP; bf16 compute, fp32 master weights, activation checkpointing)
    torchrun --nproc_per_node 8 train_reward.py --init runs/ode/ckpt.pt --prompts prompts.txt --out runs/reward
    # starting from Self Forcing's released ODE initialization instead of train_ode.py's
    # (hf download gdhe17/Self-Forcing checkpoints/ode_init.pt --local-dir .)
    torchrun --nproc_per_node 8 train_reward.py --init checkpoints/ode_init.pt --prompts prompts.txt --out runs/reward

The paper supervises the last frame only because supervising more frames encourages static videos
(section 5.2); the last frame, at the end of the autoregressive rollout, keeps the motion.

The paper's ablations, as flags
-------------------------------
(... = torchrun --nproc_per_node 8 train_reward.py --init runs/ode/ckpt.pt --prompts PROMPTS;
score each with `eval_vbench.sh --checkpoint OUT/ckpt.pt`)

    ... --out runs/reward                   Table 1 "Ours (chunk-wise)": 84.92 total / 85.91 quality / 80.97 semantic
    ... --reward-frames random              section 5.2: score one random frame of the whole video instead of
                                            the last (the paper: dynamic degree, Table 3, more than 10 points lower)
    ... --dmd-weight 1                      section 5.1, Table 2 "Reward + Distill": 82.55 / 83.20 / 79.96:
                                            reward and DMD jointly, each normalized (see joint_gradient), with
                                            distill_dmd.py's DMD loss and critic; the real score is --teacher,
                                            by default --model (the base Wan 1.3B, as in distill_dmd.py)
    ... --dmd-weight 1 --teacher Wan-AI/Wan2.1-T2V-14B-Diffusers
                                            section 5.3: the same with the 14B teacher (no substantial difference)
    ... --reward pickscore                  not in the paper: another differentiable image reward in place of
                                            ImageReward (section 6 names other rewards as future work)
    ... --cache-grad detach                 not in the paper: the KV cache carries no gradient, so the last
                                            frame's reward trains the last block only (see below)
    train_ode.py alone, then eval_vbench.sh Table 1 "ODE Only (chunk-wise)": 68.77 / 73.27 / 50.81

One training step
-----------------
For each video of the global batch (its noise, prompt and scored frame from its own random stream; see Run):
1. Self-rollout, as at inference (rollout): the whole latent video in causal blocks with the generator's own
   KV cache, every block stopping after one denoising step drawn per update (exit_step). The paper's rollout
   "is the same as SelfForcing", whose training code lets the gradient through the KV cache (straight-through:
   later blocks read the clean keys/values, their gradient reaches each earlier block's exit step; it looks
   accidental there, but it made the published models): --cache-grad straight-through, the default, computes
   exactly that (tests/test_self_forcing.py, against Self Forcing's own pipeline).
2. Decode the scored frame through the real Wan VAE with the exact gradient (decode_reward_frames).
3. Score it against its prompt with the frozen fp32 reward (load_reward): reward_loss = -mean(reward).
4. AdamW step on the generator, EMA update (generator_update; with --dmd-weight, joint_gradient's DMD
   term and critic_update first).
Outputs in --out (ckpt.pt, log.jsonl, sample_<step>.mp4): see save, train and write_sample.

Not tested here: anything on a GPU (bf16 autocast through FSDP, activation checkpointing, the memory
and speed figures), the real ImageReward/PickScore/Wan weights, and the paper's VBench numbers.
Memory and time estimates: BENCHMARKS.md, "train_reward.py: hardware" and "train_reward.py: reward decode memory".
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import causal_wan as cw
import common
import convert
import distill_dmd as dmd
from common import UserError

SCRIPT = "train_reward.py"  # recorded in the checkpoint: --resume continues only this script's runs


@dataclass
class Config:
    # for real runs, pass your own list (Self Forcing trains on extended VidProM prompts)
    prompts: str = dmd.EXAMPLE_PROMPTS
    height: int = 480
    width: int = 832
    frames: int = 81  # pixel frames -> 21 latent frames
    block_size: int = 3  # latent frames per causal block (chunk-wise; 1: frame-wise)
    reward: str = "imagereward"
    reward_frames: str = "last"  # the paper's choice; "random" is the section 5.2 ablation
    # how the last frame's gradient reaches the earlier blocks it attended to: through the KV cache as Self
    # Forcing's training code computes it ("straight-through", what the paper's self-rollout ran), or not at
    # all ("detach": the cache carries no gradient, so the loss reaches only the scored frame's block)
    cache_grad: str = "straight-through"
    # appendix B.2: batch 8, AdamW (0, 0.999), eps 1e-8, weight decay 0.01, lr 2e-6, EMA 0.99
    global_batch: int = 8  # accumulation = global_batch / (GPUs x micro_batch), an error if not whole
    micro_batch: int = 1
    lr: float = 2e-6
    ema_decay: float = 0.99
    # the generator starts trained (train_ode.py's EMA, or Self Forcing's ODE init): averaging from the
    # first update keeps nothing worse than that init in the EMA, so no warm-up
    ema_start: int = 0
    grad_clip: float = 10.0  # Self Forcing's
    max_steps: int = 500  # the paper does not state it: watch sample_reward in log.jsonl and the samples
    save_every: int = 50
    log_every: int = 1
    sample_every: int = 50
    # --dmd-weight ablation (section 5.1): distill_dmd.py's settings for the DMD term and its critic (guidance,
    # critic steps and lr, and Wan's negative prompt), used only with --dmd-weight
    dmd_weight: float = 0.0
    guidance: float = 4.0
    critic_steps: int = 5
    critic_lr: float = 4e-7
    negative_prompt: str = cw.WAN_NEGATIVE_PROMPT

    @staticmethod
    def tiny():
        # 64x64 pixels, 21 frames -> latents [16, 6, 8, 8] (two causal blocks of 3); a step takes ~1 s on a CPU
        return Config(height=64, width=64, frames=21, global_batch=2, lr=1e-2, ema_decay=0.9, max_steps=20,
                      save_every=10, log_every=1, sample_every=10, critic_steps=1, critic_lr=1e-3)

# -----------------------------------------------------------------------------
# rewards: reward_fn(frames, prompts) -> scores [B], from load_reward (--reward imagereward or pickscore)


def patch_image_reward_for_transformers5():
    """image-reward 1.5 (2023) is unmaintained: it imports only beside OpenAI's `clip` and builds only with
    transformers 4.x. Instead of pinning transformers 4, fill in those six missing things, each only where it is
    missing. Call before using the package."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils
    from transformers import BertTokenizer
    # its CLIPScore/AestheticScore modules `import clip` (OpenAI CLIP, not a declared dependency,
    # not used by ImageReward; PyPI's `clip` is another project): an empty module lets them import
    if "clip" not in sys.modules and importlib.util.find_spec("clip") is None:
        sys.modules["clip"] = types.ModuleType("clip")
    # transformers >= 4.56 moved these two from modeling_utils to pytorch_utils; BLIP's med.py
    # imports them from the old place
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    # ...and this one was removed; med.py imports it for prune_heads(), which ImageReward never calls
    if not hasattr(modeling_utils, "find_pruneable_heads_and_indices"):
        def find_pruneable_heads_and_indices(*args, **kwargs):
            raise NotImplementedError("head pruning is not supported with transformers 5")
        modeling_utils.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices
    # transformers 5 renamed the tokenizer's additional_special_tokens to extra_special_tokens;
    # BLIP's init_tokenizer() reads additional_special_tokens_ids[0] to find its [ENC] token
    if not hasattr(BertTokenizer, "additional_special_tokens_ids"):
        BertTokenizer.additional_special_tokens_ids = property(lambda self: self.extra_special_tokens_ids)
    with warnings.catch_warnings():  # its blip.py runs warnings.filterwarnings("ignore") for the whole process
        from ImageReward.models.BLIP import med
    # BLIP's BertModel calls init_weights() in __init__ instead of post_init(); in transformers 5
    # init_weights() ties weights listed in all_tied_weights_keys, which only post_init() sets.
    # BLIP's BertModel has no tied weights, so the empty mapping is exact
    if not hasattr(med.BertPreTrainedModel, "all_tied_weights_keys"):
        med.BertPreTrainedModel.all_tied_weights_keys = {}
    # transformers 5 removed PreTrainedModel.invert_attention_mask: this is the 4.x version
    # (1 = attend -> 0, 0 = ignore -> dtype min, broadcast over heads and queries)
    if not hasattr(med.BertPreTrainedModel, "invert_attention_mask"):
        def invert_attention_mask(self, mask):
            mask = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]).to(self.dtype)
            return (1.0 - mask) * torch.finfo(self.dtype).min
        med.BertPreTrainedModel.invert_attention_mask = invert_attention_mask
    # ...and get_head_mask; BLIP always passes head_mask=None, for which 4.x returned [None] * layers
    if not hasattr(med.BertPreTrainedModel, "get_head_mask"):
        def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
            assert head_mask is None, "BLIP never uses head masks"
            return [None] * num_hidden_layers
        med.BertPreTrainedModel.get_head_mask = get_head_mask


def preprocess(frames, size, crop, mean, std):
    """Torch twin of the PIL Resize(size, bicubic) -> CenterCrop(crop) -> ToTensor -> Normalize that
    both reward models were trained with, differentiable: [B, 3, H, W] in [-1, 1] -> [B, 3, crop, crop]."""
    # a saved video clamps to [-1, 1] too: the reward judges what the user will see, and pixels
    # pushed out of range get no gradient (no reward hacking through invisible values)
    x = (frames.float().clamp(-1, 1) + 1) / 2
    H, W = x.shape[-2:]
    h, w = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)  # torchvision's rounding
    # antialias=True is PIL's bicubic (a = -0.5, kernel widened when shrinking), not torch's a = -0.75.
    # PIL resizes width then height and clamps to 0..255 after each pass; doing the same keeps us
    # within one uint8 step of PIL even where bicubic overshoots
    x = F.interpolate(x, size=(H, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    # torchvision's CenterCrop rounding; HF's CLIP processor floors, the same for even margins (video frames)
    top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
    x = x[:, :, top:top + crop, left:left + crop]  # [B, 3, crop, crop]
    mean, std = torch.tensor(mean, device=x.device), torch.tensor(std, device=x.device)
    return (x - mean[:, None, None]) / std[:, None, None]


def freeze(model):
    model.eval().requires_grad_(False)  # gradients flow into the pixels only
    return model


def build_image_reward(med_config, tokenizer, vit_width=1024, vit_depth=24, device="cpu"):
    """The package's own ImageReward class, with the two things its constructor hard-codes made
    explicit: the BERT tokenizer (always 'bert-base-uncased' from the hub) and the ViT (always
    ViT-L/16: width 1024, depth 24). The real checkpoint gives exactly the package's model."""
    import ImageReward as RM
    from ImageReward.models.BLIP import blip, blip_pretrain
    from transformers import BertTokenizer

    fix = "save BertTokenizer.from_pretrained('bert-base-uncased') to a folder and pass --reward-tokenizer DIR"

    def load_bert_tokenizer(name):  # BLIP's init_tokenizer() asks for 'bert-base-uncased' by name
        try:
            return BertTokenizer.from_pretrained(tokenizer)
        except OSError as e:
            raise UserError(f"BERT tokenizer {tokenizer!r} not found locally and the hub is unreachable: {fix}") from e

    def create_vit(vit, image_size, *args):  # BLIP's ViTs all use 64-wide attention heads
        return blip.VisionTransformer(img_size=image_size, patch_size=16, embed_dim=vit_width,
                                      depth=vit_depth, num_heads=vit_width // 64), vit_width

    saved = blip.BertTokenizer, blip_pretrain.create_vit
    blip.BertTokenizer, blip_pretrain.create_vit = (types.SimpleNamespace(from_pretrained=load_bert_tokenizer),
                                                    create_vit)
    try:
        model = RM.ImageReward(med_config=med_config, device=device)
    finally:
        blip.BertTokenizer, blip_pretrain.create_vit = saved
    vocab_size = model.blip.text_encoder.config.vocab_size
    # transformers 5 quietly builds a 5-token tokenizer from an empty folder
    if len(model.blip.tokenizer) != vocab_size:
        raise UserError(f"BERT tokenizer {tokenizer!r} has {len(model.blip.tokenizer)} tokens with BLIP's [DEC] [ENC], "
                         f"ImageReward's text encoder {vocab_size} (not found, or not bert-base-uncased): {fix}")
    return model


def load_image_reward(path=None, tokenizer=None, device="cpu", dtype=torch.float32):
    patch_image_reward_for_transformers5()
    fix = "download THUDM/ImageReward ImageReward.pt + med_config.json into a folder and pass --reward-path DIR"
    if path is None:  # the two files ImageReward.load("ImageReward-v1.0") downloads, via the hub cache
        from huggingface_hub import hf_hub_download
        try:
            ckpt = hf_hub_download("THUDM/ImageReward", "ImageReward.pt")
            med_config = hf_hub_download("THUDM/ImageReward", "med_config.json")
        except OSError as e:
            raise UserError(f"ImageReward weights not in the hub cache and the hub is unreachable: {fix}") from e
    else:
        ckpt, med_config = os.path.join(path, "ImageReward.pt"), os.path.join(path, "med_config.json")
        if not (os.path.isfile(ckpt) and os.path.isfile(med_config)):
            raise UserError(f"ImageReward weights not found at {path} (no ImageReward.pt + med_config.json): {fix}")
    state_dict = torch.load(ckpt, map_location="cpu", weights_only=True)
    if "blip.visual_encoder.pos_embed" not in state_dict:
        raise UserError(f"{ckpt} is not an ImageReward checkpoint (no blip.visual_encoder): {fix}")
    vit_width = state_dict["blip.visual_encoder.pos_embed"].shape[-1]  # 1024 for the real ViT-L
    vit_depth = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("blip.visual_encoder.blocks."))
    model = build_image_reward(med_config, tokenizer or "bert-base-uncased", vit_width, vit_depth, device)
    missing = model.load_state_dict(state_dict, strict=False).missing_keys  # strict=False as ImageReward.load
    # what score_gard() runs; position_ids is a fixed buffer
    used = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
    missing = [k for k in missing if k.startswith(used) and not k.endswith("position_ids")]
    if missing:
        raise UserError(f"{ckpt} is not an ImageReward checkpoint (missing {missing[:3]}...): {fix}")
    model = freeze(model).to(device, dtype)
    resize, crop, _, _, normalize = model.preprocess.transforms  # the package's PIL pipeline: read its numbers

    def image_reward(frames, prompts):
        # tokenized exactly like ImageReward.score(); score_gard() is score() without PIL and .detach(),
        # and already applies the (reward - mean) / std normalization
        text = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        text = text.to(device)
        image = preprocess(frames, resize.size, crop.size[0], normalize.mean, normalize.std).to(dtype)
        return model.score_gard(text.input_ids, text.attention_mask, image)[:, 0].float()  # [B]
    image_reward.model = model
    return image_reward


def load_pickscore(path=None, processor=None, device="cpu", dtype=torch.float32):
    from transformers import AutoProcessor, CLIPModel
    path = path or "yuvalkirstain/PickScore_v1"
    processor_path = processor or "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    try:
        model = freeze(CLIPModel.from_pretrained(path)).to(device, dtype)
    except OSError as e:
        raise UserError(f"PickScore weights {path!r} not found locally and not downloadable from the hub: "
                         "download the yuvalkirstain/PickScore_v1 repo into a folder and pass --reward-path DIR") from e
    try:
        processor = AutoProcessor.from_pretrained(processor_path)
    except OSError as e:
        raise UserError(f"CLIP processor {processor_path!r} not found locally and not downloadable from the hub: "
                         "save laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor to a folder "
                         "and pass --reward-tokenizer DIR") from e
    if len(processor.tokenizer) != model.config.text_config.vocab_size:
        raise UserError(f"CLIP processor {processor_path!r} has {len(processor.tokenizer)} tokens, PickScore's text "
                         f"encoder {model.config.text_config.vocab_size}: pass laion/CLIP-ViT-H-14-laion2B-s32B-b79K's "
                         "processor folder as --reward-tokenizer DIR")
    ip = processor.image_processor

    def pickscore(frames, prompts):
        # as PickScore's reference code: logit_scale.exp() * cos(image embedding, text embedding)
        text = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        image = preprocess(frames, ip.size["shortest_edge"], ip.crop_size["height"], ip.image_mean, ip.image_std)
        image = image.to(dtype)
        image_emb = model.get_image_features(pixel_values=image).pooler_output  # [B, D]
        text_emb = model.get_text_features(**text).pooler_output  # [B, D]
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (image_emb * text_emb).sum(-1)).float()  # [B]
    pickscore.model = model
    return pickscore


def check_reward_path(name, path):
    """Before anything loads: --reward-path DIR holds the files the reward's loader reads, and its
    JSON files parse (None: the hub cache, checked when it loads)."""
    if path is None:
        return
    needed = {"imagereward": ["ImageReward.pt", "med_config.json"], "pickscore": ["config.json"]}[name]
    title = {"imagereward": "ImageReward", "pickscore": "PickScore"}[name]
    if not all(os.path.isfile(os.path.join(path, f)) for f in needed):
        raise UserError(f"{title} weights not found at {path} (no {' + '.join(needed)}): download them into a "
                        f"folder and pass --reward-path DIR")
    for f in needed:
        if f.endswith(".json"):
            common.read_json(os.path.join(path, f), "--reward-path file", fix="download it again")


def load_reward(name, path=None, tokenizer=None, device="cpu", dtype=torch.float32):
    """--reward NAME --reward-path DIR --reward-tokenizer DIR -> reward_fn(frames, prompts) -> scores:
    frames [B, 3, H, W] in [-1, 1] (RGB, any H, W), prompts a list of B strings, scores [B] float32,
    differentiable w.r.t. the frames only (the reward model is frozen). dtype is the reward model's
    (bf16 is fine on GPU); preprocessing and the scores stay fp32.

        --reward imagereward   ImageReward-v1.0 (THUDM/ImageReward, the `image-reward` package)
        --reward pickscore     PickScore_v1 (yuvalkirstain/PickScore_v1, a CLIP-H through transformers)

    Weights come from the Hugging Face hub cache, or from a folder with --reward-path DIR (ImageReward:
    ImageReward.pt + med_config.json; PickScore: a save_pretrained CLIPModel folder). --reward-tokenizer
    DIR gives the text side: ImageReward's BERT tokenizer (default bert-base-uncased from the hub) or
    PickScore's processor (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K), so a machine with everything
    on disk needs no hub at all."""
    loaders = {"imagereward": load_image_reward, "pickscore": load_pickscore}
    if name not in loaders:
        raise UserError(f"unknown reward {name!r}: use --reward imagereward or --reward pickscore")
    return loaders[name](path, tokenizer, device, dtype)


# Tiny random reward models for tests and --tiny CPU demos: the real classes with small configs,
# written to disk in the real on-disk format, to be read back by load_reward like real weights.
# --tiny builds a tiny random Wan and a tiny random ImageReward once, under ~/.cache/reward_forcing/.
# The random tiny VAE hardly depends on the latent frame it decodes, so the tiny demo's reward hardly
# moves; tests/test_train_reward.py gives its VAE a variance-preserving init to show the reward rising.

TINY_WORDS = "a an the of on in with and photo video cat dog car red blue green sky sea tree man woman running".split()


def make_tiny_image_reward(folder):
    """ImageReward.pt + med_config.json + BERT tokenizer files in `folder`: a ViT of width 64 and
    depth 2 at the real 224x224 input, and a 2-layer BERT that keeps width 768 because the package's
    reward head is hard-coded MLP(768). Returns (path, tokenizer) for load_reward."""
    patch_image_reward_for_transformers5()
    from transformers import BertTokenizer
    os.makedirs(folder, exist_ok=True)
    letters = list("abcdefghijklmnopqrstuvwxyz")  # + '##' pieces: any lowercase word tokenizes
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(dict.fromkeys(specials + letters + ["##" + c for c in letters] + TINY_WORDS))
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(folder).save_pretrained(folder)
    med_config = dict(architectures=["BertModel"], model_type="bert", hidden_size=768, num_hidden_layers=2,
                      num_attention_heads=12, intermediate_size=128, hidden_act="gelu", hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, initializer_range=0.02, layer_norm_eps=1e-12,
                      max_position_embeddings=64, pad_token_id=0, type_vocab_size=2,
                      vocab_size=len(vocab) + 2, encoder_width=64, add_cross_attention=True)  # +2: [DEC] [ENC]
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(med_config, f, indent=2)
    torch.manual_seed(0)
    model = build_image_reward(os.path.join(folder, "med_config.json"), folder, vit_width=64, vit_depth=2)
    # the package's head init (std 1/769, no activations) outputs ~0 with ~1e-14 pixel gradients;
    # a variance-preserving init makes the random reward depend on the image
    for layer in model.mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
    torch.save(model.state_dict(), os.path.join(folder, "ImageReward.pt"))
    return folder, folder


def make_tiny_pickscore(folder):
    """A CLIPModel (2 layers, width 64, 224 input, patch 32) + CLIPProcessor saved with save_pretrained
    in `folder`, with a letter-level BPE vocab. Returns (path, tokenizer) for load_reward."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]  # specials last, as in CLIP
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1, **small),
                        vision_config=dict(image_size=224, patch_size=32, **small), projection_dim=32)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder, folder


def tiny_reward_dir(name):
    """The tiny reward of --tiny: built once in ~/.cache/reward_forcing/tiny_<name>, atomically (ranks
    or runs started together never see a half-written folder). Returns the folder."""
    folder = os.path.join(os.path.dirname(convert.tiny_model_dir()), f"tiny_{name}")
    if not os.path.isdir(folder):
        tmp = f"{folder}.tmp{os.getpid()}"
        {"imagereward": make_tiny_image_reward, "pickscore": make_tiny_pickscore}[name](tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# -----------------------------------------------------------------------------
# the reward of the generated video


def reward_loss(rewards):
    """L_reward = -E_z[R(x_T)] (section 3.2): minus the mean reward [B] of the scored frames."""
    return -rewards.mean()


def reward_frame_indices(mode, num_latent_frames, batch, generator):
    """Which decoded frame of each video the reward scores -> [B] indices into its 1 + 4 (F - 1)
    pixel frames. 'last': the final frame (the paper: supervising more frames encourages static
    videos; the last frame, the end of the autoregressive rollout, keeps the motion). 'random'
    (section 5.2's ablation): one frame drawn uniformly from the whole video, one per video as
    for 'last'."""
    num_pixel_frames = 1 + 4 * (num_latent_frames - 1)
    if mode == "last":
        return [num_pixel_frames - 1] * batch
    return torch.randint(num_pixel_frames, (batch,), generator=generator, device=generator.device).tolist()


def latent_frame_of(pixel_frame):
    """The latent frame the Wan VAE decodes a pixel frame from: 0 -> 0, 1..4 -> 1, 5..8 -> 2, ..."""
    return 0 if pixel_frame == 0 else (pixel_frame - 1) // 4 + 1


def first_pixel_frame(latent_frame):
    """The first pixel frame the Wan VAE decodes from a latent frame: 0 -> 0, 1 -> 1, 2 -> 5, ..."""
    return 0 if latent_frame == 0 else 1 + 4 * (latent_frame - 1)


class CheckpointedCacheModule(torch.nn.Module):
    """A module of the Wan VAE decoder that reads and writes its causal feature cache (a residual block,
    a resampler, the middle block: module(x, feat_cache, feat_idx)), run under activation checkpointing.
    Inside, it is a pure function of (x, the cache slots from its first one on): they are a copy, so the
    recompute in the backward sees those slots, not the ones later frames left behind. Only the slots
    from its own on are kept for the recompute: the earlier ones hold this latent frame's new cache,
    which the backward does not need (2.7 GiB less at the peak at 480x832, counted)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, feat_cache, feat_idx, **kw):
        if not torch.is_grad_enabled():  # nothing to save: a plain call
            return self.module(x, feat_cache=feat_cache, feat_idx=feat_idx, **kw)

        def run(x, slots):
            slots, idx = list(slots), [0]
            return self.module(x, feat_cache=slots, feat_idx=idx, **kw), slots, idx[0]
        first = feat_idx[0]
        y, slots, used = checkpoint(run, x, feat_cache[first:], use_reentrant=False)
        feat_cache[first:] = slots  # the caller's cache moves on, as after the module's own call
        feat_idx[0] = first + used
        return y


class CompactGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. The Wan VAE's causal convs read their
    cache as torch.cat([cache, x]) (2 + 4 frames), whose backward hands the cache a view into the
    gradient of the whole concatenation, so that gradient (3x the cache's) would stay alive until the
    previous latent frame's backward consumes it. Passed through this just before the cat, the cache
    gets its own 2 frames, as soon as the cat's backward has run (6.3 GiB less at the peak at
    480x832, counted)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def compact_cache_gradient(conv, args, kwargs):
    """Forward pre-hook of a causal conv of the Wan VAE decoder, conv(x, cache_x): the cache through
    CompactGradient (the values are unchanged)."""
    if len(args) > 1 and torch.is_tensor(args[1]) and args[1].requires_grad:
        args = (args[0], CompactGradient.apply(args[1])) + args[2:]
    if torch.is_tensor(kwargs.get("cache_x")) and kwargs["cache_x"].requires_grad:
        kwargs = dict(kwargs, cache_x=CompactGradient.apply(kwargs["cache_x"]))
    return args, kwargs


def checkpoint_decoder(vae):
    """Wrap each module of the VAE decoder that reads the causal cache in CheckpointedCacheModule (in
    place; the same computation, so decoding is unchanged): with decode_reward_frames' checkpoint per
    latent frame, the backward then holds the activations of one residual block at a time instead of
    those of a latent frame (4 pixel frames at full size). Returns the VAE."""
    decoder = vae.decoder
    if not isinstance(decoder.mid_block, CheckpointedCacheModule):
        for conv in decoder.modules():
            if isinstance(conv, torch.nn.Conv3d):  # diffusers' WanCausalConv3d
                conv.register_forward_pre_hook(compact_cache_gradient, with_kwargs=True)
        decoder.mid_block = CheckpointedCacheModule(decoder.mid_block)
        for block in decoder.up_blocks:
            for i, resnet in enumerate(block.resnets):
                block.resnets[i] = CheckpointedCacheModule(resnet)
            if block.upsamplers is not None:
                block.upsamplers[0] = CheckpointedCacheModule(block.upsamplers[0])
    return vae


def decode_frame(vae, z, cache, first):
    """One latent frame z [B, C, 1, h, w] -> pixels [B, 3, 1 or 4, H, W], and the VAE's causal feature
    cache after it (a new list). A pure function of (z, cache), so it can be checkpointed: the cache
    it starts from is passed in, not read from the VAE. The VAE is left holding no cache, also when
    the checkpoint's recompute in the backward stops this function early (it stops once it has the
    tensors it needs): else that cache (11 GiB at 480x832) stayed alive through the generator's
    backward, until the next step's decode."""
    vae._feat_map = list(cache)
    try:
        pixels = cw.vae_decode(vae, z, first=first)  # first: a video's latent frame 0 (clears the cache)
        return pixels, list(vae._feat_map)
    finally:
        vae._feat_map = [None] * len(vae._feat_map)


def decode_reward_frames(vae, video, pixel_frames, block_size, checkpointed=False):
    """The frames the reward scores, with the exact gradient to the generator block that made them:
    video [B, C, F, h, w] (normalized latents), pixel_frames [B] indices into each decoded video
    -> pixels [B, 3, H, W] in [-1, 1].

    The Wan VAE is causal: latent frame j decodes to pixel frames 1+4(j-1) .. 4j (frame 0 to pixel
    frame 0) from a feature cache of ALL the frames before it (each of the decoder's ~30 causal
    convs reads the two frames before its input), so a pixel frame depends on latent frames 0..j.
    The generator block holding j starts at latent frame s = block_size * (j // block_size); the
    blocks before it have no graph in reward training (they reach later blocks only through the
    detached KV cache). So frames 0..s-1 are decoded without gradient, only to fill the cache, then
    s..j with gradient: the pixels equal one decode of the whole video, and so does the gradient
    w.r.t. latent frames s..j (tested against autograd through the full decode, 1e-5). With
    --dmd-weight the earlier blocks do have a graph (for DMD), but the reward still reaches only
    the scored frame's block: the reward trains the block that made the frame, as without DMD.
    Through the cache the last pixel frame depends on all three frames of the last block, and the two
    earlier ones get the larger share of the gradient (Wan2.1's VAE architecture with random weights,
    64x104: norms 9.4, 4.7 and 1.4 for the scored frame's own).

    Why the whole prefix: no shorter context is identical. Max |difference| of the last frame when the
    decode starts at latent frame c instead of 0 (Wan 2.1's VAE architecture, random weights, 32x32
    pixels, 21 latent frames):

        start c    1      2      5     10     15     19     20 (no context)
        max diff   0.019  0.035  0.10  0.50   1.09   1.54   1.05

    So exactness was chosen; the cost is a no-grad decode of the earlier frames, about one sample.py
    decode per video.

    checkpointed (training on GPU, as the generator's activation checkpointing): the backward through 3
    latent frames (12 pixel frames) of the decoder at 480x832 is large, so each latent frame's decode is
    checkpointed, and inside it each decoder module that reads the cache (checkpoint_decoder, applied
    to the VAE in place): the backward recomputes one latent frame, then one residual block at a time,
    for two extra decoder forwards of s..j. Its memory: `python bench.py --reward-decode --count`
    (counted on fake tensors; without --count, measured); numbers in BENCHMARKS.md,
    "train_reward.py: reward decode memory"."""
    if checkpointed:
        checkpoint_decoder(vae)
    frames = []
    for b, p in enumerate(pixel_frames):
        j = latent_frame_of(p)
        s = j // block_size * block_size
        z = video[b:b + 1]
        vae.clear_cache()
        if s > 0:
            with torch.no_grad():
                cw.vae_decode(vae, z[:, :, :s].detach())  # context: fills the causal cache, output unused
        cache, pixels = vae._feat_map, []
        for i in range(s, j + 1):
            if checkpointed:
                out, cache = checkpoint(decode_frame, vae, z[:, :, i:i + 1], cache, i == 0, use_reentrant=False)
            else:
                out, cache = decode_frame(vae, z[:, :, i:i + 1], cache, i == 0)
            pixels.append(out)  # [1, 3, 1 or 4, H, W]
        frames.append(torch.cat(pixels, 2)[:, :, p - first_pixel_frame(s)])  # [1, 3, H, W]
        vae.clear_cache()  # the graph holds what the backward needs
    return torch.cat(frames)  # [B, 3, H, W]


# Reward + DMD (--dmd-weight W, section 5.1): each generator update also computes distill_dmd.py's dmd_loss
# on the same rollout (teacher with CFG as real score, critic as fake score), and before it --critic-steps
# critic updates with distill_dmd.py's critic_loss on fresh detached rollouts, exactly as in distill_dmd.py
# (its functions are imported, not copied). The paper says only that the losses are "normalized so that they
# are on the same scale" (appendix B.2); joint_gradient says how, and why the gradient's size rather than the
# loss value. The running means s_k are EMAs of the global batch's mean gradient norms, updated after every
# step (generator_update) and saved in the checkpoint; at the first step each video's own norms are used. The
# log has both raw norms and the factor dmd_factor = s_reward / s_dmd.
# The normalizers follow each term's gradient size over about the last 10 steps:
LOSS_SCALE_DECAY = 0.9


def joint_gradient(video, loss_reward, loss_dmd, scales, dmd_weight):
    """Gradient w.r.t. the generated video of section 5.1's joint objective, with the normalization of
    appendix B.2 ("we normalize the losses so that they are on the same scale"):

        L = s_reward * (L_reward / s_reward + W * L_dmd / s_dmd),   s_k = running mean of ||dL_k / dvideo||

    Both losses reach the generator only through the video, so there the two terms push with equal
    norms for W = 1 (W times the reward's for --dmd-weight W), and the sum keeps the reward's own
    size: gradient clipping and Adam see the magnitudes of the reward-only method. The size of the
    gradient is normalized, not the loss value: ImageReward's scores are standardized (mean ~0), so
    |L_reward| passes through 0 and dividing by it would explode, and the DMD loss value is
    0.5 mean(step^2), so dividing by it would make its push inversely proportional to its step.

    video [B, C, F, h, w] with its graph; scales {'reward', 'dmd': running mean, or None before the
    first update: then this micro-batch's own norms} -> (dL/dvideo, norms {'reward', 'dmd'}, s_reward / s_dmd)."""
    grad_reward = torch.autograd.grad(loss_reward, video)[0]  # autograd stops at the video: cheap
    grad_dmd = torch.autograd.grad(loss_dmd, video)[0]
    norms = dict(reward=grad_reward.norm(), dmd=grad_dmd.norm())
    s_reward, s_dmd = (norms[k] if scales[k] is None else torch.tensor(scales[k], device=video.device)
                       for k in ("reward", "dmd"))
    factor = s_reward / s_dmd.clamp_min(1e-30)
    return grad_reward + dmd_weight * factor * grad_dmd, norms, factor


# -----------------------------------------------------------------------------
# training


def load_generator(args, init):
    """The generator: --model's architecture (and, with --tiny and no --init, its random weights) with
    the weights of `init`: train_ode.py's OUT/ckpt.pt (its EMA) or Self Forcing's ode_init.pt
    ({'generator', 'generator_ema'}, original Wan layout)."""
    model = cw.from_pretrained(args.model, torch.float32)
    if init:
        convert.load_generator_weights(model, init)
    return model


@torch.no_grad()
def write_sample(args, ema, vae, reward_fn, context, prompt, latent_shape, step, rank, device):
    """A video of the first prompt from the EMA generator with all 4 steps, from the same noise every time
    (every rank takes part: the weights are sharded). Rank 0 writes OUT/sample_<step>.mp4 and returns the
    reward of its last frame (sample_reward in log.jsonl, also printed); the other ranks return None."""
    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn([1] + latent_shape, generator=g, device=device)
    video = cw.rollout(ema, noise, ema.prompt_kv(context), block_size=args.block_size, generator=g)
    if rank != 0:
        return None
    pixels = cw.vae_decode(vae, video)  # [1, 3, T, H, W]
    common.save_video(os.path.join(args.out, f"sample_{step}.mp4"), pixels[0])
    return reward_fn(pixels[:, :, -1], [prompt]).item()


@dataclass
class Run:
    """What the training loop works with, built once by setup(). As in distill_dmd.py, the global batch
    is `slots` groups of micro_batch videos; this rank runs `my_slots` (slots [rank*accum, (rank+1)*accum)).
    Slot j of update u draws its noise, prompts and frames from its own generator step_generator(seed, u, j),
    and its prompts from its own share of the prompt file (lines j, j + slots, ...): one GPU with
    accumulation and N GPUs compute the same step."""
    rank: int
    device: torch.device
    joint: bool  # --dmd-weight > 0: section 5.1's reward + DMD
    accum: int  # micro-batches per rank per update: global / (GPUs x micro), an error if not whole (check_args)
    my_slots: range
    prompts: list  # the prompt file's lines, repeated until every slot has one
    shares: dict  # slot -> the prompt lines it draws from
    contexts: dict  # prompt line -> its embedding [n, text_dim] (CPU, padding cut off)
    uncond: torch.Tensor  # the negative prompt's embedding [1, 512, text_dim] (the teacher's CFG)
    generator: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    teacher: torch.nn.Module  # --dmd-weight only (else None): the real score, frozen
    critic: torch.nn.Module  # --dmd-weight only: the fake score
    critic_opt: torch.optim.Optimizer  # --dmd-weight only
    loss_scales: dict  # --dmd-weight: running means of the two terms' gradient norms {'reward', 'dmd'}
    step: int  # generator updates done (from the checkpoint with --resume)
    latent_shape: list  # [C, F, h, w] of one video
    num_blocks: int
    vae: torch.nn.Module  # frozen, fp32: decodes the scored frames and the samples
    reward_fn: object  # reward_fn(frames [B, 3, H, W], prompts) -> [B]
    checkpointed: bool  # checkpoint the reward decode (on GPU, as the generator's blocks)
    ckpt_path: str
    log_path: str
    wandb: object  # the wandb run on rank 0 with --wandb, else None


def check_args(args, world):
    """Everything about the flags and files that can be wrong, before any model loads."""
    if args.global_batch % (world * args.micro_batch):
        raise UserError(f"--global-batch {args.global_batch} is not divisible by world size {world} "
                        f"x --micro-batch {args.micro_batch}")
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise UserError(f"--frames must be 4k+1 and --height/--width multiples of 16 "
                        f"(got {args.frames}, {args.height}x{args.width})")
    cw.check_model(args.model)
    if args.dmd_weight > 0:
        cw.check_model(args.teacher, "--teacher")
    check_reward_path(args.reward, args.reward_path)


def setup(args, rank, world, device):
    """Check the flags and files (before any model loads), read the prompts and encode them, load the
    generator (and with --dmd-weight the teacher and the critic), shard them, restore them with the
    optimizers from OUT/ckpt.pt on --resume, and load the VAE and the reward model."""
    check_args(args, world)
    joint = args.dmd_weight > 0  # section 5.1's ablation: reward + DMD
    slots = args.global_batch // args.micro_batch
    accum = slots // world
    my_slots = range(rank * accum, (rank + 1) * accum)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    ckpt = common.load_resume(ckpt_path, args, SCRIPT, stage="with --dmd-weight" if joint else "without --dmd-weight")
    if ckpt is None and args.init:  # before the text encoder loads
        convert.check_checkpoint(args.init, "--init checkpoint")
    if ckpt is None and not args.init and not args.tiny:
        raise UserError("--init is required: the ODE-initialized generator (runs/ode/ckpt.pt from train_ode.py, "
                        "or Self Forcing's checkpoints/ode_init.pt)")
    wandb = None
    if rank == 0:
        wandb = common.open_log(log_path, ckpt["step"] if ckpt else 0, args.resume, config=vars(args),
                            wandb_name=f"reward-{os.path.basename(os.path.abspath(args.out))}" if args.wandb else None)

    prompts = common.read_prompts(args.prompts)
    prompts = prompts * math.ceil(slots / len(prompts))  # every slot needs at least one line
    shares = {j: list(range(j, len(prompts), slots)) for j in my_slots}
    needed = {i for share in shares.values() for i in share} | {0}  # + prompt 0 for the sample videos
    bf16 = device.type == "cuda"  # bf16 compute with fp32 master weights on GPU; fp32 on CPU
    contexts, uncond = cw.text_contexts(args.model, {i: prompts[i] for i in needed}, device,
                                        torch.bfloat16 if bf16 else torch.float32, args.negative_prompt,
                                        progress=rank == 0)

    nets = load_networks(args, ckpt, joint, bf16)
    del ckpt
    latent_shape = [nets["generator"].cfg.in_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8]
    # both frozen and in fp32, so the reward judges the pixels sample.py writes (fp32 VAE, as diffusers)
    # and scores as the reward package computes them; every rank decodes and scores its own videos
    vae = cw.load_vae(args.model, torch.float32, device)
    reward_fn = load_reward(args.reward, args.reward_path, args.reward_tokenizer, device, torch.float32)
    return Run(rank=rank, device=device, joint=joint, accum=accum, my_slots=my_slots, prompts=prompts, shares=shares,
               contexts=contexts, uncond=uncond, **nets, latent_shape=latent_shape,
               num_blocks=math.ceil(latent_shape[1] / args.block_size), vae=vae, reward_fn=reward_fn, checkpointed=bf16,
               ckpt_path=ckpt_path, log_path=log_path, wandb=wandb)


def load_networks(args, ckpt, joint, bf16):
    """The generator, its EMA and optimizer (+ with --dmd-weight the frozen teacher, the critic and its
    optimizer), sharded, and restored from ckpt (None: a new run from --init). Returns the Run fields."""
    generator = load_generator(args, None if ckpt is not None else args.init)
    ema = copy.deepcopy(generator).requires_grad_(False)
    generator.gradient_checkpointing = bf16  # per block, on GPU
    teacher = critic = critic_opt = None
    nets = [generator, ema]
    if joint:  # the real score (frozen teacher) and the fake score (critic, from the base model), as in distill_dmd.py
        teacher = cw.from_pretrained(args.teacher, torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)
        critic = cw.from_pretrained(args.model, torch.float32)
        if (teacher.cfg.in_channels, teacher.cfg.text_dim) != (critic.cfg.in_channels, critic.cfg.text_dim):
            raise UserError(f"the teacher '{args.teacher}' does not share latent channels and text encoder "
                            f"with --model '{args.model}'")
        critic.gradient_checkpointing = bf16
        nets += [teacher, critic]
    for net in nets:  # one code path for 1 and N GPUs
        common.shard_model(net, bf16, cw.keeps_fp32)
    # betas (0.0, 0.999): no momentum (appendix B.2, as DMD2 and Self Forcing): the rollout the
    # gradient comes from changes with the weights every step
    opt = torch.optim.AdamW(generator.parameters(), lr=args.lr, betas=(0.0, 0.999), weight_decay=0.01, eps=1e-8)
    if joint:
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.0, 0.999), weight_decay=0.01,
                                       eps=1e-8)
    step, loss_scales = 0, {"reward": None, "dmd": None}
    if ckpt is not None:
        common.load_full_state_dict(generator, ckpt["model"])
        common.load_full_state_dict(ema, ckpt["ema"])
        common.load_full_state_dict(generator, ckpt["optimizer"], opt)
        if joint:
            common.load_full_state_dict(critic, ckpt["critic"])
            common.load_full_state_dict(critic, ckpt["critic_optimizer"], critic_opt)
            loss_scales = dict(ckpt["loss_scales"])
        step = ckpt["step"]
    return dict(generator=generator, ema=ema, opt=opt, teacher=teacher, critic=critic, critic_opt=critic_opt,
                loss_scales=loss_scales, step=step)


def exit_step(args, update):
    """The denoising step where every block of this update's rollouts stops, drawn at random per update:
    the same for all blocks, videos and ranks (Self Forcing's same_step_across_blocks), so all ranks run
    the same number of sharded forwards."""
    g = common.step_generator(args.seed, update, -1, "cpu")  # slot -1: a stream no slot uses
    return int(torch.randint(len(cw.DENOISING_TIMESTEPS), (1,), generator=g))


def graph_blocks(scored, cache_grad):
    """The blocks a loss on the frames of the `scored` blocks reaches, which are all that need a graph: with
    cache_grad "straight-through" every block up to the last scored one (the cache passes a block's gradient
    on to the blocks it attended to), with "detach" the scored ones only."""
    return range(max(scored) + 1) if cache_grad == "straight-through" else set(scored)


def rollout(args, run, update, slot, grad):
    """This slot's videos [B, C, F, h, w] by self-rollout, as at inference, with their prompts, text embeddings,
    scored frames and the generator for the rest of the slot's draws (the rollout's re-noising, DMD's timesteps).
    The gradient flows through each block's exit step only; the earlier steps and the cache passes run without it.
    Only the blocks the loss reaches get a graph (grad_blocks; same gradient, tested): with --cache-grad
    straight-through every block up to the last scored one (the cache passes each block's gradient on to the
    blocks it attended to; for the last frame: all of them), with --cache-grad detach only the scored frames'
    blocks (for the last frame: the last block, ~15 GB less at 81 frames); with --dmd-weight all of them."""
    g = common.step_generator(args.seed, update, slot, run.device)
    share = run.shares[slot]
    ids = [share[k] for k in torch.randint(len(share), (args.micro_batch,), generator=g, device=run.device).tolist()]
    noise = torch.randn([args.micro_batch] + run.latent_shape, generator=g, device=run.device)
    pixel_frames = reward_frame_indices(args.reward_frames, run.latent_shape[1], args.micro_batch, g)
    context = cw.padded(run.contexts, ids, run.device)
    scored = {latent_frame_of(p) // args.block_size for p in pixel_frames}
    reached = range(run.num_blocks) if run.joint else graph_blocks(scored, args.cache_grad)
    with torch.set_grad_enabled(grad):
        video = cw.rollout(run.generator, noise, run.generator.prompt_kv(context), block_size=args.block_size,
                           exit_steps=[exit_step(args, update)] * run.num_blocks, generator=g,
                           grad_blocks=reached, cache_grad=args.cache_grad)  # [B, C, F, h, w]
    return video, [run.prompts[i] for i in ids], context, pixel_frames, g


def critic_update(args, run, update, step):
    """--dmd-weight: one update of the critic on fresh detached rollouts, as in distill_dmd.py.
    Returns its logs {'critic_loss', 'critic_grad_norm'}."""
    loss_sum = torch.zeros((), device=run.device)
    for slot in run.my_slots:
        video, _, context, _, g = rollout(args, run, update, slot, grad=False)
        loss, _ = dmd.critic_loss(video, run.critic, context, g)
        (loss / run.accum).backward()
        loss_sum += loss.detach() / run.accum
    logs = dict(critic_loss=common.all_mean(loss_sum), critic_grad_norm=common.grad_norm(run.critic, args.grad_clip))
    common.stop_if_diverged(step, run.ckpt_path, logs)
    run.critic_opt.step()
    run.critic_opt.zero_grad(set_to_none=True)
    return logs


def generator_update(args, run, update, step):
    """One update of the generator on the reward of the frames of its own rollout (+ the normalized DMD
    term with --dmd-weight), then the EMA (and the running means of --dmd-weight). Returns its logs."""
    sums = {}
    for slot in run.my_slots:
        video, texts, context, pixel_frames, g = rollout(args, run, update, slot, grad=True)
        frames = decode_reward_frames(run.vae, video, pixel_frames, args.block_size, checkpointed=run.checkpointed)
        rewards = run.reward_fn(frames, texts)  # [B]
        loss = reward_loss(rewards)
        stats = dict(loss=loss, reward=rewards.mean())
        if run.joint:
            loss_dmd, _ = dmd.dmd_loss(video, run.teacher, run.critic, context, run.uncond, args.guidance, g)
            grad, norms, factor = joint_gradient(video, loss, loss_dmd, run.loss_scales, args.dmd_weight)
            video.backward(grad / run.accum)
            stats.update(dmd_loss=loss_dmd.float(), reward_grad_norm=norms["reward"], dmd_grad_norm=norms["dmd"],
                         dmd_factor=factor)
        else:
            (loss / run.accum).backward()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + v.detach() / run.accum
        del video  # before the next rollout
    logs = {k: common.all_mean(v) for k, v in sums.items()}
    logs.update(grad_norm=common.grad_norm(run.generator, args.grad_clip), exit_step=exit_step(args, update))
    common.stop_if_diverged(step, run.ckpt_path, logs)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    # --ema-start N: through update N the EMA is a copy of the live weights, then it averages
    common.ema_update(run.ema, run.generator, args.ema_decay if step > args.ema_start else 0.0)
    common.stop_if_diverged(step, run.ckpt_path, nets=dict(generator=run.generator, EMA=run.ema,
                                                            **(dict(critic=run.critic) if run.joint else {})))
    if run.joint:  # the running means take this step's gradient norms (mean over the global batch)
        for k, used in run.loss_scales.items():
            norm = logs[f"{k}_grad_norm"]
            run.loss_scales[k] = norm if used is None else LOSS_SCALE_DECAY * used + (1 - LOSS_SCALE_DECAY) * norm
    return logs


def save(args, run, step):
    """OUT/ckpt.pt, gathered by every rank, written by rank 0 atomically and only if every tensor is finite: a plain
    dict (torch.load(weights_only=True)) of 'model', 'ema', 'optimizer' (the generator's), 'step', 'args',
    'script', 'stage'; with --dmd-weight also 'critic', 'critic_optimizer', 'loss_scales' (the running means).
    `sample.py --checkpoint OUT/ckpt.pt` renders its EMA. --resume continues exactly (weights, EMA, optimizers,
    normalizers, step; the noise follows from the step number)."""
    ckpt = dict(model=common.full_state_dict(run.generator), ema=common.full_state_dict(run.ema),
                optimizer=common.full_state_dict(run.generator, run.opt), step=step, args=vars(args),
                script=SCRIPT, stage="with --dmd-weight" if run.joint else "without --dmd-weight")
    if run.joint:
        ckpt.update(critic=common.full_state_dict(run.critic),
                    critic_optimizer=common.full_state_dict(run.critic, run.critic_opt),
                    loss_scales=dict(run.loss_scales))
    if run.rank == 0:
        common.save_checkpoint(run.ckpt_path, ckpt)


def train(args, rank, world, device):
    """The loop: setup, then per step the critic updates (--dmd-weight), the generator update, the sample, the
    log and the checkpoint. OUT/log.jsonl gets one JSON line per logged step: loss, reward, grad_norm, exit_step,
    step_time, gpu_mem_gb, sample_reward when a sample was written; with --dmd-weight also dmd_loss, critic_loss,
    critic_grad_norm, reward_grad_norm, dmd_grad_norm, dmd_factor. The tqdm bar on rank 0 shows reward, loss,
    grad norm, step time and GPU memory. A NaN/inf loss, reward or gradient stops the run with
    `error: training diverged at step N (...)` before the optimizer step and without saving."""
    run = setup(args, rank, world, device)
    step = run.step
    critic_steps = args.critic_steps if run.joint else 0
    bar = tqdm(initial=step, total=args.max_steps, desc="reward", disable=rank != 0)
    # Ctrl-C / SIGTERM: one line, the steps done (step, read when it comes) and the checkpoint that stays
    with common.interruptible(lambda: f"after step {step} of {args.max_steps}: "
                                      f"{common.kept_checkpoint(run.ckpt_path, resume=True)}"):
        while step < args.max_steps:
            t0 = time.time()
            updates = step * (critic_steps + 1)  # this step's update numbers: critic ..., generator
            record = dict(step=step + 1)
            # --dmd-weight: the critic learns the score of the generator's current videos, as in distill_dmd.py
            critic_logs = [critic_update(args, run, updates + c, step + 1) for c in range(critic_steps)]
            if critic_logs:
                record.update({k: sum(log[k] for log in critic_logs) / len(critic_logs) for k in critic_logs[0]})
            # generator: the reward of the frames of its own rollout (+ the normalized DMD term with --dmd-weight)
            record.update(generator_update(args, run, updates + critic_steps, step + 1))
            step += 1

            if args.sample_every and step % args.sample_every == 0:
                record["sample_reward"] = write_sample(args, run.ema, run.vae, run.reward_fn,
                                                       cw.padded(run.contexts, [0], device), run.prompts[0],
                                                       run.latent_shape, step, rank, device)
            record["step_time"] = time.time() - t0
            if device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            bar.update()
            bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.3f}",
                            gnorm=f"{record['grad_norm']:.3f}", s=f"{record['step_time']:.2f}",
                            **({"mem": f"{record['gpu_mem_gb']:.1f}G"} if "gpu_mem_gb" in record else {}))
            if rank == 0 and record.get("sample_reward") is not None:
                bar.write(f"step {step}: {args.out}/sample_{step}.mp4, "
                          f"reward of its last frame {record['sample_reward']:.4f}")
            if rank == 0 and (step % args.log_every == 0 or step == args.max_steps):
                common.log_step(run.log_path, record, run.wandb)
            if step % args.save_every == 0 or step == args.max_steps:
                save(args, run, step)
        bar.close()
        if rank == 0:
            common.print_done(run.ckpt_path, step, reward=record["reward"], loss=record["loss"])


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Wan and reward, small sizes (CPU demo, tests)")
    p.add_argument("--model", help=f"base diffusers-format Wan (folder or hub id): config, text encoder, VAE, "
                                   f"critic init (default {cw.DEFAULT_MODEL}; with --tiny the cached tiny Wan)")
    p.add_argument("--init", help="the generator to start from: train_ode.py's OUT/ckpt.pt (its EMA) or Self Forcing's "
                                  "ode_init.pt (required, except with --tiny: the tiny Wan's random weights)")
    p.add_argument("--prompts", help="text file, one prompt per line (default prompts/dmd_example.txt)")
    p.add_argument("--height", type=common.positive_int)
    p.add_argument("--width", type=common.positive_int)
    p.add_argument("--frames", type=common.positive_int, help="pixel frames, 4k+1 (81)")
    p.add_argument("--block-size", type=common.positive_int, help="latent frames per causal block (3; 1: frame-wise)")
    p.add_argument("--reward", choices=["imagereward", "pickscore"],
                   help="the differentiable image reward (imagereward)")
    p.add_argument("--reward-path",
                   help="folder with the reward's weights (default: the hub cache; with --tiny a tiny random one)")
    p.add_argument("--reward-tokenizer", help="folder with ImageReward's BERT tokenizer or PickScore's CLIP processor")
    p.add_argument("--reward-frames", choices=["last", "random"],
                   help="last: the final frame (the paper); random: one random frame of the whole video (section 5.2)")
    p.add_argument("--cache-grad", choices=cw.CACHE_GRAD,
                   help="straight-through: the last frame's gradient reaches the earlier blocks through the KV cache, "
                        "as in Self Forcing's training code (default); detach: it reaches the last block only")
    p.add_argument("--dmd-weight", type=common.nonnegative_float,
                   help="0: reward only (the paper's method); W > 0: + W x the normalized DMD "
                        "loss of distill_dmd.py (section 5.1, Table 2)")
    p.add_argument("--teacher", help="with --dmd-weight: the real score's diffusers-format Wan (default: --model, "
                                     "the base Wan as in the paper; Wan-AI/Wan2.1-T2V-14B-Diffusers for section 5.3)")
    p.add_argument("--guidance", type=common.nonnegative_float,
                   help="with --dmd-weight: teacher CFG, uncond + g (cond - uncond) (4.0)")
    p.add_argument("--critic-steps", type=common.positive_int,
                   help="with --dmd-weight: critic updates per generator update (5)")
    p.add_argument("--critic-lr", type=common.learning_rate, help="with --dmd-weight: critic learning rate (4e-7)")
    p.add_argument("--negative-prompt",
                   help="with --dmd-weight: unconditional branch of the teacher's CFG (default: Wan's own)")
    p.add_argument("--out", required=True, help="folder for ckpt.pt, log.jsonl, sample_<step>.mp4")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/ckpt.pt")
    p.add_argument("--max-steps", type=common.positive_int, help="generator updates (500)")
    p.add_argument("--global-batch", type=common.positive_int, help="videos per update, all ranks (8)")
    p.add_argument("--micro-batch", type=common.positive_int, help="videos per rank per forward (1)")
    p.add_argument("--lr", type=common.learning_rate, help="generator learning rate (2e-6)")
    p.add_argument("--ema-decay", type=common.decay, help="EMA of the generator (0.99)")
    p.add_argument("--ema-start", type=common.nonnegative_int,
                   help="generator updates before the EMA starts averaging: until then it is a "
                        "copy of the live weights (0: the init is already trained)")
    p.add_argument("--grad-clip", type=common.positive_float, help="gradient norm clipping (10)")
    p.add_argument("--save-every", type=common.positive_int)
    p.add_argument("--log-every", type=common.positive_int)
    p.add_argument("--sample-every", type=common.nonnegative_int,
                   help="write OUT/sample_<step>.mp4 from the EMA generator and log its "
                        "last frame's reward (0: never)")
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--wandb", action="store_true")
    args = p.parse_args(argv)
    preset = Config.tiny() if args.tiny else Config()
    for name, value in asdict(preset).items():
        if getattr(args, name) is None:  # flags left unset take the preset
            setattr(args, name, value)
    if args.model is None:
        args.model = convert.make_tiny_wan(convert.tiny_model_dir()) if args.tiny else cw.DEFAULT_MODEL
    args.teacher = args.teacher or args.model  # the real score of --dmd-weight, as in distill_dmd.py
    if args.tiny and args.reward_path is None:
        args.reward_path = args.reward_tokenizer = tiny_reward_dir(args.reward)
    return args


def main(args):
    rank, world, device = common.init_distributed()
    try:
        with common.own_folder(args.out, dmd.STALE):  # one run per --out
            train(args, rank, world, device)
            dist.barrier()  # no rank tears the group down while rank 0 still writes the checkpoint
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_script(main, parse_args)
