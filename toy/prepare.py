"""
Build the toy world's models (toy/world.py), as nanoGPT's data/<name>/prepare.py builds a dataset: one command,
resumable, everything seeded. It writes, in the real on-disk formats, what the stage scripts load:

    python toy/prepare.py                   # ~17 min on 2 free CPU cores; writes toy/out/ (see below)
    python toy/prepare.py --quick           # ~2 min, shorter trainings: the CI check "trained beats random"
    python toy/prepare.py --out DIR --seed 1

Run again after an interruption: finished parts are kept and the VAE and teacher continue from their last
checkpoint (work/*_ckpt.pt, every 100 steps).

    toy/out/wan/           the world's "Wan2.1": a diffusers-format folder (model_index.json, transformer/, vae/,
                           text_encoder/, tokenizer/, scheduler/), for --model / --teacher of every stage script
    toy/out/reward/        the world's "PickScore": a CLIPModel + CLIPProcessor, for train_reward.py
                           --reward pickscore --reward-path toy/out/reward --reward-tokenizer toy/out/reward
    toy/out/prompts/       train.txt (324 prompts), heldout.txt (108), all.txt (432), heldout_core.txt (12)
    toy/out/samples/       the teacher's videos of held-out prompts (mp4), to watch
    toy/out/report.json    every number below, with the minutes each part took
    toy/out/work/          intermediate state (checkpoints, latents); deletable once the run is done

The parts, in order:
1. text: a frozen random UMT5 encoder (d_model 32, 2 layers) behind a character-level T5 tokenizer, as
   causal_wan.make_tiny_wan builds; random weights carry a prompt's characters to the teacher, which learns to
   read them (the reference probe found this enough for unseen combinations).
2. vae: a diffusers AutoencoderKLWan (z_dim 16, 8x spatial, 4x temporal, as Wan's) trained as an autoencoder
   on the posterior mean with foreground pixels weighted 10x: first on single frames (cheap steps: the first
   frame is the image path of the causal VAE), then on 9-frame clips (the temporal path). Its config's
   latents_mean / latents_std are measured on the encoded data, as Wan's are.
3. latents: training-split clips encoded once and normalized, the teacher's data.
4. teacher: a bidirectional WanTransformer3DModel (trained as causal_wan.CausalWan, the same parameter names)
   with flow matching in the scripts' parameterization: x_t = (1 - s) x0 + s noise, s = t / 1000, the network
   predicts v = noise - x0; s logit-normal; 10% of prompts dropped to an unconditional text (half "", half
   Wan's negative prompt, the stage scripts' default, so classifier-free guidance works with either); an EMA.
5. reward: a tiny CLIP trained contrastively on (last frame, prompt) pairs, with a word-level tokenizer.
6. eval: VAE PSNR and the detector (toy/metrics.py) on reconstructions of held-out clips; the teacher's
   held-out prompt alignment with an Euler sampler and CFG at 4 and 25 steps (and a random teacher's); the
   reward's retrieval accuracy on held-out frames and how smoothly its score follows a frame towards the prompt.

Then the stage scripts run on it (toy/run.py does, with their sizes: --height 32 --width 32 --frames 9), e.g.
    python distill_dmd.py --model toy/out/wan --generator bidirectional --prompts toy/out/prompts/train.txt ...
"""
import os

# Under contention (2 cores shared with other jobs) OpenMP's default spinning wait made each step up to 10x
# slower in CPU time (measured here); passive waiting changes no result, only how idle threads wait.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import string  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import causal_wan as cw  # noqa: E402
import common  # noqa: E402
from common import UserError  # noqa: E402
from toy import metrics as M  # noqa: E402
from toy import world as W  # noqa: E402


