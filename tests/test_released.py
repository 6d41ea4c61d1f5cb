"""Released streaming checkpoints run here with their own rules: our rollout (VideoStream with sample.py's --cache and
--steps presets, weights through convert.py) against each project's own inference code, vendored in
tests/vendor/<project> (patched only for the CPU and the tiny shapes; each folder's README says what), on the same
tiny random weights written in that project's checkpoint layout, the same noise and the same re-noising draws (their
scheduler's add_noise is handed ours). Latents, fp32, max |ours - theirs| < 1e-4 (they reach 1e-6 to 3e-6: fp32
rounding, e.g. PEFT's unmerged LoRA against our merged weights, their fp64 complex RoPE against our fp32 tables).

- LongLive v1.0 (NVlabs/LongLive @ e52d9ef): longlive_base.pt ({'generator': 'model.<original Wan name>'}) + lora.pt
  ({'generator_lora': peft.get_peft_model_state_dict's keys}) applied by their loader with PEFT, merged by ours;
  window 12 with a 3-frame sink; prompt switches re-cached their way (global_sink True as released, and False);
  use_infinite_attention (window RoPE).
- Reward Forcing by Lu et al. (JaydenLyh/Reward-Forcing @ 4317f5a): a bare 'model.<original Wan name>' dict; window 9,
  a 3-frame EMA-Sink (alpha 0.999, and 0.5 to see the blend), window RoPE; a 1-frame sink for its overwrite branch.
- Causal Forcing (thu-ml/Causal-Forcing @ 1fc7bbc): {'generator'} or {'generator_ema'} ('model._fsdp_wrapped_module.'
  keys), chunk-wise and frame-wise 4 steps, frame-wise image-to-video, and Causal Forcing++'s 2- and 1-step models
  (the first block on the 4 steps).

The three projects and Self Forcing (tests/test_self_forcing.py, imported at module level) all name their packages
`pipeline`, `utils` (a namespace package) and `wan`: `vendored` imports one project's with no other vendored folder in
sys.path or sys.modules, and puts both back after, so they share a pytest process.
"""
import contextlib
import os
import sys

import imageio
import numpy as np
import pytest
import torch

import causal_wan as cw
import common  # noqa: F401  (first: it filters torchao's import-time messages)
import convert
import sample

VENDOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor")
TINY = dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=32, ffn_dim=64, num_heads=2,
            num_layers=2, text_dim=32, freq_dim=32)  # = cw.WanConfig.tiny()
H = W = 4  # latent height and width: 4 tokens per latent frame
SHAPES = dict(num_transformer_blocks=2, frame_seq_length=4, num_heads=2, head_dim=16)  # their PATCH arguments
FOUR = [1000, 750, 500, 250]


@contextlib.contextmanager
def vendored(project):
    """Import tests/vendor/<project>'s packages alone: the other vendored folders out of sys.path and their modules
    out of sys.modules meanwhile (utils is a namespace package: it would merge every vendored utils/ on the path)."""
    names, path = ("pipeline", "utils", "wan", "demo_utils"), sys.path[:]
    others = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in names}
    sys.path[:] = [os.path.join(VENDOR, project)] + [p for p in path if not os.path.abspath(p).startswith(VENDOR)]
    try:
        yield
    finally:
        sys.path[:] = path
        for k in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[k]
        sys.modules.update(others)


class Args(dict):
    """What OmegaConf gives their code: a dict with attribute access."""
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def their_wrapper(wrapper, models, **model_kwargs):
    """WanDiffusionWrapper(**model_kwargs, is_causal=True) as their pipelines build it, its from_pretrained of the
    full-size folder pointed at the tiny config."""
    for cls in models:
        cls.from_pretrained = classmethod(lambda cls, *a, **kw: cls(**TINY, **kw))
    try:
        return wrapper(**model_kwargs, is_causal=True)
    finally:
        for cls in models:
            del cls.from_pretrained


