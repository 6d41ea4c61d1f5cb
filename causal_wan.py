"""
Causal Wan2.1: the text-to-video transformer of Wan2.1 written out in ~200 lines of plain PyTorch,
with per-frame timesteps, block-causal attention and a KV cache; the autoregressive rollout that
sampling and every training stage share; and the loading of its weights, text encoder and VAE.

Parameter names are exactly those of diffusers' `WanTransformer3DModel`, so the official weights
(`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`, folder `transformer/`) load with strict=True and a
full-attention forward matches diffusers to < 1e-5 in fp32 (tests/test_causal_wan.py::
test_parity_with_diffusers). Checkpoints (ours, and the original Wan layout of Wan's own release,
CausVid and Self Forcing) load through convert.py. Three attention modes, one module:

    model(x, t, prompt_kv)                         full (bidirectional: teacher, critic)
    model(x, t, prompt_kv, block_size=3)           block-causal (teacher-forced training)
    model(x, t, prompt_kv, kv_cache=cache)         one block attending to the cache (rollout)

Latents are [B, C, F, H, W] everywhere (diffusers' layout); `t` is [B] or per frame [B, F].
Flow matching: x_t = (1 - s) x0 + s noise, s = t / 1000, the network predicts v = noise - x0.

How the causal model works
--------------------------
- Per-frame timesteps: the modulation is computed per frame and broadcast over its tokens.
- RoPE's time index is the absolute latent-frame index, so a block keeps its position whether it
  is computed alone against the KV cache or inside the whole sequence.
- Block-causal attention (block_size=3 chunk-wise, 1 frame-wise) runs block by block over key
  prefixes with unmasked SDPA: no dense mask exists even at 32,760 tokens, and flash attention
  applies. In the cache mode a block attends to the cached keys plus its own, with no mask at all.
- `rollout` (through VideoStream, the generation loop sample.py and demo.py share): per block,
  4 denoising steps (DENOISING_TIMESTEPS; predict x0, re-noise it to the next step), then one clean
  t=0 pass that writes the block's keys/values into the KVCache. `exit_steps` gives Self Forcing's
  training mode: block b stops at step exit_steps[b], and the gradient flows through that step
  only, and (cache_grad "straight-through", Self Forcing's) from later blocks through the cache into
  it. block_size >= F is the 4-step bidirectional generator.
- The KVCache is written in place at inference and concatenated in training (autograd needs what a
  step read to stay as it was); `rollout` picks by whether gradients are on. Same video (tested).

Reading order: WanConfig; the network (RoPE, attention, the block-causal mask, the blocks,
KVCache, CausalWan); the parameters that stay fp32 (FP32_PARAMS, keeps_fp32, cast_model); the
few-step schedule, predict_x0, VideoStream, rollout; loading (from_pretrained, the UMT5 text
encoder and the trainers' text helpers, the VAE).
"""
import math
import os
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import UserError, read_json

DEFAULT_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


# -----------------------------------------------------------------------------
# config

@dataclass
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6

    @staticmethod
    def wan_1_3b():
        return WanConfig()

    @staticmethod
    def wan_14b():
        return WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

    @staticmethod
    def tiny():
        # head_dim 16 splits 8/4/4 between the time/height/width RoPE axes, like 44/42/42 at 128
        return WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, freq_dim=32)

    @staticmethod
    def from_diffusers(cfg):
        """WanConfig from a diffusers `transformer/config.json` dict (text-to-video models only)."""
        if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
            raise UserError("this transformer is an image-to-video Wan (image_dim is set); use a T2V model")
        if (cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads"
                or not cfg.get("cross_attn_norm", True)):
            raise UserError(f"unsupported Wan variant (qk_norm={cfg.get('qk_norm')}, "
                            f"cross_attn_norm={cfg.get('cross_attn_norm')})")
        heads = cfg["num_attention_heads"]
        return WanConfig(
            dim=heads * cfg["attention_head_dim"], ffn_dim=cfg["ffn_dim"], num_heads=heads,
            num_layers=cfg["num_layers"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], patch_size=tuple(cfg["patch_size"]), eps=cfg["eps"])

    def to_diffusers(self):
        """The kwargs of diffusers' WanTransformer3DModel for this config."""
        return dict(patch_size=tuple(self.patch_size), num_attention_heads=self.num_heads,
                    attention_head_dim=self.dim // self.num_heads, in_channels=self.in_channels,
                    out_channels=self.out_channels, text_dim=self.text_dim, freq_dim=self.freq_dim,
                    ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=self.eps)


# -----------------------------------------------------------------------------
# the network (module and parameter names follow diffusers' WanTransformer3DModel)

def timestep_sinusoid(t, dim):
    """diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): [N] -> [N, dim] fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_angles(head_dim, frames, height, width, frame_offset, device):
    """3-D RoPE angles [F*H*W, head_dim/2]. The time axis uses the ABSOLUTE latent-frame index
    (frame_offset + f), so a block keeps its position whether it is computed alone or in the
    whole sequence. Computed in fp64 like diffusers' tables, which only cover 1024 frames."""
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim

    def axis(dim, positions):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
        return torch.outer(positions.to(torch.float64), inv_freq)  # [n, dim/2]

    ang_t = axis(t_dim, torch.arange(frame_offset, frame_offset + frames, device=device))
    ang_h = axis(h_dim, torch.arange(height, device=device))
    ang_w = axis(w_dim, torch.arange(width, device=device))
    grid = torch.cat([
        ang_t[:, None, None].expand(frames, height, width, -1),
        ang_h[None, :, None].expand(frames, height, width, -1),
        ang_w[None, None, :].expand(frames, height, width, -1)], dim=-1)
    return grid.reshape(frames * height * width, head_dim // 2)


def apply_rope(x, cos, sin):
    """Rotate adjacent channel pairs of x [B, L, H, D] by the angles (cos/sin [L, 1, D/2], fp32)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def shift_rope(k, frames):
    """Cached keys [B, H, L, D] roped at time position p -> roped at p + frames (R(a) R(b) = R(a + b))."""
    angles = rope_angles(k.shape[-1], 1, 1, 1, frames, k.device)  # [1, D/2]: time only, height and width at 0
    return apply_rope(k, angles.cos().float(), angles.sin().float())


def attention(q, k, v):
    """SDPA over [B, H, L, D]. On a GPU only fused kernels may run (flash, cuDNN, memory-efficient):
    the math fallback would materialize [L, L] scores (7 GB per block call at full size), so an
    unsupported case raises instead of silently going slow."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def block_causal_mask(num_frames, tokens_per_frame, block_size, device=None):
    """The training mask [L, L] (True = may attend): a token sees every token of its own block of
    `block_size` latent frames and of all earlier blocks. The model never builds it: it computes
    the same attention block by block over key prefixes (see `Attention.forward`)."""
    block = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame) // block_size
    return block[:, None] >= block[None, :]