@dataclass
class Config:
    world: W.World = field(default_factory=W.World)
    # text encoder (frozen, random)
    text_dim: int = 32
    # VAE: Wan's architecture at small widths; 8x spatial needs 4 levels (dim_mult of length 4)
    vae_base_dim: int = 16
    vae_dim_mult: tuple = (1, 1, 1, 1)
    vae_steps: int = 1500  # on single frames (see inflate_to_video)
    vae_batch: int = 16
    vae_video_steps: int = 0  # then on whole clips
    vae_video_batch: int = 2
    vae_video_lr: float = 5e-5
    vae_lr: float = 5e-4  # 3e-4..5e-4 broke through in the reference probe; 1.5e-3 stalled at mean grey here
    fg_weight: float = 10.0
    # the teacher's data
    num_clips: int = 4000
    # teacher (Wan's layout at a toy size; patch (1, 1, 1), not Wan's (1, 2, 2): 4x4 latents -> 16 tokens a
    # frame, 48 a video). The stage scripts pad every prompt to 512 text tokens, which costs 2.6x a step at this
    # size (70 against 27 ms at batch 32): a small network and many steps did better than a bigger one in the
    # same minutes
    dim: int = 64
    num_heads: int = 4
    num_layers: int = 2
    ffn_dim: int = 256
    patch: tuple = (1, 1, 1)
    teacher_steps: int = 5000
    teacher_batch: int = 32
    teacher_lr: float = 1e-3
    prompt_dropout: float = 0.1
    # the noise levels trained on: logit-normal s warped by this shift towards high noise (as Wan's flow shift).
    # Where the object is in each frame (its motion) is decided at high noise: with shift 1 the teacher made
    # static objects (held-out direction 0.46, dynamic degree 0.27 after 5,000 steps); with 3, 0.94 and 0.90
    train_shift: float = 3.0
    ema_decay: float = 0.995
    # reward: a CLIP on the last frame
    clip_width: int = 64
    clip_layers: int = 2
    clip_patch: int = 8
    clip_steps: int = 600
    clip_batch: int = 128
    clip_lr: float = 1e-3
    # evaluation
    eval_videos: int = 48
    guidance: float = 3.0
    shift: float = 3.0  # of the Euler sampler's grid, as Wan's scheduler (flow_shift 3)
    ckpt_every: int = 100
    seed: int = 0

    @staticmethod
    def quick():
        # the CI check that every part runs and learns something (~1 min); the behaviour of trained models is
        # tested on the shipped ones (tests/test_toy.py)
        return Config(vae_steps=120, num_clips=256, teacher_steps=200, teacher_lr=2e-3, clip_steps=60, clip_batch=64,
                      eval_videos=12)


# -----------------------------------------------------------------------------
# small helpers: seeded randomness per step, atomic files, timing

def rng_for(seed, part, step):
    """numpy and torch generators for one step of one part: a resumed run draws the same data and noise."""
    key = [seed, part, step]
    torch_seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
    return np.random.default_rng(key), torch.Generator().manual_seed(torch_seed)


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def cosine_lr(step, total, lr, warmup=50, floor=0.1):
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))))


class Timer:
    """Wall-clock and CPU minutes per part, added up over resumed runs in work/minutes.json (CPU time / 2 is
    about the wall time on 2 free cores; the load average says how busy the machine was)."""

    def __init__(self, path):
        self.path = path
        self.minutes = common.read_json(path, "work/minutes.json") if os.path.isfile(path) else {}

    def __call__(self, name):
        timer = self

        class Part:
            def __enter__(self):
                self.wall, self.cpu = time.time(), time.process_time()

            def __exit__(self, *exc):
                old = timer.minutes.get(name, dict(wall=0.0, cpu=0.0))
                timer.minutes[name] = dict(wall=round(old["wall"] + (time.time() - self.wall) / 60, 2),
                                           cpu=round(old["cpu"] + (time.process_time() - self.cpu) / 60, 2),
                                           load=round(os.getloadavg()[1], 1))
                with open(timer.path, "w") as f:
                    json.dump(timer.minutes, f, indent=1)
        return Part()


# -----------------------------------------------------------------------------
# 1. text: tokenizer + frozen random UMT5, and every prompt's embedding

