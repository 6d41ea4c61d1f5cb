"""
Text -> video with the causal (autoregressive) Wan: block by block with a KV cache, each block
decoded as soon as it is denoised; the prompt can change mid-video, a clip or an image can be continued.

    python sample.py --prompt "a corgi running in a park at sunset"                  # out.mp4: 81 frames 480x832, 16 fps
    python sample.py --checkpoint runs/reward/ckpt.pt --prompt "..." --out corgi.mp4  # a trained generator (EMA)
    python sample.py --checkpoint self_forcing_dmd.pt --prompt "..."                  # Self Forcing's released checkpoint
    python sample.py --prompts-file prompts.txt --num-videos 2 --out videos/          # one video per prompt and seed
    python sample.py --prompt "..." --frames 321 --stream                             # 20 s, playable while written
    python sample.py --prompt "..." --chunk 1                                         # frame-wise: lower first-frame latency
    python sample.py --tiny --prompt "a red fox" --frames 21 --out /tmp/fox.mp4       # CPU, seconds, random weights
    python sample.py --prompts-file prompts.txt --out videos/ --compile --overlap-decode  # speed options (BENCHMARKS.md)
    python sample.py --prompt "..." --decoder tae --decoder-path taew2_1.pth          # the tiny decoder (Speed kit in this docstring)
    python sample.py --prompt "..." --fp8 --compile                                   # float8 transformer (GPU, cc >= 8.9)
    python sample.py --prompt "..." --offload                                         # less GPU memory
    python sample.py --benchmark [--tiny]                                             # speed (see BENCHMARKS.md)
    python sample.py --prompt "a corgi runs on a beach" --switch 41 "the corgi jumps into the sea" --frames 161
    python sample.py --prompt "..." --frames 961 --switch 241 "..." --switch 481 "..." --switch 721 "..."  # 1 min, 4 prompts
    python sample.py --prompt "the corgi swims back" --extend corgi.mp4 --frames 241  # the clip, then new frames
    python sample.py --prompt "a corgi runs on a beach" --image first.png              # image-to-video
    python sample.py --checkpoint runs/dmd/ckpt.pt --prompt "..."  # distill_dmd.py's bidirectional 4-step model

Weights
-------
--model is a hub id (default Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or a local diffusers-format folder
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/). Offline, get it once with
`hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir wan` and pass --model wan. Without weights
and without the hub, sample.py says exactly that in one line. --checkpoint takes a checkpoint of
this repo (its EMA generator; --no-ema for the raw one) or Self Forcing's / CausVid's .pt in the
original Wan key layout (mapped on load). --tiny builds a random-init tiny Wan (transformer, VAE,
UMT5, tokenizer) in the real diffusers format under ~/.cache/reward_forcing/tiny_wan and runs the
same loading code a user with real weights runs, at 64x64. Its output is noise; it tests the
pipeline, not the model.

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
video is finished.

Switching prompts
-----------------
--switch FRAME PROMPT (repeatable): from the first block boundary at or after video frame FRAME
(blocks start at frames 0, 9, 21, 33, ... chunk-wise; 0, 1, 5, 9, ... frame-wise) the video
follows PROMPT; the log says at which frame. The KV cache of the frames the window holds (sink +
recent frames) is recomputed under the new prompt from their clean latents, each at its own RoPE
position (re-cache, as LongLive does), so the new prompt takes hold without a cut. --no-recache
swaps only the cross-attention prompt (for comparison: the cached frames keep the old prompt).

Continuing a clip, image-to-video
---------------------------------
--extend CLIP continues a video: the clip (its longest 4k+1 prefix) is encoded by the Wan VAE
(causal: first frame alone, then groups of 4) and its latents are placed in the KV cache as clean
context, as a long video would hold them (the sink and the most recent frames). The output is the
clip as the VAE reconstructs it, then the new frames, decoded in one pass of the causal decoder (no
seam); --frames counts both. --image IMG starts the video from an image (the first latent frame),
as Self Forcing's image-to-video does with a text-to-video generator: its quality with T2V-trained
weights is untested. Clips and images of another size are resized and center-cropped to
--height x --width. A bidirectional checkpoint (distill_dmd.py --generator bidirectional) renders
the whole video as one block with full attention (no --chunk, --switch, --extend, --image).

What is exact
-------------
Exact (tests/test_interactive.py, on the tiny model): without a switch the video is training's
rollout, bit for bit; frames before a switch are the single-prompt video's; a switch with re-cache
after b blocks is bit for bit the continuation of those b blocks' latents under the new prompt;
continuing the first blocks of a video's latents gives exactly its remaining blocks while those
first blocks fit the window (at most --max-frames minus --chunk latent frames: 69 video frames
with the defaults), and its decode equals one decode of the whole video. Past the window a continuation is not the
original: like LongLive's re-cache, it re-derives the recent frames' keys from the frames the
window holds, while the original computed them with the evicted frames still in view. (--extend
goes through the VAE encoder, so a clip's latents are the encoder's, not the generator's.) The
noise of each block depends only on --seed and where the block starts: a video of N frames is the
first N frames of a longer one with the same seed and switches (up to a shorter last block).

Speed flags
-----------
What each one measured is in BENCHMARKS.md; none is on by default until a GPU run shows it pays.
--overlap-decode decodes block b in a worker thread (on a GPU, its own CUDA stream) while block b+1
is denoised, same frames. --compile runs the transformer blocks through torch.compile (--compile
reduce-overhead adds CUDA graphs; the first video pays the compilation, so it is for many prompts or
long videos). --compile-vae compiles the VAE decoder too (its norms, activations and cache padding
fuse around cuDNN's convolutions; same pixels within one level of 255 on the CPU). --cudnn-benchmark
lets cuDNN autotune the VAE's convolutions. --vae-dtype bf16 decodes in bf16 instead of fp32
(diffusers runs the Wan VAE in fp32; bf16 changes pixels, by up to 13/255 on the tiny random VAE:
not checked on the real one).

Speed kit
---------
Speed kit (what was measured: BENCHMARKS.md; none of it is on by default):
--decoder tae --decoder-path taew2_1.pth decodes with the decoder of TAEW2.1, the tiny autoencoder
for Wan 2.1 latents published at github.com/madebyollin/taehv (download taew2_1.pth there), instead
of the Wan VAE: 24.9x fewer FLOPs per latent frame, block by block with its own causal memory (equal
to one decode of the whole video: tested), in --dtype (bf16 on a GPU, fp32 on the CPU). Its image
quality is the published model's, not measured here (the tests use random weights), so the exact
fp32 Wan VAE stays the default. --extend and --image still load the Wan VAE to encode the clip or
image, and free it before generating; the clip's frames in the output are then the tiny decoder's
reconstruction. --vae-dtype bf16 and --compile-vae set how the Wan VAE decodes and are refused with
it (--cudnn-benchmark applies to both). --tiny without --decoder-path builds a random one in
taew2_1.pth's layout.
--fp8 runs the 10 linear layers of every transformer block in float8 through torchao (weights in
float8 with a scale per output row, activations quantized per token at each call); the norms,
modulation, RoPE, embedders and output head stay bf16. It needs a CUDA GPU of compute capability
>= 8.9 (Ada, Hopper or newer) and --dtype bf16; elsewhere it is a one-line error. Eager float8 can
be slower than bf16 (pytorch/ao#685), so use it with --compile. Not measured yet (no GPU so far):
its speed, and its difference from bf16 with the real weights.
--offload loads the text encoder (UMT5-XXL, 5.7B parameters, ~11 GB in bf16) and the decoder into
CPU memory (the machine's RAM must hold them) and puts their weights on the device only while they run: all the prompts (switches
included) are encoded before the generator moves to the device, so the two are never there
together, and each block's decode brings the decoder over and drops it after. The video is the same
(tested on the CPU); the GPU memory it saves and the time its transfers take are not measured yet.
`--benchmark` has a row for each of the three (rows 9-11, each on top of the rows above it; --fp8's
on a float8 copy of the model, which the rows after it do not use) and times the text encoder with
and without --offload, with the peak GPU memory of each: the numbers a GPU run will give.
"""
import argparse
import collections
import contextlib
import copy
import math
import os
import re
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import causal_wan as cw


