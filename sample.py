"""
Text -> video with the causal (autoregressive) Wan: block by block with a KV cache, each block
decoded as soon as it is denoised; the prompt can change mid-video, a clip or an image can be continued.

    python sample.py --prompt "a corgi running in a park at sunset"             # out.mp4: 81 frames 480x832, 16 fps
    python sample.py --checkpoint runs/reward/ckpt.pt --prompt "..." --out corgi.mp4  # a trained generator (EMA)
    python sample.py --checkpoint self_forcing_dmd.pt --prompt "..."             # Self Forcing's released checkpoint
    python sample.py --prompts-file prompts.txt --num-videos 2 --out videos/     # one video per prompt and seed
    python sample.py --prompt "..." --frames 321 --stream                        # 20 s, playable while written
    python sample.py --prompt "..." --chunk 1                                    # frame-wise: lower first-frame latency
    python sample.py --tiny --prompt "a red fox" --frames 21 --out /tmp/fox.mp4  # CPU, seconds, random weights
    python sample.py --prompts-file prompts.txt --out videos/ --compile --overlap-decode  # speed flags (BENCHMARKS.md)
    python sample.py --prompt "..." --decoder tae --decoder-path taew2_1.pth     # the tiny decoder (load_decoder)
    python sample.py --prompt "..." --fp8 --compile                              # float8 transformer (GPU, cc >= 8.9)
    python sample.py --prompt "..." --offload                                    # less GPU memory
    python bench.py [--tiny]                                                     # measures the speed (BENCHMARKS.md)
    python sample.py --prompt "a corgi runs on a beach" --switch 41 "the corgi jumps into the sea" --frames 161
    # 1 min, 4 prompts:
    python sample.py --prompt "..." --frames 961 --switch 241 "..." --switch 481 "..." --switch 721 "..."
    python sample.py --prompt "the corgi swims back" --extend corgi.mp4 --frames 241  # the clip, then new frames
    python sample.py --prompt "a corgi runs on a beach" --image first.png        # image-to-video
    python sample.py --checkpoint runs/dmd/ckpt.pt --prompt "..."  # distill_dmd.py's bidirectional 4-step model
    python sample.py --checkpoint longlive_base.pt --lora lora.pt --cache longlive --prompt "..."  # LongLive v1.0
    python sample.py --checkpoint rewardforcing.pt --cache reward-forcing --prompt "..."  # Reward Forcing (Lu et al.)
    python sample.py --checkpoint framewise-2step.pt --chunk 1 --steps 2 --prompt "..."  # Causal Forcing++ 2-step

Frames, blocks and long videos
------------------------------
--frames is any 4k+1. The latent video has (frames-1)/4+1 frames, generated in blocks of --chunk
latent frames: --chunk 3 (chunk-wise) generates 3 latent frames (12 video frames) per block,
--chunk 1 (frame-wise) one latent frame; a last block may be shorter. Videos longer than 81 frames
keep an attention window of --max-frames latent frames (21, the training length): a block attends
to the first block (an attention sink) plus the most recent frames, with RoPE positions that keep
growing, so the time per block stays flat however long the video. Each block is decoded by the VAE
as soon as it is done (the Wan VAE is causal; block-wise decoding gives the same frames as one
decode), and written to the mp4. --stream writes a fragmented mp4 that players open before the
video is finished (and that keeps its frames when Ctrl-C or SIGTERM stops sample.py: main says so).

Where the rest is explained: the weights (--model, --checkpoint, --tiny) at load_generator;
--switch at check_interactive and FrameStream._take_switches; --extend and --image at
read_start_frames; a bidirectional --checkpoint at generator_of; released models (--cache,
--steps, --lora) at CACHES; what is exact, bit for bit, at FrameStream; the speed flags at
add_model_flags, and the speed kit (--decoder tae, --fp8, --offload) at load_decoder and load_models.
"""
import argparse
import collections
import contextlib
import math
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

import causal_wan as cw
import common
import convert
import speedkit

TOY_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "weights")  # --toy (toy/run.py --ship)