def build_text(cfg, folder):
    """A T5 tokenizer whose Unigram vocab holds each word of the grammar as one piece (and single characters for
    any other text), and a random UMT5 encoder, saved as tokenizer/ and text_encoder/ in folder (the layout
    cw.load_text_encoder reads). Word pieces, not make_tiny_wan's characters: each word then reaches the
    teacher as one random vector in a fixed slot; with characters, a teacher of this budget learned the look
    of the world but hardly which words ask for what (held-out colour 0.35 against 0.23 for a random one)."""
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel
    words = sorted({w for s in W.all_specs() for w in s.prompt.split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [("\u2581" + w, 0.0) for w in words]  # a whole word scores above any split into characters
    vocab += [(c, -2.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(cfg_seed(cfg, "text"))
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=8, d_ff=64,
                                          num_layers=2, num_heads=4, relative_attention_num_buckets=8))
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    encoder.save_pretrained(os.path.join(tmp, "text_encoder"))
    os.replace(tmp, folder)


def cfg_seed(cfg, part):
    return cfg.seed * 1000 + ["text", "vae", "teacher", "reward", "eval"].index(part)


def encode_texts(folder, prompts):
    """{prompt: [n, text_dim]} for the prompts, '' and Wan's negative prompt, through the saved tokenizer and
    encoder and the stage scripts' own encoding (cw.encode_prompts: 512 tokens, zeros after the text)."""
    tokenizer, encoder = cw.load_text_encoder(folder)
    out = {}
    for s in range(0, len(prompts), 64):
        emb = cw.encode_prompts(tokenizer, encoder, prompts[s:s + 64])
        for p, e in zip(prompts[s:s + 64], emb):
            out[p] = e[:int((e.abs().sum(-1) > 0).nonzero().max()) + 1].clone()
    for p in ["", cw.WAN_NEGATIVE_PROMPT]:
        e = cw.encode_negative_prompt(tokenizer, encoder, p)[0]
        out[p] = e[:int((e.abs().sum(-1) > 0).nonzero().max()) + 1].clone()
    return out


def context_batch(texts, prompts):
    """[B, 512, text_dim]: the embeddings of `prompts`, zero-padded to 512 as the stage scripts pass them."""
    return torch.stack([F.pad(texts[p], (0, 0, 0, 512 - len(texts[p]))) for p in prompts])


# -----------------------------------------------------------------------------
# 2. the VAE

def make_vae(cfg, latents_mean=None, latents_std=None):
    from diffusers import AutoencoderKLWan
    kw = {} if latents_mean is None else dict(latents_mean=latents_mean, latents_std=latents_std)
    return AutoencoderKLWan(base_dim=cfg.vae_base_dim, dim_mult=list(cfg.vae_dim_mult), num_res_blocks=1, z_dim=16,
                            **kw)


def vae_loss(vae, x, fg_weight):
    """Reconstruction of the posterior MEAN (sampling the posterior stalled at the background in the probe),
    squared error with the object's pixels weighted fg_weight times: the object is ~10% of the pixels and all
    of the content."""
    z = vae.encode(x).latent_dist.mode()
    y = vae.decode(z).sample
    bg = x.flatten(2).median(2).values[..., None, None, None]  # [B, 3, 1, 1, 1]
    fg = ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()  # [B, 1, T, H, W]
    return ((1 + (fg_weight - 1) * fg) * (y - x) ** 2).mean()


def inflate_to_video(vae):
    """Make the video VAE start as the image VAE applied per frame (as video VAEs inflated from image ones
    start): every causal 3x3x3 convolution sees only the current frame (its two past taps zero) and each
    temporal resampling passes frames through (identity on its newest tap). Then a latent frame holds the last
    of its 4 frames and decodes to 4 copies of it, and training on single frames trains the whole VAE: their
    past taps get no gradient (the past of a first frame is zero padding) and stay zero. In the probe, random
    temporal weights made the frames after the 9th fade out and a 9-frame clip phase hardly fixed it."""
    for m in vae.modules():
        if type(m).__name__ == "WanCausalConv3d" and m.weight.shape[2] == 3 and m.weight.shape[3] > 1:
            m.weight.data[:, :, :2] = 0
        if type(m).__name__ == "WanResample" and hasattr(m, "time_conv"):
            w = m.time_conv.weight.data  # [out, in, 3, 1, 1]; out = 2 x in for the upsampling (two frames)
            w.zero_()
            m.time_conv.bias.data.zero_()
            for k in range(w.shape[0] // w.shape[1]):
                w[k * w.shape[1]:(k + 1) * w.shape[1], :, -1, 0, 0] = torch.eye(w.shape[1])
    return vae


def train_vae(cfg, work, train_specs):
    """Single frames of training clips, batch vae_batch; then vae_video_steps on whole clips (0 by default: a
    150-step clip phase at lr 5e-5 took PSNR from 27 to 22 within the budget). Resumable from work/vae_ckpt.pt."""
    path = os.path.join(work, "vae_ckpt.pt")
    torch.manual_seed(cfg_seed(cfg, "vae"))
    vae = inflate_to_video(make_vae(cfg))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step, total = 0, cfg.vae_steps + cfg.vae_video_steps
    if os.path.isfile(path):
        ckpt = torch.load(path, weights_only=True)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    bar = tqdm(total=total, initial=step, desc="vae")
    while step < total:
        image = step < cfg.vae_steps
        batch = cfg.vae_batch if image else cfg.vae_video_batch
        rng, _ = rng_for(cfg.seed, 1, step)
        # a random frame of each clip, so that every position along the motion is seen
        picks = [[int(rng.integers(cfg.world.frames))] if image else None for _ in range(batch)]
        specs = [train_specs[i] for i in rng.integers(0, len(train_specs), batch)]
        x = W.to_model(np.stack([W.render(s, int(rng.integers(2**31)), cfg.world, frames=f)
                                 for s, f in zip(specs, picks)]))  # [B, 3, 1 or T, H, W]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.vae_steps, cfg.vae_lr) if image else cfg.vae_video_lr
        loss = vae_loss(vae, x, cfg.fg_weight)
        if not torch.isfinite(loss):
            raise UserError(f"VAE training diverged at step {step}: lower vae_lr")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", data="frames" if image else "clips")
        if step % cfg.ckpt_every == 0 or step == total:
            save_atomic(dict(model=vae.state_dict(), optimizer=opt.state_dict(), step=step), path)
    bar.close()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, videos, batch=16, desc=None):
    """uint8 [N, T, H, W, 3] -> posterior means [N, 16, F, h, w] (not normalized)."""
    out = []
    for s in tqdm(range(0, len(videos), batch), desc=desc, disable=desc is None):
        out.append(vae.encode(W.to_model(videos[s:s + batch])).latent_dist.mode())
    return torch.cat(out)


@torch.no_grad()
def decode(vae, latents, batch=16):
    """Normalized latents [N, 16, F, h, w] -> uint8 [N, T, H, W, 3], through the stage scripts' cw.vae_decode."""
    return np.concatenate([W.to_uint8(cw.vae_decode(vae, latents[s:s + batch])) for s in range(0, len(latents), batch)])


# -----------------------------------------------------------------------------
# 4. the teacher

def teacher_config(cfg):
    return cw.WanConfig(dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                        text_dim=cfg.text_dim, freq_dim=64, patch_size=tuple(cfg.patch))


def flow_matching_loss(model, x0, context, generator, shift=1.0):
    """E || v(x_t, t) - (noise - x0) ||^2 with x_t = (1 - s) x0 + s noise, t = 1000 s, s logit-normal: the
    parameterization of cw.predict_x0 and every stage script."""
    B = x0.shape[0]
    s = torch.sigmoid(torch.randn(B, generator=generator))  # [B]
    s = shift * s / (1 + (shift - 1) * s)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = (1 - s.view(B, 1, 1, 1, 1)) * x0 + s.view(B, 1, 1, 1, 1) * noise
    return F.mse_loss(model(x_t, 1000 * s, model.prompt_kv(context)), noise - x0)


def train_teacher(cfg, work, latents, prompts, texts):
    """latents [N, 16, F, h, w] normalized, prompts [N]; resumable from work/teacher_ckpt.pt. Returns the EMA."""
    import copy
    path = os.path.join(work, "teacher_ckpt.pt")
    torch.manual_seed(cfg_seed(cfg, "teacher"))
    model = cw.CausalWan(teacher_config(cfg))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr, betas=(0.9, 0.99), weight_decay=0.01)
    step = 0
    if os.path.isfile(path):
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    uncond = ["", cw.WAN_NEGATIVE_PROMPT]
    bar = tqdm(total=cfg.teacher_steps, initial=step, desc="teacher")
    while step < cfg.teacher_steps:
        rng, gen = rng_for(cfg.seed, 3, step)
        idx = torch.as_tensor(rng.integers(0, len(latents), cfg.teacher_batch))
        drop = rng.random(cfg.teacher_batch) < cfg.prompt_dropout
        text = [uncond[int(rng.integers(2))] if d else prompts[i] for i, d in zip(idx.tolist(), drop)]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.teacher_steps, cfg.teacher_lr)
        loss = flow_matching_loss(model, latents[idx], context_batch(texts, text), gen, cfg.train_shift)
        if not torch.isfinite(loss):
            raise UserError(f"teacher training diverged at step {step}: lower teacher_lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        common.ema_update(ema, model, min(cfg.ema_decay, step / (step + 10)))
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.teacher_steps:
            save_atomic(dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), step=step),
                        path)
    bar.close()
    return ema.eval()