class FP32LayerNorm(nn.LayerNorm):
    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)  # over all heads at once, before the split
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def keys_values(self, context):
        """Cross-attention keys/values of the text [B, H, S, D], computed once per prompt."""
        k = self.norm_k(self.to_k(context)).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        v = self.to_v(context).unflatten(2, (self.num_heads, -1)).transpose(1, 2)
        return k, v

    def forward(self, x, rope=None, kv=None, past_kv=None, block_tokens=None):
        """Self-attention when kv is None (returns the output and this call's keys/values for the
        cache), else cross-attention to the given keys/values."""
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.num_heads, -1))  # [B, L, H, D]
        if kv is not None:
            out = attention(q.transpose(1, 2), *kv)
            return self.to_out[0](out.transpose(1, 2).flatten(2).type_as(x))
        k = self.norm_k(self.to_k(x)).unflatten(2, (self.num_heads, -1))
        v = self.to_v(x).unflatten(2, (self.num_heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
        if past_kv is not None:
            # rollout: the block attends to every cached key and to itself; no mask is needed
            out = attend_to_cache(q, k, v, past_kv)
        elif block_tokens is not None:
            # block-causal: queries of block i attend to the key prefix up to the end of block i.
            # Equal to SDPA with block_causal_mask, but each call is unmasked (flash-eligible)
            # and the dense [L, L] mask never exists (it would be 1 GB at 32,760 tokens).
            L = q.shape[2]
            out = torch.cat([
                attention(q[:, :, s:s + block_tokens], k[:, :, :s + block_tokens], v[:, :, :s + block_tokens])
                for s in range(0, L, block_tokens)], dim=2)
        else:
            out = attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2).type_as(x)), (k, v)


class GELUProj(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, ffn_dim), nn.Identity(), nn.Linear(ffn_dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.attn2 = Attention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, mod, rope, text_kv, past_kv=None, block_tokens=None):
        """x [B, L, D]; mod [B, Fm, 6, D] fp32 with Fm = 1 (one t) or the number of frames (one t
        per frame), broadcast over each frame's tokens (never repeated per token). Modulation,
        residual adds and norms in fp32, as in diffusers and Wan."""
        B, L, D = x.shape
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + mod).unsqueeze(2).unbind(3)
        frames = lambda y: y.view(B, mod.shape[1], -1, D)  # noqa: E731  [B, Fm, L/Fm, D]: tokens grouped by frame
        h = (frames(self.norm1(x.float())) * (1 + scale) + shift).flatten(1, 2).type_as(x)
        a, new_kv = self.attn1(h, rope=rope, past_kv=past_kv, block_tokens=block_tokens)
        x = (frames(x.float()) + frames(a) * gate).flatten(1, 2).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), kv=text_kv)
        h = (frames(self.norm3(x.float())) * (1 + c_scale) + c_shift).flatten(1, 2).type_as(x)
        x = (frames(x.float()) + frames(self.ffn(h).float()) * c_gate).flatten(1, 2).type_as(x)
        return x, new_kv


class MLP(nn.Module):
    def __init__(self, dim_in, dim_out, act):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)
        self.act = act

    def forward(self, x):
        # own input cast: the time embedder stays fp32 in a bf16 model (FP32_PARAMS), and under FSDP
        # a unit's weights have their compute dtype only inside its forward
        return self.linear_2(self.act(self.linear_1(x.to(self.linear_1.weight.dtype))))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.time_embedder = MLP(cfg.freq_dim, cfg.dim, nn.SiLU())
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = MLP(cfg.text_dim, cfg.dim, nn.GELU(approximate="tanh"))


@torch.compiler.disable  # its shapes change every block: keep it out of compiled graphs (sample.py --compile)
def attend_to_cache(q, k, v, past_kv):
    """Attention of a block (q, k, v [B, H, L, D]) over the cached keys/values and its own.
    past_kv: the layer's `KVCache.past(i)`."""
    return attention(q, *past_kv(k, v))


def _concat_kv(old_k, old_v, k, v):
    return torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)


def _in_place_kv(buf_k, buf_v, n, k, v):
    end = n + k.shape[2]
    if end > buf_k.shape[2]:
        raise ValueError(f"a block of {k.shape[2]} tokens does not fit the KV cache ({n} of {buf_k.shape[2]} held)")
    buf_k[:, :, n:end] = k
    buf_v[:, :, n:end] = v
    return buf_k[:, :, :end], buf_v[:, :, :end]


