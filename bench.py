"""
Speed and memory (nanoGPT's bench.py): the causal generator against diffusers' bidirectional
WanPipeline in the same run, on random weights (speed does not depend on them); and the memory of
train_reward.py's reward decode.

    python bench.py --tiny                            # CPU, tiny config, ~1 min: every section
    python bench.py                                   # one GPU, the full 1.3B config, 81 frames 480x832
    python bench.py --levers 2,5 --baseline-steps 0   # some rows only (a short GPU lease)
    python bench.py --reward-decode --count           # the reward decode's peak at 480x832, counted (any machine)
    python bench.py --reward-decode --height 120 --width 208 --latent-frames 6 --no-checkpoint   # measured

The sampling benchmark prints, each section as soon as it is measured (a run cut short keeps what
it printed): the text encoder's time and memory with and without --offload; the KV cache's speedup
over recomputing the prefix and parity with diffusers' network; the optimization ladder (LEVERS:
each sample.py speed flag on top of the rows above it, chunk-wise and frame-wise, with FPS, the
first block's latency, peak memory and the difference from the first row's latents and pixels),
one result line per row `<card> ... fps=<chunk-wise FPS> first_block_s=<s>`; the fastest row's (of
those sample.py runs: not row 1) transformer TFLOP/s against the card's bf16 peak and the decoders
alone; diffusers' 50-step WanPipeline; per-block times across a long video (flat once the attention
window is full). Every row drives sample.py's own sampler (sample.generate), except row 1, the plain
reference: training's concatenating KV cache through cw.rollout. BENCHMARKS.md has what each
section measured, and the plan for a GPU lease (../shared/gpu/README.md).

--reward-decode measures the peak memory and time of train_reward.py's reward decode + backward
(decode_reward_frames: the last frame of the video, the gradient to its generator block) with the
Wan2.1 VAE architecture (random weights, fp32). --count runs the same code on fake tensors (torch's
FakeTensorMode) and adds up the bytes of the tensors alive at each moment (PeakMemory): the peak a
caching allocator must hold, in seconds, without the memory; it matched measured CPU peaks from
64x104 to 240x416 within 5% and does not see a conv library's scratch space or fragmentation.
Measured: GPU, torch.cuda.max_memory_allocated above what the VAE and the latents hold; CPU, the
growth of the process's peak resident memory (VmHWM, reset just before), with glibc returning freed
large blocks (MALLOC_MMAP_THRESHOLD_, set by a re-exec when unset) so that the peak counts live
memory. The peak does not depend on --latent-frames beyond 6; the time does.
"""
import argparse
import collections
import contextlib
import copy
import os
import resource
import sys
import time
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import causal_wan as cw
import common
import convert
import sample
import speedkit
import train_reward


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="the tiny Wan's config and files on the CPU (seconds), instead of the 1.3B config")
    p.add_argument("--model", default=cw.DEFAULT_MODEL,
                   help="--tiny: a tiny diffusers-format Wan folder (default: the cached one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--height", type=int, help="multiple of 16 (default 480; 64 with --tiny)")
    p.add_argument("--width", type=int, help="multiple of 16 (default 832; 64 with --tiny)")
    p.add_argument("--frames", type=int, default=81, help="video frames, 12k-3: whole blocks of 3 latent frames (81)")
    p.add_argument("--max-frames", type=common.positive_int, default=21, help="attention window in latent frames")
    p.add_argument("--baseline-steps", type=int, default=50, help="steps of diffusers' WanPipeline (0: skip it)")
    p.add_argument("--levers",
                   help="which optimization rows to measure, e.g. 1,2,5 (default all; row 1 is the plain path)")
    p.add_argument("--long-frames", type=int,
                   help="frames of the long-video run, 12k-3 (957 = 1 min; 165 with --tiny; 0: skip it)")
    p.add_argument("--memory-plan", action="store_true",
                   help="count each training step's peak memory per GPU under FSDP on fake tensors (1.3B, 480x832, 81 "
                        "frames; --tiny: the tiny config) instead")
    p.add_argument("--gpus", type=common.positive_int, default=8,
                   help="--memory-plan: GPUs the states are sharded over (8)")
    p.add_argument("--reward-decode", action="store_true",
                   help="measure train_reward.py's reward decode + backward instead")
    p.add_argument("--count", action="store_true",
                   help="--reward-decode: count the peak on fake tensors (seconds, no memory)")
    p.add_argument("--latent-frames", type=common.positive_int, default=21,
                   help="--reward-decode: latent frames of the video")
    p.add_argument("--block-size", type=common.positive_int, default=3,
                   help="--reward-decode: latent frames per generator block")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="--reward-decode: decode_reward_frames(checkpointed=False), to compare")
    args = p.parse_args(argv)
    if args.tiny and args.model == cw.DEFAULT_MODEL:
        args.model = convert.tiny_model_dir()
    args.height = args.height or (64 if args.tiny else 480)
    args.width = args.width or (64 if args.tiny else 832)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.long_frames is None:
        args.long_frames = 165 if args.tiny else 957
    return args


def check_args(args):
    """Everything that can be checked before a model is built."""
    if args.reward_decode:
        common.check_video_size(args, frames=False)
        return common.check_device(args.device)
    common.check_video_size(args)
    if args.levers is not None:
        try:
            args.levers = sorted({int(n) for n in args.levers.split(",")})
        except ValueError:
            args.levers = [0]
        if not args.levers or not all(1 <= n <= len(LEVERS) for n in args.levers):
            raise common.UserError(f"--levers takes row numbers 1-{len(LEVERS)} separated by commas "
                                   f"(see BENCHMARKS.md)")
    if args.baseline_steps < 0:
        raise common.UserError("--baseline-steps must be 0 (skip the baseline) or more")
    check_benchmark_lengths(args)
    if args.max_frames < 6:
        raise common.UserError(f"--max-frames {args.max_frames} must hold at least two blocks of 3 latent frames")
    common.check_device(args.device)
    # --tiny reads a tiny folder (the cached one is built on first use); the full config is WanConfig's, with random
    # weights, so --model is not read and needs no download (a GPU machine lent for a benchmark has no hub)
    if args.tiny and args.model != convert.tiny_model_dir():
        cw.check_model(args.model)


def main(args):
    if args.memory_plan:
        return memory_plan(args)
    check_args(args)
    if not args.reward_decode:
        return benchmark(args)
    if not args.count and not args.device.startswith("cuda") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # the CPU's peak resident memory counts live memory only if glibc returns freed large blocks:
        # set before the process starts, so start it again once
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    return reward_decode_main(args)