@torch.no_grad()
def euler_sample(model, cond, uncond, noise, steps, guidance, shift):
    """Euler on the velocity from s = 1 to 0 over a grid warped by `shift`, with classifier-free guidance
    v = v_u + g (v_c - v_u). cond [B, 512, D], uncond [1, 512, D]."""
    s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    kv_c, kv_u = model.prompt_kv(cond), model.prompt_kv(uncond.expand(len(cond), -1, -1))
    x = noise
    for i in range(steps):
        t = torch.full((len(x),), 1000 * float(s[i]))
        v = model(x, t, kv_c)
        if guidance != 1:
            v_u = model(x, t, kv_u)
            v = v_u + guidance * (v - v_u)
        x = x + float(s[i + 1] - s[i]) * v
    return x


# -----------------------------------------------------------------------------
# 5. the reward: a tiny CLIP

def build_clip_tokenizer():
    """A CLIP BPE tokenizer whose merges make each word of the grammar one token (other text falls back to
    letters), built by merging what it still splits until nothing is split."""
    from transformers import CLIPTokenizer
    words = sorted({w for s in W.all_specs() for w in s.prompt.split()})
    letters = list(string.ascii_lowercase)
    vocab, merges = letters + [c + "</w>" for c in letters], []

    def make():  # specials last, as in CLIP
        ids = {t: i for i, t in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}
        return CLIPTokenizer(vocab=ids, merges=list(merges))
    while True:
        tokenizer = make()
        split = [p for p in (tokenizer.tokenize(w) for w in words) if len(p) > 1]
        if not split:
            return tokenizer
        for p in split:
            if (p[0], p[1]) not in merges:
                merges.append((p[0], p[1]))
            if p[0] + p[1] not in vocab:
                vocab.append(p[0] + p[1])