def parse_args(argv=None):
    p = cw.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="text of the video")
    p.add_argument("--prompts-file", help="one prompt a line, one video each")
    p.add_argument("--jobs", help="tab-separated lines 'prompt<TAB>seed<TAB>out.mp4' (used by eval_vbench.sh)")
    add_model_flags(p)
    p.add_argument("--seed", type=cw.seed, default=0)
    p.add_argument("--num-videos", type=cw.positive_int, default=1, help="videos per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (81 = 5 s at 16 fps)")
    p.add_argument("--chunk", type=int, choices=[1, 3], help="latent frames per block: 3 chunk-wise (default), 1 frame-wise")
    p.add_argument("--out", default="out.mp4", help="an .mp4 path for one video, else a folder")
    p.add_argument("--fps", type=cw.positive_int, default=16)
    p.add_argument("--stream", action="store_true", help="write each block into the mp4 as soon as it is decoded (fragmented mp4, playable while written)")
    p.add_argument("--switch", nargs=2, action="append", default=[], metavar=("FRAME", "PROMPT"),
                   help="from the first block boundary at or after video frame FRAME on, generate PROMPT (repeatable)")
    p.add_argument("--no-recache", action="store_true", help="--switch changes only the cross-attention, without re-caching (for comparison)")
    p.add_argument("--extend", metavar="CLIP", help="continue this video: the output is the clip, then new frames (--frames counts both)")
    p.add_argument("--image", help="image-to-video: the image is the first frame (untested with text-to-video weights)")
    p.add_argument("--benchmark", action="store_true", help="measure speed with random weights (see BENCHMARKS.md)")
    p.add_argument("--baseline-steps", type=int, default=50, help="benchmark: steps of diffusers' WanPipeline (0: skip it)")
    p.add_argument("--levers", help="benchmark: which optimization rows to measure, e.g. 1,2,5 (default all; row 1 is the plain path)")
    p.add_argument("--long-frames", type=int, help="benchmark: frames of the long-video run, 12k-3 (957 = 1 min; 165 with --tiny; 0: skip it)")
    args = p.parse_args(argv)
    model_defaults(args)
    if args.long_frames is None:
        args.long_frames = 165 if args.tiny else 957
    args.chunk_given, args.chunk = args.chunk is not None, args.chunk or 3
    return args


def add_model_flags(p):
    """The flags of the generator, its decoder and their speed options, shared with demo.py."""
    p.add_argument("--model", default=cw.DEFAULT_MODEL, help="diffusers-format Wan: hub id or local folder")
    p.add_argument("--checkpoint", help="a generator trained by this repo (or Self Forcing's .pt)")
    p.add_argument("--no-ema", action="store_true", help="use the checkpoint's raw weights instead of its EMA")
    p.add_argument("--height", type=int, help="multiple of 16 (default 480; 64 with --tiny)")
    p.add_argument("--width", type=int, help="multiple of 16 (default 832; 64 with --tiny)")
    p.add_argument("--max-frames", type=cw.positive_int, default=21, help="attention window in latent frames (long videos)")
    p.add_argument("--tiny", action="store_true", help="random tiny Wan built on the fly (CPU demo; output is noise)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile the transformer blocks (reduce-overhead: also CUDA graphs); the first video pays the compilation")
    p.add_argument("--compile-vae", action="store_true", help="torch.compile the VAE decoder too (minutes of compilation on the first video)")
    p.add_argument("--overlap-decode", action="store_true", help="decode block b while block b+1 is denoised (a worker thread, on a GPU its own stream)")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16"], help="VAE decode precision (fp32 as diffusers runs the Wan VAE)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune the decoder's convolutions (GPU)")
    p.add_argument("--decoder", default="vae", choices=["vae", "tae"], help="vae: the Wan VAE (exact, the default); tae: the tiny decoder of --decoder-path")
    p.add_argument("--decoder-path", metavar="FILE", help="--decoder tae: taew2_1.pth from github.com/madebyollin/taehv (--tiny: a random one)")
    p.add_argument("--fp8", action="store_true", help="the transformer blocks' linear layers in float8 (torchao; a GPU of compute capability >= 8.9)")
    p.add_argument("--offload", action="store_true", help="low memory: the text encoder and the decoder in CPU memory, on the device only while they run")


def model_defaults(args):
    """The defaults that depend on --tiny and --device."""
    if args.tiny:
        args.model = cw.tiny_model_dir() if args.model == cw.DEFAULT_MODEL else args.model
    if args.height is None:
        args.height = 64 if args.tiny else 480
    if args.width is None:
        args.width = 64 if args.tiny else 832
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args