def check_benchmark_lengths(args):
    """The benchmark's videos are whole blocks of 3 latent frames (12k-3 frames): a short last block
    is a new shape, which a compiled row would compile inside its timed run. The long video also
    outlasts the attention window, or its per-block times would show nothing."""
    def whole(frames):  # the nearest 12k-3 frames, at least 9
        return 12 * max(1, round((frames + 3) / 12)) - 3

    if ((args.frames - 1) // 4 + 1) % 3:
        raise common.UserError(f"--frames {args.frames} is {(args.frames - 1) // 4 + 1} latent frames, not whole "
                               f"blocks of 3: the benchmark needs 12k-3 frames (try {whole(args.frames)})")
    long_latent = (args.long_frames - 1) // 4 + 1
    if args.long_frames != 0 and (args.long_frames < 0 or (args.long_frames - 1) % 4 or long_latent % 3
                                  or long_latent <= args.max_frames):
        shortest = 12 * (args.max_frames // 3 + 1) - 3
        raise common.UserError(f"--long-frames {args.long_frames} must be 12k-3 frames (whole blocks of 3 latent "
                               f"frames: a short last block would compile inside the timed run) and longer than the "
                               f"--max-frames {args.max_frames} latent frame window: try "
                               f"{max(whole(args.long_frames), shortest)}, or 0 to skip the long video")
    if args.levers and not args.device.startswith("cuda") and all(LEVERS[n - 1].cpu_skip for n in args.levers):
        raise common.UserError(f"--levers {','.join(map(str, args.levers))}: only rows that need a GPU, and the device "
                               f"is {args.device}")


PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}  # dense, vendor sheets


def transformer_flops(cfg, tokens, keys, text_len=512):
    """Analytic FLOPs of one model call: `tokens` queries attending to `keys` self-attention keys.
    Per layer: q/k/v/o and cross q/o projections (6 D^2 per token), FFN (2 D F), self-attention
    scores + weighted sum (2 keys D), cross-attention (2 text_len D); x2 for multiply-add. The text
    keys/values are computed once per prompt and not counted."""
    D = cfg.dim
    per_token = 6 * D * D + 2 * D * cfg.ffn_dim + 2 * keys * D + 2 * text_len * D
    return 2 * tokens * per_token * cfg.num_layers


def rollout_flops(cfg, latent_frames, tokens_per_frame, chunk, max_frames, steps=4):
    total, cached = 0, 0
    for start in range(0, latent_frames, chunk):
        n = min(chunk, latent_frames - start) * tokens_per_frame
        calls = steps + (start + chunk < latent_frames)  # the clean pass that writes the cache
        total += calls * transformer_flops(cfg, n, cached + n)
        held = min(start + chunk, max(max_frames - chunk, chunk))  # frames in the window afterwards
        cached = held * tokens_per_frame
    return total


def decode_flops(decode, latent_frames, h, w, chunk):
    """FLOPs of decoding a latent video [1, 16, latent_frames, h, w] block by block with decode(z,
    first), its decoder on the meta device, counted by torch's FlopCounterMode (nothing is
    computed; seconds on a CPU)."""
    from torch.utils.flop_counter import FlopCounterMode
    z = torch.zeros(1, 16, latent_frames, h, w, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for b, start in enumerate(range(0, latent_frames, chunk)):
            decode(z[:, :, start:start + chunk], first=b == 0)
    return counter.get_total_flops()


def vae_decode_flops(vae_config, latent_frames, h, w, chunk):
    """decode_flops of the Wan VAE of `vae_config`."""
    from diffusers import AutoencoderKLWan
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(vae_config).eval()
    return decode_flops(partial(cw.vae_decode, vae), latent_frames, h, w, chunk)


def tae_decode_flops(tae, latent_frames, h, w, chunk):
    """decode_flops of the tiny decoder `tae` (a copy of it on the meta device)."""
    return decode_flops(partial(speedkit.tae_decode, copy.deepcopy(tae).to("meta")), latent_frames, h, w, chunk)


def rollout_recompute(model, noise, prompt_kv, chunk, generator=None):
    """Reference without a KV cache: every step of every block runs the whole prefix (clean earlier
    blocks at t=0 + the noisy block) through the block-causal forward. Equal output, more compute."""
    done, B = [], noise.shape[0]
    for start in range(0, noise.shape[2], chunk):
        x = noise[:, :, start:start + chunk]
        for i, t in enumerate(cw.DENOISING_TIMESTEPS):
            tt = torch.tensor([[0.0] * start + [t] * x.shape[2]] * B, device=x.device)
            x0 = cw.predict_x0(model, torch.cat(done + [x], 2), tt, prompt_kv, block_size=chunk)[:, :, start:]
            if i + 1 < len(cw.DENOISING_TIMESTEPS):
                s = cw.DENOISING_TIMESTEPS[i + 1] / 1000
                x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=generator).to(x0)
        done.append(x0)
    return torch.cat(done, 2)


class Lever(NamedTuple):
    """One row of the optimization ladder. change: the settings it adds to the rows above it (keys
    of apply_setting / lever_flags); cpu_skip: why the CPU skips it (None: it runs there too);
    compiles: it costs compilation time, so a row left out by --levers does not pass it on; alone:
    the rows below never build on it (it holds a second model, freed after its row); check(bench):
    raises common.UserError when this device cannot run it (the message is the row's skip reason)."""
    label: str
    change: dict
    cpu_skip: str | None = None
    compiles: bool = False
    alone: bool = False
    check: Callable | None = None


# the optimizations, measured one by one, each on top of the rows above it (a new row: one line here,
# plus its key in apply_setting / run_video and lever_flags)
LEVERS = [
    Lever("plain: concatenating KV cache, eager, fp32 VAE, decode in line", {"static_cache": False}),
    Lever("+ in-place KV cache (always on)", {"static_cache": True}),
    Lever("+ decode overlapped with the next block (--overlap-decode)", {"overlap": True}),
    Lever("+ cuDNN autotuning of the VAE convolutions (--cudnn-benchmark)", {"cudnn": True}, cpu_skip="needs a GPU"),
    Lever("+ torch.compile of the blocks (--compile)", {"compile": "default"}, compiles=True),
    Lever("+ CUDA graphs (--compile reduce-overhead)", {"compile": "reduce-overhead"}, cpu_skip="needs a GPU",
          compiles=True),
    Lever("+ torch.compile of the VAE decoder (--compile-vae)", {"compile_vae": True},
          cpu_skip="its compilation takes ~90 s on a CPU", compiles=True),
    Lever("+ bf16 VAE decode (--vae-dtype bf16; changes pixels)", {"vae_dtype": "bf16"}),
    Lever("+ tiny decoder (--decoder tae; changes pixels)", {"decoder": "tae"}),
    Lever("+ float8 linear layers (--fp8)", {"fp8": True}, cpu_skip="needs a GPU of compute capability >= 8.9",
          alone=True, check=lambda bench: speedkit.check_fp8(bench.device, bench.dtype)),
    Lever("+ low memory (--offload)", {"offload": True}),
]


def lever_flags(setting):
    """The sample.py flags of a ladder setting (the VAE-only ones dropped with --decoder tae, which refuses them)."""
    tae = setting.get("decoder") == "tae"
    flags = ["(concatenating KV cache: benchmark only)" if setting.get("static_cache") is False else "",
             f"--compile {setting['compile']}" if setting.get("compile") else "",
             "--compile-vae" if setting.get("compile_vae") and not tae else "",
             "--overlap-decode" if setting.get("overlap") else "", "--cudnn-benchmark" if setting.get("cudnn") else "",
             "--vae-dtype bf16" if setting.get("vae_dtype") == "bf16" and not tae else "",
             "--decoder tae" if tae else "",
             "--fp8" if setting.get("fp8") else "", "--offload" if setting.get("offload") else ""]
    return " ".join(f for f in flags if f) or "(none)"


class CompileCounter:
    """Counts torch.compile's compilations (dynamo's: one per new variant of a compiled function,
    i.e. a new shape, dtype or cache state, or the piece after a graph break) by the file of the
    code compiled: causal_wan.py is the transformer blocks, autoencoder_kl_wan.py the VAE decoder."""
    NAMES = {"causal_wan.py": "block", "autoencoder_kl_wan.py": "VAE"}

    def __init__(self):
        from torch._dynamo.convert_frame import register_bytecode_hook
        self.counts = collections.Counter()
        self.handle = register_bytecode_hook(self._count)

    def _count(self, code, new_code):
        name = os.path.basename(code.co_filename)
        self.counts[self.NAMES.get(name, name)] += 1

    def since(self, before):
        """{what: compilations} since the snapshot `before` (a Counter copy)."""
        return {k: v - before.get(k, 0) for k, v in self.counts.items() if v - before.get(k, 0)}

    @staticmethod
    def describe(counts):
        return ", ".join(f"{counts.get(k, 0)} {k}"
                         for k in ["block", "VAE"] + sorted(set(counts) - {"block", "VAE"})) + " variants"

    def close(self):
        self.handle.remove()


@dataclass
class Bench:
    """What every step of the benchmark uses: the flags, the device, the models and the prompt."""
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    card: str  # the device's name: the first word of every result line
    cfg: cw.WanConfig
    model: cw.CausalWan
    reference: torch.nn.Module  # diffusers' WanTransformer3DModel, the same weights, as diffusers runs it
    vaes: dict  # {"fp32": the Wan VAE as sample.py runs it, "bf16": a bf16 copy}
    tae: torch.nn.Module  # the tiny decoder (--decoder tae), random weights, in the run's dtype
    context: torch.Tensor  # [1, 512, text_dim] text embedding
    prompt_kv: list
    compiles: CompileCounter
    block_mode: str | None = None  # the blocks' torch.compile mode now (None: eager)
    fp8: tuple | None = None  # (a float8 copy of the model, its prompt_kv) while a --fp8 row runs

    @property
    def cuda(self):
        return self.device.type == "cuda"

    @property
    def latent_frames(self):
        return (self.args.frames - 1) // 4 + 1

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def noise(self, frames):
        h, w = self.args.height // 8, self.args.width // 8
        return torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(0)).to(self.device, self.dtype)


