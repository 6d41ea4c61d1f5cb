"""
Stage 3 of Reward Forcing: fine-tune the few-step causal generator with a differentiable reward
of the last generated frame.

This file reads top to bottom: first the reward models (this section), then the training loop.

A reward is a function reward_fn(frames, prompts) -> scores: frames [B, 3, H, W] in [-1, 1] (RGB,
any H, W), prompts a list of B strings, scores [B] float32, differentiable w.r.t. the frames only
(the reward model is frozen). Two are available, picked with --reward:

    --reward imagereward   ImageReward-v1.0 (THUDM/ImageReward, the `image-reward` package)
    --reward pickscore     PickScore_v1 (yuvalkirstain/PickScore_v1, a CLIP-H through transformers)

Weights come from the Hugging Face hub cache, or from a folder with --reward-path DIR
(ImageReward: ImageReward.pt + med_config.json; PickScore: a save_pretrained CLIPModel folder).
--reward-tokenizer DIR gives the text side: ImageReward's BERT tokenizer (default
bert-base-uncased from the hub) or PickScore's processor (default
laion/CLIP-ViT-H-14-laion2B-s32B-b79K), so a machine with everything on disk needs no hub at all.
"""
import importlib.util
import json
import math
import os
import sys
import types
import warnings

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# rewards


def patch_image_reward_for_transformers5():
    """image-reward 1.5 (2023) imports only beside OpenAI's `clip` and builds only with transformers
    4.x: fill in those six missing things, each only where it is missing. Call before using the package."""
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
            raise SystemExit(f"BERT tokenizer {tokenizer!r} not found locally and the hub is unreachable: {fix}") from e

    def create_vit(vit, image_size, *args):  # BLIP's ViTs all use 64-wide attention heads
        return blip.VisionTransformer(img_size=image_size, patch_size=16, embed_dim=vit_width,
                                      depth=vit_depth, num_heads=vit_width // 64), vit_width

    saved = blip.BertTokenizer, blip_pretrain.create_vit
    blip.BertTokenizer, blip_pretrain.create_vit = types.SimpleNamespace(from_pretrained=load_bert_tokenizer), create_vit
    try:
        model = RM.ImageReward(med_config=med_config, device=device)
    finally:
        blip.BertTokenizer, blip_pretrain.create_vit = saved
    vocab_size = model.blip.text_encoder.config.vocab_size
    if len(model.blip.tokenizer) != vocab_size:  # transformers 5 quietly builds a 5-token tokenizer from an empty folder
        raise SystemExit(f"BERT tokenizer {tokenizer!r} has {len(model.blip.tokenizer)} tokens with BLIP's [DEC] [ENC], "
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
            raise SystemExit(f"ImageReward weights not in the hub cache and the hub is unreachable: {fix}") from e
    else:
        ckpt, med_config = os.path.join(path, "ImageReward.pt"), os.path.join(path, "med_config.json")
        if not (os.path.isfile(ckpt) and os.path.isfile(med_config)):
            raise SystemExit(f"ImageReward weights not found at {path} (no ImageReward.pt + med_config.json): {fix}")
    state_dict = torch.load(ckpt, map_location="cpu", weights_only=True)
    if "blip.visual_encoder.pos_embed" not in state_dict:
        raise SystemExit(f"{ckpt} is not an ImageReward checkpoint (no blip.visual_encoder): {fix}")
    vit_width = state_dict["blip.visual_encoder.pos_embed"].shape[-1]  # 1024 for the real ViT-L
    vit_depth = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("blip.visual_encoder.blocks."))
    model = build_image_reward(med_config, tokenizer or "bert-base-uncased", vit_width, vit_depth, device)
    missing = model.load_state_dict(state_dict, strict=False).missing_keys  # strict=False as ImageReward.load
    used = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")  # what score_gard() runs; position_ids is a fixed buffer
    missing = [k for k in missing if k.startswith(used) and not k.endswith("position_ids")]
    if missing:
        raise SystemExit(f"{ckpt} is not an ImageReward checkpoint (missing {missing[:3]}...): {fix}")
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
        raise SystemExit(f"PickScore weights {path!r} not found locally and not downloadable from the hub: "
                         "download the yuvalkirstain/PickScore_v1 repo into a folder and pass --reward-path DIR") from e
    try:
        processor = AutoProcessor.from_pretrained(processor_path)
    except OSError as e:
        raise SystemExit(f"CLIP processor {processor_path!r} not found locally and not downloadable from the hub: "
                         "save laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor to a folder "
                         "and pass --reward-tokenizer DIR") from e
    if len(processor.tokenizer) != model.config.text_config.vocab_size:
        raise SystemExit(f"CLIP processor {processor_path!r} has {len(processor.tokenizer)} tokens, PickScore's text "
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


def load_reward(name, path=None, tokenizer=None, device="cpu", dtype=torch.float32):
    """--reward NAME --reward-path DIR --reward-tokenizer DIR -> reward_fn(frames, prompts) -> [B].
    dtype is the reward model's (bf16 is fine on GPU); preprocessing and the scores stay fp32."""
    loaders = {"imagereward": load_image_reward, "pickscore": load_pickscore}
    if name not in loaders:
        raise SystemExit(f"unknown reward {name!r}: use --reward imagereward or --reward pickscore")
    return loaders[name](path, tokenizer, device, dtype)


# Tiny random reward models for tests and --tiny CPU demos: the real classes with small configs,
# written to disk in the real on-disk format, to be read back by load_reward like real weights.

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