def build_clip(cfg, tokenizer):
    from transformers import CLIPConfig, CLIPModel
    n = len(tokenizer)
    small = dict(hidden_size=cfg.clip_width, intermediate_size=4 * cfg.clip_width, num_hidden_layers=cfg.clip_layers,
                 num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=n, max_position_embeddings=77, bos_token_id=n - 2,
                                         eos_token_id=n - 1, pad_token_id=n - 1, **small),
                        vision_config=dict(image_size=cfg.world.height, patch_size=cfg.clip_patch, **small),
                        projection_dim=cfg.clip_width)
    torch.manual_seed(cfg_seed(cfg, "reward"))
    return CLIPModel(config)


def clip_scores(model, processor, frames, prompts):
    """[B] or, with all_pairs, [B, P] logit_scale.exp() * cos(image, text): train_reward.load_pickscore's score.
    frames [B, 3, H, W] in [-1, 1]."""
    import train_reward
    ip = processor.image_processor
    image = train_reward.preprocess(frames, ip.size["shortest_edge"], ip.crop_size["height"], ip.image_mean,
                                    ip.image_std)
    text = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    img = model.get_image_features(pixel_values=image).pooler_output
    txt = model.get_text_features(**text).pooler_output
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * img @ txt.T  # [B, P]


def last_frames(cfg, specs, seeds, augment_rng=None):
    """The last frame of each clip as [B, 3, H, W] in [-1, 1]; augmented (a blur, a little noise) for training,
    so that a decoded, slightly soft frame reads like the world's."""
    x = W.to_model(np.stack([W.render(s, int(seed), cfg.world, frames=[-1]) for s, seed in zip(specs, seeds)]))[:, :, 0]
    if augment_rng is not None:
        blur = torch.as_tensor(augment_rng.random(len(x)) < 0.5).view(-1, 1, 1, 1)
        x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
        x = x + 0.03 * torch.as_tensor(augment_rng.standard_normal(x.shape), dtype=torch.float32)
    return x


