"""Our self-rollout against Self Forcing's own training pipeline (tests/vendor/self_forcing: its
pipeline/self_forcing_training.py and wan/modules/causal_model.py at commit 33593df, patched only for the
CPU and tiny shapes), on the same tiny random weights, noise, exit steps and re-noising draws.

Self Forcing's exit step writes its keys/values into the KV cache buffer in place with grad on; the clean
t = 0 pass overwrites them under no_grad, which leaves the autograd graph attached. So later blocks attend
to the clean keys/values in the forward, and their gradient reaches every earlier block's exit-step
keys/values (straight-through). causal_wan.rollout's default, cache_grad="straight-through", computes that
gradient; cache_grad="detach" drops the term. Parameter gradients, relative L2 over all parameters:
ours (straight-through) vs theirs < 1e-4, for a loss on the last block and on all frames, with and without
our activation checkpointing; ours (detach) differs from theirs by percents (4-6% on these weights) and
equals theirs with a detached cache.

Their clean pass is given x0 itself: upstream adds sigma = 0.00498 of fresh noise to it (context_noise = 0
is a timestep that add_noise rounds to the scheduler's 4.98) while telling the model t = 0; ours runs
x0 at t = 0 (NoiseFeed below; a difference of 3e-4 to 7e-4 in later blocks with upstream's noise)."""
import contextlib
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

import causal_wan as cw
import common  # noqa: F401  (first: it filters torchao's import-time messages)
from convert import diffusers_to_original

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor", "self_forcing"))
from pipeline.self_forcing_training import SelfForcingTrainingPipeline  # noqa: E402
from utils.wan_wrapper import WanDiffusionWrapper  # noqa: E402
from wan.modules.causal_model import CausalWanModel  # noqa: E402

TINY = dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, dim=32, ffn_dim=64, num_heads=2,
            num_layers=2, text_dim=32, freq_dim=32)  # = cw.WanConfig.tiny()
H = W = 4  # latent height and width: 4 tokens per latent frame


def their_generator(ours):
    """WanDiffusionWrapper(timestep_shift=5, is_causal=True) around a CausalWanModel holding our weights
    (original Wan names, loaded strictly), with gradient checkpointing on as their training runs it (without
    it their backward fails on the in-place cache writes). The wrapper's __init__ runs as written; only
    its from_pretrained of the full-size folder is pointed at the tiny model."""
    model = CausalWanModel(**TINY)
    model.load_state_dict(diffusers_to_original(ours.state_dict()), strict=True)
    CausalWanModel.from_pretrained = classmethod(lambda cls, *a, **k: model)
    try:
        gen = WanDiffusionWrapper(timestep_shift=5.0, is_causal=True)
    finally:
        del CausalWanModel.from_pretrained
    gen.model.num_frame_per_block = 3  # model/dmd.py
    gen.model.gradient_checkpointing = True  # = generator.enable_gradient_checkpointing() under their diffusers 0.31
    return gen


