"""GPU checks: the optimized sampling paths against the plain one at full size in bf16, and the
causal network against diffusers' in bf16. Skipped without CUDA (so in CI); written for the first
session with a GPU (`python -m pytest -q tests/test_gpu.py`, a few minutes on one H100).

RF_TEST_GPU_ON_CPU=1 runs the same checks on the CPU with 2 of the 30 layers at 64x64, only to
check the tests themselves."""
import os

import pytest
import torch

import causal_wan as cw
import sample

ON_CPU = os.environ.get("RF_TEST_GPU_ON_CPU") == "1"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a GPU")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def setup():
    """Wan2.1-1.3B (random weights) in bf16 with diffusers' copy, the Wan VAE in fp32, a prompt."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    torch.manual_seed(0)
    cfg = cw.WanConfig(num_layers=2) if ON_CPU else cw.WanConfig.wan_1_3b()
    frames, h, w = (7, 8, 8) if ON_CPU else (21, 60, 104)  # latent size: 81 frames 480x832 on the GPU
    with torch.device(DEVICE):
        reference = WanTransformer3DModel(**cfg.to_diffusers()).eval().requires_grad_(False)
        vae = AutoencoderKLWan().eval().requires_grad_(False)
    model = cw.CausalWan(cfg)
    model.load_state_dict(reference.state_dict())
    model = model.to(DEVICE, torch.bfloat16).eval().requires_grad_(False)
    context = torch.randn(1, 512, cfg.text_dim, device=DEVICE)
    context[:, 20:] = 0
    noise = torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)
    return dict(model=model, reference=reference, vae=vae, context=context, noise=noise, prompt_kv=model.prompt_kv(context.bfloat16()))


def rel(a, b):
    r = ((a.float() - b.float()).norm() / b.float().norm()).item()
    print(f"relative difference {r:.2e}")
    return r


def test_bf16_parity_with_diffusers(setup):
    """Our bf16 network against diffusers' fp32 one on the same weights: bf16 rounding only."""
    x = setup["noise"][:, :, :3]
    t = torch.full((1,), 700.0, device=DEVICE)
    with torch.no_grad():
        ours = setup["model"](x, t, setup["prompt_kv"])
        theirs = setup["reference"](x.float(), t, setup["context"], return_dict=False)[0]
    assert rel(ours, theirs) < 2e-2


def test_in_place_cache_equals_concatenated_bf16(setup):
    runs = []
    with torch.no_grad():
        for static in (False, True):
            runs.append(cw.rollout(setup["model"], setup["noise"], setup["prompt_kv"], static_cache=static,
                                   generator=torch.Generator().manual_seed(1)))
    assert rel(runs[1], runs[0]) < 1e-3  # same kernels on the same values; a view of a buffer vs a new tensor


def test_overlapped_decode_gives_the_same_frames(setup):
    got = {}
    for overlap in (False, True):
        got[overlap] = []
        sample.generate(setup["model"], setup["vae"], setup["prompt_kv"], setup["noise"], 3, 21, got[overlap].append,
                        generator=torch.Generator().manual_seed(1), overlap=overlap)
    assert [f.shape for f in got[True]] == [f.shape for f in got[False]]
    assert all((a == b).all() for a, b in zip(got[False], got[True]))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_blocks_match_eager(setup, mode):
    from torch._dynamo.utils import counters
    model = setup["model"]
    torch._dynamo.reset()  # count this test's compilations only
    counters.clear()
    with torch.no_grad():
        eager = cw.rollout(model, setup["noise"], setup["prompt_kv"], generator=torch.Generator().manual_seed(1))
        sample.compile_blocks(model, mode)
        try:
            for _ in range(2):  # the second call replays what the first compiled (and, reduce-overhead, recorded)
                compiled = cw.rollout(model, setup["noise"], setup["prompt_kv"], generator=torch.Generator().manual_seed(1))
        finally:
            sample.compile_blocks(model, None)
    print(f"graphs compiled: {counters['stats']['unique_graphs']}; inductor counters: {dict(counters['inductor'])}")
    assert counters["stats"]["unique_graphs"] > 0  # compiled, not silently eager
    if mode == "reduce-overhead" and DEVICE.type == "cuda":
        assert counters["inductor"]["cudagraph_skips"] == 0  # CUDA graphs really used
    assert rel(compiled, eager) < 5e-2  # bf16: fused kernels round differently, and errors carry over blocks


def test_compiled_vae_decoder_matches_eager(setup):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    frames = {}
    for on in (False, True):
        sample.compile_vae(setup["vae"], on)
        try:
            for _ in range(1 + on):  # compiled: the second pass reuses the compiled variants
                frames[on] = []
                sample.generate(setup["model"], setup["vae"], setup["prompt_kv"], setup["noise"][:, :, :6], 3, 21,
                                frames[on].append, generator=torch.Generator().manual_seed(1))
        finally:
            sample.compile_vae(setup["vae"], False)
    diff = max(abs(a.astype(int) - b.astype(int)).max() for a, b in zip(frames[False], frames[True]))
    print(f"max pixel difference {diff}; graphs compiled: {counters['stats']['unique_graphs']}")
    assert counters["stats"]["unique_graphs"] > 0
    assert diff <= 2  # fp32 VAE: the fused kernels round differently, by at most a level or two of 255