def train_reward_model(cfg, folder, train_specs):
    """Symmetric InfoNCE on (last frame, prompt) pairs; saves CLIPModel + CLIPProcessor in folder."""
    from transformers import CLIPImageProcessor, CLIPProcessor
    tokenizer = build_clip_tokenizer()
    size = cfg.world.height
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)  # the frame itself, in [-1, 1]
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = build_clip(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    for step in (bar := tqdm(range(cfg.clip_steps), desc="reward")):
        rng, _ = rng_for(cfg.seed, 5, step)
        specs = [train_specs[i] for i in rng.integers(0, len(train_specs), cfg.clip_batch)]
        frames = last_frames(cfg, specs, rng.integers(0, 2**31, cfg.clip_batch), augment_rng=rng)
        prompts = [s.prompt for s in specs]
        logits = clip_scores(model, processor, frames, prompts)  # [B, B]
        # a prompt drawn twice in a batch is a positive for both frames: soft targets over its copies
        same = torch.tensor([[a == b for b in prompts] for a in prompts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.clip_steps, cfg.clip_lr)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    os.replace(tmp, folder)


# -----------------------------------------------------------------------------
# 6. the diffusers folder and the evaluation

def write_wan_folder(folder, text_folder, vae, teacher):
    """model_index.json + transformer/ vae/ text_encoder/ tokenizer/ scheduler/ with WanPipeline.save_pretrained,
    as cw.make_tiny_wan writes its random one; the transformer is the teacher's EMA under diffusers' class."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    tokenizer, encoder = cw.load_text_encoder(text_folder)
    transformer = WanTransformer3DModel(**teacher.cfg.to_diffusers())
    transformer.load_state_dict(teacher.state_dict(), strict=True)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def eval_specs(cfg, specs, n, part):
    """n specs cycling through `specs` in a seeded order, with seeds no training clip used (>= 10^9)."""
    rng = np.random.default_rng([cfg.seed, 6, part])
    order = rng.permutation(len(specs))
    return [specs[order[i % len(specs)]] for i in range(n)], [10**9 + 1000 * part + i for i in range(n)]


def eval_vae(cfg, vae, heldout):
    specs, seeds = eval_specs(cfg, heldout, cfg.eval_videos, 0)
    videos = np.stack([W.render(s, seed, cfg.world) for s, seed in zip(specs, seeds)])
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(W.to_model(videos[s:s + 16])).latent_dist.mode()).sample
                         for s in range(0, len(videos), 16)])
    mse = (rec - W.to_model(videos)).pow(2).mean().item()
    prompts = [s.prompt for s in specs]
    return dict(psnr=round(10 * math.log10(4 / mse), 2), ground_truth=M.video_metrics(videos, prompts, cfg.world),
                reconstruction=M.video_metrics(W.to_uint8(rec), prompts, cfg.world))


def eval_teacher(cfg, teacher, vae, texts, specs, part, steps, guidance):
    specs, seeds = eval_specs(cfg, specs, cfg.eval_videos, part)
    prompts = [s.prompt for s in specs]
    shape = [16, (cfg.world.frames - 1) // 4 + 1, cfg.world.height // 8, cfg.world.width // 8]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = euler_sample(teacher, context_batch(texts, prompts), context_batch(texts, [cw.WAN_NEGATIVE_PROMPT]), noise,
                     steps, guidance, cfg.shift)
    videos = decode(vae, z)
    return M.video_metrics(videos, prompts, cfg.world), videos


def eval_reward(cfg, folder, heldout, n=96):
    """Retrieval on held-out last frames (unseen seeds): top-1 over all prompts, over the 48 prompts that differ
    only in colour / shape / direction, and per attribute; smoothness: the score of a frame whose object's
    colour blends from another colour to the prompt's (9 steps), as the Spearman correlation with the blend."""
    from transformers import AutoProcessor

    import train_reward
    reward = train_reward.load_reward("pickscore", folder, folder)  # the path train_reward.py --reward pickscore takes
    model, processor = reward.model, AutoProcessor.from_pretrained(folder)
    specs, seeds = eval_specs(cfg, heldout, n, 1)
    all_specs = W.all_specs()
    with torch.no_grad():
        scores = clip_scores(model, processor, last_frames(cfg, specs, seeds), [s.prompt for s in all_specs])
    index = {s: i for i, s in enumerate(all_specs)}
    out = dict(top1_all=float(np.mean([all_specs[int(scores[i].argmax())] == s for i, s in enumerate(specs)])))
    alternatives = dict(color=W.COLORS, shape=W.SHAPES, direction=W.DIRECTIONS, size=W.SIZES, speed=W.SPEEDS)
    core = [("color", "shape", "direction")] + [(a,) for a in alternatives]
    for attrs in core:
        hits = []
        for i, s in enumerate(specs):
            variants = [s]
            for a in attrs:
                variants = [replace(v, **{a: x}) for v in variants for x in alternatives[a]]
            best = max(variants, key=lambda v: scores[i, index[v]].item())
            hits.append(best == s)
        out["top1_" + "_".join(attrs) if len(attrs) == 1 else "top1_core"] = float(np.mean(hits))
    # smoothness along a colour blend, and that the score's gradient reaches the pixels
    rhos = []
    for s, seed in zip(specs[:16], seeds[:16]):
        other = next(c for c in W.COLORS if c != s.color)
        a = last_frames(cfg, [s], [seed])
        b = last_frames(cfg, [replace(s, color=other)], [seed])
        blend = torch.linspace(0, 1, 9).view(-1, 1, 1, 1)
        with torch.no_grad():
            r = reward(b + blend * (a - b), [s.prompt] * 9)
        rhos.append(np.corrcoef(np.arange(9), np.argsort(np.argsort(r.numpy())))[0, 1])  # Spearman's rho
    frame = last_frames(cfg, specs[:1], seeds[:1]).requires_grad_(True)
    reward(frame, [specs[0].prompt]).sum().backward()
    out["color_blend_spearman"] = float(np.mean(rhos))
    out["pixel_grad_norm"] = float(frame.grad.norm())
    out["chance_top1_all"] = 1 / len(all_specs)
    return out


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "toy", "out"), help="output folder (toy/out)")
    p.add_argument("--quick", action="store_true", help="short trainings (~2 min): the CI check")
    p.add_argument("--seed", type=common.seed, default=0)
    return p.parse_args(argv)