def check_args(args):
    if args.frames < 1 or (args.frames - 1) % 4:
        raise cw.UserError(f"--frames {args.frames} is not 4k+1: the VAE maps 1 + 4k frames to 1 + k latent frames (try {4 * round((args.frames - 1) / 4) + 1})")
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 16:
            raise cw.UserError(f"--{name} {getattr(args, name)} is not a positive multiple of 16 (VAE 8x and patch 2x)")
    if args.num_videos < 1:
        raise cw.UserError("--num-videos must be at least 1")
    if args.levers is not None:
        try:
            args.levers = sorted({int(n) for n in args.levers.split(",")})
        except ValueError:
            args.levers = [0]
        if not args.levers or not all(1 <= n <= len(LEVERS) for n in args.levers):
            raise cw.UserError(f"--levers takes row numbers 1-{len(LEVERS)} separated by commas (see BENCHMARKS.md)")
    if args.baseline_steps < 0:
        raise cw.UserError("--baseline-steps must be 0 (skip the baseline) or more")
    if args.benchmark:
        check_benchmark_lengths(args)
    if args.max_frames < 2 * args.chunk:
        raise cw.UserError(f"--max-frames {args.max_frames} must hold at least two blocks of --chunk {args.chunk}")
    check_device(args.device)
    check_speed_kit(args)
    if not (args.tiny and args.model == cw.tiny_model_dir()):  # --tiny builds its own on first use
        cw.check_model(args.model)
    if args.checkpoint:
        cw.check_file(args.checkpoint, "--checkpoint")


def check_speed_kit(args):
    """--decoder, --decoder-path and --fp8 against each other and this machine, before any model
    loads (sample.py and demo.py; the device is checked). The tiny decoder's file is checked by
    loading it, the first model to load (it is small)."""
    if args.decoder == "vae" and args.decoder_path is not None:
        raise cw.UserError(f"--decoder-path '{args.decoder_path}' is the tiny decoder's file: add --decoder tae "
                           f"(the default decoder, the Wan VAE, comes from --model)")
    if args.decoder == "tae":
        if args.decoder_path is None and not args.tiny:
            raise cw.UserError(f"--decoder tae needs the tiny decoder's file: {cw.TAE_DOWNLOAD}, and pass --decoder-path taew2_1.pth")
        vae_only = [flag for flag, on in (("--vae-dtype bf16", args.vae_dtype == "bf16"), ("--compile-vae", args.compile_vae)) if on]
        if vae_only:
            raise cw.UserError(f"{vae_only[0]} sets how the Wan VAE decodes, and --decoder tae decodes with the tiny decoder "
                               f"(in --dtype, {args.dtype}): drop {vae_only[0]}")
    if args.fp8:
        cw.check_fp8(args.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)


def check_device(name):
    """--device names a device this machine has: cpu, cuda, cuda:N."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise cw.UserError(f"--device '{name}' is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise cw.UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise cw.UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise cw.UserError(f"--device {name}: only cpu and cuda are supported")


def check_benchmark_lengths(args):
    """The benchmark's videos are whole blocks of 3 latent frames (12k-3 frames): a short last block
    is a new shape, which a compiled row would compile inside its timed run. The long video also
    outlasts the attention window, or its per-block times would show nothing."""
    whole = lambda frames: 12 * max(1, round((frames + 3) / 12)) - 3
    if ((args.frames - 1) // 4 + 1) % 3:
        raise cw.UserError(f"--frames {args.frames} is {(args.frames - 1) // 4 + 1} latent frames, not whole blocks of 3: "
                           f"the benchmark needs 12k-3 frames (try {whole(args.frames)})")
    long_latent = (args.long_frames - 1) // 4 + 1
    if args.long_frames != 0 and (args.long_frames < 0 or (args.long_frames - 1) % 4 or long_latent % 3 or long_latent <= args.max_frames):
        shortest = 12 * (args.max_frames // 3 + 1) - 3
        raise cw.UserError(f"--long-frames {args.long_frames} must be 12k-3 frames (whole blocks of 3 latent frames: a short last "
                           f"block would compile inside the timed run) and longer than the --max-frames {args.max_frames} latent frame "
                           f"window: try {max(whole(args.long_frames), shortest)}, or 0 to skip the long video")
    if args.levers and not args.device.startswith("cuda") and all(LEVERS[n - 1].cpu_skip for n in args.levers):
        raise cw.UserError(f"--levers {','.join(map(str, args.levers))}: only rows that need a GPU, and the device is {args.device}")


def read_jobs(args):
    """[(prompt, seed, out_path)] from --prompt / --prompts-file / --jobs."""
    if sum(x is not None for x in (args.prompt, args.prompts_file, args.jobs)) != 1:
        raise cw.UserError("give exactly one of --prompt, --prompts-file, --jobs")
    if args.jobs:
        jobs = []
        for n, line in enumerate(cw.read_text(args.jobs, "--jobs").splitlines(), 1):
            parts = line.split("\t")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].lower().endswith(".mp4"):
                raise cw.UserError(f"{args.jobs}:{n}: expected 'prompt<TAB>seed<TAB>out.mp4'")
            if not parts[0].strip():
                raise cw.UserError(f"{args.jobs}:{n}: empty prompt")
            if int(parts[1]) >= 2**32:
                raise cw.UserError(f"{args.jobs}:{n}: seed {parts[1]} is not in 0..{2**32 - 1}")
            jobs.append((parts[0], int(parts[1]), parts[2]))
        return check_outputs(jobs)
    if args.prompts_file:
        prompts = [line.strip() for line in cw.read_text(args.prompts_file, "--prompts-file").splitlines() if line.strip()]
        if not prompts:
            raise cw.UserError(f"--prompts-file '{args.prompts_file}' has no prompts")
    else:
        prompts = [args.prompt]
    pairs = [(p, args.seed + k) for p in prompts for k in range(args.num_videos)]
    if not all(p.strip() for p, _ in pairs):
        raise cw.UserError("empty prompt: give a text description of the video")
    one_file = args.out.lower().endswith(".mp4")
    extension = os.path.splitext(args.out.rstrip("/"))[1]
    if not one_file and extension and not os.path.isdir(args.out):  # would silently become a folder
        raise cw.UserError(f"--out '{args.out}' ends in '{extension}': videos are mp4, so give a name ending in .mp4, "
                           f"or a folder (one without an extension, or one that exists)")
    if len(pairs) == 1 and one_file:
        return check_outputs([(pairs[0][0], pairs[0][1], args.out)])
    if one_file:
        raise cw.UserError(f"{len(pairs)} videos cannot all be written to '{args.out}': give a folder as --out")
    return check_outputs([(p, s, os.path.join(args.out, f"{i:04d}_{slug(p)}-{s}.mp4")) for i, (p, s) in enumerate(pairs)])


def check_outputs(jobs):
    """Every video can be written where it goes (folder writable, no folder in the way of the
    file): found now, not after the video has been generated."""
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(path)) for _, _, path in jobs):
        cw.check_output_folder(folder, "output folder")
    for _, _, path in jobs:
        if os.path.isdir(path):
            raise cw.UserError(f"'{path}' is a folder: the video cannot be written there (remove it or choose another --out)")
    return jobs


def slug(text, n=60):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "video"


def load_generator(args, device, dtype, kind="causal"):
    if args.tiny:
        if args.model == cw.tiny_model_dir():
            cw.make_tiny_wan(args.model)  # built once, then reused
        print("--tiny: random-init tiny Wan, the video is noise (it tests the pipeline, not the model)", file=sys.stderr)
    model = cw.from_pretrained(args.model, dtype=torch.float32)
    if args.checkpoint:
        cw.load_generator_weights(model, args.checkpoint, use_ema=not args.no_ema, kind=kind)
    return cw.cast_model(model, dtype, device).eval().requires_grad_(False)  # bf16 with Wan's fp32 parameters kept


def load_models(args, device, dtype, kind, prompts, start_frames):
    """(the generator on `device`, {prompt: text context [1, 512, text_dim]} for every prompt in
    `prompts`, decode(z, first) for FrameStream, the latents of start_frames or None). The text
    encoder runs once, here, for all the prompts (switches included), and is freed before the
    decoder loads. --offload: every model loads into CPU memory; the text encoder's weights go to
    the device only while it encodes, before the generator moves there (the two are never on the
    device together), and the decoder's only while it decodes a block (load_decoder)."""
    home = torch.device("cpu") if args.offload else device  # where weights live while their model is not running
    tae = None
    if args.decoder == "tae":  # first: it is small, and a wrong file is said before the big models load
        tae = cw.load_tiny_decoder(args.decoder_path or cw.tiny_decoder_path(), home, dtype)
    model = load_generator(args, home, dtype, kind)
    tokenizer, encoder = cw.load_text_encoder(args.model, dtype=dtype, device=home)
    with cw.on_device(encoder, device):  # a no-op unless --offload
        contexts = {p: cw.encode_prompts(tokenizer, encoder, [p]) for p in dict.fromkeys(prompts)}
    del tokenizer, encoder  # the text encoder (5.7B for Wan) is not needed during generation
    model = model.to(device)
    if args.fp8:
        cw.quantize_fp8(model)  # torchao converts the weights where they are: on the GPU, before torch.compile
    if args.compile:
        compile_blocks(model, args.compile)
    decode, prefix = load_decoder(args, device, tae, start_frames)
    return model, contexts, decode, prefix