class KVCache:
    """Per-layer keys (after RoPE) and values [B, H, L, D] of the clean frames generated so far.

    `pos` is the absolute index of the next latent frame (its RoPE time position). For videos
    longer than the model was trained on, the cache keeps the first `sink_frames` frames (an
    attention sink) plus the most recent ones, so that a block of n frames attends to at most
    `max_frames` frames, itself included: the cost per block stays flat however long the video.

    Two storages, equal results. static=True (inference): one buffer per layer, allocated once for the whole
    window; a block writes its keys/values in place after the cached ones and attends to that prefix, so no call
    copies the cache, and evicting moves the recent frames down once per block. static=False (training): every call
    concatenates into new tensors, because autograd and activation checkpointing's recompute need the tensors a
    step read to stay unchanged while later blocks extend the cache.

    rope="window" (Lu et al.'s Reward Forcing, LongLive's infinity config): RoPE positions are the window's slots (the
    sink first, the block last), never above max_frames. sink_ema: Reward Forcing's EMA-Sink. Both: `evict`.
    """

    def __init__(self, num_layers, max_frames=21, sink_frames=3, static=False, total_frames=None, rope="absolute",
                 sink_ema=None):
        if rope not in ("absolute", "window") or sink_ema is not None and rope != "window":
            raise ValueError(f"rope must be 'absolute' or 'window' (sink_ema needs 'window'), not {rope!r}")
        self.kv = [None] * num_layers  # static: the buffers; else the cached tensors themselves
        self.max_frames, self.sink_frames, self.static = max_frames, sink_frames, static
        self.rope, self.sink_ema = rope, sink_ema
        self.total_frames = total_frames  # the video's length if known: in place, no buffer needs more
        self.pos = 0  # absolute frame index of the next block
        self.frames = 0  # frames currently held
        self.tokens = 0  # tokens currently held (per layer)
        self.tokens_per_frame = None  # in place: set when the buffers are allocated

    def past(self, i, num_frames):
        """What layer i's attention needs for a block of num_frames frames: a function (k, v) of the
        block -> the keys/values it attends to (the cache's, then its own). In place, it also writes
        the block's keys/values after the cached ones, so the clean pass leaves them where `append`
        wants them. Concatenating: None while the cache is empty, and bound to the cache as it is
        now, so a recompute (activation checkpointing) sees the same keys."""
        if self.static:
            return partial(self._write_in_place, i, num_frames, self.tokens)
        return None if self.kv[i] is None else partial(_concat_kv, *self.kv[i])

    def _write_in_place(self, i, num_frames, n, k, v):
        if self.kv[i] is None:  # room for the window: what is kept after a block, plus the next block
            self.tokens_per_frame = k.shape[2] // num_frames
            frames = max(self.max_frames - num_frames, self.sink_frames) + num_frames
            frames = min(frames, self.total_frames or frames)
            shape = (k.shape[0], k.shape[1], frames * self.tokens_per_frame, k.shape[3])
            self.kv[i] = (k.new_empty(shape), v.new_empty(shape))
        return _in_place_kv(*self.kv[i], n, k, v)

    def append(self, kvs, num_frames, keep=None):
        """Make the block the model just ran (its clean pass) part of the cache, then evict to `keep` frames (default
        frames_kept). In place, its keys/values are already there (the forward wrote them): kvs may be None."""
        if self.static:
            L = num_frames * self.tokens_per_frame
        else:
            L = kvs[0][0].shape[2]
            for i, (k, v) in enumerate(kvs):
                self.kv[i] = (k, v) if self.kv[i] is None else _concat_kv(*self.kv[i], k, v)
        self.pos += num_frames
        self.frames += num_frames
        self.tokens += L
        self.evict(self.frames_kept(num_frames) if keep is None else keep)

    def evict(self, keep):
        """Drop the oldest frames after the sink until `keep` are left. rope="window": the recent frames move down as
        many slots, so their keys are rotated back as many positions. sink_ema=a: the dropped frames are first blended
        into the sink (keys moved to its slots), sink = a sink + (1 - a) dropped if as many as it holds, else its first
        frames are replaced by them (a = 0), as Reward Forcing's wan/modules/causal_model.py @ 4317f5a does."""
        drop = self.frames - keep
        if drop <= 0:
            return
        tokens_per_frame = self.tokens // self.frames
        s, e = self.sink_frames * tokens_per_frame, (self.sink_frames + drop) * tokens_per_frame
        for i, (k, v) in enumerate(self.kv):
            sink_k, sink_v, rest_k, rest_v = k[:, :, :s], v[:, :, :s], k[:, :, e:self.tokens], v[:, :, e:self.tokens]
            if self.rope == "window":
                rest_k = shift_rope(rest_k, -drop)
            if self.sink_ema is not None:
                m, a = min(e - s, s), self.sink_ema if e - s == s else 0.0
                old_k = shift_rope(k[:, :, s:s + m], -self.sink_frames)
                sink_k = torch.cat([a * sink_k[:, :, :m] + (1 - a) * old_k, sink_k[:, :, m:]], 2)
                sink_v = torch.cat([a * sink_v[:, :, :m] + (1 - a) * v[:, :, s:s + m], sink_v[:, :, m:]], 2)
            new_k, new_v = torch.cat([sink_k, rest_k], 2), torch.cat([sink_v, rest_v], 2)  # new tensors: no overlap
            if self.static:  # the same buffers, the kept frames at their front
                k[:, :, :new_k.shape[2]], v[:, :, :new_v.shape[2]] = new_k, new_v
            else:
                self.kv[i] = (new_k, new_v)
        self.frames -= drop
        self.tokens -= e - s

    def frames_kept(self, num_frames):
        """How many frames the cache keeps after a block of num_frames: the sink plus the most recent
        ones, leaving room for a next block of the same size (attention span <= max_frames)."""
        return max(self.max_frames - num_frames, self.sink_frames)

    def clear(self):
        """Forget every frame (a re-cache refills the cache); in place, the buffers stay allocated."""
        if not self.static:
            self.kv = [None] * len(self.kv)
        self.pos = self.frames = self.tokens = 0

    def num_bytes(self):
        return sum(t.numel() * t.element_size() for kv in self.kv if kv is not None for t in kv)