def released_layout(model, prefix="model."):
    """Our weights as their WanDiffusionWrapper's state dict: `prefix` + the original Wan names."""
    return {prefix + k: v for k, v in convert.diffusers_to_original(model.state_dict()).items()}


def our_draws(pipeline, seed=7):
    """Their add_noise gets, between denoising steps, what VideoStream draws there: torch.randn([B, C, n, H, W]) from
    one generator (theirs [B*n, C, H, W])."""
    g, real = torch.Generator().manual_seed(seed), pipeline.scheduler.add_noise

    def add_noise(x0, noise, t):
        eps = torch.randn((1, x0.shape[1], x0.shape[0], *x0.shape[2:]), generator=g).permute(0, 2, 1, 3, 4)
        return real(x0, eps.flatten(0, 1).to(x0.dtype), t)
    pipeline.scheduler.add_noise = add_noise


class Encoder(torch.nn.Module):  # their text encoder: prompt -> {'prompt_embeds': [1, 512, text_dim]}
    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, text_prompts):
        return {"prompt_embeds": torch.cat([self.table[p] for p in text_prompts])}


class Latents(torch.nn.Module):  # their VAE: the comparison is on latents
    def decode_to_pixel(self, latent, use_cache=False):
        return latent

    decode_to_pixel_chunk = decode_to_pixel