def load_decoder(args, device, tae=None, start_frames=None):
    """(decode(z, first): latents [1, 16, n, h, w] -> pixels [1, 3, T, H, W] in [-1, 1] for
    FrameStream, the latents of start_frames [T, H, W, 3] or None). --decoder vae: the Wan VAE in
    --vae-dtype. --decoder tae: `tae`, the tiny decoder (loaded first, in --dtype); the Wan VAE
    then loads only when there are start_frames (--extend, --image) to encode, and is freed after.
    --offload: the decoder's weights stay in CPU memory and are on the device only while it
    decodes a block (its causal state stays on the device)."""
    home = torch.device("cpu") if args.offload else device
    vae = prefix = None
    if args.decoder == "vae" or start_frames is not None:
        vae = cw.load_vae(args.model, dtype=torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32, device=home)
    if start_frames is not None:
        with cw.on_device(vae, device):  # a no-op unless --offload
            prefix = vae_encode(vae, start_frames, device)
    if args.decoder == "tae":  # the VAE, if it encoded, is freed when this returns
        decoder, decode = tae, partial(cw.tae_decode, tae)
    else:
        decoder, decode = compile_vae(vae, args.compile_vae), partial(cw.vae_decode, vae)
    return (cw.offloaded(decode, decoder, device) if args.offload else decode), prefix


# -----------------------------------------------------------------------------
# interactive inputs: --switch, --extend, --image, and a bidirectional --checkpoint


def generator_of(args):
    """'causal', or 'bidirectional' for distill_dmd.py --generator bidirectional: read from the
    checkpoint's args without loading its weights (mmap)."""
    return cw.generator_kind(cw.load_checkpoint(args.checkpoint, mmap=True)) if args.checkpoint else "causal"


def check_interactive(args, kind):
    """Before any model loads: (latent frames per block, the switches [(frame, prompt)], the
    frames the video starts from (uint8 [T, H, W, 3]) or None)."""
    latent_frames = (args.frames - 1) // 4 + 1
    if args.no_recache and not args.switch:
        raise cw.UserError("--no-recache changes how --switch switches prompts: give a --switch FRAME PROMPT too")
    if kind == "bidirectional":
        given = [f for f, on in [("--chunk", args.chunk_given), ("--switch", args.switch), ("--extend", args.extend),
                                 ("--image", args.image)] if on]
        if given:
            raise cw.UserError(f"checkpoint '{args.checkpoint}' is a bidirectional generator: it renders the whole video as "
                               f"one block, so {given[0]} does not apply (drop it, or use a causal checkpoint)")
        print(f"note: '{args.checkpoint}' is a bidirectional 4-step generator: the whole video ({latent_frames} latent "
              f"frames) is rendered as one block with full attention", file=sys.stderr)
        return latent_frames, [], None
    start_frames = read_start_frames(args)
    start = 0 if start_frames is None else (len(start_frames) - 1) // 4 + 1  # latent frames given
    first = max(1, pixel_frame(start))  # the first frame a switch may name
    switches, at = [], {}  # at: {the frame a switch takes effect: the frame it named}
    for frame, prompt in args.switch:
        if not re.fullmatch(r"-?\d+", frame):
            raise cw.UserError(f"--switch '{frame}': FRAME must be a video frame number, e.g. --switch 41 \"the fox jumps\"")
        frame = int(frame)
        if not first <= frame < args.frames:
            why = "" if frame >= first else f" (frames 0-{first - 1} come from --extend/--image)" if start else " (frame 0 is --prompt's)"
            raise cw.UserError(f"--switch {frame} is outside the frames a switch can name, {first}-{args.frames - 1}{why}")
        if not prompt.strip():
            raise cw.UserError(f"--switch {frame}: empty prompt")
        boundary = start  # the switch takes effect at the first block boundary at or after the frame
        while pixel_frame(boundary) < frame:
            boundary += args.chunk
        if boundary >= latent_frames:
            raise cw.UserError(f"--switch {frame}: the first block boundary at or after it is frame {pixel_frame(boundary)}, "
                               f"after the video's last frame {args.frames - 1}; switch earlier or make the video longer")
        if pixel_frame(boundary) in at:
            raise cw.UserError(f"--switch {at[pixel_frame(boundary)]} and --switch {frame} both take effect at frame "
                               f"{pixel_frame(boundary)} (switches happen at block boundaries): give one of them")
        at[pixel_frame(boundary)] = frame
        switches.append((frame, prompt))
    return args.chunk, switches, start_frames