class CausalWan(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.gradient_checkpointing = False  # per block, during training

    def prompt_kv(self, context):
        """Text embeddings [B, S, text_dim] -> per-layer cross-attention keys/values. Compute once
        per prompt and reuse for every block and step."""
        c = self.condition_embedder.text_embedder(context)
        return [blk.attn2.keys_values(c) for blk in self.blocks]

    def forward(self, x, t, prompt_kv, block_size=None, kv_cache=None, update_cache=False, kv_out=None):
        """x [B, C, F, H, W], t [B] or [B, F] -> velocity [B, C, F, H, W].

        block_size: block-causal attention over blocks of that many latent frames.
        kv_cache: x is the next block; it attends to the cache and itself, and is placed at RoPE
        position kv_cache.pos. update_cache=True appends its keys/values (the clean pass).
        kv_out: a list that receives this call's keys/values per layer [B, H, L, D], with their graph
        (the exit step's, for VideoStream's straight-through cache gradient).
        """
        B, C, nF, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        f, h, w = nF // pt, H // ph, W // pw
        head_dim = self.cfg.dim // self.cfg.num_heads
        # the block's RoPE time position: its absolute frame index, or its slot after the cache's (window RoPE)
        offset = 0 if kv_cache is None else kv_cache.frames if kv_cache.rope == "window" else kv_cache.pos
        angles = rope_angles(head_dim, f, h, w, offset, x.device)
        rope = (angles.cos().float()[:, None], angles.sin().float()[:, None])

        # the compute dtype of the blocks (bf16 or fp32): that of the text keys their cross-attention
        # projections made (under FSDP a weight only has its compute dtype inside its unit's forward)
        dtype = prompt_kv[0][0].dtype
        # contiguous: the blocks get the same strides from here as from each other (one compiled variant, not two)
        x = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # [B, f*h*w, D]
        t = t.reshape(B, -1)  # [B, 1] or [B, F]
        emb = self.condition_embedder
        # the timestep path in fp32 (FP32_PARAMS), as Wan computes it under fp32 autocast
        temb = emb.time_embedder(timestep_sinusoid(t.flatten(), self.cfg.freq_dim))  # [B*Fm, D]
        mod = emb.time_proj(F.silu(temb).to(emb.time_proj.weight.dtype))
        mod = mod.float().view(B, -1, 6, self.cfg.dim)  # [B, Fm, 6, D]
        temb = temb.float().view(B, -1, 1, self.cfg.dim)

        block_tokens = None if block_size is None else block_size * h * w
        new_kvs = [] if kv_out is None else kv_out
        for i, blk in enumerate(self.blocks):
            past = kv_cache.past(i, f) if kv_cache is not None else None
            args = (x, mod, rope, prompt_kv[i], past, block_tokens)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, kv = checkpoint(blk, *args, use_reentrant=False)
            else:
                x, kv = blk(*args)
            if kv_out is not None or update_cache and not kv_cache.static:  # in place, nothing holds on to them
                new_kvs.append(kv)
        if update_cache:  # in place, the keys/values are already in the cache
            kv_cache.append([(k.detach(), v.detach()) for k, v in new_kvs] or None, f)

        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb).unsqueeze(2).unbind(3)  # [B, Fm, 1, D]
        x = self.norm_out(x.float()).view(B, temb.shape[1], -1, self.cfg.dim)  # [B, Fm, f*h*w/Fm, D]
        x = (x * (1 + scale) + shift).flatten(1, 2)
        x = self.proj_out(x.to(self.proj_out.weight.dtype))  # [B, f*h*w, C*pt*ph*pw]; fp32 in bf16, as Wan's head
        x = x.reshape(B, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, -1, f * pt, h * ph, w * pw)


# -----------------------------------------------------------------------------
# the fp32 policy: the parameters that stay fp32 when the model runs in bf16 are the timestep path (time
# embedder, time projection), the modulation (scale-shift) tables, the affine cross-attention norm and the output
# head. Wan's own code (wan/modules/model.py) computes the time embedding, time projection, modulation and head
# under fp32 autocast, and diffusers keeps time_embedder, scale_shift_table and the norms in fp32
# (WanTransformer3DModel._keep_in_fp32_modules); this is the union of the two. They are 1.2% of Wan2.1-1.3B's
# weights and a negligible share of its FLOPs, and the weights were trained with them in fp32. Everything else
# (attention, FFN, patch and text embedding) runs in bf16.
FP32_PARAMS = ("condition_embedder.time_embedder.", "condition_embedder.time_proj.", "scale_shift_table", ".norm2.",
               "proj_out.")


def keeps_fp32(name):
    """Whether the parameter `name` (as in model.named_parameters()) stays fp32 in a bf16 model."""
    return any(pattern in name for pattern in FP32_PARAMS)


@torch.no_grad()
def cast_model(model, dtype, device=None):
    """model.to(device, dtype), except that the FP32_PARAMS stay fp32 (the bf16 model as Wan runs
    it). Use it instead of .to(dtype) for a CausalWan: .to(bf16) would round them too."""
    for name, p in model.named_parameters():
        p.data = p.data.to(device=device, dtype=torch.float32 if keeps_fp32(name) else dtype)
    for b in model.buffers():  # none today; here so that a future buffer does not stay behind
        b.data = b.data.to(device=device)
    return model


# -----------------------------------------------------------------------------
# the few-step schedule and the autoregressive rollout

