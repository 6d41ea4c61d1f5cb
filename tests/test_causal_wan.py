"""The model file's numerics on a tiny random Wan: parity with diffusers, the block-causal mask,
KV-cache equivalence, key mapping, long videos."""
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

import causal_wan as cw


def _inputs(model, frames=6, hw=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, hw, hw, generator=g)
    ctx = torch.randn(batch, 12, model.cfg.text_dim, generator=g)
    ctx[:, 9:] = 0  # zero padding as encode_prompts produces
    t = torch.rand(batch, frames, generator=g) * 1000  # a different timestep per frame
    return x, ctx, t


@pytest.fixture(scope="module")
def model(tiny_wan):
    return cw.from_pretrained(tiny_wan).eval()


def test_parity_with_diffusers(tiny_wan, model):
    ref = WanTransformer3DModel.from_pretrained(os.path.join(tiny_wan, "transformer")).eval()
    x, ctx, t = _inputs(model)
    h, w = x.shape[3] // 2, x.shape[4] // 2
    with torch.no_grad():
        ours = model(x, t, model.prompt_kv(ctx))
        # diffusers takes a per-token timestep [B, F*H*W]: repeat each frame's t over its tokens
        theirs = ref(x, t.repeat_interleave(h * w, dim=1), ctx, return_dict=False)[0]
        assert (ours - theirs).abs().max() < 1e-5
        ours1 = model(x, t[:, 0], model.prompt_kv(ctx))
        theirs1 = ref(x, t[:, 0], ctx, return_dict=False)[0]
        assert (ours1 - theirs1).abs().max() < 1e-5
    assert theirs.abs().mean() > 0.1  # the comparison is not between two zero tensors


@pytest.mark.parametrize("block_size", [3, 1])
def test_block_causal_attention_matches_mask(model, block_size):
    attn = model.blocks[0].attn1
    frames, tpf = 6, 16
    x = torch.randn(2, frames * tpf, model.cfg.dim)
    ang = cw.rope_angles(model.cfg.dim // model.cfg.num_heads, frames, 4, 4, 0, "cpu")
    rope = (ang.cos().float()[:, None], ang.sin().float()[:, None])
    with torch.no_grad():
        out, _ = attn(x, rope=rope, block_tokens=block_size * tpf)
        q = cw.apply_rope(attn.norm_q(attn.to_q(x)).unflatten(2, (2, -1)), *rope).transpose(1, 2)
        k = cw.apply_rope(attn.norm_k(attn.to_k(x)).unflatten(2, (2, -1)), *rope).transpose(1, 2)
        v = attn.to_v(x).unflatten(2, (2, -1)).transpose(1, 2)
        mask = cw.block_causal_mask(frames, tpf, block_size)
        ref = attn.to_out[0](F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))
    assert (out - ref).abs().max() < 1e-5
    # the mask itself: block-causal, not frame-causal, not full
    m = mask.view(frames, tpf, frames, tpf)[:, 0, :, 0]
    blocks = torch.arange(frames) // block_size
    assert torch.equal(m, blocks[:, None] >= blocks[None, :])


@pytest.mark.parametrize("block_size", [3, 1])
def test_causality(model, block_size):
    x, ctx, t = _inputs(model)
    kv = model.prompt_kv(ctx)
    x2 = x.clone()
    x2[:, :, block_size:] += torch.randn_like(x2[:, :, block_size:])  # change everything after block 0
    t2 = t.clone()
    t2[:, block_size:] = 1000 - t2[:, block_size:]
    with torch.no_grad():
        a = model(x, t, kv, block_size=block_size)
        b = model(x2, t2, kv, block_size=block_size)
        full_a, full_b = model(x, t, kv), model(x2, t2, kv)
    assert (a[:, :, :block_size] - b[:, :, :block_size]).abs().max() == 0
    assert (a[:, :, block_size:] - b[:, :, block_size:]).abs().max() > 1e-2
    assert (full_a[:, :, :block_size] - full_b[:, :, :block_size]).abs().max() > 1e-3  # full mode does leak


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("block_size", [3, 1])
def test_kv_cache_equals_masked_forward(model, block_size, static):
    x, ctx, t = _inputs(model, frames=7)  # the last block is shorter for block_size 3
    kv = model.prompt_kv(ctx)
    with torch.no_grad():
        masked = model(x, t, kv, block_size=block_size)
        cache = cw.KVCache(len(model.blocks), max_frames=64, static=static)
        cached = [model(x[:, :, s:s + block_size], t[:, s:s + block_size], kv, kv_cache=cache, update_cache=True)
                  for s in range(0, 7, block_size)]
    assert cache.pos == 7
    assert (torch.cat(cached, 2) - masked).abs().max() < 1e-5