def parse_args(argv=None):
    p = common.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="text of the video")
    p.add_argument("--prompts-file", help="one prompt a line, one video each")
    p.add_argument("--jobs", help="tab-separated lines 'prompt<TAB>seed<TAB>out.mp4' (used by eval_vbench.sh)")
    add_model_flags(p)
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--num-videos", type=common.positive_int, default=1,
                   help="videos per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (81 = 5 s at 16 fps)")
    p.add_argument("--chunk", type=int, choices=[1, 3],
                   help="latent frames per block: 3 chunk-wise (default), 1 frame-wise")
    p.add_argument("--out", default="out.mp4", help="an .mp4 path for one video, else a folder")
    p.add_argument("--fps", type=common.positive_int, default=16)
    p.add_argument("--stream", action="store_true",
                   help="write each block into the mp4 as soon as it is decoded "
                        "(fragmented mp4, playable while written)")
    p.add_argument("--switch", nargs=2, action="append", default=[], metavar=("FRAME", "PROMPT"),
                   help="from the first block boundary at or after video frame FRAME on, generate PROMPT (repeatable)")
    p.add_argument("--no-recache", action="store_true",
                   help="--switch changes only the cross-attention, without re-caching (for comparison)")
    p.add_argument("--extend", metavar="CLIP",
                   help="continue this video: the output is the clip as the VAE reconstructs it, then new frames "
                        "(--frames counts both; --tiny's random VAE does not reconstruct it)")
    p.add_argument("--image", help="image-to-video: the image is the first frame, as the VAE reconstructs it "
                                   "(untested with text-to-video weights; --tiny's random VAE does not reconstruct it)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--benchmark" in argv:  # the benchmark has a script of its own
        rest = " ".join(a for a in argv if a != "--benchmark")
        raise common.UserError(f"the benchmark is bench.py now: python bench.py{' ' + rest if rest else ''}")
    args = p.parse_args(argv)
    model_defaults(args)
    args.chunk_given, args.chunk = args.chunk is not None, args.chunk or 3
    return args


def add_model_flags(p):
    """The flags of the generator, its decoder and their speed options, shared with demo.py.

    The speed flags: what each one measured is in BENCHMARKS.md; none is on by default until a GPU
    run shows it pays. --overlap-decode decodes block b in a worker thread (on a GPU, its own CUDA
    stream) while block b+1 is denoised, same frames. --compile runs the transformer blocks through
    torch.compile (--compile reduce-overhead adds CUDA graphs; the first video pays the compilation,
    so it is for many prompts or long videos). --compile-vae compiles the VAE decoder too (its norms,
    activations and cache padding fuse around cuDNN's convolutions; same pixels within one level of
    255 on the CPU). --cudnn-benchmark lets cuDNN autotune the VAE's convolutions. --vae-dtype bf16
    decodes in bf16 instead of fp32 (diffusers runs the Wan VAE in fp32; bf16 changes pixels, by up
    to 13/255 on the tiny random VAE: not checked on the real one). The speed kit (--decoder tae,
    --fp8, --offload) is explained at load_models and load_decoder."""
    p.add_argument("--model", default=cw.DEFAULT_MODEL, help="diffusers-format Wan: hub id or local folder")
    p.add_argument("--checkpoint", help="a generator trained by this repo (or Self Forcing's .pt)")
    p.add_argument("--no-ema", action="store_true", help="use the checkpoint's raw weights instead of its EMA")
    p.add_argument("--height", type=int, help="multiple of 16 (default 480; 64 with --tiny)")
    p.add_argument("--width", type=int, help="multiple of 16 (default 832; 64 with --tiny)")
    p.add_argument("--max-frames", type=common.positive_int,
                   help="attention window in latent frames (long videos; default 21, or --cache's)")
    p.add_argument("--cache", default="default", choices=list(CACHES),
                   help="the KV-cache rules of a released model (window, sink, RoPE, EMA-sink, re-cache; see CACHES)")
    p.add_argument("--steps", type=int, default=4, choices=list(STEPS),
                   help="denoising steps per block: 4, or 2 / 1 for Causal Forcing++'s models (first block: 4)")
    p.add_argument("--lora", metavar="FILE", help="a PEFT LoRA merged into the generator (LongLive's lora.pt)")
    p.add_argument("--lora-alpha", type=common.positive_float,
                   help="the LoRA's alpha (default: its rank, a scale of 1, as LongLive's)")
    p.add_argument("--tiny", action="store_true", help="random tiny Wan built on the fly (CPU demo; output is noise)")
    p.add_argument("--toy", action="store_true",
                   help="the toy world's trained models (toy/weights: --model toy/weights/wan --checkpoint "
                        "toy/weights/generator, 32x32, --chunk 1): a CPU video that shows something")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile the transformer blocks (reduce-overhead: also CUDA graphs); "
                        "the first video pays the compilation")
    p.add_argument("--compile-vae", action="store_true",
                   help="torch.compile the VAE decoder too (minutes of compilation on the first video)")
    p.add_argument("--overlap-decode", action="store_true",
                   help="decode block b while block b+1 is denoised (a worker thread, on a GPU its own stream)")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="VAE decode precision (fp32 as diffusers runs the Wan VAE)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune the decoder's convolutions (GPU)")
    p.add_argument("--decoder", default="vae", choices=["vae", "tae"],
                   help="vae: the Wan VAE (exact, the default); tae: the tiny decoder of --decoder-path")
    p.add_argument("--decoder-path", metavar="FILE",
                   help="--decoder tae: taew2_1.pth from github.com/madebyollin/taehv (--tiny: a random one)")
    p.add_argument("--fp8", action="store_true",
                   help="the transformer blocks' linear layers in float8 (torchao; a GPU of compute capability >= 8.9)")
    p.add_argument("--offload", action="store_true",
                   help="low memory: the text encoder and the decoder in CPU memory, on the device only while they run")


# Released streaming models whose checkpoints load (convert.py) but whose KV cache keeps other rules than ours.
# Their keys do not tell them apart (each is a Wan2.1-1.3B in Self Forcing's layout), so --cache names the rules
# (VideoStream's options). default: this repo's, Self Forcing's, CausVid's and Causal Forcing's (a window of
# --max-frames latent frames, the first block as its sink, absolute RoPE, the replayed re-cache). longlive: LongLive
# v1.0 (NVlabs/LongLive, longlive_base.pt + --lora lora.pt): a window of 12 with a 3-frame sink, its own re-cache at a
# --switch (past the window the sink keeps the old prompt); longlive-infinity: its use_infinite_attention config (RoPE
# over the window's slots). reward-forcing: Lu et al.'s (JaydenLyh/Reward-Forcing): a window of 9, a 3-frame EMA-Sink
# (alpha 0.999), RoPE over the window's slots. Each equals its project's own inference on tiny random weights
# (tests/test_released.py).
CACHES = {
    "default": {},
    "longlive": dict(max_frames=12, sink_frames=3, recache="longlive"),
    "longlive-infinity": dict(max_frames=12, sink_frames=3, recache="longlive", rope="window"),
    "reward-forcing": dict(max_frames=9, sink_frames=3, rope="window", sink_ema=0.999),
}
# --steps: the schedule per block; Causal Forcing++'s 2- and 1-step models (thu-ml/Causal-Forcing) run the first block
# with the 4 steps (their denoising_step_list_first_chunk)
STEPS = {4: {}, 2: dict(timesteps=cw.shift_timesteps([1000, 500]), first_timesteps=cw.DENOISING_TIMESTEPS),
         1: dict(timesteps=cw.shift_timesteps([1000]), first_timesteps=cw.DENOISING_TIMESTEPS)}


def stream_options(args):
    """VideoStream's options of --cache and --steps (the window, args.max_frames, is passed on its own)."""
    return {k: v for k, v in {**CACHES[args.cache], **STEPS[args.steps]}.items() if k != "max_frames"}