def shift_timesteps(timesteps, shift=5.0):
    """Warp timesteps in [0, 1000] with the flow-matching shift s' = shift s / (1 + (shift-1) s)."""
    s = torch.as_tensor(timesteps, dtype=torch.float64) / 1000
    return (shift * s / (1 + (shift - 1) * s) * 1000).tolist()


# [1000, 750, 500, 250] warped with shift 5 -> [1000, 937.5, 833.3, 625]
DENOISING_TIMESTEPS = shift_timesteps([1000, 750, 500, 250])


def predict_x0(model, x, t, prompt_kv, **kw):
    """x0 = x_t - s * v, in fp32 (then back to x's dtype). t: [B] or [B, F] in [0, 1000]."""
    v = model(x, t, prompt_kv, **kw)
    s = (t.float() / 1000).reshape(t.shape[0], 1, -1, 1, 1)  # broadcasts over [B, C, F, H, W]
    return (x.float() - s * v.float()).to(x.dtype)


CACHE_GRAD = ("straight-through", "detach")  # how a block's gradient reaches the blocks it attended to


class StraightThrough(torch.autograd.Function):
    """Forward: the clean pass's keys/values (exactly); backward: their gradient goes to the exit step's."""

    @staticmethod
    def forward(ctx, exit_kv, clean_kv):
        return clean_kv.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class VideoStream:
    """A latent video generated block by block with the KV cache: the one generation loop that training (`rollout`),
    sample.py and the live demo share.

        stream = VideoStream(model, prompt_kv, block_size=3)       # total_frames=None: endless
        x0 = stream.next_block(noise, generator)                  # noise [B, C, n, H, W] -> clean block
        stream.set_prompt(model.prompt_kv(new_context))           # switch the prompt (re-cache)
        stream.prefill(latents)                                   # a fresh stream continues these frames

    Each block: denoise with the few-step schedule at RoPE position `pos` (predict x0, re-noise it to the next
    timestep with noise from `generator`), then run the clean x0 once more at t=0 to write its keys/values into the
    cache (skipped after the last block of a video of known length: nothing reads it). The stream also holds the
    clean latents of exactly the frames the cache holds (attention sink + recent window), with their positions and
    the blocks they were cached in. Re-cache (`set_prompt`) and `prefill` rebuild the whole cache, the sink included,
    from those latents by replaying the cache passes as they first ran: block by block (the sink block first, then
    the recent frames in their blocks), each block attending to the blocks replayed before it (block-causal), each
    frame at its own RoPE position. So a switch with re-cache after b blocks equals continuing the first b blocks'
    latents under the new prompt, exactly, with or without eviction.

    Released models' rules, as options (the defaults are ours and Self Forcing's): sink_frames (None: the first
    block), rope and sink_ema (KVCache), recache="longlive" (`_recache_longlive`) with global_sink, and
    first_timesteps, the schedule of the first block the stream generates (Causal Forcing++'s 1- and 2-step models
    run it with the 4 steps). sample.py's --cache and --steps name the released combinations.

    Within the window (no frame evicted yet) a continuation is exact: prefill of a video's first k blocks, then the
    same noise, gives exactly its remaining blocks (later evictions included). Past it, a continuation (and a
    re-cache under the same prompt) is a close relative of the original, not the original: the replay re-derives the
    recent frames' keys from the held frames only (sink + recent window), while the original computed them when the
    evicted frames were still in the cache.
    """

    def __init__(self, model, prompt_kv, block_size=3, max_frames=21, timesteps=DENOISING_TIMESTEPS,
                 total_frames=None, static=None, cache_grad="straight-through", sink_frames=None, rope="absolute",
                 sink_ema=None, recache="replay", global_sink=True, first_timesteps=None):
        if cache_grad not in CACHE_GRAD:
            raise ValueError(f"cache_grad must be one of {CACHE_GRAD}, not {cache_grad!r}")
        if recache not in ("replay", "longlive") or recache == "longlive" and sink_ema is not None:
            raise ValueError(f"recache must be 'replay' or 'longlive' (without sink_ema), not {recache!r}")
        self.model, self.prompt_kv, self.block_size, self.timesteps = model, prompt_kv, block_size, timesteps
        self.first_timesteps, self.recache, self.global_sink = first_timesteps, recache, global_sink
        self.cache_grad = cache_grad  # how a block's gradient reaches the blocks it attended to (training)
        self.total_frames = total_frames  # latent frames of the video, or None (endless)
        if static is None:  # in place, except for a single block (it reads no cache)
            static = total_frames is None or total_frames > block_size
        sink = block_size if sink_frames is None else sink_frames
        sink = sink if total_frames is None else min(sink, total_frames)
        self.kv_cache = KVCache(len(model.blocks), max_frames=max_frames, sink_frames=sink, static=static,
                                total_frames=total_frames, rope=rope, sink_ema=sink_ema)
        self.pos = 0  # latent frames so far = the RoPE position of the next block
        self.held = None  # [B, C, n, H, W]: clean latents of the n frames the cache holds
        self.held_pos = []  # the absolute position of each
        self.held_block = []  # the position of the block each was cached with (a re-cache replays the same blocks)

    def next_block(self, noise, generator=None, exit_step=None, grad=False, steps=None):
        """noise [B, C, n, H, W] -> the clean block x0 at positions pos..pos+n-1.

        exit_step (training): stop after that denoising step; with grad=True the gradient flows
        through that step only (and, with cache_grad "straight-through", from later blocks through the
        cache into this step's keys/values). steps: a list that receives the noisy input x_t of every step."""
        B, n = noise.shape[0], noise.shape[2]
        timesteps, self.first_timesteps = self.first_timesteps or self.timesteps, None  # the first block's, once
        last = len(timesteps) - 1 if exit_step is None else int(exit_step)
        exit_kv = [] if grad and self.cache_grad == "straight-through" else None  # the exit step's, with graph
        x = noise
        for i in range(last + 1):
            if steps is not None:
                steps.append(x)
            t = torch.full((B,), timesteps[i], device=x.device, dtype=torch.float32)
            with torch.set_grad_enabled(grad and i == last):
                x0 = predict_x0(self.model, x, t, self.prompt_kv, kv_cache=self.kv_cache,
                                kv_out=exit_kv if i == last else None)
            if i < last:
                s = timesteps[i + 1] / 1000
                eps = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device)
                eps = eps.to(x0.device, x0.dtype)  # a CPU generator gives the same noise on every device
                x = (1 - s) * x0 + s * eps
        if self.total_frames is None or self.pos + n < self.total_frames:
            self._cache_block(x0.detach(), self.pos, exit_kv)
        self.pos += n
        return x0

    @torch.no_grad()
    def _cache_block(self, x0, block_pos, exit_kv=None):
        """The clean pass: x0 [B, C, n, H, W] at t=0 writes its keys/values at position kv_cache.pos;
        then hold its latents, dropping those of the frames the cache just evicted.

        exit_kv: the exit step's keys/values per layer, with their graph (training, cache_grad
        "straight-through"). The cache then holds the clean pass's values, and later blocks' gradient
        reaches the exit step's keys/values: what Self Forcing's training pipeline computes (its exit
        step writes its keys/values into the cache buffer in place with grad on, and the clean pass
        overwrites the values under no_grad, which keeps the autograd graph attached). It looks
        accidental there, but it produced the published models; "detach" drops that term."""
        first = self.kv_cache.pos
        t0 = torch.zeros(x0.shape[0], device=x0.device)
        if exit_kv is None:
            self.model(x0, t0, self.prompt_kv, kv_cache=self.kv_cache, update_cache=True)
        else:
            if self.kv_cache.static:
                raise ValueError("the straight-through cache gradient needs the concatenating KV cache (static=False)")
            clean = []
            self.model(x0, t0, self.prompt_kv, kv_cache=self.kv_cache, kv_out=clean)
            with torch.enable_grad():
                self.kv_cache.append([(StraightThrough.apply(ek, ck), StraightThrough.apply(ev, cv))
                                      for (ek, ev), (ck, cv) in zip(exit_kv, clean)], x0.shape[2])
        n = x0.shape[2]
        self.held = x0 if self.held is None else torch.cat([self.held, x0], 2)
        self.held_pos += range(first, first + n)
        self.held_block += [block_pos] * n
        self._hold(self.kv_cache.frames - self.kv_cache.sink_frames)  # what the cache holds

    def _hold(self, recent):
        """Hold only the sink's latents and the `recent` latest ones (LongLive's re-cache needs the last max_frames,
        more than the cache keeps between blocks)."""
        sink, recent = self.kv_cache.sink_frames, self.kv_cache.max_frames if self.recache == "longlive" else recent
        if len(self.held_pos) > sink + recent:
            frames = list(range(sink)) + list(range(len(self.held_pos) - recent, len(self.held_pos)))
            self.held = self.held[:, :, frames]
            self.held_pos = [self.held_pos[i] for i in frames]
            self.held_block = [self.held_block[i] for i in frames]

    def _replay(self):
        """Rebuild the cache under self.prompt_kv from the held latents: each run of frames that
        was cached in one block is cached again in one block, at its own positions."""
        held, pos, block = self.held, self.held_pos, self.held_block
        self.kv_cache.clear()
        self.held, self.held_pos, self.held_block = None, [], []
        start = 0
        for i in range(1, len(pos) + 1):
            if i == len(pos) or block[i] != block[start] or pos[i] != pos[i - 1] + 1:
                self.kv_cache.pos = pos[start]
                self._cache_block(held[:, :, start:i], block[start])
                start = i
        self.kv_cache.evict(self.kv_cache.frames_kept(self.block_size))  # recache="longlive" holds more than that
        self.kv_cache.pos = self.pos

    def set_prompt(self, prompt_kv, recache=True):
        """Generate the next blocks under a new prompt (its `model.prompt_kv`). recache=True
        recomputes the cache of the held frames under it; False switches only the cross-attention
        keys/values (the cached frames keep the old prompt's keys: the new prompt takes hold slowly)."""
        self.prompt_kv = prompt_kv
        if recache and self.held is not None:
            self._recache_longlive() if self.recache == "longlive" else self._replay()

    @torch.no_grad()
    def _recache_longlive(self):
        """LongLive v1.0's (_recache_after_switch): the last max_frames frames re-encoded under the new prompt in one
        unmasked call (each attends to all, later ones included), the first sink_frames of them the sink from then on.
        Past the window with global_sink (its inference configs) the sink keeps the old prompt's keys/values, and the
        max_frames - sink_frames frames after it are re-encoded attending to it (upstream also runs sink_frames frames
        before them, whose keys no query reads). Then the cache keeps what it keeps after a block."""
        kv, keep_sink = self.kv_cache, self.global_sink and self.pos > self.kv_cache.max_frames
        n = kv.max_frames - kv.sink_frames if keep_sink else min(self.pos, kv.max_frames)
        kv.evict(kv.sink_frames) if keep_sink else kv.clear()
        assert self.held_pos[-n:] == list(range(self.pos - n, self.pos)), "the re-encoded frames are not held"
        kv.pos, kvs = self.pos - n, []
        self.model(self.held[:, :, -n:], torch.zeros(self.held.shape[0], device=self.held.device), self.prompt_kv,
                   kv_cache=kv, kv_out=kvs)
        kv.append(kvs, n, keep=kv.frames_kept(self.block_size))

    def prefill(self, latents):
        """Continue a video: latents [B, C, L, H, W] are its first L clean frames (a clip, an image).
        A fresh stream places the frames a long video of L frames made in blocks of block_size
        would hold in its cache (the sink and the most recent ones) and goes on at position L."""
        if self.pos != 0:
            raise ValueError("prefill starts a stream: this one has already generated frames")
        L = latents.shape[2]
        self.held, self.held_pos = latents, list(range(L))
        self.held_block = [p - p % self.block_size for p in range(L)]
        self._hold(self.kv_cache.frames_kept(self.block_size) - self.kv_cache.sink_frames)
        self.pos = L
        self._replay()