def read_start_frames(args):
    """--image (one frame) or --extend (a clip, cut to its longest 4k+1 prefix) as uint8 frames
    [T, H, W, 3] of --height x --width, resized and center-cropped when needed; None without them."""
    if args.image and args.extend:
        raise cw.UserError("--extend and --image together: a video continues a clip or starts from an image, give one")
    path = args.image or args.extend
    if path is None:
        return None
    name = f"--{'image' if args.image else 'extend'} '{path}'"
    if not os.path.isfile(path):
        raise cw.UserError(f"{name} does not exist")
    if args.image:
        from PIL import Image
        try:
            with Image.open(path) as image:
                frames = np.array(image.convert("RGB"))[None]  # [1, H, W, 3]
        except Exception as e:  # not an image, truncated
            raise cw.UserError(f"{name} is not a readable image ({type(e).__name__}): give a PNG or JPEG") from None
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
            raise cw.UserError(f"{name} is not a readable video ({type(e).__name__}): give an mp4") from None
        if len(frames) < 5:
            raise cw.UserError(f"{name} has {len(frames)} frame(s): continue a video of 5 frames or more, or use --image")
        usable = 4 * ((len(frames) - 1) // 4) + 1
        if usable != len(frames) and len(frames) < args.frames:
            print(f"note: {name} has {len(frames)} frames, not 4k+1: using its first {usable}", file=sys.stderr)
        frames = np.stack(frames[:usable])
    if len(frames) >= args.frames:
        raise cw.UserError(f"{name} gives {len(frames)}{'+' if args.extend else ''} frames and --frames {args.frames} counts the "
                           f"whole video, so nothing is left to generate: make --frames larger than the clip")
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
        x = torch.nn.functional.interpolate(chunk.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", antialias=True)
        out.append(x[:, :, top:top + height, left:left + width].round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
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
    closed file must decode to expected_frames frames (cw.finished_mp4), or it is removed."""
    tmp = path if stream else path + ".part.mp4"
    count = 0
    with cw.finished_mp4(tmp, path, expected_frames), open_writer(tmp, fps, stream, frames_per_block) as writer:
        for frames in blocks:
            for frame in frames:
                writer.append_data(frame)
            count += len(frames)
            if progress is not None:
                progress.update(1)
    return count


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
    state (`partial(cw.vae_decode, vae)` or `partial(cw.tae_decode, tae)`). encode(prompt) -> text
    context [1, S, text_dim] for switches; it runs in the iterating thread. frames: the video's length (4k+1 video frames,
    prefix included), None to run until stop(). prefix: clean latents [1, 16, L, h, w] the video
    starts with (an --extend clip, an --image): their decoded frames come first, then new frames
    from position L. noise(start, n) -> (noise [1, 16, n, h, w], generator): each block's noise
    (default `block_noise` with `seed`). keep_latents: collect every block's latents in `latents`.

    Thread safety: switch() and stop() may be called from any thread at any time; they only queue
    a request under a lock, applied by the iterating thread before its next block. `frames_done`,
    `switches_done` [(frame, prompt, recache)] and `latents` are written by the iterating thread only.
    With overlap, each block is decoded in a worker thread while the next one is generated (see
    decode_blocks).
    """

    def __init__(self, model, decode, prompt_kv, *, height, width, seed=0, frames=None, chunk=3, max_frames=21,
                 encode=None, prefix=None, overlap=False, log=None, keep_latents=False, noise=None, static_cache=None):
        param = next(model.parameters())
        shape = lambda n: (1, model.cfg.in_channels, n, height // 8, width // 8)  # noqa: E731
        self.model, self.decode, self.prompt_kv, self.encode = model, decode, prompt_kv, encode
        self.noise = noise or (lambda start, n: block_noise(seed, start, shape(n), param.device, param.dtype))
        self.latent_frames = None if frames is None else (frames - 1) // 4 + 1
        self.chunk, self.max_frames, self.overlap, self.static_cache = chunk, max_frames, overlap, static_cache
        self.prefix = None if prefix is None else prefix.to(param.device, param.dtype)
        self.log = log or (lambda message: None)
        self.frames_done, self.switches_done = 0, []
        self.latents = [] if keep_latents else None
        self._lock, self._requests, self._stop, self._started = threading.Lock(), [], threading.Event(), False

    def switch(self, prompt, recache=True, frame=None):
        """Generate `prompt` from the first block boundary at or after video frame `frame` on (None:
        the next boundary). recache=False switches only the cross-attention (see cw.VideoStream)."""
        if not prompt.strip():
            raise cw.UserError("empty switch prompt: give a text description of what comes next")
        if self.encode is None:
            raise cw.UserError("this stream has no encode function: it cannot switch prompts")
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
        stream = cw.VideoStream(self.model, self.prompt_kv, self.chunk, self.max_frames, total_frames=self.latent_frames,
                                static=self.static_cache)
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
        (the others would not generate a single frame)."""
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
            yield cw.to_uint8_frames(decode(z, first)[0])
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
        return cw.to_uint8_frames(decode(z, first)[0])  # to the CPU: waits for this stream only


@torch.no_grad()
def generate(model, decode, prompt_kv, noise, chunk, max_frames, on_frames, generator=None, progress=None, overlap=False,
             static_cache=None):
    """The latent video of `noise` [1, C, F, h, w] (re-noised from one `generator`, as cw.rollout),
    each block decoded by decode(z, first) as soon as it is done (`partial(cw.vae_decode, vae)` or
    `partial(cw.tae_decode, tae)`, as FrameStream takes it): a FrameStream with that noise. on_frames
    gets the uint8 frames [T, H, W, 3] of every block, in order (1 + 4(n - 1) frames for the first
    block, 4n after). Returns the latents. static_cache=False: the concatenating KV cache (benchmark only)."""
    h, w = noise.shape[3:]
    stream = FrameStream(model, decode, prompt_kv, height=8 * h, width=8 * w,
                         frames=4 * (noise.shape[2] - 1) + 1,
                         chunk=chunk, max_frames=max_frames, overlap=overlap, keep_latents=True, static_cache=static_cache,
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


def compile_vae(vae, on=True, backend="inductor"):
    """torch.compile the VAE decoder in place (on=False: eager again). The convolutions stay
    cuDNN's; the norms, activations and the causal-cache padding around them fuse. It compiles
    four variants per dtype (first frame, cache filling, steady state, and the steady state once
    more when the cache holds inductor's outputs, whose strides differ), then reuses them.
    backend="eager": dynamo only (the same graphs, guards and recompilations, no code generated;
    the tests count variants with it)."""
    if on != (vae.decoder._compiled_call_impl is not None):  # where nn.Module.compile keeps the compiled forward
        vae.decoder._compiled_call_impl = None
        if on:
            allow_recompiles()
            vae.decoder.compile(backend=backend)
    return vae


def allow_recompiles(limit=32):
    """Each shape/dtype variant (first block, frame-wise, fp32 and bf16 VAE, two compile modes) is a
    recompilation of the same code; past torch's default limit of 8 it would run eager again."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def compile_blocks(model, mode="default", backend="inductor"):
    """torch.compile every transformer block in place (state_dict names unchanged); mode None
    makes them eager again. Norms, RoPE, modulation and the projections fuse; attention over the
    KV cache stays outside the graphs (attend_to_cache), so their shapes do not change per block.
    Each block compiles as 4 pieces (split around that attention), once per block shape.

    mode "reduce-overhead" also replays them as CUDA graphs. A replay writes its outputs into
    memory that CUDA-graph trees free at the start of the next "generation", and by default every
    call of a compiled block starts one: block i+1 would read block i's overwritten output
    (pytorch/pytorch#152887). So each call of the whole model is marked as one generation
    (torch.compiler.cudagraph_mark_step_begin, a forward pre-hook): its 30 blocks are one recorded
    path, and what outlives the call (the model's output, the in-place KV cache written by the
    uncompiled attention) is ordinary memory. The concatenating KV cache (training) would keep the
    blocks' keys/values across calls, so it cannot run with CUDA graphs. backend: see compile_vae."""
    allow_recompiles()
    for blk in model.blocks:
        blk._compiled_call_impl = None  # where nn.Module.compile keeps the compiled forward
        if mode is not None:
            blk.compile(mode=mode if backend == "inductor" else None, backend=backend)
    hook = getattr(model, "cuda_graph_step_hook", None)
    if hook is not None:
        hook.remove()
    model.cuda_graph_step_hook = (model.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
                                  if mode == "reduce-overhead" else None)
    return model


def main(args):
    check_args(args)
    if args.benchmark:
        return benchmark(args)
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
                             max_frames=args.max_frames, prefix=prefix, overlap=args.overlap_decode, log=bar.write)
        for frame, text in switches:
            stream.switch(text, recache=not args.no_recache, frame=frame)
        count = write_video(path, stream, args.frames, args.fps, args.stream, 4 * chunk, progress=bar)
        given = f", the first {len(start_frames)} from {args.extend or args.image}" if prefix is not None else ""
        bar.write(f"wrote {path} ({count} frames{given}, seed {seed}): {prompt[:80]}")
    bar.close()


# -----------------------------------------------------------------------------
# benchmark: python sample.py --benchmark [--tiny]


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
    return decode_flops(partial(cw.tae_decode, copy.deepcopy(tae).to("meta")), latent_frames, h, w, chunk)


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
    raises cw.UserError when this device cannot run it (the message is the row's skip reason)."""
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
    Lever("+ CUDA graphs (--compile reduce-overhead)", {"compile": "reduce-overhead"}, cpu_skip="needs a GPU", compiles=True),
    Lever("+ torch.compile of the VAE decoder (--compile-vae)", {"compile_vae": True},
          cpu_skip="its compilation takes ~90 s on a CPU", compiles=True),
    Lever("+ bf16 VAE decode (--vae-dtype bf16; changes pixels)", {"vae_dtype": "bf16"}),
    Lever("+ tiny decoder (--decoder tae; changes pixels)", {"decoder": "tae"}),
    Lever("+ float8 linear layers (--fp8)", {"fp8": True}, cpu_skip="needs a GPU of compute capability >= 8.9", alone=True,
          check=lambda bench: cw.check_fp8(bench.device, bench.dtype)),
    Lever("+ low memory (--offload)", {"offload": True}),
]


def lever_flags(setting):
    """The sample.py flags of a ladder setting (the VAE-only ones dropped with --decoder tae, which refuses them)."""
    tae = setting.get("decoder") == "tae"
    flags = ["(concatenating KV cache: benchmark only)" if setting.get("static_cache") is False else "",
             f"--compile {setting['compile']}" if setting.get("compile") else "",
             "--compile-vae" if setting.get("compile_vae") and not tae else "",
             "--overlap-decode" if setting.get("overlap") else "", "--cudnn-benchmark" if setting.get("cudnn") else "",
             "--vae-dtype bf16" if setting.get("vae_dtype") == "bf16" and not tae else "", "--decoder tae" if tae else "",
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
        return ", ".join(f"{counts.get(k, 0)} {k}" for k in ["block", "VAE"] + sorted(set(counts) - {"block", "VAE"})) + " variants"

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
        raise cw.UserError("no optimization row could be measured (see the FAILED or skipped lines above)")
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
    if args.tiny and args.model == cw.tiny_model_dir():
        cw.make_tiny_wan(args.model)
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
          f"(the encoder next to the generator and the fp32 VAE, as sample.py holds them)\n  with --offload: {offload_s:.3f} s "
          f"(the weights' copy to the device included), peak device memory {memory(offload_peak)} (the encoder alone: "
          f"on the device only inside cw.on_device, before the generator is there)")
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
    tae = cw.load_tiny_decoder(cw.tiny_decoder_path()) if args.tiny else cw.TinyDecoder().eval().requires_grad_(False)
    tae = tae.to(device, dtype)
    gib = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) / 2**30  # noqa: E731
    print(f"weights held: generator {gib(model):.2f} GiB, diffusers' reference {gib(reference):.2f} GiB (parity and baseline: "
          f"not in sample.py), Wan VAE {gib(vae):.2f} GiB (+ its bf16 copy), tiny decoder {gib(tae):.3f} GiB; every peak below "
          f"includes them (the --offload row keeps the decoders in CPU memory)")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    context = context.to(dtype)
    return Bench(args, device, dtype, card, cfg, model, reference, vaes, tae, context, model.prompt_kv(context), CompileCounter())


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
                                                  num_heads=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    encoder = encoder.to(dtype).to("cpu").eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return encoder


def time_text_encoder(encoder, device, offload):
    """One UMT5 encoding of 512 tokens, after a warm-up: (its output [1, 512, D] on the device,
    seconds, peak device memory in GiB while it ran: NaN on a CPU). offload: the encoder's weights
    are in CPU memory and go to the device only inside cw.on_device, as sample.py --offload encodes
    (the seconds include that copy); else they are on the device already."""
    ids = torch.randint(0, encoder.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0)).to(device)
    place = partial(cw.on_device, encoder, device) if offload else contextlib.nullcontext
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
            compile_blocks(model, setting.get("compile"))
        bench.block_mode = setting.get("compile")
    if setting.get("fp8") and bench.fp8 is None:
        bench.fp8 = float8_copy(bench)
    home = torch.device("cpu") if setting.get("offload") else bench.device
    for vae in bench.vaes.values():
        compile_vae(vae, bool(setting.get("compile_vae"))).to(home)
    bench.tae.to(home)


def float8_copy(bench):
    """(cw.quantize_fp8 of a deep copy of the eager model, the prompt_kv of that copy: its
    cross-attention projections are float8 layers too), its blocks compiled as the model's are."""
    before = torch.cuda.memory_allocated(bench.device) if bench.cuda else 0
    compile_blocks(bench.model, None)  # copy the eager model: a compiled block's code is bound to the original
    model = cw.quantize_fp8(copy.deepcopy(bench.model))
    for m in (bench.model, model) if bench.block_mode else ():
        compile_blocks(m, bench.block_mode)
    if bench.cuda:
        print(f"  (the float8 copy of the model: {(torch.cuda.memory_allocated(bench.device) - before) / 2**30:.2f} GiB on the "
              f"device next to the {bench.args.dtype} model, in this row's peak; freed after it)")
    return model, model.prompt_kv(bench.context)


def decode_for(bench, setting, decoder=None):
    """decode(z, first) as sample.py's load_decoder makes it for `setting` (`decoder`, if given,
    instead of its --decoder): the tiny decoder, or the VAE in --vae-dtype; with --offload through
    cw.offloaded (the weights on the device only during each call)."""
    if (decoder or setting.get("decoder", "vae")) == "tae":
        module, decode = bench.tae, partial(cw.tae_decode, bench.tae)
    else:
        module = bench.vaes[setting.get("vae_dtype", "fp32")]
        decode = partial(cw.vae_decode, module)
    return cw.offloaded(decode, module, bench.device) if setting.get("offload") else decode


def run_video(bench, frames, chunk, setting):
    """The sampling path of sample.py with `setting`: (seconds in all, seconds to each block's uint8
    frames on the CPU, latents, frames)."""
    apply_setting(bench, setting)
    model, prompt_kv = bench.fp8 if setting.get("fp8") else (bench.model, bench.prompt_kv)
    marks, frames_out = [], []

    def on_frames(f):
        marks.append(time.perf_counter())
        frames_out.append(f)

    bench.sync(); t0 = time.perf_counter()
    latents = generate(model, decode_for(bench, setting), prompt_kv, bench.noise(frames), chunk, bench.args.max_frames, on_frames,
                       generator=torch.Generator().manual_seed(1), overlap=bool(setting.get("overlap")),
                       static_cache=setting.get("static_cache", True))
    bench.sync()
    return time.perf_counter() - t0, [m - t0 for m in marks], latents, frames_out


def transformer_only(bench, frames, chunk):
    """Seconds of the rollout alone (no decoding), with the blocks as they are now."""
    bench.sync(); t0 = time.perf_counter()
    with torch.no_grad():
        cw.rollout(bench.model, bench.noise(frames), bench.prompt_kv, block_size=chunk, max_frames=bench.args.max_frames)
    bench.sync()
    return time.perf_counter() - t0


def measure_kv_cache(bench):
    """KV cache vs recomputing the whole prefix every step (transformer only, eager, same noise),
    and the plain full-attention forward against diffusers' on the same weights. Returns the speedup."""
    model, lat_f, args = bench.model, bench.latent_frames, bench.args
    transformer_only(bench, min(lat_f, 6), 3)  # warm-up
    with torch.no_grad():
        bench.sync(); t0 = time.perf_counter()
        recomputed = rollout_recompute(model, bench.noise(lat_f), bench.prompt_kv, 3, generator=torch.Generator().manual_seed(1))
        bench.sync(); slow = time.perf_counter() - t0
        cached = cw.rollout(model, bench.noise(lat_f), bench.prompt_kv, block_size=3, max_frames=args.max_frames,
                            generator=torch.Generator().manual_seed(1))
    fast = transformer_only(bench, lat_f, 3)
    print(f"KV cache: speedup {slow / fast:.2f}x over recomputing the prefix ({slow:.3f} s vs {fast:.3f} s, transformer only, "
          f"eager); max |diff| {(recomputed.float() - cached.float()).abs().max().item():.2e}")
    with torch.no_grad():
        x = bench.noise(3)
        t = torch.full((1,), 500.0, device=bench.device)
        d = (model(x, t, bench.prompt_kv).float() - bench.reference(x, t, bench.context, return_dict=False)[0].float()).abs().max().item()
    print(f"parity with diffusers' WanTransformer3DModel ({args.dtype}, 3 frames): max |diff| {d:.2e}")
    return slow / fast


def measure_ladder(bench):
    """The LEVERS rows, each on top of the ones above it. A row left out by --levers still passes
    its cheap settings on to the rows below, never a compilation, and an `alone` row (--fp8) never
    passes anything on. Returns the measured rows."""
    args = bench.args
    print(f"\noptimizations, each on top of the rows above (FPS for {args.frames} frames incl. VAE decode; first = seconds to the first "
          f"block's frames on the CPU; diff = max |difference| from the first measured row's latents / uint8 pixels, same noise "
          f"(pixels: from the first measured row with the same decoder; a decoder's first row: from the other's, 'another decoder'); "
          f"compiled = torch.compile variants, see CompileCounter):")
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
        except cw.UserError as e:  # e.g. --fp8 on a card without float8
            print(f"  {label}: skipped ({e})")
            continue
        try:
            row = measure_row(bench, label, {**setting, **lever.change}, first)
        except Exception as e:  # an optimization that does not run on this device/torch: say so, measure the rest without it
            print(f"  {label}: FAILED ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); the rows below go on without it")
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
        ref_frames = first.setdefault((chunk, setting.get("decoder", "vae")), frames)  # the first measured row's with this decoder
        another = ref_frames is frames and first_frames is not frames  # this decoder's first row: compared with the other
        dl = (latents.float() - ref_latents).abs().max().item()
        dp = max(int(abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(frames, first_frames if another else ref_frames))
        row[chunk] = dict(fps=bench.args.frames / total, first=marks[0], total=total, peak=peak, latents=latents)
        part = (f"{mode} {bench.args.frames / total:.2f} FPS, first {marks[0]:.3f} s" + (f", peak {peak:.1f} GiB" if bench.cuda else "")
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


def report_fastest(bench, rows):
    """The fastest row that decodes with the fp32 Wan VAE in detail: FPS, first block, peak memory,
    the transformer alone and its TFLOP/s against the card's bf16 peak, the VAE and the tiny decoder
    alone. Returns it."""
    args, cfg = bench.args, bench.cfg
    vae_rows = [r for r in rows if r["setting"].get("decoder", "vae") == "vae" and r["setting"].get("vae_dtype", "fp32") == "fp32"]
    best = max(vae_rows or rows, key=lambda r: r[3]["fps"])
    s = best["setting"]
    apply_setting(bench, s)
    print(f"\nfastest{' with the fp32 VAE' if vae_rows else ''}: {best['label']}\n  sample.py flags: {lever_flags(s)}")
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
        print(f"{'chunk-wise' if chunk == 3 else 'frame-wise'}: {r['fps']:.2f} FPS ({r['total']:.3f} s for {args.frames} frames, "
              f"transformer alone {dit:.3f} s), first block {r['first']:.3f} s, {mem} (all resident weights included)")
        print(f"  transformer: {flops / 1e12:.4g} TFLOP analytic ({lat_f} latent frames x {(h // 2) * (w // 2)} tokens, D={cfg.dim}, "
              f"FFN={cfg.ffn_dim}, {cfg.num_layers} layers, 4 steps + cache pass, text 512) -> {flops / dit / 1e12:.4g} TFLOP/s"
              + (f" = {100 * flops / dit / 1e12 / peak_tflops:.1f}% of the {peak_tflops:.0f} TFLOP/s bf16 peak" if peak_tflops
                 else " (no bf16 peak known for this device)"))
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
    at_peak = lambda decoder_flops: (f": {args.frames / ((flops + decoder_flops) / 1e12 / peak_tflops):.1f} FPS if all of it ran "  # noqa: E731
                                     f"at the bf16 peak" if peak_tflops else "")
    print(f"  VAE decode alone ({setting.get('vae_dtype', 'fp32')}): {vae_s:.3f} s, {vae_flops / 1e12:.4g} TFLOP counted by "
          f"torch.utils.flop_counter -> {vae_flops / vae_s / 1e12:.4g} TFLOP/s; transformer + VAE = {(flops + vae_flops) / 1e12:.4g} "
          f"TFLOP" + at_peak(vae_flops))
    print(f"  tiny decoder alone ({args.dtype}, --decoder tae): {tae_s:.3f} s, {tae_flops / 1e12:.4g} TFLOP counted the same way -> "
          f"{tae_flops / tae_s / 1e12:.4g} TFLOP/s; the VAE takes {vae_flops / tae_flops:.1f}x its FLOPs and {vae_s / tae_s:.1f}x its "
          f"time; transformer + tiny decoder = {(flops + tae_flops) / 1e12:.4g} TFLOP" + at_peak(tae_flops))


def decode_seconds(bench, decode, latents):
    """Seconds to decode `latents` [1, 16, F, h, w] block by block (3 latent frames) into uint8
    frames on the CPU, as sample.py does, after one warm-up block (a decoder's first call)."""
    with torch.no_grad():
        decode(latents[:, :, :3], first=True)
        bench.sync(); t0 = time.perf_counter()
        for start in range(0, latents.shape[2], 3):
            cw.to_uint8_frames(decode(latents[:, :, start:start + 3], first=start == 0)[0])
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
    compile_vae(vae, False).to(bench.device)  # eager, on the device (the --offload row keeps it in CPU memory)
    pipe(num_inference_steps=2, **kw)  # warm-up
    bench.sync(); t0 = time.perf_counter()
    pipe(num_inference_steps=args.baseline_steps, **kw)
    bench.sync(); base = time.perf_counter() - t0
    print(f"baseline WanPipeline ({args.baseline_steps} steps, CFG 5): {base:.2f} s = {args.frames / base:.3f} FPS, "
          f"first frame after {base:.2f} s; causal chunk-wise (fastest setting) is {best[3]['fps'] * base / args.frames:.1f}x its FPS")


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
    print(f"long video: {args.long_frames} frames ({len(steps)} blocks) in {total:.2f} s = {args.long_frames / total:.2f} FPS; "
          f"per block: blocks 2-{k + 1} {head * 1e3:.1f} ms, last {k} {tail * 1e3:.1f} ms (ratio {tail / head:.2f}); "
          f"KV cache {max(kv_bytes) / 2**20:.4g} MiB")
    warn_compiles(bench, before, "the long video")


if __name__ == "__main__":
    try:
        main(parse_args())
    except cw.UserError as e:
        cw.print_error(e)
        sys.exit(2)