def model_defaults(args):
    """The defaults that depend on --tiny, --device and --cache, and the flags that contradict each other there."""
    window = CACHES[args.cache].get("max_frames")
    if window is not None and args.max_frames not in (None, window):
        raise common.UserError(f"--cache {args.cache} keeps the released model's window of {window} latent frames: "
                               f"drop --max-frames {args.max_frames}")
    args.max_frames = window or args.max_frames or 21
    if args.lora_alpha is not None and args.lora is None:
        raise common.UserError(f"--lora-alpha {args.lora_alpha} scales a --lora: give --lora FILE too")
    if args.tiny:
        args.model = convert.tiny_model_dir() if args.model == cw.DEFAULT_MODEL else args.model
    if args.toy:  # shorthands only: the toy models go through the same loaders as Wan
        if args.tiny:
            raise common.UserError("--toy and --tiny are two different small models: give one of them")
        args.model = os.path.join(TOY_WEIGHTS, "wan") if args.model == cw.DEFAULT_MODEL else args.model
        args.checkpoint = args.checkpoint or os.path.join(TOY_WEIGHTS, "generator")
        args.chunk = args.chunk or 1  # the toy generator is frame-wise (toy/run.py: --block-size 1)
    if args.height is None:
        args.height = 64 if args.tiny else 32 if args.toy else 480
    if args.width is None:
        args.width = 64 if args.tiny else 32 if args.toy else 832
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def check_args(args):
    common.check_video_size(args)
    if args.num_videos < 1:
        raise common.UserError("--num-videos must be at least 1")
    check_window(args)
    common.check_device(args.device)
    check_speed_kit(args)
    if not (args.tiny and args.model == convert.tiny_model_dir()):  # --tiny builds its own on first use
        cw.check_model(args.model)
    check_weights(args)


def check_window(args):
    """--max-frames and --cache against --chunk (sample.py and demo.py)."""
    if args.cache != "default" and args.chunk != 3:
        raise common.UserError(f"--cache {args.cache} is a released model's, which generates blocks of 3 latent "
                               f"frames: drop --chunk {args.chunk}")
    if args.max_frames < 2 * args.chunk:
        raise common.UserError(f"--max-frames {args.max_frames} must hold at least two blocks of --chunk {args.chunk}")


def check_weights(args):
    """--checkpoint and --lora exist and can be opened (sample.py and demo.py)."""
    if args.checkpoint:
        convert.check_checkpoint(args.checkpoint, "--checkpoint")
    if args.lora:
        common.check_file(args.lora, "--lora")


def check_speed_kit(args):
    """--decoder, --decoder-path and --fp8 against each other and this machine, before any model
    loads (sample.py and demo.py; the device is checked). The tiny decoder's file is checked by
    loading it, the first model to load (it is small). --vae-dtype bf16 and --compile-vae set how
    the Wan VAE decodes and are refused with --decoder tae (--cudnn-benchmark applies to both).
    --fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or newer) and --dtype bf16;
    elsewhere it is a one-line error."""
    if args.decoder == "vae" and args.decoder_path is not None:
        raise common.UserError(f"--decoder-path '{args.decoder_path}' is the tiny decoder's file: add --decoder tae "
                               f"(the default decoder, the Wan VAE, comes from --model)")
    if args.decoder == "tae":
        if args.decoder_path is None and not args.tiny:
            raise common.UserError(f"--decoder tae needs the tiny decoder's file: {speedkit.TAE_DOWNLOAD}, "
                                   f"and pass --decoder-path taew2_1.pth")
        vae_only = [flag for flag, on in (("--vae-dtype bf16", args.vae_dtype == "bf16"),
                                          ("--compile-vae", args.compile_vae)) if on]
        if vae_only:
            raise common.UserError(f"{vae_only[0]} sets how the Wan VAE decodes, and --decoder tae decodes with the "
                                   f"tiny decoder (in --dtype, {args.dtype}): drop {vae_only[0]}")
    if args.fp8:
        speedkit.check_fp8(args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)


def read_jobs(args):
    """[(prompt, seed, out_path)] from --prompt / --prompts-file / --jobs."""
    if sum(x is not None for x in (args.prompt, args.prompts_file, args.jobs)) != 1:
        raise common.UserError("give exactly one of --prompt, --prompts-file, --jobs")
    if args.jobs:
        jobs = []
        for n, line in enumerate(common.read_text(args.jobs, "--jobs").splitlines(), 1):
            parts = line.split("\t")
            if len(parts) != 3 or not parts[2].lower().endswith(".mp4"):
                raise common.UserError(f"{args.jobs}:{n}: expected 'prompt<TAB>seed<TAB>out.mp4'")
            if not parts[0].strip():
                raise common.UserError(f"{args.jobs}:{n}: empty prompt")
            if not re.fullmatch(r"[0-9]+", parts[1]):  # not str.isdigit(): it takes '²', which int() refuses
                raise common.UserError(f"{args.jobs}:{n}: seed '{parts[1]}' is not a whole number in the digits 0-9")
            if int(parts[1]) >= 2**32:
                raise common.UserError(f"{args.jobs}:{n}: seed {parts[1]} is not in 0..{2**32 - 1}")
            jobs.append((parts[0], int(parts[1]), parts[2]))
        return check_outputs(jobs)
    if args.prompts_file:
        prompts = [line.strip() for line in common.read_text(args.prompts_file, "--prompts-file").splitlines()
                   if line.strip()]
        if not prompts:
            raise common.UserError(f"--prompts-file '{args.prompts_file}' has no prompts")
    else:
        prompts = [args.prompt]
    pairs = [(p, args.seed + k) for p in prompts for k in range(args.num_videos)]
    if not all(p.strip() for p, _ in pairs):
        raise common.UserError("empty prompt: give a text description of the video")
    one_file = args.out.lower().endswith(".mp4")
    extension = os.path.splitext(args.out.rstrip("/"))[1]
    if not one_file and extension and not os.path.isdir(args.out):  # would silently become a folder
        raise common.UserError(f"--out '{args.out}' ends in '{extension}': videos are mp4, so give a name ending in "
                               f".mp4, or a folder (one without an extension, or one that exists)")
    if len(pairs) == 1 and one_file:
        return check_outputs([(pairs[0][0], pairs[0][1], args.out)])
    if one_file:
        raise common.UserError(f"{len(pairs)} videos cannot all be written to '{args.out}': give a folder as --out")
    return check_outputs([(p, s, os.path.join(args.out, f"{i:04d}_{slug(p)}-{s}.mp4"))
                          for i, (p, s) in enumerate(pairs)])