def their_pipeline(gen):
    """model/base.py's _initialize_inference_pipeline with configs/self_forcing_dmd.yaml: steps [1000, 750,
    500, 250] warped with the scheduler (shift 5), blocks of 3 latent frames, 21 frames at most, context
    noise 0; plus the PATCH arguments for the tiny shapes."""
    scheduler = gen.get_scheduler()
    timesteps = torch.cat((scheduler.timesteps.cpu(), torch.tensor([0], dtype=torch.float32)))
    return SelfForcingTrainingPipeline(
        denoising_step_list=timesteps[1000 - torch.tensor([1000, 750, 500, 250])], scheduler=scheduler,
        generator=gen, num_frame_per_block=3, independent_first_frame=False, same_step_across_blocks=False,
        last_step_only=False, num_max_frames=21, context_noise=0, num_transformer_blocks=TINY["num_layers"],
        frame_seq_length=(H // 2) * (W // 2), num_heads=TINY["num_heads"], head_dim=TINY["dim"] // TINY["num_heads"])


@contextlib.contextmanager
def exit_steps_drawn(exit_steps):
    """Their generate_and_sync_list draws the exit steps with one torch.randint (then broadcasts them): it
    gets `exit_steps` instead."""
    real = torch.randint

    def draw(*args, low, high, size, device=None):
        assert size == (len(exit_steps),)
        return torch.tensor(exit_steps, device=device)
    torch.randint = draw
    try:
        yield
    finally:
        torch.randint = real


@contextlib.contextmanager
def our_noise(pipeline, generator):
    """Their add_noise gets, between denoising steps, the values our rollout draws from `generator` at the
    same points (torch.randn([B, C, n, H, W]) there, [B*n, C, H, W] here), and for the clean pass returns
    x0 itself (see the module docstring)."""
    real = pipeline.scheduler.add_noise

    def add_noise(x0, noise, timestep):  # x0 [B*n, C, H, W]
        if bool((timestep == pipeline.context_noise).all()):
            return x0.type_as(noise)
        n, C = x0.shape[:2]
        eps = torch.randn((1, C, n, *x0.shape[2:]), generator=generator).permute(0, 2, 1, 3, 4).flatten(0, 1)
        return real(x0, eps, timestep)
    pipeline.scheduler.add_noise = add_noise
    try:
        yield
    finally:
        del pipeline.scheduler.add_noise


class DetachedCache(torch.nn.Module):
    """Their generator with the cache detached after each clean pass: what cache_grad="detach" computes."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def get_scheduler(self):
        return self.gen.get_scheduler()

    def forward(self, *args, **kwargs):
        out = self.gen(*args, **kwargs)
        if not torch.is_grad_enabled() and bool((kwargs["timestep"] == 0).all()):
            for c in kwargs["kv_cache"]:
                c["k"], c["v"] = c["k"].detach(), c["v"].detach()
        return out


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """Their pipeline broadcasts the exit steps from rank 0: a group of one process (gloo) makes it a no-op."""
    if dist.is_initialized():
        yield
        return
    path = tempfile.mktemp(prefix="sf_gloo_")
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def setup(frames=9, seed=0):
    """Our tiny model (its own init) and the inputs: noise [1, 16, F, H, W], a 7-token prompt zero-padded to
    512 as both models see it, fixed loss weights."""
    torch.manual_seed(seed)
    ours = cw.CausalWan(cw.WanConfig.tiny())
    g = torch.Generator().manual_seed(1234 + seed)
    noise = torch.randn(1, 16, frames, H, W, generator=g)
    text = torch.zeros(1, 512, 32)
    text[:, :7] = torch.randn(1, 7, 32, generator=g)
    weights = torch.randn(1, 16, frames, H, W, generator=g)
    return ours, noise, text, weights


def our_gradient(ours, noise, text, weights, exit_steps, cache_grad, checkpointing=False):
    """(video, parameter gradients in original Wan names) of loss = sum(weights * video)."""
    ours.zero_grad(set_to_none=True)
    ours.gradient_checkpointing = checkpointing
    video = cw.rollout(ours, noise, ours.prompt_kv(text), block_size=3, exit_steps=exit_steps,
                       generator=torch.Generator().manual_seed(7), cache_grad=cache_grad)
    (weights * video).sum().backward()
    return video.detach(), diffusers_to_original({n: p.grad.clone() for n, p in ours.named_parameters()})


def their_gradient(gen, noise, text, weights, exit_steps, detached=False):
    gen.model.zero_grad(set_to_none=True)
    pipeline = their_pipeline(gen)
    if detached:
        pipeline.generator = DetachedCache(gen)
    with exit_steps_drawn(exit_steps), our_noise(pipeline, torch.Generator().manual_seed(7)):
        video, _, _ = pipeline.inference_with_trajectory(noise=noise.permute(0, 2, 1, 3, 4).contiguous(),
                                                         prompt_embeds=text[:, :7])
    video = video.permute(0, 2, 1, 3, 4)  # [B, F, C, H, W] -> ours [B, C, F, H, W]
    (weights * video).sum().backward()
    return video.detach(), {n: p.grad.clone() for n, p in gen.model.named_parameters()}


def relative(a, b):
    flat = lambda g: torch.cat([g[k].flatten().double() for k in sorted(b)])  # noqa: E731
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


@pytest.mark.parametrize("loss", ["last block", "all frames"])
def test_gradient_through_the_kv_cache_is_self_forcing_s(loss):
    ours, noise, text, weights = setup()
    if loss == "last block":
        weights[:, :, :-3] = 0
    exit_steps = [3, 1, 2]  # a different exit step per block: each block's exit-step graph is its own
    gen = their_generator(ours)
    theirs, g_theirs = their_gradient(gen, noise, text, weights, exit_steps)
    _, g_theirs_detached = their_gradient(gen, noise, text, weights, exit_steps, detached=True)
    video, g_ours = our_gradient(ours, noise, text, weights, exit_steps, "straight-through")
    _, g_ours_checkpointed = our_gradient(ours, noise, text, weights, exit_steps, "straight-through",
                                          checkpointing=True)
    _, g_detached = our_gradient(ours, noise, text, weights, exit_steps, "detach")
    forward = (video - theirs).abs().max().item()
    print(f"{loss}: forward {forward:.1e}; gradients vs theirs: straight-through {relative(g_ours, g_theirs):.1e} "
          f"(checkpointed {relative(g_ours_checkpointed, g_theirs):.1e}), detach {relative(g_detached, g_theirs):.3f} "
          f"(vs theirs detached {relative(g_detached, g_theirs_detached):.1e})")
    assert forward < 1e-5
    assert relative(g_ours, g_theirs) < 1e-4 and relative(g_ours_checkpointed, g_theirs) < 1e-4
    assert relative(g_detached, g_theirs) > 1e-2  # the term the detached cache drops
    assert relative(g_detached, g_theirs_detached) < 1e-4