def rollout(model, noise, prompt_kv, block_size=3, timesteps=DENOISING_TIMESTEPS, exit_steps=None,
            max_frames=21, generator=None, on_block=None, trajectory=None, grad_blocks=None, static_cache=None,
            cache_grad="straight-through", **options):
    """Generate a video block by block with the KV cache: noise [B, C, F, H, W] -> clean latents, each block by
    `VideoStream.next_block`. A last block shorter than block_size is allowed; block_size >= F is the bidirectional
    few-step generator (one block, full attention).

    Training (Self Forcing): exit_steps[b] stops block b after that denoising step and returns its x0; when grad is
    enabled it flows only through that step (earlier steps and the cache pass run without grad). Inference:
    exit_steps=None runs every step. cache_grad: how a block's gradient reaches the earlier blocks it attended to.
    "straight-through" (Self Forcing's training code, the default): later blocks read the clean pass's keys/values
    and their gradient goes to each earlier block's exit-step keys/values, so a loss on the last frame reaches every
    block; "detach": the cache carries no gradient, so a loss reaches only the blocks that made its frames.
    grad_blocks (None: all) gives a graph to those blocks only; the others need neither the graph nor its memory,
    and a block outside it passes no gradient on. So grad_blocks is exact for the blocks a loss reaches: with
    "detach" the blocks of the scored frames, with "straight-through" every block up to the last scored one.
    on_block(b, x0, kv_cache) is called after each block (streaming decode, benchmarks). trajectory: a list that
    receives, per block, the noisy input x_t of every step taken. static_cache: the KV cache's storage (None: in
    place without grad if there are several blocks, else concatenated). options: VideoStream's released-model options.
    """
    nF = noise.shape[2]
    grad = torch.is_grad_enabled()
    # inference writes the cache in place; training concatenates (see KVCache)
    # (a single block reads no cache: then nothing is preallocated)
    static = (not grad and nF > block_size) if static_cache is None else static_cache
    stream = VideoStream(model, prompt_kv, block_size, max_frames, timesteps, total_frames=nF, static=static,
                         cache_grad=cache_grad, **options)
    blocks = []
    for b, start in enumerate(range(0, nF, block_size)):
        steps = [] if trajectory is not None else None
        x0 = stream.next_block(noise[:, :, start:start + block_size], generator,
                               exit_step=None if exit_steps is None else exit_steps[b],
                               grad=grad and (grad_blocks is None or b in grad_blocks), steps=steps)
        blocks.append(x0)
        if trajectory is not None:
            trajectory.append(steps)
        if on_block is not None:
            on_block(b, x0, stream.kv_cache)
    return torch.cat(blocks, dim=2)


