"""The model file's numerics on a tiny random Wan (`pytest tests/test_causal_wan.py`, seconds): the
causal network equals diffusers' WanTransformer3DModel on the same weights (< 1e-5, fp32, per-frame
timesteps); block-causal attention equals SDPA with the block-causal mask; later blocks never change
earlier outputs; the KV-cached rollout equals recomputing the whole prefix; the gradient flows only
through the exit step; the original-layout key map round-trips and loads Self Forcing-style
checkpoints; long videos keep the cache bounded; the in-place (inference) KV cache gives the rollout
of the concatenating (training) one, window eviction included; block-wise VAE decoding equals one
decode; a one-block rollout is the bidirectional sampler; bf16 keeps Wan's fp32 parameters."""
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

import causal_wan as cw
import common
import convert


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
    """Self Forcing's self-rollout with cache_grad="detach": the gradient of a loss on the video equals
    that of a reference, written out here with the KV cache, in which each block's steps before its exit
    step and its cache pass run under no_grad and the exit step starts from a detached input (the default,
    "straight-through", is compared with Self Forcing's own pipeline in tests/test_self_forcing.py).

    Planted in rollout: grad enabled for every denoising step of a block (not only i == last) ->
    a parameter's gradient differs by 69% of its norm (blocks.1.attn1.to_k.bias; here the
    reference's gradients equal the rollout's exactly)."""
    x, ctx, _ = _inputs(model, frames=6, hw=4, batch=1)
    kv = [(k.detach(), v.detach()) for k, v in model.prompt_kv(ctx)]
    exit_steps = [1, 3]
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # loss = sum(weights * video)
    out = cw.rollout(model, x, kv, block_size=3, exit_steps=exit_steps, generator=torch.Generator().manual_seed(2),
                     cache_grad="detach")
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
    orig = convert.diffusers_to_original(sd)
    for key in ["blocks.0.self_attn.q.weight", "blocks.0.cross_attn.o.bias", "blocks.0.norm3.weight",
                "blocks.0.modulation", "blocks.1.ffn.0.weight", "head.modulation", "head.head.weight",
                "time_embedding.0.weight", "time_projection.1.bias", "text_embedding.2.weight",
                "blocks.0.self_attn.norm_k.weight", "patch_embedding.weight"]:
        assert key in orig, key
    assert len(orig) == len(sd)
    back = convert.original_to_diffusers(orig)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # Self Forcing's checkpoint layout: {'generator': {'model.<original key>': ...}, 'generator_ema': ...}
    ckpt = {"generator": {"model." + k: v for k, v in orig.items()},
            "generator_ema": {"model." + k: v + 1 for k, v in orig.items()}}
    loaded = cw.CausalWan(model.cfg)
    loaded.load_state_dict(convert.generator_state_dict(ckpt), strict=True)
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight + 1)  # EMA weights by default
    loaded.load_state_dict(convert.generator_state_dict(ckpt, use_ema=False), strict=True)
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight)


def test_long_video_window_is_bounded(model):
    x, ctx, _ = _inputs(model, frames=30, hw=4, batch=1)
    kv = model.prompt_kv(ctx)
    held = []
    with torch.no_grad():
        out = cw.rollout(model, x, kv, block_size=3, max_frames=9,
                         on_block=lambda b, x0, c: held.append((c.pos, c.frames, c.num_bytes())))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # RoPE positions grow (no write after the last block)
    assert [p for p, _, _ in held] == list(range(3, 28, 3)) + [27]
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
                                   generator=torch.Generator().manual_seed(1),
                                   on_block=lambda b, x0, c: caches.append(c)))
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
    with pytest.raises(common.UserError, match="empty prompt"):
        cw.encode_prompts(tok, enc, ["  "])


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(common.UserError, match="neither a diffusers-format folder nor a hub id"):
        cw.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(common.UserError, match="has no 'transformer/' folder"):
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