def benchmark(args):
    """Speed of the causal generator vs diffusers' bidirectional WanPipeline, same size, same run.
    Random weights (speed does not depend on them): the full 1.3B config, or --tiny on the CPU.
    Every optimization (LEVERS) is measured on top of the ones before it, so the table shows what
    each one moved; the detailed numbers are then taken with the fastest setting. Each section is
    printed as soon as it is measured, so a run cut short (a GPU lent for minutes) keeps its numbers."""
    sys.stdout.reconfigure(line_buffering=True)  # a pipe (| tee) gets every line when it is printed
    bench = build_benchmark(args)
    kv_speedup = measure_kv_cache(bench)
    rows = measure_ladder(bench)
    if not rows:
        raise common.UserError("no optimization row could be measured (see the FAILED or skipped lines above)")
    best = report_fastest(bench, rows)
    measure_baseline(bench, best)
    measure_long_video(bench, best)
    print(f"fps={best[3]['fps']:.2f} first_block_s={best[3]['first']:.4f} kv_speedup={kv_speedup:.2f}")


def build_benchmark(args):
    """The models on the benchmark's device, in the order that lets the text encoder's section
    measure both ways sample.py holds them: the text encoder (random UMT5: the tiny folder's or
    UMT5-XXL's config) in CPU memory, timed on the device alone as --offload runs it (before the
    generator is there); our CausalWan (built on the meta device, materialized on the target one:
    no fp32 copy on the CPU) and the fp32 Wan VAE, and the encoder timed again next to them, as
    sample.py runs it without --offload, then dropped; diffusers' transformer (random weights: the
    tiny folder's or the 1.3B config's), whose weights the CausalWan takes, in the run's dtype as
    diffusers loads it; a bf16 copy of the VAE; the tiny decoder in the run's dtype (--tiny: the
    one sample.py --tiny --decoder tae loads; else TAEW2.1's published widths, random weights)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # --device cuda:1: streams, events and synchronize on that GPU
    torch.manual_seed(0)
    if args.tiny and args.model == convert.tiny_model_dir():
        convert.make_tiny_wan(args.model)
    cfg = cw.read_wan_config(os.path.join(args.model, "transformer")) if args.tiny else cw.WanConfig.wan_1_3b()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {card}, dtype {args.dtype}, config {'tiny' if args.tiny else 'Wan2.1-T2V-1.3B'} (random weights), "
          f"{args.frames} frames {args.height}x{args.width}, batch 1, torch {torch.__version__}")
    encoder = text_encoder_in_cpu_memory(args, device, dtype)
    context, offload_s, offload_peak = time_text_encoder(encoder, device, offload=True)  # alone on the device
    with torch.device("meta"):
        model = cw.CausalWan(cfg)
    model = cw.cast_model(model, dtype).to_empty(device=device)  # the final dtypes, then memory on the device
    if args.tiny:  # the VAE in fp32, as in sample.py
        vae = AutoencoderKLWan.from_pretrained(os.path.join(args.model, "vae")).to(device)
    else:
        with torch.device(device):
            vae = AutoencoderKLWan()
    _, seconds, peak = time_text_encoder(encoder.to(device), device, offload=False)  # next to the generator and the VAE
    del encoder  # as sample.py does: not needed while generating
    memory = lambda gib: f"{gib:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"  # noqa: E731
    print(f"text encoding (UMT5, 512 tokens, once per prompt): {seconds:.3f} s, peak device memory {memory(peak)} "
          f"(the encoder next to the generator and the fp32 VAE, as sample.py holds them)\n"
          f"  with --offload: {offload_s:.3f} s (the weights' copy to the device included), peak device memory "
          f"{memory(offload_peak)} (the encoder alone: on the device only inside speedkit.on_device, before the "
          f"generator is there)")
    if args.tiny:
        reference = WanTransformer3DModel.from_pretrained(os.path.join(args.model, "transformer")).to(device)
    else:
        with torch.device(device):
            reference = WanTransformer3DModel(**cfg.to_diffusers())
    model.load_state_dict(reference.state_dict())  # from diffusers' fp32 weights (a copy, each to its dtype)
    model.eval().requires_grad_(False)
    reference = as_diffusers_loads(reference, dtype).eval().requires_grad_(False)
    vae = vae.eval().requires_grad_(False)
    vaes = {"fp32": vae, "bf16": copy.deepcopy(vae).to(torch.bfloat16)}
    tae = (speedkit.load_tiny_decoder(speedkit.tiny_decoder_path()) if args.tiny
           else speedkit.TinyDecoder().eval().requires_grad_(False))
    tae = tae.to(device, dtype)
    gib = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) / 2**30  # noqa: E731
    print(f"weights held: generator {gib(model):.2f} GiB, diffusers' reference {gib(reference):.2f} GiB (parity and "
          f"baseline: not in sample.py), Wan VAE {gib(vae):.2f} GiB (+ its bf16 copy), tiny decoder "
          f"{gib(tae):.3f} GiB; every peak below includes them (the --offload row keeps the decoders in CPU memory)")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    context = context.to(dtype)
    return Bench(args, device, dtype, card, cfg, model, reference, vaes, tae, context, model.prompt_kv(context),
                 CompileCounter())


def as_diffusers_loads(model, dtype):
    """model.to(dtype) the way diffusers' from_pretrained(dtype=dtype) loads it: parameters and
    buffers of the modules its class names in _keep_in_fp32_modules (for Wan: RoPE, time embedder,
    scale-shift tables, norms) stay fp32. In place; returns model."""
    keep = type(model)._keep_in_fp32_modules or []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def text_encoder_in_cpu_memory(args, device, dtype):
    """Random UMT5 in `dtype`, its weights in CPU memory: the tiny folder's, or UMT5-XXL's config
    (5.7B parameters, initialized on the device, where it takes seconds, then moved)."""
    from transformers import UMT5Config, UMT5EncoderModel
    if args.tiny:
        _, encoder = cw.load_text_encoder(args.model)
    else:
        with torch.device(device):
            encoder = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                  num_heads=64, feed_forward_proj="gated-gelu",
                                                  tie_word_embeddings=False))
    encoder = encoder.to(dtype).to("cpu").eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return encoder


def time_text_encoder(encoder, device, offload):
    """One UMT5 encoding of 512 tokens, after a warm-up: (its output [1, 512, D] on the device,
    seconds, peak device memory in GiB while it ran: NaN on a CPU). offload: the encoder's weights
    are in CPU memory and go to the device only inside speedkit.on_device, as sample.py --offload encodes
    (the seconds include that copy); else they are on the device already."""
    ids = torch.randint(0, encoder.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0)).to(device)
    place = partial(speedkit.on_device, encoder, device) if offload else contextlib.nullcontext
    sync = partial(torch.cuda.synchronize, device) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        with place():
            encoder(ids)  # warm-up
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with place():
            context = encoder(ids).last_hidden_state
        sync()
        seconds = time.perf_counter() - t0
    return context, seconds, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def apply_setting(bench, setting):
    """Put the models in the state `setting` asks for. Compiling is lazy (the first call compiles),
    and going back to a mode compiled before reuses its code. --fp8: a float8 copy of the model,
    made when a setting asks for it and freed by the first setting that does not; --offload: the
    decoders' weights in CPU memory (decode_for brings them over for each block)."""
    torch.backends.cudnn.benchmark = bool(setting.get("cudnn"))
    if bench.fp8 is not None and not setting.get("fp8"):
        bench.fp8 = None  # freed: the rows after it do not hold it in their peak memory
    if setting.get("compile") != bench.block_mode:
        for model in [bench.model] + ([bench.fp8[0]] if bench.fp8 else []):
            speedkit.compile_blocks(model, setting.get("compile"))
        bench.block_mode = setting.get("compile")
    if setting.get("fp8") and bench.fp8 is None:
        bench.fp8 = float8_copy(bench)
    home = torch.device("cpu") if setting.get("offload") else bench.device
    for vae in bench.vaes.values():
        speedkit.compile_vae(vae, bool(setting.get("compile_vae"))).to(home)
    bench.tae.to(home)