def main(args):
    cfg = replace(Config.quick() if args.quick else Config(), seed=args.seed)
    common.check_output_folder(args.out, "--out")
    work = os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)
    settings = json.loads(json.dumps(asdict(cfg)))
    settings_path = os.path.join(work, "config.json")
    if os.path.isfile(settings_path):
        if common.read_json(settings_path, "work/config.json") != settings:
            raise UserError(f"'{args.out}' was built with other settings (--quick / --seed): use another --out "
                            f"or delete it")
    else:
        with open(settings_path, "w") as f:
            json.dump(settings, f, indent=1)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its "Loading weights" bars at every from_pretrained
    report = dict(config=settings)
    timer = Timer(os.path.join(work, "minutes.json"))
    torch.set_flush_denormal(True)  # tiny weights near zero make denormals, 10x slower on some CPUs

    specs = W.all_specs()
    train_specs, heldout = W.split(specs)
    os.makedirs(os.path.join(args.out, "prompts"), exist_ok=True)
    for name, group in [("train", train_specs), ("heldout", heldout), ("all", specs),
                        ("heldout_core", W.split(W.all_specs(core_only=True))[1])]:
        with open(os.path.join(args.out, "prompts", f"{name}.txt"), "w") as f:
            f.write("".join(s.prompt + "\n" for s in group))

    # 1. text
    text_folder = os.path.join(work, "text")
    with timer("text"):
        if not os.path.isdir(text_folder):
            build_text(cfg, text_folder)
        texts = encode_texts(text_folder, [s.prompt for s in specs])

    # 2. VAE, 3. latents (and the VAE's normalization, measured on them)
    latents_path = os.path.join(work, "latents.pt")
    with timer("vae"):
        vae = train_vae(cfg, work, train_specs)
    with timer("latents"):
        if not os.path.isfile(latents_path):
            rng = np.random.default_rng([cfg.seed, 2])
            clip_specs = [train_specs[i % len(train_specs)] for i in rng.permutation(cfg.num_clips)]
            videos = np.stack([W.render(s, i, cfg.world) for i, s in enumerate(clip_specs)])
            mu = encode(vae, videos, desc="latents")  # [N, 16, F, h, w]
            mean, std = mu.mean(dim=(0, 2, 3, 4)), mu.std(dim=(0, 2, 3, 4))
            save_atomic(dict(latents=((mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)).half(),
                             prompts=[s.prompt for s in clip_specs], mean=mean.tolist(), std=std.tolist()),
                        latents_path)
        data = torch.load(latents_path, weights_only=True)
    state = vae.state_dict()
    vae = make_vae(cfg, data["mean"], data["std"])
    vae.load_state_dict(state)
    vae.eval().requires_grad_(False)

    # 4. teacher
    with timer("teacher"):
        teacher = train_teacher(cfg, work, data["latents"].float(), data["prompts"], texts)

    # 5. reward
    reward_folder = os.path.join(args.out, "reward")
    with timer("reward"):
        if not os.path.isfile(os.path.join(reward_folder, "config.json")):
            train_reward_model(cfg, reward_folder, train_specs)

    # the diffusers folder, checked through the stage scripts' own loaders
    wan_folder = os.path.join(args.out, "wan")
    with timer("write"):
        write_wan_folder(wan_folder, text_folder, vae, teacher)
        cw.check_model(wan_folder)
        loaded = cw.from_pretrained(wan_folder)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
        vae = cw.load_vae(wan_folder)

    # 6. evaluation
    with timer("eval"):
        evaluate(cfg, report, vae, teacher, texts, reward_folder, train_specs, heldout, args.out)
    report["minutes"] = dict(timer.minutes, total=dict(wall=round(sum(v["wall"] for v in timer.minutes.values()), 2),
                                                       cpu=round(sum(v["cpu"] for v in timer.minutes.values()), 2)))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print_summary(report, args.out)