# -----------------------------------------------------------------------------
# weights: diffusers format (a hub id or a local folder); checkpoints of any layout: convert.py

HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


CHECKPOINT_FILE = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")  # a value ending so names a file, not a model


def check_model(model, flag="--model"):
    """Before anything loads: a local diffusers-format Wan has its four parts and a transformer
    config we can read; a hub id has one on the hub (or in the hub cache), fetched alone here, so
    an unknown id or no network is an error that names `flag` before anything loads."""
    name = "model" if flag == "--model" else flag
    if os.path.isdir(model):
        for part in ("transformer", "vae", "text_encoder", "tokenizer"):
            resolve_folder(model, part, flag)
        read_wan_config(os.path.join(model, "transformer"))
    elif not os.path.exists(model) and model.lower().endswith(CHECKPOINT_FILE):
        raise UserError(f"{name} '{model}' does not exist")
    elif os.path.exists(model) or not HUB_ID.fullmatch(model):
        raise UserError(f"{name} '{model}' is neither a diffusers-format folder "
                        f"nor a hub id like {DEFAULT_MODEL}")
    else:
        read_wan_config(resolve_folder(model, "transformer", flag, files="config.json"))


def resolve_folder(model, subfolder, flag=None, files="*"):
    """A local diffusers-format folder or a hub id -> path of `subfolder` on disk (from the hub: its `files`).
    `flag`: the flag that named the model, for the error messages."""
    if os.path.isdir(model):
        path = os.path.join(model, subfolder)
        if not os.path.isdir(path):
            raise UserError(f"{flag + ' ' if flag else ''}'{model}' has no '{subfolder}/' folder: expected a "
                            f"diffusers-format Wan folder (model_index.json, transformer/, vae/, text_encoder/, "
                            f"tokenizer/)")
        return path
    if os.path.exists(model) or not HUB_ID.fullmatch(model):
        raise UserError(f"model '{model}' is neither a diffusers-format folder nor a hub id like {DEFAULT_MODEL}")
    from huggingface_hub import snapshot_download
    try:
        root = snapshot_download(model, allow_patterns=[f"{subfolder}/{files}"])
    except Exception as e:  # offline, unknown repo, no auth: one message with the way out
        raise UserError(f"could not get '{model}'{' for ' + flag if flag else ''} ({type(e).__name__}); download it "
                        f"with `hf download {model} --local-dir DIR` and pass {flag + ' DIR' if flag else 'that DIR'}"
                        ) from None
    return os.path.join(root, subfolder)


def load_safetensors_folder(folder):
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"no .safetensors weights in '{folder}'")
    state_dict = {}
    for f in files:
        state_dict.update(load_file(os.path.join(folder, f)))
    return state_dict


