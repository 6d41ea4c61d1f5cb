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


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not (FP8_GPU or ON_CPU), reason="float8 needs compute capability >= 8.9")
def test_fp8_blocks_stay_close_to_bf16(setup, monkeypatch):
    """--fp8 (cw.quantize_fp8: the blocks' linear layers in float8 through torchao) against bf16 on
    the same noise: one forward and the whole rollout; prints both relative differences. The bounds
    only catch a broken path (unrelated outputs differ by ~1.4); a 2-layer full-width model on the
    CPU gave 0.5% and 0.4%."""
    import copy
    if ON_CPU:  # torchao refuses a CPU by a hardware assert; its kernels run there (tests/test_speed_levers.py)
        import torchao.quantization.quant_api as quant_api
        monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    else:
        cw.check_fp8(DEVICE, torch.bfloat16)
    model = setup["model"]
    fp8 = cw.quantize_fp8(copy.deepcopy(model))
    x, t = setup["noise"][:, :, :3], torch.full((1,), 700.0, device=DEVICE)
    with torch.no_grad():
        fp8_kv = fp8.prompt_kv(setup["context"].bfloat16())  # its cross-attention keys/values are fp8 layers too
        one = rel(fp8(x, t, fp8_kv), model(x, t, setup["prompt_kv"]))
        videos = [cw.rollout(m, setup["noise"], kv, generator=torch.Generator().manual_seed(1))
                  for m, kv in ((model, setup["prompt_kv"]), (fp8, fp8_kv))]
        video = rel(videos[1], videos[0])
    print(f"fp8 vs bf16: one forward {one:.2e}, rollout {video:.2e}")
    assert one < 0.1 and video < 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA memory to measure")
def test_on_device_frees_the_gpu_after_use():
    """--offload's building block on a real GPU: the weights take GPU memory only inside on_device,
    and come back as the same CPU tensors (the .data swap path that .to('cuda') takes)."""
    layer = torch.nn.Linear(4096, 4096)  # 64 MiB in fp32
    weight = layer.weight.data_ptr()
    base = torch.cuda.memory_allocated(DEVICE)
    with cw.on_device(layer, DEVICE):
        assert layer.weight.is_cuda
        inside = torch.cuda.memory_allocated(DEVICE) - base
    after = torch.cuda.memory_allocated(DEVICE) - base
    print(f"inside {inside / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB")
    assert inside >= 64 * 2**20 and after == 0 and layer.weight.data_ptr() == weight