def float8_copy(bench):
    """(speedkit.quantize_fp8 of a deep copy of the eager model, the prompt_kv of that copy: its
    cross-attention projections are float8 layers too), its blocks compiled as the model's are."""
    before = torch.cuda.memory_allocated(bench.device) if bench.cuda else 0
    speedkit.compile_blocks(bench.model, None)  # copy the eager model: a compiled block's code is bound to the original
    model = speedkit.quantize_fp8(copy.deepcopy(bench.model))
    for m in (bench.model, model) if bench.block_mode else ():
        speedkit.compile_blocks(m, bench.block_mode)
    if bench.cuda:
        print(f"  (the float8 copy of the model: "
              f"{(torch.cuda.memory_allocated(bench.device) - before) / 2**30:.2f} GiB on the device next to the "
              f"{bench.args.dtype} model, in this row's peak; freed after it)")
    return model, model.prompt_kv(bench.context)


def decode_for(bench, setting, decoder=None):
    """decode(z, first) as sample.py's load_decoder makes it for `setting` (`decoder`, if given,
    instead of its --decoder): the tiny decoder, or the VAE in --vae-dtype; with --offload through
    speedkit.offloaded (the weights on the device only during each call)."""
    if (decoder or setting.get("decoder", "vae")) == "tae":
        module, decode = bench.tae, partial(speedkit.tae_decode, bench.tae)
    else:
        module = bench.vaes[setting.get("vae_dtype", "fp32")]
        decode = partial(cw.vae_decode, module)
    return speedkit.offloaded(decode, module, bench.device) if setting.get("offload") else decode