def read_wan_config(folder):
    """WanConfig of a diffusers `transformer/` folder, or a one-line error for a broken config.json."""
    path = os.path.join(folder, "config.json")
    cfg = read_json(path, "transformer config", fix="download the model's transformer/config.json again")
    try:
        return WanConfig.from_diffusers(cfg)
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"transformer config '{path}' is not a Wan transformer's ({type(e).__name__}: {e}): "
                        f"download the model's transformer/config.json again") from None


def from_pretrained(model=DEFAULT_MODEL, dtype=torch.float32, device="cpu"):
    """The causal transformer with the weights of a diffusers-format Wan (hub id or folder)."""
    folder = resolve_folder(model, "transformer")
    cfg = read_wan_config(folder)
    with torch.device("meta"):
        net = CausalWan(cfg)
    net.load_state_dict(load_safetensors_folder(folder), strict=True, assign=True)
    return cast_model(net, dtype, device)


# -----------------------------------------------------------------------------
# text encoder (UMT5), the trainers' text helpers and the VAE, from the same diffusers-format folder

# Wan 2.1's own negative prompt (its shared_config): the unconditional branch of classifier-free
# guidance in Wan, CausVid and Self Forcing
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
                       "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
                       "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def load_text_encoder(model=DEFAULT_MODEL, dtype=torch.float32, device="cpu"):
    from transformers import AutoTokenizer, UMT5EncoderModel
    tokenizer = AutoTokenizer.from_pretrained(resolve_folder(model, "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(resolve_folder(model, "text_encoder"), dtype=dtype).to(device).eval()
    return tokenizer, encoder.requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts, max_len=512):
    """Prompts -> [B, 512, text_dim], as WanPipeline does: cleaned text, 512 tokens, encoder
    output kept up to the real length (with </s>) and exact zeros after it. The transformer's
    cross-attention has no mask, so the zero rows take part in the softmax, as in training."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    for p in prompts:
        if not p.strip():
            raise UserError("empty prompt: give a text description of the video")
    tok = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_len,
                    truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = tok.input_ids.to(encoder.device), tok.attention_mask.to(encoder.device)
    out = encoder(ids, mask).last_hidden_state
    return out * mask[..., None].to(out.dtype)


@torch.no_grad()
def encode_negative_prompt(tokenizer, encoder, text, max_len=512):
    """[1, 512, text_dim] embedding of a negative prompt. "" (WanPipeline's default) is the encoder
    output of the lone </s> token followed by zeros, not all zeros; encode_prompts refuses "" because
    for a user's prompt it is a mistake, so that case is encoded here the same way."""
    if text.strip():
        return encode_prompts(tokenizer, encoder, [text], max_len)
    tok = tokenizer([""], padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    ids, mask = tok.input_ids.to(encoder.device), tok.attention_mask.to(encoder.device)
    out = encoder(ids, mask).last_hidden_state
    return out * mask[..., None].to(out.dtype)


def text_contexts(model, prompts, device, dtype, negative_prompt=None, progress=True):
    """The trainers' text embeddings, each prompt encoded once at start: {key: prompt} -> ({key:
    embedding [n, text_dim] on the CPU, the zero padding cut off (a 1.4K-prompt set would be 6 GB per
    GPU at 512 x 4096)}, the negative prompt's [1, 512, text_dim] fp32 on `device`, or None). Batches
    of 16 in the order of the keys; the text encoder (UMT5-XXL: 11 GB in bf16) is freed after."""
    from tqdm import tqdm
    tokenizer, encoder = load_text_encoder(model, dtype, device)
    keys = sorted(prompts)
    contexts = {}
    for s in tqdm(range(0, len(keys), 16), desc="text", disable=not progress or len(keys) <= 16):
        emb = encode_prompts(tokenizer, encoder, [prompts[k] for k in keys[s:s + 16]])  # [b, 512, text_dim]
        for k, e in zip(keys[s:s + 16], emb):
            n = int((e.abs().sum(-1) > 0).nonzero().max()) + 1
            contexts[k] = e[:n].cpu().clone()
    uncond = None
    if negative_prompt is not None:
        uncond = encode_negative_prompt(tokenizer, encoder, negative_prompt).float().to(device)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return contexts, uncond


def padded(contexts, keys, device, length=512):
    """The text_contexts of `keys` as a batch [B, 512, text_dim] fp32 on `device`, with exact zeros
    after each prompt, as encode_prompts returns it."""
    return torch.stack([F.pad(contexts[k].float(), (0, 0, 0, length - len(contexts[k]))) for k in keys]).to(device)


def load_vae(model=DEFAULT_MODEL, dtype=torch.float32, device="cpu"):
    from diffusers import AutoencoderKLWan
    vae = AutoencoderKLWan.from_pretrained(resolve_folder(model, "vae"), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def vae_decode(vae, z, first=True):
    """Normalized latents [B, 16, n, h, w] -> pixels [B, 3, T, H, W] in [-1, 1].

    The Wan VAE decodes frame by frame with a causal feature cache. first=False continues the
    cache of the previous call, so decoding a video block by block (streaming) gives the same
    frames as one decode of the whole video: latent frame 0 -> 1 frame, each later one -> 4.
    Follows AutoencoderKLWan._decode, which clears that cache on every call."""
    z = z.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    if first:
        vae.clear_cache()
    x = vae.post_quant_conv(z * std + mean)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        # contiguous: a slice of a several-frame block has other strides than a one-frame block, and
        # torch.compile (--compile-vae) would compile every variant of the decoder twice for that
        frames.append(vae.decoder(x[:, :, i:i + 1].contiguous(), feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=first and i == 0))
    return torch.cat(frames, 2).clamp(-1, 1)