def evaluate(cfg, report, vae, teacher, texts, reward_folder, train_specs, heldout, out):
    """report['vae'], ['teacher'] (trained and random, held-out and training prompts), ['reward']; the teacher's
    held-out videos as samples/teacher_*.mp4."""
    report["vae"] = eval_vae(cfg, vae, heldout)
    torch.manual_seed(cfg_seed(cfg, "teacher"))
    random_teacher = cw.CausalWan(teacher_config(cfg)).eval()
    report["teacher"] = {}
    for name, net, specs, part, steps, guidance in [
            ("heldout_25_steps_cfg", teacher, heldout, 2, 25, cfg.guidance),
            ("heldout_4_steps_cfg", teacher, heldout, 2, 4, cfg.guidance),
            ("heldout_25_steps_no_cfg", teacher, heldout, 2, 25, 1.0),
            ("train_25_steps_cfg", teacher, train_specs, 3, 25, cfg.guidance),
            ("random_teacher_25_steps_cfg", random_teacher, heldout, 2, 25, cfg.guidance)]:
        report["teacher"][name], videos = eval_teacher(cfg, net, vae, texts, specs, part, steps, guidance)
        if name.startswith("heldout_") and "no_cfg" not in name:
            write_grid(os.path.join(out, "samples", f"teacher_{name}.mp4"), videos[:12])
    report["reward"] = eval_reward(cfg, reward_folder, heldout)


def write_grid(path, videos, cols=4):
    """uint8 [N, T, H, W, 3] -> one mp4 of the videos tiled cols wide (2-pixel white gaps)."""
    n, T, H, Wd, _ = videos.shape
    rows = -(-n // cols)
    grid = np.full((T, rows * (H + 2), cols * (Wd + 2), 3), 255, np.uint8)
    for i, v in enumerate(videos):
        r, c = divmod(i, cols)
        grid[:, r * (H + 2):r * (H + 2) + H, c * (Wd + 2):c * (Wd + 2) + Wd] = v
    grid = grid[:, :grid.shape[1] // 2 * 2, :grid.shape[2] // 2 * 2]  # even sizes for H.264
    common.save_video(path, torch.from_numpy(grid).permute(3, 0, 1, 2).float() / 127.5 - 1, fps=8)


def print_summary(report, out):
    m = report["minutes"]
    print(f"\nwrote {out}/wan (diffusers Wan), {out}/reward (CLIP reward), {out}/prompts, {out}/report.json")
    print("minutes (wall / cpu): " + ", ".join(f"{k} {v['wall']:.1f}/{v['cpu']:.1f}" for k, v in m.items()))
    v = report["vae"]
    print(f"vae: psnr {v['psnr']:.1f} dB; detector on held-out ground truth: {M.format_metrics(v['ground_truth'])}")
    print(f"     on their reconstructions: {M.format_metrics(v['reconstruction'])}")
    for k, t in report["teacher"].items():
        print(f"teacher {k}: {M.format_metrics(t)}")
    r = report["reward"]
    print("reward (held-out last frames): " + " ".join(f"{k} {v:.2f}" for k, v in r.items()))


def resumable(main):
    """main(args), where Ctrl-C or SIGTERM ends as one line (common.run_script) saying that the run continues
    (prepare.py and run.py)."""
    def run(args):
        with common.interruptible(lambda: f"while building {args.out}: what finished is kept; the same command "
                                          f"continues from there"):
            main(args)
    return run


if __name__ == "__main__":
    common.run_script(resumable(main), parse_args)  # a UserError: one line, exit 2; Ctrl-C: one line, exit 130