def check_outputs(jobs):
    """Every video can be written where it goes (folder writable, no folder in the way of the
    file): found now, not after the video has been generated."""
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(path)) for _, _, path in jobs):
        common.check_output_folder(folder, "output folder")
    for _, _, path in jobs:
        if os.path.isdir(path):
            raise common.UserError(f"'{path}' is a folder: the video cannot be written there "
                                   f"(remove it or choose another --out)")
    return jobs


def slug(text, n=60):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "video"


def load_generator(args, device, dtype, kind="causal"):
    """The generator of --model and --checkpoint on `device`, in `dtype`, frozen.

    --model is a hub id (default Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or a local diffusers-format folder
    (model_index.json, transformer/, vae/, text_encoder/, tokenizer/). Offline, get it once with
    `hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir wan` and pass --model wan. Without weights
    and without the hub, sample.py says exactly that in one line. --checkpoint takes a checkpoint of
    this repo (its EMA generator; --no-ema for the raw one) or Self Forcing's / CausVid's .pt in the
    original Wan key layout (mapped on load). --tiny builds a random-init tiny Wan (transformer, VAE,
    UMT5, tokenizer) in the real diffusers format under ~/.cache/reward_forcing/tiny_wan and runs the
    same loading code a user with real weights runs, at 64x64. Its output is noise; it tests the
    pipeline, not the model. --lora merges a PEFT LoRA into the weights after --checkpoint, in fp32
    (convert.merge_lora); LongLive runs it unmerged in bf16, so the two differ by bf16 rounding."""
    if args.tiny:
        if args.model == convert.tiny_model_dir():
            convert.make_tiny_wan(args.model)  # built once, then reused
        print("--tiny: random-init tiny Wan, the video is noise (it tests the pipeline, not the model)",
              file=sys.stderr)
    model = cw.from_pretrained(args.model, dtype=torch.float32)
    if args.checkpoint:
        convert.load_generator_weights(model, args.checkpoint, use_ema=not args.no_ema, kind=kind)
    if args.lora:
        convert.merge_lora(model, convert.load_lora(args.lora), args.lora_alpha)
    return cw.cast_model(model, dtype, device).eval().requires_grad_(False)  # bf16 with Wan's fp32 parameters kept


def load_models(args, device, dtype, kind, prompts, start_frames):
    """(the generator on `device`, {prompt: text context [1, 512, text_dim]} for every prompt in
    `prompts`, decode(z, first) for FrameStream, the latents of start_frames or None). The text
    encoder runs once, here, for all the prompts (switches included), and is freed before the
    decoder loads.

    The speed kit: --decoder tae (load_decoder), --fp8, --offload. None of it is on by default; what
    was measured is in BENCHMARKS.md. bench.py has a row for each of the three (rows 9-11, each on
    top of the rows above it; --fp8's on a float8 copy of the model, which the rows after it do not
    use) and times the text encoder with and without --offload, with the peak GPU memory of each:
    the numbers a GPU run will give.
    --fp8 runs the 10 linear layers of every transformer block in float8 through torchao (weights in
    float8 with a scale per output row, activations quantized per token at each call); the norms,
    modulation, RoPE, embedders and output head stay bf16 (what it needs: check_speed_kit). Eager
    float8 can be slower than bf16 (pytorch/ao#685), so use it with --compile. Not measured yet (no
    GPU so far): its speed, and its difference from bf16 with the real weights.
    --offload: every model loads into CPU memory (the machine's RAM must hold the text encoder,
    UMT5-XXL, 5.7B parameters, ~11 GB in bf16, and the decoder); the text encoder's weights go to the
    device only while it encodes all the prompts (switches included), before the generator moves
    there (the two are never on the device together), and the decoder's only while it decodes a
    block: each block's decode brings it over and drops it after (load_decoder). The video is the
    same (tested on the CPU); the GPU memory it saves and the time its transfers take are not
    measured yet."""
    home = torch.device("cpu") if args.offload else device  # where weights live while their model is not running
    tae = None
    if args.decoder == "tae":  # first: it is small, and a wrong file is said before the big models load
        tae = speedkit.load_tiny_decoder(args.decoder_path or speedkit.tiny_decoder_path(), home, dtype)
    model = load_generator(args, home, dtype, kind)
    tokenizer, encoder = cw.load_text_encoder(args.model, dtype=dtype, device=home)
    with speedkit.on_device(encoder, device):  # a no-op unless --offload
        contexts = {p: cw.encode_prompts(tokenizer, encoder, [p]) for p in dict.fromkeys(prompts)}
    del tokenizer, encoder  # the text encoder (5.7B for Wan) is not needed during generation
    model = model.to(device)
    if args.fp8:
        speedkit.quantize_fp8(model)  # torchao converts the weights where they are: on the GPU, before torch.compile
    if args.compile:
        speedkit.compile_blocks(model, args.compile)
    decode, prefix = load_decoder(args, device, tae, start_frames)
    return model, contexts, decode, prefix


def load_decoder(args, device, tae=None, start_frames=None):
    """(decode(z, first): latents [1, 16, n, h, w] -> pixels [1, 3, T, H, W] in [-1, 1] for
    FrameStream, the latents of start_frames [T, H, W, 3] or None). --decoder vae: the Wan VAE in
    --vae-dtype. --decoder tae: `tae`, the tiny decoder (loaded first, in --dtype); the Wan VAE
    then loads only when there are start_frames (--extend, --image) to encode, and is freed after.
    --offload: the decoder's weights stay in CPU memory and are on the device only while it
    decodes a block (its causal state stays on the device).

    --decoder tae --decoder-path taew2_1.pth decodes with the decoder of TAEW2.1, the tiny
    autoencoder for Wan 2.1 latents published at github.com/madebyollin/taehv (download taew2_1.pth
    there), instead of the Wan VAE: 24.9x fewer FLOPs per latent frame, block by block with its own
    causal memory (equal to one decode of the whole video: tested), in --dtype (bf16 on a GPU, fp32
    on the CPU). Its image quality is the published model's, not measured here (the tests use random
    weights), so the exact fp32 Wan VAE stays the default. With --extend or --image the Wan VAE
    encodes the clip or image and is freed before generating; the clip's frames in the output are
    then the tiny decoder's reconstruction. --tiny without --decoder-path builds a random one in
    taew2_1.pth's layout."""
    home = torch.device("cpu") if args.offload else device
    vae = prefix = None
    if args.decoder == "vae" or start_frames is not None:
        vae = cw.load_vae(args.model, dtype=torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32,
                          device=home)
    if start_frames is not None:
        with speedkit.on_device(vae, device):  # a no-op unless --offload
            prefix = vae_encode(vae, start_frames, device)
    if args.decoder == "tae":  # the VAE, if it encoded, is freed when this returns
        decoder, decode = tae, partial(speedkit.tae_decode, tae)
    else:
        decoder, decode = speedkit.compile_vae(vae, args.compile_vae), partial(cw.vae_decode, vae)
    return (speedkit.offloaded(decode, decoder, device) if args.offload else decode), prefix