def inputs(frames, prompts=1, seed=3):
    """Noise [1, C, F, H, W] and prompt embeddings {name: [1, 512, text_dim]}, zeros after 7 + i tokens."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, frames, H, W, generator=g)
    table = {f"prompt {i}": torch.zeros(1, 512, TINY["text_dim"]) for i in range(prompts)}
    for i, e in enumerate(table.values()):
        e[:, :7 + i] = torch.randn(1, 7 + i, TINY["text_dim"], generator=g)
    return noise, table


@torch.no_grad()
def ours(model, noise, table, switches=(), block=3, prefix=None, **options):
    """VideoStream over `noise`, switching to the next prompt at the first block boundary at or after each latent
    index in `switches` (their rule), after `prefix` if given (image-to-video)."""
    prompts, g = list(table.values()), torch.Generator().manual_seed(7)
    start = 0 if prefix is None else prefix.shape[2]
    stream = cw.VideoStream(model, model.prompt_kv(prompts[0]), block, total_frames=start + noise.shape[2], **options)
    out, switches = [] if prefix is None else [prefix], list(switches)
    if prefix is not None:
        stream.prefill(prefix)
    for s in range(0, noise.shape[2], block):
        if switches and start + s >= switches[0]:
            switches.pop(0)
            stream.set_prompt(model.prompt_kv(prompts[len(prompts) - 1 - len(switches)]))
        out.append(stream.next_block(noise[:, :, s:s + block], g))
    return torch.cat(out, 2)


def diff(a, b):
    return (a - b).abs().max().item()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return cw.CausalWan(cw.WanConfig.tiny())


# -----------------------------------------------------------------------------
# LongLive v1.0

LONGLIVE_FRAMES, LONGLIVE_SWITCHES = 30, [6, 12, 21]  # before the window fills, when it is full, after evictions


def longlive_config(global_sink=True, infinity=False):
    """configs/longlive_interactive_inference.yaml (its model part = longlive_inference.yaml's; infinity:
    longlive_inference_infinity.yaml's use_infinite_attention), + the PATCH arguments for the tiny shapes."""
    return Args(denoising_step_list=FOUR, warp_denoising_step=True, num_frame_per_block=3, model_name="Wan2.1-T2V-1.3B",
                model_kwargs=Args(local_attn_size=12, timestep_shift=5.0, sink_size=3,
                                  **(dict(use_infinite_attention=True) if infinity else {})),
                use_ema=False, global_sink=global_sink, context_noise=0,
                adapter=Args(type="lora", rank=256, alpha=256, dropout=0.0, dtype="bfloat16", verbose=False), **SHAPES)


def longlive_modules():
    import peft
    from pipeline import CausalInferencePipeline, InteractiveCausalInferencePipeline
    from utils.lora_utils import configure_lora_for_model
    from utils.wan_wrapper import WanDiffusionWrapper
    from wan.modules.causal_model import CausalWanModel
    from wan.modules.causal_model_infinity import CausalWanModel as CausalWanModelInfinity
    models = (CausalWanModel, CausalWanModelInfinity)
    return (peft, CausalInferencePipeline, InteractiveCausalInferencePipeline, configure_lora_for_model,
            lambda cfg: their_wrapper(WanDiffusionWrapper, models, **cfg.model_kwargs))


@pytest.fixture(scope="module")
def longlive(tmp_path_factory):
    """longlive_base.pt and lora.pt in LongLive's layout (the LoRA made by their configure_lora_for_model and saved
    as their trainer saves it), and our model: the base through convert.load_generator_weights, the LoRA merged by
    convert.merge_lora (what sample.py --checkpoint longlive_base.pt --lora lora.pt loads)."""
    pytest.importorskip("peft", reason="LongLive applies its LoRA with PEFT (pip install -r requirements.txt)")
    folder = tmp_path_factory.mktemp("longlive")
    base, lora = str(folder / "longlive_base.pt"), str(folder / "lora.pt")
    torch.save({"generator": released_layout(tiny_model())}, base)
    with vendored("longlive"):
        peft, _, _, configure_lora, wrapper = longlive_modules()
        cfg = longlive_config()
        gen = wrapper(cfg)
        gen.load_state_dict(torch.load(base)["generator"])
        lora_model = configure_lora(gen.model, model_name="generator", lora_config=cfg.adapter, is_main_process=False)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # PEFT starts from B = 0 (no change): random A and B instead
            for name, p in lora_model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        torch.save({"generator_lora": peft.get_peft_model_state_dict(lora_model), "critic_lora": {}, "step": 0}, lora)
    model = convert.load_generator_weights(cw.CausalWan(cw.WanConfig.tiny()), base, use_ema=False)
    plain = convert.load_generator_weights(cw.CausalWan(cw.WanConfig.tiny()), base, use_ema=False)
    return base, lora, convert.merge_lora(model, convert.load_lora(lora)), plain


@torch.no_grad()
def longlive_run(base, lora, switch, global_sink=True, infinity=False):
    """Their CausalInferencePipeline (one prompt) or InteractiveCausalInferencePipeline (4 prompts, switches at
    LONGLIVE_SWITCHES), the weights loaded as inference.py loads them (base strictly, then the LoRA with PEFT,
    unmerged), fp32 (without its final .to(bfloat16))."""
    noise, table = inputs(LONGLIVE_FRAMES, prompts=4 if switch else 1)
    with vendored("longlive"):
        peft, single, interactive, configure_lora, wrapper = longlive_modules()
        cfg = longlive_config(global_sink, infinity)
        pipeline = (interactive if switch else single)(cfg, device=torch.device("cpu"), generator=wrapper(cfg),
                                                       text_encoder=Encoder(table), vae=Latents())
        pipeline.generator.load_state_dict(torch.load(base)["generator"])
        pipeline.generator.model = configure_lora(pipeline.generator.model, model_name="generator",
                                                  lora_config=cfg.adapter, is_main_process=False)
        peft.set_peft_model_state_dict(pipeline.generator.model, torch.load(lora)["generator_lora"])
        our_draws(pipeline)
        theirs = noise.permute(0, 2, 1, 3, 4).contiguous()  # [B, F, C, H, W]
        if switch:
            _, latents = pipeline.inference(theirs, text_prompts_list=[[p] for p in table],
                                            switch_frame_indices=LONGLIVE_SWITCHES, return_latents=True)
        else:
            _, latents = pipeline.inference(theirs, text_prompts=list(table), return_latents=True)
    return latents.permute(0, 2, 1, 3, 4), noise, table


@pytest.mark.parametrize("cache, switch, global_sink, static", [
    ("longlive", False, True, True),
    ("longlive", True, True, True),
    ("longlive", True, True, False),  # the concatenating cache (training's)
    ("longlive", True, False, True),
    ("longlive-infinity", False, True, True),
    ("longlive-infinity", True, True, True),
])
def test_longlive(longlive, cache, switch, global_sink, static):
    """sample.py --checkpoint longlive_base.pt --lora lora.pt --cache longlive[-infinity] [--switch ...] = LongLive's
    own inference: the window of 12 with its 3-frame sink filling and evicting (10 blocks), its re-cache at switches
    before the window is full, when it is full and after evictions, with the sink kept (global_sink, released) or
    re-encoded; infinity: RoPE over the window's slots.
    Checked here to differ: the base without the LoRA (3.4e-1); our replayed re-cache instead of theirs (3.3e-3; 4.2e-2
    without global_sink); global_sink flipped (4.2e-2); absolute RoPE for the infinity config (3.3e-2); (our default
    window of 21: 6.1e-2). Planted, and failed: in convert.merge_lora a scale of 1/2 (all 6 cases and
    test_lora_merge_equals_peft); in VideoStream._recache_longlive the sink re-encoded although global_sink (the 3
    cases with switches and global_sink); in VideoStream._hold only the frames the cache holds (the 4 switch cases:
    the re-encoded frames are not held); in KVCache.evict window RoPE without rotating the moved keys (both infinity
    cases)."""
    base, lora, model, plain = longlive
    theirs, noise, table = longlive_run(base, lora, switch, global_sink, infinity=cache.endswith("infinity"))
    switches = LONGLIVE_SWITCHES if switch else ()
    options = dict(sample.CACHES[cache], global_sink=global_sink, static=static)
    err = diff(ours(model, noise, table, switches, **options), theirs)
    print(f"LongLive {cache} switch={switch} global_sink={global_sink} static={static}: max |ours - theirs| {err:.1e}")
    assert err < 1e-4
    if switch and global_sink and static:  # the re-cache and the LoRA are what make it match
        assert diff(ours(model, noise, table, switches, **dict(options, recache="replay")), theirs) > 1e-3
        assert diff(ours(plain, noise, table, switches, **options), theirs) > 1e-3
        assert diff(ours(model, noise, table, switches, **dict(options, global_sink=False)), theirs) > 1e-3
    if cache.endswith("infinity") and not switch:
        assert diff(ours(model, noise, table, **dict(options, rope="absolute")), theirs) > 1e-3


def test_lora_merge_equals_peft(tmp_path):
    """convert.merge_lora (W += alpha / r B @ A, merged in fp32) = PEFT's LoRA, unmerged, on our model's linear layers
    in diffusers' names (LongLive's LoRA is in the original Wan names: test_longlive), with alpha != r (LongLive's is
    alpha = r = 256, a scale of 1): the forward outputs agree to fp32 rounding. A key that is no LoRA weight, a missing
    lora_B, a module the model lacks and a file without LoRA weights are one-line errors."""
    peft = pytest.importorskip("peft", reason="pip install -r requirements.txt")
    model = tiny_model()
    x, t, context = torch.randn(1, 16, 3, H, W), torch.tensor([500.0]), torch.randn(1, 7, 32)
    wrapped = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_v",
                                                                                                   "proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        lora = peft.get_peft_model_state_dict(wrapped)
        reference = wrapped(x, t, wrapped.prompt_kv(context))
        merged = convert.merge_lora(model, lora, alpha=12)
        assert diff(merged(x, t, merged.prompt_kv(context)), reference) < 1e-5
        scale_one = convert.merge_lora(tiny_model(), lora)  # alpha = r: a scale of 1, not 3
        assert diff(scale_one(x, t, scale_one.prompt_kv(context)), reference) > 1e-3
    key = next(k for k in lora if "lora_B" in k)
    for bad, message in [({"blocks.0.attn1.to_q.weight": lora[key]}, "is not a LoRA weight"),
                         ({k: v for k, v in lora.items() if k != key}, "has no lora_B"),
                         ({k.replace("to_q", "to_z"): v for k, v in lora.items()}, "is not a weight of the generator")]:
        with pytest.raises(common.UserError, match=message):
            convert.merge_lora(tiny_model(), bad)
    torch.save({"step": 1}, tmp_path / "not_lora.pt")
    with pytest.raises(common.UserError, match="holds no LoRA weights"):
        convert.load_lora(str(tmp_path / "not_lora.pt"))


# -----------------------------------------------------------------------------
# Reward Forcing (Lu et al.)

@pytest.fixture(scope="module")
def reward_forcing(tmp_path_factory):
    """rewardforcing.pt as their inference.py loads it: a bare WanDiffusionWrapper state dict."""
    path = str(tmp_path_factory.mktemp("reward_forcing") / "rewardforcing.pt")
    torch.save(released_layout(tiny_model()), path)
    return path, convert.load_generator_weights(cw.CausalWan(cw.WanConfig.tiny()), path)


@torch.no_grad()
def reward_forcing_run(path, sink_size=3, alpha=None):
    """Their CausalInferencePipeline (configs/reward_forcing.yaml over default_config.yaml: window 9, sink 3; the
    EMA-Sink's compression_alpha is CausalWanSelfAttention's default 0.999) on 30 latent frames, 10 blocks."""
    noise, table = inputs(30)
    with vendored("reward_forcing_lu"):
        from pipeline import CausalInferencePipeline
        from utils.wan_wrapper import WanDiffusionWrapper
        from wan.modules.causal_model import CausalWanModel, CausalWanSelfAttention
        cfg = Args(denoising_step_list=FOUR, warp_denoising_step=True, num_frame_per_block=3, context_noise=0,
                   independent_first_frame=False, checkpoint_path="checkpoints",
                   model_kwargs=Args(timestep_shift=5.0, local_attn_size=9, sink_size=sink_size), **SHAPES)
        gen = their_wrapper(WanDiffusionWrapper, [CausalWanModel], checkpoint_path=cfg.checkpoint_path,
                            **cfg.model_kwargs)
        for m in gen.model.modules():
            if isinstance(m, CausalWanSelfAttention):
                m.max_attention_size = m.local_attn_size * SHAPES["frame_seq_length"]  # was local_attn_size * 1560
                m.compression_alpha = m.compression_alpha if alpha is None else alpha
        pipeline = CausalInferencePipeline(cfg, device=torch.device("cpu"), generator=gen, text_encoder=Encoder(table),
                                           vae=Latents())
        pipeline.generator.load_state_dict(torch.load(path))  # inference.py, strict
        our_draws(pipeline)
        _, latents = pipeline.inference(noise=noise.permute(0, 2, 1, 3, 4).contiguous(), text_prompts=list(table),
                                        return_latents=True)
    return latents.permute(0, 2, 1, 3, 4), noise, table


@pytest.mark.parametrize("sink_size, alpha, static", [(3, None, True), (3, None, False), (3, 0.5, True),
                                                      (1, None, True)])
def test_reward_forcing(reward_forcing, sink_size, alpha, static):
    """sample.py --checkpoint rewardforcing.pt --cache reward-forcing = Lu et al.'s own inference: window 9, the
    3-frame EMA-Sink blending every evicted block (from block 3 on), RoPE over the window's slots; alpha 0.5 checks the
    blend itself (at 0.999 it moves these latents by 4e-3 only); a 1-frame sink takes their other branch (the sink
    replaced by the first evicted frame).
    Checked here to differ: the blend off (4.8e-2 at alpha 0.5; 6.1e-4 at 0.999); absolute RoPE (2.7e-2); (our default
    cache: 8.4e-2). Planted in KVCache.evict, and failed: the moved keys not rotated (all 4 cases); the evicted keys
    blended without moving them to the sink's slots (all 4); the newest frames blended instead of the evicted ones
    (all 4); a = alpha in the overwrite branch (the 1-frame sink)."""
    path, model = reward_forcing
    theirs, noise, table = reward_forcing_run(path, sink_size, alpha)
    options = dict(sample.CACHES["reward-forcing"], sink_frames=sink_size, static=static)
    options["sink_ema"] = alpha or options["sink_ema"]
    err = diff(ours(model, noise, table, **options), theirs)
    print(f"Reward Forcing sink {sink_size} alpha {options['sink_ema']} static={static}: max |ours - theirs| {err:.1e}")
    assert err < 1e-4
    if alpha is not None:
        assert diff(ours(model, noise, table, **dict(options, sink_ema=None)), theirs) > 1e-3
    if sink_size == 3 and alpha is None and static:
        assert diff(ours(model, noise, table, **dict(options, rope="absolute", sink_ema=None)), theirs) > 1e-3


# -----------------------------------------------------------------------------
# Causal Forcing

@torch.no_grad()
def causal_forcing_run(path, key, steps, block, first=None, image=False):
    """Their CausalInferencePipeline (configs/causal_forcing_dmd_{chunkwise,framewise,framewise_2step,framewise_1step}
    .yaml: no sink, no window, a 21-frame cache) on 21 latent frames, the checkpoint loaded as their inference.py
    loads it ('generator_ema' with --use_ema, FSDP's prefix dropped); image: one clean latent first (--i2v)."""
    noise, table = inputs(21 - image)
    initial = torch.randn(1, 1, 16, H, W, generator=torch.Generator().manual_seed(5)) if image else None
    with vendored("causal_forcing"):
        from pipeline.causal_inference import CausalInferencePipeline
        from utils.wan_wrapper import WanDiffusionWrapper
        from wan.modules.causal_model import CausalWanModel
        cfg = Args(denoising_step_list=steps, warp_denoising_step=True, num_frame_per_block=block, context_noise=0,
                   independent_first_frame=False, denoising_step_list_first_chunk=first, kv_cache_size=21 * 4,
                   model_kwargs=Args(timestep_shift=5.0), **SHAPES)
        pipeline = CausalInferencePipeline(cfg, device="cpu", text_encoder=Encoder(table), vae=Latents(),
                                           generator=their_wrapper(WanDiffusionWrapper, [CausalWanModel],
                                                                   **cfg.model_kwargs))
        state_dict = torch.load(path)[key]
        pipeline.generator.load_state_dict({k.replace("model._fsdp_wrapped_module.", "model.", 1): v
                                            for k, v in state_dict.items()})
        our_draws(pipeline)
        _, latents = pipeline.inference(noise=noise.permute(0, 2, 1, 3, 4).contiguous(), text_prompts=list(table),
                                        initial_latent=initial, return_latents=True)
    return latents.permute(0, 2, 1, 3, 4), noise, table, None if initial is None else initial.permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("name, key, steps, block, image", [
    ("chunk-wise (and the ODE init)", "generator", 4, 3, False),
    ("frame-wise", "generator_ema", 4, 1, False),
    ("frame-wise image-to-video", "generator_ema", 4, 1, True),
    ("Causal Forcing++ 2-step", "generator_ema", 2, 1, False),
    ("Causal Forcing++ 1-step", "generator_ema", 1, 1, False),
])
def test_causal_forcing(name, key, steps, block, image, tmp_path):
    """sample.py --checkpoint <theirs> [--chunk 1] [--steps 2|1] [--image] = Causal Forcing's own inference: their
    checkpoints load as they are (convert.load_generator_weights) and run with our default cache; the 2- and 1-step
    models need --steps (their first block on the 4 steps: VideoStream's first_timesteps).
    Checked here to differ: --steps 2 without the 4-step first block (6.0; 1 step: 3.9). Planted in
    VideoStream.next_block, and failed: the first schedule for every block, and first_timesteps ignored (the 2- and
    1-step cases)."""
    path = str(tmp_path / f"{key}.pt")
    prefix = "model._fsdp_wrapped_module." if key == "generator_ema" else "model."  # EMA_FSDP's names
    torch.save({key: released_layout(tiny_model(), prefix)}, path)
    schedule = {4: FOUR, 2: [1000, 500], 1: [1000]}[steps]
    theirs, noise, table, initial = causal_forcing_run(path, key, schedule, block, FOUR if steps < 4 else None, image)
    model = convert.load_generator_weights(cw.CausalWan(cw.WanConfig.tiny()), path)
    err = diff(ours(model, noise, table, block=block, prefix=initial, **sample.STEPS[steps]), theirs)
    print(f"Causal Forcing {name}: max |ours - theirs| {err:.1e}")
    assert err < 1e-4
    if steps == 2:
        assert diff(ours(model, noise, table, block=block, timesteps=sample.STEPS[2]["timesteps"]), theirs) > 1


# -----------------------------------------------------------------------------
# the flags

@pytest.mark.parametrize("flags, options", [
    (["--cache", "longlive", "--lora", "LORA", "--switch", "61", "after the window"],
     dict(sample.CACHES["longlive"], timesteps=cw.DENOISING_TIMESTEPS)),
    (["--cache", "reward-forcing"], dict(sample.CACHES["reward-forcing"])),
    (["--chunk", "1", "--steps", "2"], dict(max_frames=21, **sample.STEPS[2])),
    (["--cache", "longlive-infinity", "--extend", "CLIP", "--switch", "70", "x"],
     dict(sample.CACHES["longlive-infinity"])),
])
def test_sample_py_passes_the_released_rules_on(tiny_wan, tmp_path, monkeypatch, flags, options):
    """sample.py --checkpoint (a LongLive-layout file: {'generator': 'model.<original Wan>'}) with --cache, --lora
    (merged into the generator it runs), --steps and --extend (a 61-frame clip: past LongLive's window, then a
    block and a switch) on the tiny Wan: the mp4 has its 81 frames, and every VideoStream it makes gets the preset's
    options.
    Planted: FrameStream not passing its options on (all 4 fail); VideoStream._replay not evicting after it replays
    LongLive's held frames (the --extend case: its next block does not fit the cache)."""
    torch.save({"generator": released_layout(cw.from_pretrained(tiny_wan))}, tmp_path / "base.pt")
    lora = {f"base_model.model.blocks.{i}.self_attn.q.lora_{ab}.weight": torch.randn(shape) * 0.1
            for i in range(2) for ab, shape in [("A", (4, 32)), ("B", (32, 4))]}
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 0}, tmp_path / "lora.pt")
    expected = convert.merge_lora(cw.from_pretrained(tiny_wan), lora).blocks[1].attn1.to_q.weight
    made = []
    real = cw.VideoStream.__init__

    def spy(self, model, prompt_kv, block_size=3, max_frames=21, timesteps=cw.DENOISING_TIMESTEPS, **kw):
        made.append(dict(kw, max_frames=max_frames, timesteps=timesteps, weight=model.blocks[1].attn1.to_q.weight))
        real(self, model, prompt_kv, block_size, max_frames, timesteps, **kw)
    monkeypatch.setattr(cw.VideoStream, "__init__", spy)
    with imageio.get_writer(tmp_path / "clip.mp4", fps=16, macro_block_size=1) as w:
        for i in range(61):
            w.append_data(np.full((32, 32, 3), 4 * i, np.uint8))
    flags = [str(tmp_path / {"LORA": "lora.pt", "CLIP": "clip.mp4"}[f]) if f in ("LORA", "CLIP") else f for f in flags]
    sample.main(sample.parse_args(["--tiny", "--model", tiny_wan, "--checkpoint", str(tmp_path / "base.pt"),
                                   "--prompt", "a fox", "--frames", "81", "--height", "32", "--width", "32",
                                   "--out", str(tmp_path / "fox.mp4"), *flags]))
    with imageio.get_reader(tmp_path / "fox.mp4") as r:
        assert r.count_frames() == 81
    assert made and all({k: m[k] for k in options} == options for m in made), made[0]
    assert torch.equal(made[0]["weight"], expected) == ("--lora" in flags)