def run_video(bench, frames, chunk, setting):
    """The sampling path of sample.py with `setting`: (seconds in all, seconds to each block's uint8
    frames on the CPU, latents, frames)."""
    apply_setting(bench, setting)
    model, prompt_kv = bench.fp8 if setting.get("fp8") else (bench.model, bench.prompt_kv)
    marks, frames_out = [], []

    def on_frames(f):
        marks.append(time.perf_counter())
        frames_out.append(f)

    bench.sync()
    t0 = time.perf_counter()
    decode, generator = decode_for(bench, setting), torch.Generator().manual_seed(1)
    if setting.get("static_cache") is False:  # row 1: training's concatenating KV cache, which sample.py never uses
        with torch.no_grad():
            latents = cw.rollout(model, bench.noise(frames), prompt_kv, block_size=chunk,
                                 max_frames=bench.args.max_frames, generator=generator, static_cache=False,
                                 on_block=lambda b, x0, cache: on_frames(common.to_uint8_frames(decode(x0, b == 0)[0])))
    else:  # sample.py's path
        latents = sample.generate(model, decode, prompt_kv, bench.noise(frames), chunk, bench.args.max_frames,
                                  on_frames, generator=generator, overlap=bool(setting.get("overlap")))
    bench.sync()
    return time.perf_counter() - t0, [m - t0 for m in marks], latents, frames_out


def transformer_only(bench, frames, chunk):
    """Seconds of the rollout alone (no decoding), with the blocks as they are now."""
    bench.sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        cw.rollout(bench.model, bench.noise(frames), bench.prompt_kv, block_size=chunk,
                   max_frames=bench.args.max_frames)
    bench.sync()
    return time.perf_counter() - t0


def measure_kv_cache(bench):
    """KV cache vs recomputing the whole prefix every step (transformer only, eager, same noise),
    and the plain full-attention forward against diffusers' on the same weights. Returns the speedup."""
    model, lat_f, args = bench.model, bench.latent_frames, bench.args
    transformer_only(bench, min(lat_f, 6), 3)  # warm-up
    with torch.no_grad():
        bench.sync()
        t0 = time.perf_counter()
        recomputed = rollout_recompute(model, bench.noise(lat_f), bench.prompt_kv, 3,
                                       generator=torch.Generator().manual_seed(1))
        bench.sync()
        slow = time.perf_counter() - t0
        cached = cw.rollout(model, bench.noise(lat_f), bench.prompt_kv, block_size=3, max_frames=args.max_frames,
                            generator=torch.Generator().manual_seed(1))
    fast = transformer_only(bench, lat_f, 3)
    print(f"KV cache: speedup {slow / fast:.2f}x over recomputing the prefix ({slow:.3f} s vs {fast:.3f} s, "
          f"transformer only, eager); max |diff| {(recomputed.float() - cached.float()).abs().max().item():.2e}")
    with torch.no_grad():
        x = bench.noise(3)
        t = torch.full((1,), 500.0, device=bench.device)
        d = (model(x, t, bench.prompt_kv).float()
             - bench.reference(x, t, bench.context, return_dict=False)[0].float()).abs().max().item()
    print(f"parity with diffusers' WanTransformer3DModel ({args.dtype}, 3 frames): max |diff| {d:.2e}")
    return slow / fast