# -----------------------------------------------------------------------------
# bf16 as Wan keeps it: the timestep path, modulation tables, affine norms and head stay fp32

# written out here, independently of cw.FP32_PARAMS: diffusers' WanTransformer3DModel._keep_in_fp32_modules
# (time_embedder, scale_shift_table, norm2) and what Wan computes under fp32 autocast (time projection, head)
FP32_NAMES = ("scale_shift_table",
              "condition_embedder.time_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_1.bias",
              "condition_embedder.time_embedder.linear_2.weight", "condition_embedder.time_embedder.linear_2.bias",
              "condition_embedder.time_proj.weight", "condition_embedder.time_proj.bias",
              "proj_out.weight", "proj_out.bias")
FP32_BLOCK_NAMES = ("scale_shift_table", "norm2.weight", "norm2.bias")


def expected_dtype(name):
    block_param = name.split(".", 2)[2] if name.startswith("blocks.") else None
    return torch.float32 if name in FP32_NAMES or block_param in FP32_BLOCK_NAMES else torch.bfloat16


@pytest.fixture(scope="module")
def wide_wan(tmp_path_factory):
    """Wan2.1-1.3B's width (dim 1536, text 4096) with 2 of its 30 layers, random, saved in the
    diffusers format: bf16 rounding at the real width, in seconds."""
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cw.WanConfig(num_layers=2).to_diffusers())
    with torch.no_grad():  # diffusers initializes these to constants; trained weights are not
        for name, p in ref.named_parameters():
            if "scale_shift_table" in name or "norm2.bias" in name:
                p.normal_(0, 0.3)
            elif "norm2.weight" in name:
                p.normal_(1, 0.3)
    folder = tmp_path_factory.mktemp("wide") / "transformer"
    ref.save_pretrained(folder)
    return str(folder.parent)


def test_bf16_keeps_wans_fp32_parameters_and_error(wide_wan):
    """from_pretrained(dtype=bf16) keeps the FP32_PARAMS in fp32 and the output's error against the
    fp32 model is no worse than diffusers' own bf16 error (WanTransformer3DModel.from_pretrained with
    dtype=bf16, i.e. its _keep_in_fp32_modules) on the same weights. Measured: 4.7e-3 vs
    5.6e-3 (our fp32 head is the difference). Planted: cast_model ignoring FP32_PARAMS (the dtype
    check fails, and without it the error, 5.65e-3, exceeds diffusers'); '.norm2.' dropped from
    FP32_PARAMS (the dtype check fails)."""
    folder = os.path.join(wide_wan, "transformer")
    ours16 = cw.from_pretrained(wide_wan, dtype=torch.bfloat16).eval()
    wrong = {n: p.dtype for n, p in ours16.named_parameters() if p.dtype != expected_dtype(n)}
    assert not wrong, wrong
    ours32 = cw.from_pretrained(wide_wan).eval()
    ref32 = WanTransformer3DModel.from_pretrained(folder).eval()
    ref16 = WanTransformer3DModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    x, _, _ = _inputs(ours32, frames=2, hw=8, batch=1)  # 32 tokens, 64 text tokens: bf16 matmuls are slow on a CPU
    ctx = torch.randn(1, 64, 4096, generator=torch.Generator().manual_seed(1))
    ctx[:, 20:] = 0
    t = torch.tensor([937.5])
    with torch.no_grad():
        exact = ref32(x, t, ctx, return_dict=False)[0].float()
        assert (ours32(x, t, ours32.prompt_kv(ctx)) - exact).abs().max() < 1e-4  # the same network in fp32
        def err(out):
            return ((out.float() - exact).norm() / exact.norm()).item()
        ours = err(ours16(x.bfloat16(), t, ours16.prompt_kv(ctx.bfloat16())))
        theirs = err(ref16(x.bfloat16(), t, ctx.bfloat16(), return_dict=False)[0])
    print(f"relative error vs fp32: ours in bf16 {ours:.2e}, diffusers in bf16 {theirs:.2e}")
    assert ours <= theirs