# -----------------------------------------------------------------------------
# interactive inputs: --switch, --extend, --image, and a bidirectional --checkpoint


def generator_of(args):
    """'causal', or 'bidirectional' for distill_dmd.py --generator bidirectional: read from the
    checkpoint's args without loading its weights (mmap). A bidirectional checkpoint renders the
    whole video as one block with full attention (no --chunk, --switch, --extend, --image)."""
    return convert.generator_kind(convert.load_checkpoint(args.checkpoint, mmap=True)) if args.checkpoint else "causal"


def check_interactive(args, kind):
    """Before any model loads: (latent frames per block, the switches [(frame, prompt)], the
    frames the video starts from (uint8 [T, H, W, 3]) or None).

    --switch FRAME PROMPT (repeatable): from the first block boundary at or after video frame FRAME
    (blocks start at frames 0, 9, 21, 33, ... chunk-wise; 0, 1, 5, 9, ... frame-wise) the video
    follows PROMPT; the log says at which frame. How the switch is made (re-cache, --no-recache):
    FrameStream._take_switches."""
    latent_frames = (args.frames - 1) // 4 + 1
    if args.no_recache and not args.switch:
        raise common.UserError("--no-recache changes how --switch switches prompts: give a --switch FRAME PROMPT too")
    if kind == "bidirectional":
        given = [f for f, on in [("--chunk", args.chunk_given), ("--switch", args.switch), ("--extend", args.extend),
                                 ("--image", args.image), (f"--cache {args.cache}", args.cache != "default"),
                                 (f"--steps {args.steps}", args.steps != 4)] if on]
        if given:
            raise common.UserError(f"checkpoint '{args.checkpoint}' is a bidirectional generator: it renders the whole "
                                   f"video as one block, so {given[0]} does not apply (drop it, or use a causal "
                                   f"checkpoint)")
        print(f"note: '{args.checkpoint}' is a bidirectional 4-step generator: the whole video ({latent_frames} latent "
              f"frames) is rendered as one block with full attention", file=sys.stderr)
        return latent_frames, [], None
    start_frames = read_start_frames(args)
    start = 0 if start_frames is None else (len(start_frames) - 1) // 4 + 1  # latent frames given
    first = max(1, pixel_frame(start))  # the first frame a switch may name
    switches, at = [], {}  # at: {the frame a switch takes effect: the frame it named}
    for frame, prompt in args.switch:
        if not re.fullmatch(r"-?\d+", frame):
            raise common.UserError(f"--switch '{frame}': FRAME must be a video frame number, "
                                   f"e.g. --switch 41 \"the fox jumps\"")
        frame = int(frame)
        if not first <= frame < args.frames:
            why = ("" if frame >= first else f" (frames 0-{first - 1} come from --extend/--image)" if start
                   else " (frame 0 is --prompt's)")
            raise common.UserError(f"--switch {frame} is outside the frames a switch can name, "
                                   f"{first}-{args.frames - 1}{why}")
        if not prompt.strip():
            raise common.UserError(f"--switch {frame}: empty prompt")
        boundary = start  # the switch takes effect at the first block boundary at or after the frame
        while pixel_frame(boundary) < frame:
            boundary += args.chunk
        if boundary >= latent_frames:
            raise common.UserError(f"--switch {frame}: the first block boundary at or after it is frame "
                                   f"{pixel_frame(boundary)}, after the video's last frame {args.frames - 1}; switch "
                                   f"earlier or make the video longer")
        if pixel_frame(boundary) in at:
            raise common.UserError(f"--switch {at[pixel_frame(boundary)]} and --switch {frame} both take effect at "
                                   f"frame {pixel_frame(boundary)} (switches happen at block boundaries): give one of "
                                   f"them")
        at[pixel_frame(boundary)] = frame
        switches.append((frame, prompt))
    return args.chunk, switches, start_frames