def measure_ladder(bench):
    """The LEVERS rows, each on top of the ones above it. A row left out by --levers still passes
    its cheap settings on to the rows below, never a compilation, and an `alone` row (--fp8) never
    passes anything on. Returns the measured rows."""
    args = bench.args
    print(f"\noptimizations, each on top of the rows above (FPS for {args.frames} frames incl. VAE decode; "
          f"first = seconds to the first block's frames on the CPU; diff = max |difference| from the first measured "
          f"row's latents / uint8 pixels, same noise (pixels: from the first measured row with the same decoder; "
          f"a decoder's first row: from the other's, 'another decoder'); compiled = torch.compile variants, "
          f"see CompileCounter):")
    setting, rows, first = {}, [], {}
    for n, lever in enumerate(LEVERS, 1):
        label = f"{n}. {lever.label}"
        if lever.cpu_skip and not bench.cuda:
            print(f"  {label}: skipped ({lever.cpu_skip})")
            continue
        if args.levers and n not in args.levers:
            setting = setting if lever.compiles or lever.alone else {**setting, **lever.change}
            continue
        try:
            if lever.check:
                lever.check(bench)
        except common.UserError as e:  # e.g. --fp8 on a card without float8
            print(f"  {label}: skipped ({e})")
            continue
        try:
            row = measure_row(bench, label, {**setting, **lever.change}, first)
        except Exception as e:  # it does not run on this device/torch: say so, measure the rest without it
            print(f"  {label}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                  f"the rows below go on without it")
            row = None
        if lever.alone:
            apply_setting(bench, setting)  # frees what only this row used (the float8 copy) before the next row
        elif row:
            setting = row["setting"]
        if row:
            rows.append(row)
            print(result_line(bench, f"row {n}", row))
    return rows


def measure_row(bench, label, setting, first):
    """One ladder row, chunk-wise then frame-wise: a warm-up video (the first block, later ones,
    every VAE cache state: all that compiles), then the timed one. first: the references of the
    differences, filled as rows are measured: the first measured row's latents, and the first
    measured row's pixels with each decoder (a decoder's first row is compared with the other
    decoder's pixels, said as "another decoder")."""
    row, parts = {"label": label, "setting": dict(setting)}, []
    for chunk in (3, 1):
        mode = "chunk-wise" if chunk == 3 else "frame-wise"
        before = collections.Counter(bench.compiles.counts)
        t0 = time.perf_counter()
        run_video(bench, min(bench.latent_frames, max(2 * chunk, 3)), chunk, setting)
        warm, warm_compiles = time.perf_counter() - t0, bench.compiles.since(before)
        before = collections.Counter(bench.compiles.counts)
        if bench.cuda:
            torch.cuda.reset_peak_memory_stats(bench.device)
        total, marks, latents, frames = run_video(bench, bench.latent_frames, chunk, setting)
        timed_compiles = bench.compiles.since(before)
        peak = torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.cuda else float("nan")
        ref_latents = first.setdefault(chunk, latents.float())
        first_frames = first.setdefault((chunk, "pixels"), frames)  # the first measured row's
        # the first measured row's with this decoder
        ref_frames = first.setdefault((chunk, setting.get("decoder", "vae")), frames)
        # this decoder's first row: compared with the other decoder's
        another = ref_frames is frames and first_frames is not frames
        dl = (latents.float() - ref_latents).abs().max().item()
        dp = max(int(abs(a.astype(int) - b.astype(int)).max())
                 for a, b in zip(frames, first_frames if another else ref_frames))
        row[chunk] = dict(fps=bench.args.frames / total, first=marks[0], total=total, peak=peak, latents=latents)
        part = (f"{mode} {bench.args.frames / total:.2f} FPS, first {marks[0]:.3f} s"
                + (f", peak {peak:.1f} GiB" if bench.cuda else "")
                + f", diff {dl:.1e} / {dp}" + (" (another decoder)" if another else ""))
        if setting.get("compile") or setting.get("compile_vae") or warm_compiles:
            part += f", warm-up {warm:.1f} s compiled {CompileCounter.describe(warm_compiles)}"
        if setting.get("compile") or setting.get("compile_vae") or timed_compiles:
            part += f", timed run compiled {CompileCounter.describe(timed_compiles)}"
        parts.append(part)
    print(f"  {label}: " + "; ".join(parts))
    return row


def result_line(bench, what, row):
    """One configuration in BENCHMARKS.md's form: `<card> ... fps=<chunk-wise FPS> first_block_s=<s>`."""
    a = bench.args
    return (f"{bench.card} | torch {torch.__version__} | {a.dtype} | {a.frames} frames {a.height}x{a.width} | {what}: "
            f"{lever_flags(row['setting'])} | frame-wise {row[1]['fps']:.2f} FPS, first {row[1]['first']:.3f} s | "
            f"fps={row[3]['fps']:.2f} first_block_s={row[3]['first']:.4f}")


def fastest_row(rows):
    """(the row report_fastest details, what it is the fastest of): the fastest chunk-wise row that sample.py
    can run, leaving out row 1 (training's concatenating KV cache, benchmark only: on a tiny model it can win),
    and of those the rows that decode with the fp32 Wan VAE (sample.py's default, exact) when there are any."""
    runnable = [r for r in rows if r["setting"].get("static_cache") is not False]
    vae_rows = [r for r in runnable if r["setting"].get("decoder", "vae") == "vae"
                and r["setting"].get("vae_dtype", "fp32") == "fp32"]
    best = max(vae_rows or runnable or rows, key=lambda r: r[3]["fps"])
    what = ("of the rows sample.py runs (not row 1: benchmark only)" if runnable else
            "(only row 1, benchmark only, was measured)") + (" with the fp32 VAE" if vae_rows else "")
    return best, what


def report_fastest(bench, rows):
    """The fastest row sample.py runs (fastest_row) in detail: FPS, first block, peak memory, the
    transformer alone and its TFLOP/s against the card's bf16 peak, the VAE and the tiny decoder
    alone. Returns it."""
    args, cfg = bench.args, bench.cfg
    best, what = fastest_row(rows)
    s = best["setting"]
    apply_setting(bench, s)
    print(f"\nfastest {what}: {best['label']}\n  sample.py flags: {lever_flags(s)}")
    lat_f, h, w = bench.latent_frames, args.height // 8, args.width // 8
    peak_tflops = (next((v for k, v in PEAK_BF16_TFLOPS.items() if k in bench.card), None)
                   if bench.cuda and bench.dtype == torch.bfloat16 else None)
    before = collections.Counter(bench.compiles.counts)
    for chunk in (3, 1):
        r = best[chunk]
        dit = transformer_only(bench, lat_f, chunk)
        flops = rollout_flops(cfg, lat_f, (h // 2) * (w // 2), chunk, args.max_frames)
        mem = (f"peak GPU memory {r['peak']:.2f} GiB" if bench.cuda
               else f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        print(f"{'chunk-wise' if chunk == 3 else 'frame-wise'}: {r['fps']:.2f} FPS ({r['total']:.3f} s for "
              f"{args.frames} frames, transformer alone {dit:.3f} s), first block {r['first']:.3f} s, {mem} "
              f"(all resident weights included)")
        print(f"  transformer: {flops / 1e12:.4g} TFLOP analytic ({lat_f} latent frames x {(h // 2) * (w // 2)} "
              f"tokens, D={cfg.dim}, FFN={cfg.ffn_dim}, {cfg.num_layers} layers, 4 steps + cache pass, text 512) -> "
              f"{flops / dit / 1e12:.4g} TFLOP/s"
              + (f" = {100 * flops / dit / 1e12 / peak_tflops:.1f}% of the {peak_tflops:.0f} TFLOP/s bf16 peak"
                 if peak_tflops else " (no bf16 peak known for this device)"))
        if chunk == 3:
            report_decoders(bench, s, r["latents"], flops, peak_tflops)
    warn_compiles(bench, before, "the fastest row's section")
    print(result_line(bench, f"fastest, {best['label'].split('.')[0]}", best))
    return best


def report_decoders(bench, setting, latents, flops, peak_tflops):
    """The Wan VAE (in the row's --vae-dtype) and the tiny decoder alone on `latents`, block by block
    as sample.py decodes, with the FLOPs torch counts for each (decode_flops) and their ratio; flops:
    the transformer's, for what both would give at the bf16 peak."""
    args, (lat_f, h, w) = bench.args, latents.shape[2:]
    vae_flops = vae_decode_flops(bench.vaes["fp32"].config, lat_f, h, w, 3)
    tae_flops = tae_decode_flops(bench.tae, lat_f, h, w, 3)
    vae_s = decode_seconds(bench, decode_for(bench, setting, "vae"), latents)
    tae_s = decode_seconds(bench, decode_for(bench, setting, "tae"), latents)
    at_peak = lambda decoder_flops: (  # noqa: E731
        f": {args.frames / ((flops + decoder_flops) / 1e12 / peak_tflops):.1f} FPS if all of it ran at the bf16 peak"
        if peak_tflops else "")
    print(f"  VAE decode alone ({setting.get('vae_dtype', 'fp32')}): {vae_s:.3f} s, {vae_flops / 1e12:.4g} TFLOP "
          f"counted by torch.utils.flop_counter -> {vae_flops / vae_s / 1e12:.4g} TFLOP/s; transformer + VAE = "
          f"{(flops + vae_flops) / 1e12:.4g} TFLOP" + at_peak(vae_flops))
    print(f"  tiny decoder alone ({args.dtype}, --decoder tae): {tae_s:.3f} s, {tae_flops / 1e12:.4g} TFLOP counted "
          f"the same way -> {tae_flops / tae_s / 1e12:.4g} TFLOP/s; the VAE takes {vae_flops / tae_flops:.1f}x its "
          f"FLOPs and {vae_s / tae_s:.1f}x its time; transformer + tiny decoder = "
          f"{(flops + tae_flops) / 1e12:.4g} TFLOP" + at_peak(tae_flops))


def decode_seconds(bench, decode, latents):
    """Seconds to decode `latents` [1, 16, F, h, w] block by block (3 latent frames) into uint8
    frames on the CPU, as sample.py does, after one warm-up block (a decoder's first call)."""
    with torch.no_grad():
        decode(latents[:, :, :3], first=True)
        bench.sync()
        t0 = time.perf_counter()
        for start in range(0, latents.shape[2], 3):
            common.to_uint8_frames(decode(latents[:, :, start:start + 3], first=start == 0)[0])
        bench.sync()
    return time.perf_counter() - t0


def warn_compiles(bench, before, where):
    """Say so when something compiled inside a timed section: its times then include compilation."""
    counts = bench.compiles.since(before)
    if counts:
        print(f"  WARNING: {where} compiled {CompileCounter.describe(counts)}: its times include compilation")


def measure_baseline(bench, best):
    """diffusers' bidirectional WanPipeline: --baseline-steps steps, CFG 5, same size, same weights,
    diffusers' defaults (cuDNN heuristics, an eager fp32 VAE); and the FPS ratio."""
    from diffusers import UniPCMultistepScheduler, WanPipeline
    args = bench.args
    if args.baseline_steps == 0:
        print("baseline WanPipeline: skipped (--baseline-steps 0)")
        return
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    vae = bench.vaes["fp32"]
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=bench.reference, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=bench.context, negative_prompt_embeds=torch.zeros_like(bench.context), height=args.height,
              width=args.width, num_frames=args.frames, guidance_scale=5.0, output_type="pt")
    torch.backends.cudnn.benchmark = False
    speedkit.compile_vae(vae, False).to(bench.device)  # eager, on the device (the --offload row keeps it in CPU memory)
    pipe(num_inference_steps=2, **kw)  # warm-up
    bench.sync()
    t0 = time.perf_counter()
    pipe(num_inference_steps=args.baseline_steps, **kw)
    bench.sync()
    base = time.perf_counter() - t0
    print(f"baseline WanPipeline ({args.baseline_steps} steps, CFG 5): {base:.2f} s = {args.frames / base:.3f} FPS, "
          f"first frame after {base:.2f} s; causal chunk-wise (fastest setting) is "
          f"{best[3]['fps'] * base / args.frames:.1f}x its FPS")


def measure_long_video(bench, best):
    """Per-block time across a long video with the fastest setting: it must stay flat once the
    attention window is full (check_args made its length whole blocks, past the window)."""
    args = bench.args
    if args.long_frames == 0:
        print("long video: skipped (--long-frames 0)")
        return
    long_f = (args.long_frames - 1) // 4 + 1
    kv_bytes = []
    apply_setting(bench, best["setting"])
    before = collections.Counter(bench.compiles.counts)
    with torch.no_grad():
        cw.rollout(bench.model, bench.noise(min(long_f, args.max_frames + 3)), bench.prompt_kv, block_size=3,
                   max_frames=args.max_frames, on_block=lambda b, x0, c: kv_bytes.append(c.num_bytes()))
    total, marks, _, _ = run_video(bench, long_f, 3, best["setting"])
    steps = [b - a for a, b in zip([0.0] + marks[:-1], marks)]
    k = min(7, len(steps) // 3)  # >= 2 blocks each: check_args asks for more than the window (>= 8 blocks)
    head, tail = sum(steps[1:k + 1]) / k, sum(steps[-k:]) / k
    print(f"long video: {args.long_frames} frames ({len(steps)} blocks) in {total:.2f} s = "
          f"{args.long_frames / total:.2f} FPS; per block: blocks 2-{k + 1} {head * 1e3:.1f} ms, last {k} "
          f"{tail * 1e3:.1f} ms (ratio {tail / head:.2f}); KV cache {max(kv_bytes) / 2**20:.4g} MiB")
    warn_compiles(bench, before, "the long video")


# -----------------------------------------------------------------------------
# --reward-decode: train_reward.py's reward decode + backward, measured or counted


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of the tensor storages every op creates while they are alive (weak references:
    a storage counts until it is freed). .peak and .alive in bytes. Works on fake tensors."""

    def __init__(self):
        super().__init__()
        self.seen, self.alive, self.peak = WeakIdKeyDictionary(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                storage, size = t.untyped_storage(), t.untyped_storage().nbytes()
                self.seen[storage] = size
                weakref.finalize(storage, self._freed, size)
                self.alive += size
                self.peak = max(self.peak, self.alive)
        return out

    def _freed(self, size):
        self.alive -= size


def reward_decode(vae, video, weights, block_size, checkpointed):
    """The decode + backward measured: the last frame of the video, a linear stand-in for the reward."""
    pixels = train_reward.decode_reward_frames(vae, video, [4 * (video.shape[2] - 1)], block_size,
                                               checkpointed)  # [1, 3, H, W]
    (pixels[0] * weights).sum().backward()


def reward_decode_peak(height, width, latent_frames=6, block_size=3, checkpointed=True, vae_config=None):
    """The peak (and what stays alive after the backward) of the reward decode + backward, counted on
    fake tensors -> (peak GiB, alive GiB). vae_config: AutoencoderKLWan kwargs (default: Wan2.1's)."""
    from diffusers import AutoencoderKLWan
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        vae = AutoencoderKLWan(**(vae_config or {})).eval().requires_grad_(False)
        video = torch.randn(1, vae.config.z_dim, latent_frames, height // 8, width // 8, requires_grad=True)
        weights = torch.randn(3, height, width)
        with PeakMemory() as memory:
            reward_decode(vae, video, weights, block_size, checkpointed)
            del video.grad
    return memory.peak / 2**30, memory.alive / 2**30


def peak_rss_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def reward_decode_main(args):
    """--reward-decode: the decode + backward counted (--count) or measured on this machine."""
    mode = "no checkpoint" if args.no_checkpoint else "checkpointed"
    if args.count:
        t0 = time.time()
        peak, alive = reward_decode_peak(args.height, args.width, args.latent_frames, args.block_size,
                                         not args.no_checkpoint)
        print(f"counted | {args.height}x{args.width}, {args.latent_frames} latent frames, gradient to the last block "
              f"| {mode} | peak +{peak:.2f} GiB, alive after the backward {alive:.3f} GiB | {time.time() - t0:.0f} s")
        return
    device = torch.device(args.device)
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to(device).eval().requires_grad_(False)  # Wan2.1's VAE architecture
    F = args.latent_frames
    video = torch.randn(1, 16, F, args.height // 8, args.width // 8, device=device, requires_grad=True)
    weights = torch.randn(3, args.height, args.width, device=device)  # a linear stand-in for the reward
    s = (F - 1) // args.block_size * args.block_size  # the last frame's generator block starts at latent frame s

    t0 = time.time()
    with torch.no_grad():  # the frames before the block alone, to time a no-grad decode per latent frame
        cw.vae_decode(vae, video[:, :, :s])
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefix_seconds = time.time() - t0
    vae.clear_cache()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current resident memory
        base = peak_rss_gib()
    t0 = time.time()
    reward_decode(vae, video, weights, args.block_size, not args.no_checkpoint)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        peak = peak_rss_gib() - base
    seconds = time.time() - t0
    norms = video.grad[0].square().sum((0, 2, 3)).sqrt()[s:].tolist()
    print(f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} | "
          f"{args.height}x{args.width}, "
          f"{F} latent frames, gradient to {F - s} | {mode} | peak +{peak:.2f} GiB | {seconds:.1f} s "
          f"(a no-grad decode of the {s} frames before the block alone: {prefix_seconds:.1f} s) | "
          f"gradient norm per latent frame {[round(n, 3) for n in norms]}")


# -----------------------------------------------------------------------------
# --memory-plan: each training step's peak memory per GPU at full size, counted on fake tensors

CONTEXT_GB = 4.0  # CUDA context and allocator slack per GPU (an estimate: not counted)
REWARD_MODEL_PARAMS = 0.45e9  # ImageReward (BLIP ViT-L + BERT-base + head), fp32, replicated (from its files' sizes)


def step_memory(step, nets):
    """Run step() under PeakMemory on fake tensors -> (peak bytes minus the parameter gradients it made, which
    FSDP reduce-scatters into the sharded states unit by unit, bytes alive after it). The gradients are dropped."""
    with PeakMemory() as memory:
        step()
    grads = sum(p.grad.numel() * p.grad.element_size() for net in nets for p in net.parameters() if p.grad is not None)
    for net in nets:
        net.zero_grad(set_to_none=True)
    return memory.peak - grads, memory.alive - grads


def memory_plan(args):
    """Per GPU under FSDP over --gpus: the sharded states (fp32 master weights, gradients, AdamW's two moments,
    the EMA; bf16 frozen teachers) from parameter counts, plus each step's activations counted on fake tensors
    (PeakMemory: the bytes of live tensors, shapes only) with bf16 compute and activation checkpointing per
    block, as the trainers run on GPUs, plus the replicated frozen models and CUDA's context (estimated)."""
    from diffusers import AutoencoderKLWan
    from torch._subclasses.fake_tensor import FakeTensorMode

    import distill_dmd
    import train_ode
    cfg, (F, h, w) = (cw.WanConfig.tiny(), (6, 8, 8)) if args.tiny else (cw.WanConfig.wan_1_3b(), (21, 60, 104))
    bf16, (unit, name) = torch.bfloat16, (2**20, "MiB") if args.tiny else (2**30, "GiB")  # tiny: MiB, or all is 0.00
    print(f"memory plan: {'tiny config' if args.tiny else 'Wan2.1-T2V-1.3B'}, {F} latent frames {8 * h}x{8 * w}, "
          f"FSDP over {args.gpus} GPUs, bf16 compute, activation checkpointing, batch 1 per GPU; {name} per GPU")
    with FakeTensorMode():
        def net(trained):
            model = cw.cast_model(cw.CausalWan(cfg), bf16)
            model.gradient_checkpointing = trained
            return model.requires_grad_(trained)
        generator, critic, teacher = net(True), net(True), net(False)
        n = sum(p.numel() for p in generator.parameters())
        vae = AutoencoderKLWan(**({} if not args.tiny else dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)))
        vae = vae.eval().requires_grad_(False)
        vae_params = sum(p.numel() for p in vae.parameters())
        context, uncond = torch.randn(1, 512, cfg.text_dim, dtype=bf16), torch.randn(1, 512, cfg.text_dim, dtype=bf16)
        noise = torch.randn(1, cfg.in_channels, F, h, w, dtype=bf16)
        g = torch.Generator()
        blocks, exit_steps = F // 3, [3] * (F // 3)

        def rollout(cache_grad, grad_blocks=None):
            return cw.rollout(generator, noise, generator.prompt_kv(context), block_size=3, exit_steps=exit_steps,
                              generator=g, grad_blocks=grad_blocks, cache_grad=cache_grad)

        def reward_step(cache_grad, grad_blocks):
            video = rollout(cache_grad, grad_blocks)
            pixels = train_reward.decode_reward_frames(vae, video.float(), [4 * (F - 1)], 3, checkpointed=True)
            pixels.square().mean().backward()  # a stand-in for the reward: its model is counted below, not run

        def dmd_step():
            video = rollout("straight-through")
            distill_dmd.dmd_loss(video, teacher, critic, context, uncond, 4.0, g)[0].backward()

        def critic_step():
            with torch.no_grad():
                video = rollout("straight-through")
            distill_dmd.critic_loss(video, critic, context, g)[0].backward()

        def ode_step():
            trajectory = torch.randn(1, 5, cfg.in_channels, F, h, w, dtype=bf16)
            index = torch.zeros(1, F, dtype=torch.long)
            x0 = train_ode.student_x0(generator, trajectory, index, torch.tensor(train_ode.DMDTeacher.timesteps),
                                      generator.prompt_kv(context), 3)
            train_ode.ode_loss(x0, trajectory[:, -1]).backward()

        steps = [("reward (train_reward.py, --cache-grad straight-through)",
                  lambda: reward_step("straight-through", None), [generator], 20, 0),
                 ("reward (--cache-grad detach)", lambda: reward_step("detach", {blocks - 1}), [generator], 20, 0),
                 ("DMD generator update (distill_dmd.py --generator causal)", dmd_step, [generator, critic], 36, 2),
                 ("DMD critic update", critic_step, [critic], 36, 2),
                 ("ODE regression (train_ode.py train)", ode_step, [generator], 20, 0)]
        print(f"{'step':<58}{'states':>8}{'activations':>13}{'frozen':>8}{'context':>9}{'total':>8}")
        for step_name, step, nets, state_bytes, frozen_bytes in steps:
            t0 = time.time()
            peak, _ = step_memory(step, nets)
            states = n * state_bytes / args.gpus + n * frozen_bytes / args.gpus  # trained nets + bf16 teacher, sharded
            frozen = (vae_params + REWARD_MODEL_PARAMS) * 4 if step_name.startswith("reward") else 0  # replicated fp32
            cuda = CONTEXT_GB * 2**30
            print(f"{step_name:<58}{states / unit:>8.2f}{peak / unit:>13.2f}{frozen / unit:>8.2f}{cuda / unit:>9.1f}"
                  f"{(states + peak + frozen + cuda) / unit:>8.2f}   ({time.time() - t0:.0f} s)", flush=True)
    print(f"states: per trained net {n / 1e9:.3f}B parameters x (fp32 master 4 + gradient 4 + AdamW 8 + EMA 4 bytes; "
          f"the critic has no EMA: 16), the bf16 teacher 2 bytes, all / {args.gpus}; activations: the step's counted "
          f"peak of live tensors minus its parameter gradients (reduce-scattered unit by unit into the states); "
          f"frozen: the fp32 VAE and ImageReward (~{REWARD_MODEL_PARAMS / 1e9:.2f}B, not run here: its activations for "
          f"one 224x224 frame are not counted) replicated on every GPU; context: CUDA's, an estimate")


if __name__ == "__main__":
    try:
        main(parse_args())
    except common.UserError as e:
        common.print_error(e)
        sys.exit(2)