def test_rollout_equals_recomputing_the_prefix(model):
    """The cached rollout equals generating each block by running the whole prefix (clean earlier
    blocks at t=0, then the noisy block) through the block-causal forward."""
    x, ctx, _ = _inputs(model, frames=6, batch=1)
    kv = model.prompt_kv(ctx)
    with torch.no_grad():
        fast = cw.rollout(model, x, kv, block_size=3, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        done = []
        for s in range(0, 6, 3):
            xb = x[:, :, s:s + 3]
            for i, tt in enumerate(cw.DENOISING_TIMESTEPS):
                seq = torch.cat(done + [xb], 2)
                t = torch.tensor([[0.0] * s + [tt] * 3])
                x0 = cw.predict_x0(model, seq, t, kv, block_size=3)[:, :, s:]
                if i + 1 < len(cw.DENOISING_TIMESTEPS):
                    sig = cw.DENOISING_TIMESTEPS[i + 1] / 1000
                    xb = (1 - sig) * x0 + sig * torch.randn(x0.shape, generator=g)
            done.append(x0)
    assert (fast - torch.cat(done, 2)).abs().max() < 1e-5


def test_rollout_gradient_only_through_exit_step(model):
    """Self Forcing's self-rollout: the gradient of a loss on the video equals that of a reference,
    written out here with the KV cache, in which each block's steps before its exit step and its
    cache pass run under no_grad and the exit step starts from a detached input.

    Planted in rollout: grad enabled for every denoising step of a block (not only i == last) ->
    a parameter's gradient differs by 69% of its norm (blocks.1.attn1.to_k.bias; here the
    reference's gradients equal the rollout's exactly)."""
    x, ctx, _ = _inputs(model, frames=6, hw=4, batch=1)
    kv = [(k.detach(), v.detach()) for k, v in model.prompt_kv(ctx)]
    exit_steps = [1, 3]
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # loss = sum(weights * video)
    out = cw.rollout(model, x, kv, block_size=3, exit_steps=exit_steps, generator=torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.requires_grad
    (weights * out).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(2)  # the same re-noising draws
    steps = cw.DENOISING_TIMESTEPS
    cache = cw.KVCache(len(model.blocks))  # concatenating, as under grad
    blocks = []
    for b, last in enumerate(exit_steps):
        xb = x[:, :, 3 * b:3 * b + 3]
        with torch.no_grad():  # the steps before the exit step
            for i in range(last):
                x0 = xb - steps[i] / 1000 * model(xb, torch.tensor([steps[i]]), kv, kv_cache=cache)
                s = steps[i + 1] / 1000
                xb = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
        xb = xb.detach()
        x0 = xb - steps[last] / 1000 * model(xb, torch.tensor([steps[last]]), kv, kv_cache=cache)  # with grad
        if b + 1 < len(exit_steps):
            with torch.no_grad():  # the clean pass writes the cache
                model(x0.detach(), torch.zeros(1), kv, kv_cache=cache, update_cache=True)
        blocks.append(x0)
    reference = torch.cat(blocks, 2)
    (weights * reference).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert (out - reference).abs().max() < 1e-5
    assert grads.keys() == ref_grads.keys() and "blocks.0.attn1.to_q.weight" in grads
    relative = {n: ((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item() for n in grads}
    worst = max(relative, key=relative.get)
    assert relative[worst] < 1e-4, (worst, relative[worst])


def test_denoising_timesteps():
    assert [round(t, 1) for t in cw.DENOISING_TIMESTEPS] == [1000.0, 937.5, 833.3, 625.0]


def test_original_layout_round_trip(model):
    sd = model.state_dict()
    orig = cw.diffusers_to_original(sd)
    for key in ["blocks.0.self_attn.q.weight", "blocks.0.cross_attn.o.bias", "blocks.0.norm3.weight",
                "blocks.0.modulation", "blocks.1.ffn.0.weight", "head.modulation", "head.head.weight",
                "time_embedding.0.weight", "time_projection.1.bias", "text_embedding.2.weight",
                "blocks.0.self_attn.norm_k.weight", "patch_embedding.weight"]:
        assert key in orig, key
    assert len(orig) == len(sd)
    back = cw.original_to_diffusers(orig)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # Self Forcing's checkpoint layout: {'generator': {'model.<original key>': ...}, 'generator_ema': ...}
    ckpt = {"generator": {"model." + k: v for k, v in orig.items()},
            "generator_ema": {"model." + k: v + 1 for k, v in orig.items()}}
    loaded = cw.CausalWan(model.cfg)
    loaded.load_state_dict(cw.generator_state_dict(ckpt), strict=True)
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight + 1)  # EMA weights by default
    loaded.load_state_dict(cw.generator_state_dict(ckpt, use_ema=False), strict=True)
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight)


def test_long_video_window_is_bounded(model):
    x, ctx, _ = _inputs(model, frames=30, hw=4, batch=1)
    kv = model.prompt_kv(ctx)
    held = []
    with torch.no_grad():
        out = cw.rollout(model, x, kv, block_size=3, max_frames=9,
                         on_block=lambda b, x0, c: held.append((c.pos, c.frames, c.num_bytes())))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert [p for p, _, _ in held] == list(range(3, 28, 3)) + [27]  # RoPE positions grow (no write after the last block)
    assert max(f for _, f, _ in held) == 6  # sink (3) + recent (3): the next block makes 9
    assert len({nb for _, _, nb in held[2:]}) == 1  # memory flat once the window is full


@pytest.mark.parametrize("frames,block_size,max_frames", [(7, 3, 21), (7, 1, 21), (30, 3, 9), (11, 1, 4), (8, 3, 7)])
def test_in_place_cache_equals_concatenated(model, frames, block_size, max_frames):
    """The preallocated in-place KV cache (inference) gives the rollout of the concatenating one
    (training): short and long videos, window eviction, a shorter last block, frame-wise."""
    x, ctx, _ = _inputs(model, frames=frames, hw=4, batch=1)
    kv = model.prompt_kv(ctx)
    outs, sizes = [], []
    with torch.no_grad():
        for static in (False, True):
            caches = []
            outs.append(cw.rollout(model, x, kv, block_size=block_size, max_frames=max_frames, static_cache=static,
                                   generator=torch.Generator().manual_seed(1), on_block=lambda b, x0, c: caches.append(c)))
            assert caches[0].static is static
            sizes.append(caches[-1].frames)
    assert sizes[0] == sizes[1]
    assert (outs[0] - outs[1]).abs().max() < 1e-6
    assert outs[0].abs().mean() > 0.1


def test_rollout_picks_the_cache_storage(model):
    x, ctx, _ = _inputs(model, frames=6, hw=4, batch=1)
    kv = [(k.detach(), v.detach()) for k, v in model.prompt_kv(ctx)]
    seen = []
    with torch.no_grad():
        cw.rollout(model, x, kv, on_block=lambda b, x0, c: seen.append(c.static))
    cw.rollout(model, x, kv, exit_steps=[0, 0], on_block=lambda b, x0, c: seen.append(c.static))
    assert seen == [True, True, False, False]  # in place without grad, concatenated with grad
    one, sizes = [], []
    with torch.no_grad():
        cw.rollout(model, x[:, :, :3], kv, on_block=lambda b, x0, c: one.append(c.static))
        cw.rollout(model, x, kv, max_frames=21, on_block=lambda b, x0, c: sizes.append(c.num_bytes()))
    assert one == [False]  # a single block reads no cache: nothing is preallocated
    per_frame = 2 * len(model.blocks) * x.shape[3] * x.shape[4] // 4 * model.cfg.dim * x.element_size()
    assert sizes == [6 * per_frame] * 2  # the buffers hold the 6-frame video, not the 21-frame window


def test_vae_streaming_decode_equals_full_decode(tiny_wan):
    vae = cw.load_vae(tiny_wan)
    z = torch.randn(1, 16, 5, 4, 4)
    with torch.no_grad():
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        full = vae.decode(z * std + mean).sample
        parts = [cw.vae_decode(vae, z[:, :, :3], first=True), cw.vae_decode(vae, z[:, :, 3:], first=False)]
    stream = torch.cat(parts, 2)
    assert stream.shape == full.shape == (1, 3, 17, 32, 32)
    assert (stream - full).abs().max() < 1e-5


def test_text_encoding_zero_padding(tiny_wan):
    tok, enc = cw.load_text_encoder(tiny_wan)
    emb = cw.encode_prompts(tok, enc, ["a red fox", "a much longer prompt about a red fox in snow"])
    assert emb.shape == (2, 512, 32)
    n = len(tok("a red fox").input_ids)  # real length including </s>
    assert emb[0, :n].abs().sum(-1).min() > 0 and emb[0, n:].abs().max() == 0
    with pytest.raises(cw.UserError, match="empty prompt"):
        cw.encode_prompts(tok, enc, ["  "])


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(cw.UserError, match="neither a diffusers-format folder nor a hub id"):
        cw.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(cw.UserError, match="has no 'transformer/' folder"):
        cw.from_pretrained(str(tmp_path))


def test_one_block_rollout_is_the_bidirectional_sampler(model):
    """block_size >= F: one block with an empty cache is plain full attention (the 4-step
    bidirectional generator), and the trajectory holds the noisy input of every step."""
    x, ctx, _ = _inputs(model, frames=4, batch=1)
    kv = model.prompt_kv(ctx)
    traj = []
    with torch.no_grad():
        out = cw.rollout(model, x, kv, block_size=4, generator=torch.Generator().manual_seed(0), trajectory=traj)
        g = torch.Generator().manual_seed(0)
        xt, steps = x, []
        for i, tt in enumerate(cw.DENOISING_TIMESTEPS):
            steps.append(xt)
            x0 = cw.predict_x0(model, xt, torch.tensor([tt]), kv)
            if i + 1 < 4:
                s = cw.DENOISING_TIMESTEPS[i + 1] / 1000
                xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    assert (out - x0).abs().max() < 1e-5
    assert len(traj) == 1 and len(traj[0]) == 4
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(traj[0], steps))