def read_start_frames(args):
    """--image (one frame) or --extend (a clip, cut to its longest 4k+1 prefix) as uint8 frames
    [T, H, W, 3] of --height x --width, resized and center-cropped when needed; None without them.

    --extend CLIP continues a video: the clip (its longest 4k+1 prefix) is encoded by the Wan VAE
    (causal: first frame alone, then groups of 4; vae_encode) and its latents are placed in the KV
    cache as clean context, as a long video would hold them (the sink and the most recent frames).
    The output is the clip as the VAE reconstructs it, then the new frames, decoded in one pass of
    the causal decoder (no seam); --frames counts both. --image IMG starts the video from an image
    (the first latent frame), as Self Forcing's image-to-video does with a text-to-video generator:
    its quality with T2V-trained weights is untested. Clips and images of another size are resized
    and center-cropped to --height x --width (fit_frames). With --tiny the clip's or image's frames
    come back visibly different: the random tiny VAE cannot reconstruct them (the pipeline is real,
    the pictures are not)."""
    if args.image and args.extend:
        raise common.UserError("--extend and --image together: a video continues a clip or starts from an image, "
                               "give one")
    path = args.image or args.extend
    if path is None:
        return None
    name = f"--{'image' if args.image else 'extend'} '{path}'"
    if not os.path.isfile(path):
        raise common.UserError(f"{name} does not exist")
    if args.image:
        from PIL import Image
        try:
            with Image.open(path) as image:
                frames = np.array(image.convert("RGB"))[None]  # [1, H, W, 3]
        except Exception as e:  # not an image, truncated
            raise common.UserError(f"{name} is not a readable image ({type(e).__name__}): "
                                   f"give a PNG or JPEG") from None
    else:
        import imageio
        frames = []
        try:
            with imageio.get_reader(path, "ffmpeg") as reader:
                for frame in reader:  # at most --frames of them: a longer clip leaves nothing to generate anyway
                    frames.append(frame)
                    if len(frames) == args.frames:
                        break
        except Exception as e:  # not a video, unknown format
            raise common.UserError(f"{name} is not a readable video ({type(e).__name__}): give an mp4") from None
        if len(frames) < 5:
            raise common.UserError(f"{name} has {len(frames)} frame(s): continue a video of 5 frames or more, "
                                   f"or use --image")
        usable = 4 * ((len(frames) - 1) // 4) + 1
        if usable != len(frames) and len(frames) < args.frames:
            print(f"note: {name} has {len(frames)} frames, not 4k+1: using its first {usable}", file=sys.stderr)
        frames = np.stack(frames[:usable])
    if len(frames) >= args.frames:
        raise common.UserError(f"{name} gives {len(frames)}{'+' if args.extend else ''} frames and --frames "
                               f"{args.frames} counts the whole video, so nothing is left to generate: make --frames "
                               f"larger than the clip")
    return fit_frames(frames, args.height, args.width, name)


def fit_frames(frames, height, width, name):
    """uint8 frames [T, H, W, 3] -> [T, height, width, 3]: scaled to cover the size, center-cropped."""
    H, W = frames.shape[1:3]
    if (H, W) == (height, width):
        return frames
    print(f"note: {name} is {H}x{W}: resized and center-cropped to {height}x{width}", file=sys.stderr)
    scale = max(height / H, width / W)
    size = (max(height, round(H * scale)), max(width, round(W * scale)))
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    out = []
    for chunk in torch.from_numpy(frames).split(16):  # a few frames at a time: a long clip stays small
        x = torch.nn.functional.interpolate(chunk.permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                                            antialias=True)  # [n, 3, size[0], size[1]]
        out.append(x[:, :, top:top + height, left:left + width].round().clamp(0, 255).to(torch.uint8)
                   .permute(0, 2, 3, 1))  # [n, height, width, 3]
    return torch.cat(out).numpy()


@torch.no_grad()
def vae_encode(vae, frames, device):
    """uint8 frames [T, H, W, 3] (T = 4k+1) -> latents [1, 16, 1+k, H/8, W/8], normalized as
    cw.vae_decode expects: the Wan VAE's causal encoder (first frame alone, then groups of 4),
    the mean of its posterior."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(device).float() / 127.5 - 1  # [1, 3, T, H, W]
    mu = vae.encode(x.to(vae.dtype)).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    return (mu - mean) / std


def write_video(path, blocks, expected_frames, fps, stream, frames_per_block, progress=None):
    """Write the blocks of uint8 frames [T, H, W, 3] to an mp4; returns the frame count. Without
    --stream a finished file is always a whole video: written aside, then renamed. Either way the
    closed file must decode to expected_frames frames (common.finished_mp4), or it is removed.
    Stopped midway (Ctrl-C, SIGTERM: a KeyboardInterrupt), the file written aside is removed; a
    --stream file is the video so far and stays (streamed_mp4; main says what it keeps)."""
    tmp = path if stream else path + ".part.mp4"
    count = 0
    checked = streamed_mp4(path, expected_frames) if stream else common.finished_mp4(tmp, path, expected_frames)
    # closing(): imageio's writer, used as a context manager, leaves its file unfinished when the block raises
    with checked, contextlib.closing(open_writer(tmp, fps, stream, frames_per_block)) as writer:
        for frames in blocks:
            for frame in frames:
                writer.append_data(frame)
            count += len(frames)
            if progress is not None:
                progress.update(1)
    return count


@contextlib.contextmanager
def streamed_mp4(path, expected_frames):
    """common.finished_mp4 for a --stream file, written in place: the same check once the writer has
    closed, the same removal on an error, but a stop (KeyboardInterrupt: Ctrl-C, SIGTERM) leaves the
    file as it is, the frames written so far (kept_frames)."""
    try:
        yield
    except Exception as error:  # not a KeyboardInterrupt
        with common.finished_mp4(path, path, expected_frames):
            raise error
    with common.finished_mp4(path, path, expected_frames):
        pass


def kept_frames(path):
    """What a --stream file stopped midway keeps: the number of frames it decodes to; a file that does
    not decode is removed (0)."""
    import imageio
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            frames = sum(1 for _ in reader)
    except Exception:  # nothing written yet, or torn before its first frame
        frames = 0
    if frames == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return frames


def open_writer(path, fps, stream, frames_per_block):
    """An mp4 writer. stream: a fragmented mp4 (its index up front), one fragment per frame, a
    keyframe per block and no encoder look-ahead, flushed per packet: each block is in the file,
    playable, as soon as it is decoded (but its last frame, whose duration the muxer learns from
    the next frame)."""
    import imageio
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    params = ["-movflags", "frag_every_frame+empty_moov+default_base_moof", "-g", str(frames_per_block),
              "-tune", "zerolatency", "-flush_packets", "1"] if stream else None
    return imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_params=params)


# -----------------------------------------------------------------------------
# the streaming API: file output, --stream and demo.py all iterate a FrameStream


def pixel_frame(latent_pos):
    """The first video frame of latent frame `latent_pos`: latent 0 is frame 0, latent p >= 1 is
    frames 4p-3 .. 4p (the VAE's first frame alone, then groups of 4)."""
    return 0 if latent_pos == 0 else 4 * latent_pos - 3


def block_noise(seed, start, shape, device, dtype):
    """The initial noise of the block that starts at latent frame `start`, and the generator its
    re-noising draws from next: seeded by (seed, start), on the CPU. A block's noise depends neither
    on the video's length nor on switches, so a finite video is the first frames of the endless
    stream with the same seed, on every device."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + start) % 2**64)  # distinct per block; any seed
    return torch.randn(shape, generator=g).to(device, dtype), g


class FrameStream:
    """A video generated block by block, iterated as the uint8 frames [T, H, W, 3] of each block as
    soon as they are decoded; between blocks it takes a new prompt or a stop from any thread.

        stream = FrameStream(model, decode, model.prompt_kv(encode(prompt)), encode=encode,
                             height=480, width=832, seed=0)        # frames=None: endless
        for frames in stream:                                      # one thread iterates, once
            ...                                                    # elsewhere: stream.switch(...), stream.stop()

    model: the causal transformer (its device and dtype are the stream's). decode(z, first):
    latents [1, 16, n, h, w] -> pixels [1, 3, T, H, W] in [-1, 1], first=True resetting its causal
    state (`partial(cw.vae_decode, vae)` or `partial(speedkit.tae_decode, tae)`). encode(prompt) ->
    text context [1, S, text_dim] for switches; it runs in the iterating thread. frames: the video's
    length (4k+1 video frames, prefix included), None to run until stop(). prefix: clean latents
    [1, 16, L, h, w] the video starts with (an --extend clip, an --image): their decoded frames come
    first, then new frames from position L. noise(start, n) -> (noise [1, 16, n, h, w], generator):
    each block's noise (default `block_noise` with `seed`). keep_latents: collect every block's
    latents in `latents`. options: VideoStream's options of a released model (`stream_options`).

    Thread safety: switch() and stop() may be called from any thread at any time; they only queue
    a request under a lock, applied by the iterating thread before its next block. `frames_done`,
    `switches_done` [(frame, prompt, recache)] and `latents` are written by the iterating thread only.
    With overlap, each block is decoded in a worker thread while the next one is generated (see
    decode_blocks).

    What is exact (tests/test_interactive.py, on the tiny model): without a switch the video is
    training's rollout, bit for bit; frames before a switch are the single-prompt video's; a switch
    with re-cache after b blocks is bit for bit the continuation of those b blocks' latents under the
    new prompt; continuing the first blocks of a video's latents gives exactly its remaining blocks
    while those first blocks fit the window (at most --max-frames minus --chunk latent frames: 69
    video frames with the defaults), and its decode equals one decode of the whole video. Past the
    window a continuation is not the original: it re-derives the recent frames' keys from the frames
    the window holds, while the original computed them with the evicted frames still in view.
    (--extend goes through the VAE encoder, so a clip's latents are the encoder's, not the
    generator's.) The noise of each block depends only on --seed and where the block starts (no two
    blocks share it): a video of N frames is the first N frames of a longer one with the same seed
    and switches (up to a shorter last block). The frames streamed block by block are exactly one
    decode of the whole latent video (the decoder's causal cache carried from block to block).
    """

    def __init__(self, model, decode, prompt_kv, *, height, width, seed=0, frames=None, chunk=3, max_frames=21,
                 encode=None, prefix=None, overlap=False, log=None, keep_latents=False, noise=None, options=None):
        param = next(model.parameters())
        shape = lambda n: (1, model.cfg.in_channels, n, height // 8, width // 8)  # noqa: E731
        self.model, self.decode, self.prompt_kv, self.encode = model, decode, prompt_kv, encode
        self.noise = noise or (lambda start, n: block_noise(seed, start, shape(n), param.device, param.dtype))
        self.latent_frames = None if frames is None else (frames - 1) // 4 + 1
        self.chunk, self.max_frames, self.overlap, self.options = chunk, max_frames, overlap, options or {}
        self.prefix = None if prefix is None else prefix.to(param.device, param.dtype)
        self.log = log or (lambda message: None)
        self.frames_done, self.switches_done = 0, []
        self.latents = [] if keep_latents else None
        self._lock, self._requests, self._stop, self._started = threading.Lock(), [], threading.Event(), False

    def switch(self, prompt, recache=True, frame=None):
        """Generate `prompt` from the first block boundary at or after video frame `frame` on (None:
        the next boundary). recache=False switches only the cross-attention (see cw.VideoStream)."""
        if not prompt.strip():
            raise common.UserError("empty switch prompt: give a text description of what comes next")
        if self.encode is None:
            raise common.UserError("this stream has no encode function: it cannot switch prompts")
        with self._lock:
            self._requests.append((frame, prompt, recache))

    def stop(self):
        """End the video after the block being generated; the frames of the blocks already
        generated are still yielded, then the iteration ends."""
        self._stop.set()

    def __iter__(self):
        if self._started:
            raise RuntimeError("a FrameStream is iterated once")
        self._started = True
        for frames in decode_blocks(self._latent_blocks(), self.decode, self.overlap):
            self.frames_done += len(frames)
            yield frames

    @torch.no_grad()
    def _latent_blocks(self):
        """(latents, first) of each block to decode: the prefix's, then the generated ones."""
        stream = cw.VideoStream(self.model, self.prompt_kv, self.chunk, self.max_frames,
                                total_frames=self.latent_frames, **self.options)
        if self.prefix is not None:
            stream.prefill(self.prefix)  # the decoder's causal cache is primed by decoding the prefix
            for start in range(0, self.prefix.shape[2], self.chunk):
                if self._stop.is_set():
                    return
                yield self._kept(self.prefix[:, :, start:start + self.chunk]), start == 0
        while not self._stop.is_set() and (self.latent_frames is None or stream.pos < self.latent_frames):
            self._take_switches(stream)
            n = self.chunk if self.latent_frames is None else min(self.chunk, self.latent_frames - stream.pos)
            first = stream.pos == 0
            noise, generator = self.noise(stream.pos, n)
            yield self._kept(stream.next_block(noise, generator)), first

    def _kept(self, z):
        if self.latents is not None:
            self.latents.append(z)
        return z

    def _take_switches(self, stream):
        """Apply the switch due at this block boundary; of several due at once, the last one asked
        (the others would not generate a single frame). With re-cache the KV cache of the frames the
        window holds (sink + recent frames) is recomputed under the new prompt from their clean
        latents by replaying their cache passes as they first ran: block by block, each block
        attending to the ones before it, each frame at its own RoPE position, the sink too. So the
        new prompt takes hold without a cut. (--cache longlive re-caches LongLive's way instead: one
        unmasked pass over its window, and past the window the sink keeps the old prompt's keys;
        cw.VideoStream._recache_longlive.) recache=False (--no-recache) swaps only the
        cross-attention prompt (for comparison: the cached frames keep the old prompt)."""
        frame = pixel_frame(stream.pos)
        with self._lock:
            due = [r for r in self._requests if r[0] is None or r[0] <= frame]
            self._requests = [r for r in self._requests if not (r[0] is None or r[0] <= frame)]
        if not due:
            return
        asked, prompt, recache = due[-1]
        stream.set_prompt(self.model.prompt_kv(self.encode(prompt)), recache=recache)
        self.switches_done.append((frame, prompt, recache))
        self.log(f"switch at frame {frame}" + (f" (asked for {asked})" if asked not in (None, frame) else "")
                 + ("" if recache else " without re-cache") + f": {prompt[:80]}"
                 + (f" ({len(due) - 1} earlier switch(es) due here dropped)" if len(due) > 1 else ""))


def decode_blocks(blocks, decode, overlap=False):
    """(latents, first) per block -> that block's uint8 frames [T, H, W, 3], in order. overlap:
    block b decodes in a worker thread (on a GPU on its own CUDA stream) while block b+1 is being
    generated (pulled from `blocks` here); the first block's frames are yielded as soon as they are
    decoded (first-frame latency), each later block's once the block after it is generated."""
    if not overlap:
        for z, first in blocks:
            yield common.to_uint8_frames(decode(z, first)[0])
        return
    pending = collections.deque()
    with ThreadPoolExecutor(max_workers=1) as worker:  # one worker: blocks are decoded in order
        for z, first in blocks:
            ready = None
            if z.is_cuda:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(z.device))
                z.record_stream(side_stream(z.device))  # the allocator must not reuse z before the side stream is done
            pending.append(worker.submit(decode_aside, decode, z, first, ready))
            # the first block at once (first-frame latency); then block b once b+1 is generated: at most
            # one block waits, so frames are never late by more than a block and a slow decoder slows
            # the generation down instead of queueing blocks without bound
            while len(pending) > 1 or first and pending:
                yield pending.popleft().result()  # a decode error is raised here
        while pending:
            yield pending.popleft().result()


def decode_aside(decode, z, first, ready):
    """decode in the worker thread; on a GPU on the side stream, after z is complete (ready)."""
    side = side_stream(z.device) if ready is not None else None
    with torch.no_grad(), torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if ready is not None:
            side.wait_event(ready)
        return common.to_uint8_frames(decode(z, first)[0])  # to the CPU: waits for this stream only


@torch.no_grad()
def generate(model, decode, prompt_kv, noise, chunk, max_frames, on_frames, generator=None, progress=None,
             overlap=False):
    """The latent video of `noise` [1, C, F, h, w] (re-noised from one `generator`, as cw.rollout),
    each block decoded by decode(z, first) as soon as it is done (`partial(cw.vae_decode, vae)` or
    `partial(speedkit.tae_decode, tae)`, as FrameStream takes it): a FrameStream with that noise. on_frames
    gets the uint8 frames [T, H, W, 3] of every block, in order (1 + 4(n - 1) frames for the first
    block, 4n after). Returns the latents."""
    h, w = noise.shape[3:]
    stream = FrameStream(model, decode, prompt_kv, height=8 * h, width=8 * w,
                         frames=4 * (noise.shape[2] - 1) + 1,
                         chunk=chunk, max_frames=max_frames, overlap=overlap, keep_latents=True,
                         noise=lambda start, n: (noise[:, :, start:start + n], generator))
    for frames in stream:
        on_frames(frames)
        if progress is not None:
            progress.update(1)
    return torch.cat(stream.latents, 2)


_SIDE_STREAMS = {}


def side_stream(device):
    """One decoding stream per GPU for the whole run (the caching allocator keeps memory per
    stream, so a new stream per video would hold a new pool of VAE activations)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def main(args):
    jobs, written, current = [], 0, None  # current: (path, its FrameStream) while that video is written

    def stopped():  # what a Ctrl-C or SIGTERM leaves: the one line common.run_script prints
        if current is None:
            return (f"between videos: {written} of {len(jobs)} videos written" if written
                    else "before any video was generated: nothing written")
        path, stream = current
        kept = kept_frames(path) if args.stream else None
        left = ("its partial file was removed" if kept is None else
                f"it keeps its first {kept} frames and plays" if kept else "no frame of it was kept")
        return (f"at frame {stream.frames_done} of {args.frames} in {path} (video {written + 1} of {len(jobs)}): "
                f"{left}; {written} of {len(jobs)} videos written")

    with common.interruptible(stopped):
        check_args(args)
        jobs = read_jobs(args)
        kind = generator_of(args)
        chunk, switches, start_frames = check_interactive(args, kind)
        device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # --device cuda:1: streams, events and synchronize on that GPU
        prompts = [j[0] for j in jobs] + [p for _, p in switches]
        model, contexts, decode, prefix = load_models(args, device, dtype, kind, prompts, start_frames)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        latent_frames, start = (args.frames - 1) // 4 + 1, 0 if prefix is None else prefix.shape[2]
        blocks = math.ceil(start / chunk) + math.ceil((latent_frames - start) / chunk)
        bar = tqdm(total=blocks * len(jobs), unit="block", desc="generating")
        for prompt, seed, path in jobs:
            stream = FrameStream(model, decode, model.prompt_kv(contexts[prompt]), encode=lambda p: contexts[p],
                                 height=args.height, width=args.width, seed=seed, frames=args.frames, chunk=chunk,
                                 max_frames=args.max_frames, prefix=prefix, overlap=args.overlap_decode,
                                 log=bar.write, options=stream_options(args))
            for frame, text in switches:
                stream.switch(text, recache=not args.no_recache, frame=frame)
            current = (path, stream)
            count = write_video(path, stream, args.frames, args.fps, args.stream, 4 * chunk, progress=bar)
            current, written = None, written + 1
            given = f", the first {len(start_frames)} from {args.extend or args.image}" if prefix is not None else ""
            bar.write(f"wrote {path} ({count} frames{given}, seed {seed}): {prompt[:80]}")
        bar.close()


if __name__ == "__main__":
    common.run_script(main, parse_args)  # a UserError: one line, exit 2; Ctrl-C or SIGTERM: stopped(), exit 130/143
