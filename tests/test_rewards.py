"""Reward models of train_reward.py on tiny random weights (CPU, seconds): parity with each model's
own PIL pipeline, pixel gradients, frozen weights, and the error messages for missing weights."""
import os
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_reward as tr  # noqa: E402

PROMPTS = ["a red cat on the sky", "a dog running in the sea"]


@pytest.fixture(scope="module")
def tiny_image_reward(tmp_path_factory):
    return tr.make_tiny_image_reward(str(tmp_path_factory.mktemp("imagereward")))


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    return tr.make_tiny_pickscore(str(tmp_path_factory.mktemp("pickscore")))


def frames_uint8(H, W, seed):
    """Smooth random images plus mild noise, as uint8 (so PIL sees exactly our pixels): [2, 3, H, W]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 10, generator=g), size=(H, W), mode="bilinear")
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def to_pil(u8):
    return Image.fromarray(u8.permute(1, 2, 0).numpy())


def to_frames(u8):
    return u8.float() / 127.5 - 1  # [-1, 1], as the generator's decoded frames


def ascend(reward_fn, frames, steps=5, lr=0.02):
    """Gradient ascent on the pixels; returns the rewards before and after."""
    x = frames.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    before = reward_fn(x, PROMPTS).detach()
    for _ in range(steps):
        opt.zero_grad()
        (-reward_fn(x, PROMPTS).sum()).backward()
        opt.step()
    return before, reward_fn(x, PROMPTS).detach()


# Measured on these tiny models, over 60x104, 480x832, 97x131, 300x200 and 224x224 frames:
# - preprocessed pixels differ from PIL's by at most 0.016 (about one uint8 step, 1/255/std: PIL
#   rounds to uint8 after each resize pass) and 0.005 on average; a wrong resize (no antialias,
#   bilinear) gives 0.14+ max and 0.02+ mean. This is the sharp check of the preprocessing.
# - ImageReward rewards differ from the package's score() by at most 1.1e-4 (4e-7 at 224x224);
#   PickScore rewards from its reference code by at most 3.2e-3: the random tiny CLIP is jumpy, moving
#   by ~5e-3 under one-uint8-step pixel noise (ImageReward: ~8e-5).
PIXEL_MAX_TOL, PIXEL_MEAN_TOL = 0.025, 0.008
REWARD_TOL = {"imagereward": 5e-4, "pickscore": 6e-3}


@pytest.mark.parametrize("H, W", [(60, 104), (480, 832)])
def test_image_reward_matches_package_score(tiny_image_reward, H, W):
    import ImageReward
    reward_fn = tr.load_reward("imagereward", *tiny_image_reward)
    model = reward_fn.model
    assert type(model) is ImageReward.ImageReward and len(model.blip.visual_encoder.blocks) == 2
    u8 = frames_uint8(H, W, seed=H)
    ours = reward_fn(to_frames(u8), PROMPTS)
    assert ours.shape == (2,) and ours.dtype == torch.float32
    theirs = torch.tensor([model.score(p, to_pil(img)) for p, img in zip(PROMPTS, u8)])  # the package's PIL path
    assert (ours - theirs).abs().max() < REWARD_TOL["imagereward"], (ours, theirs)
    assert (ours[0] - ours[1]).abs() > 10 * REWARD_TOL["imagereward"]  # small next to real differences
    resize, crop, _, _, normalize = model.preprocess.transforms
    pixels = tr.preprocess(to_frames(u8), resize.size, crop.size[0], normalize.mean, normalize.std)
    diff = (pixels - torch.stack([model.preprocess(to_pil(img)) for img in u8])).abs()
    assert diff.max() < PIXEL_MAX_TOL and diff.mean() < PIXEL_MEAN_TOL


def pickscore_reference(folder, u8, prompt):
    """PickScore's reference code (its README), with transformers' CLIPProcessor on a PIL image."""
    from transformers import AutoProcessor, CLIPModel
    processor, model = AutoProcessor.from_pretrained(folder), CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        image_inputs = processor(images=[to_pil(u8)], padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs).pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs).pooler_output
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).item()


@pytest.mark.parametrize("H, W", [(60, 104), (480, 832)])
def test_pickscore_matches_reference(tiny_pickscore, H, W):
    from transformers import AutoProcessor
    reward_fn = tr.load_reward("pickscore", *tiny_pickscore)
    u8 = frames_uint8(H, W, seed=H)
    ours = reward_fn(to_frames(u8), PROMPTS)
    assert ours.shape == (2,) and ours.dtype == torch.float32
    theirs = torch.tensor([pickscore_reference(tiny_pickscore[0], img, p) for p, img in zip(PROMPTS, u8)])
    assert (ours - theirs).abs().max() < REWARD_TOL["pickscore"], (ours, theirs)
    assert (ours[0] - ours[1]).abs() > 10 * REWARD_TOL["pickscore"]
    ip = AutoProcessor.from_pretrained(tiny_pickscore[1]).image_processor
    pixels = tr.preprocess(to_frames(u8), ip.size["shortest_edge"], ip.crop_size["height"], ip.image_mean, ip.image_std)
    diff = (pixels - ip(images=[to_pil(img) for img in u8], return_tensors="pt").pixel_values).abs()
    assert diff.max() < PIXEL_MAX_TOL and diff.mean() < PIXEL_MEAN_TOL


@pytest.mark.parametrize("name", ["imagereward", "pickscore"])
def test_pixel_gradients_raise_reward_and_model_stays_frozen(tiny_image_reward, tiny_pickscore, name):
    reward_fn = tr.load_reward(name, *{"imagereward": tiny_image_reward, "pickscore": tiny_pickscore}[name])
    frames = to_frames(frames_uint8(60, 104, seed=1)) * 0.6  # away from the [-1, 1] clamp
    x = frames.clone().requires_grad_(True)
    reward_fn(x, PROMPTS).sum().backward()
    grad = x.grad.flatten(1)  # [B, 3*H*W]
    assert torch.isfinite(grad).all() and (grad.abs().sum(1) > 1e-2).all()  # measured: 1.7 (IR), 47 (PS)
    model = reward_fn.model
    assert not model.training and all(not p.requires_grad and p.grad is None for p in model.parameters())
    before, after = ascend(reward_fn, frames)
    assert (after > before + 10 * REWARD_TOL[name]).all(), (before, after)  # measured: +0.15 (IR), +4.4 (PS)


# bf16 reward models (load_reward(..., dtype=torch.bfloat16)) on 8 images (frames_uint8 seeds 0-3,
# 60x104), measured against fp32 on 4 such sets of 8: ImageReward moves by at most 0.016 (mean
# 0.005-0.008) while its rewards spread across the 8 images with std 0.023-0.035 (max - min
# 0.057-0.097); PickScore moves by at most 0.050 (mean 0.009-0.023), spread std 0.37-0.50 (max - min
# 0.84-1.34). The tolerance sits below the spread: a bf16 error that reorders images fails.
BF16_TOL = {"imagereward": 0.02, "pickscore": 0.08}


@pytest.mark.parametrize("name", ["imagereward", "pickscore"])
def test_bf16_reward_is_bf16_and_close_to_fp32(tiny_image_reward, tiny_pickscore, name):
    """Asked for bf16, the reward model's weights are bf16 and its scores (fp32) differ from the fp32
    model's, by less than the rewards' spread across images. Planted: load_reward ignoring dtype
    (the bf16 path silently fp32) -> weights fp32 and a difference of exactly 0."""
    paths = {"imagereward": tiny_image_reward, "pickscore": tiny_pickscore}[name]
    frames = torch.cat([to_frames(frames_uint8(60, 104, seed=seed)) for seed in range(4)])  # [8, 3, 60, 104]
    prompts = PROMPTS * 4
    fp32 = tr.load_reward(name, *paths)(frames, prompts)
    bf16_fn = tr.load_reward(name, *paths, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16_fn.model.parameters()} == {torch.bfloat16}
    bf16 = bf16_fn(frames, prompts)
    diff = (bf16 - fp32).abs()
    assert bf16.dtype == torch.float32 and diff.mean() > 1e-4, diff  # bf16 really ran
    assert diff.max() < BF16_TOL[name], diff
    assert fp32.max() - fp32.min() > 2 * BF16_TOL[name], fp32  # the tolerance is small next to the spread


def test_missing_weights_say_what_to_do(tmp_path, tiny_image_reward, monkeypatch):
    with pytest.raises(tr.UserError, match=r"ImageReward weights not found at .*nope.*pass --reward-path DIR"):
        tr.load_reward("imagereward", str(tmp_path / "nope"))
    with pytest.raises(tr.UserError, match=r"PickScore weights .*nope.* not found .*pass --reward-path DIR"):
        tr.load_reward("pickscore", str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")  # transformers 5 loads a 5-token BertTokenizer from it without complaint
    with pytest.raises(tr.UserError, match=r"BERT tokenizer .*empty.* has \d+ tokens.*--reward-tokenizer DIR"):
        tr.load_reward("imagereward", tiny_image_reward[0], str(tmp_path / "empty"))
    with pytest.raises(tr.UserError, match="unknown reward 'hpsv2'"):
        tr.load_reward("hpsv2")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # an empty cache and no hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(tr.UserError, match="ImageReward weights not in the hub cache and the hub is unreachable"):
        tr.load_reward("imagereward")
    with pytest.raises(tr.UserError, match="PickScore weights 'yuvalkirstain/PickScore_v1' not found"):
        tr.load_reward("pickscore")