def test_cast_model_keeps_fp32_parameters(model):
    """cast_model is what every bf16 path uses instead of .to(bf16) (sample.py, the ODE teacher)."""
    import copy
    m = cw.cast_model(copy.deepcopy(model), torch.bfloat16)
    assert {n: p.dtype for n, p in m.named_parameters()} == {n: expected_dtype(n) for n, _ in model.named_parameters()}
    same = dict(model.named_parameters())
    # not rounded on the way
    assert all(torch.equal(p, same[n]) for n, p in m.named_parameters() if p.dtype == torch.float32)


def fsdp_bf16_worker(model_dir):
    """Run by test_fsdp_bf16_keeps_fp32_parameters under torchrun (2 CPU ranks, gloo): what the three
    trainers do with bf16 on GPUs (a generator with fp32 master weights, gradient checkpointing, one
    optimizer step; a frozen teacher loaded in bf16), recording the dtype of every parameter as the
    forward sees it (FSDP has gathered and cast it by then) and of the inputs of the fp32 layers."""
    import torch.distributed as dist
    rank, world, device = common.init_distributed()
    seen, fp32_inputs = {}, {}

    def watch(model):
        for name, module in model.named_modules():
            def hook(m, args, name=name):
                for p_name, p in m.named_parameters(recurse=False):
                    seen[f"{name}.{p_name}" if name else p_name] = p.dtype
                if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32:
                    fp32_inputs[name] = args[0].dtype
            module.register_forward_pre_hook(hook)

    torch.manual_seed(0)
    student = cw.from_pretrained(model_dir)
    student.gradient_checkpointing = True
    teacher = cw.from_pretrained(model_dir, torch.bfloat16).requires_grad_(False)
    for net in (student, teacher):
        common.shard_model(net, True, cw.keeps_fp32)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x, ctx, t = _inputs(student, frames=2, batch=1, seed=rank)
    before = {n: p.full_tensor().clone() for n, p in student.named_parameters()}  # sharded (DTensors) until a forward
    for net, grad in ((teacher, False), (student, True)):
        seen.clear(), fp32_inputs.clear()
        watch(net)
        with torch.set_grad_enabled(grad):
            v = net(x, t, net.prompt_kv(ctx), block_size=1)
        wrong = {n: d for n, d in seen.items() if d != expected_dtype(n)}
        assert len(seen) == len(list(net.parameters())) and not wrong, (grad, wrong, len(seen))
        assert fp32_inputs and set(fp32_inputs.values()) == {torch.float32}, fp32_inputs
        assert v.dtype == torch.float32  # the head's output
    (v.float() ** 2).mean().backward()
    opt.step()
    for n, p in student.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad.full_tensor()).all(), n
    assert any(not torch.equal(p.full_tensor(), before[n]) for n, p in student.named_parameters())
    if rank == 0:
        print(f"FSDP bf16: {len(seen)} parameters seen by the forward, "
              f"{sum(d == torch.float32 for d in seen.values())} of them fp32")
    dist.destroy_process_group()


def test_fsdp_bf16_keeps_fp32_parameters(tiny_wan, tmp_path):
    """common.shard_model(bf16=True), which all three trainers call, under torchrun with 2 CPU ranks:
    the forward sees the FP32_PARAMS in fp32 (and feeds fp32 into those layers), everything else
    in bf16, for a trained generator and a frozen bf16 teacher; a training step keeps fp32 master
    weights and gradients. (The trainers use bf16 only on GPUs; this calls the same function with
    bf16=True on the CPU.) Planted: one FSDP unit per block with param_dtype bf16 (as before):
    scale_shift_table and norm2 seen in bf16."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nsys.path[:0] = [{os.path.dirname(here)!r}, {here!r}]\n"
                      f"import test_causal_wan\ntest_causal_wan.fsdp_bf16_worker({tiny_wan!r})\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip().splitlines()[-1])
    assert "parameters seen by the forward" in r.stdout
