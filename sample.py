"""
Text -> video with the causal (autoregressive) Wan: block by block with a KV cache, each block
decoded as soon as it is denoised.

    python sample.py --prompt "a corgi running in a park at sunset"                  # 81 frames 480x832
    python sample.py --checkpoint out/reward/ckpt.pt --prompt "..." --out corgi.mp4   # a trained generator (EMA)
    python sample.py --prompts-file prompts.txt --num-videos 2 --out videos/          # one video per prompt and seed
    python sample.py --prompt "..." --frames 321 --stream                             # 20 s, playable while written
    python sample.py --tiny --prompt "a red fox" --frames 21 --out /tmp/fox.mp4       # CPU, seconds, random weights
    python sample.py --benchmark [--tiny]                                             # speed (see BENCHMARKS.md)

--chunk 3 generates 3 latent frames (12 video frames) per block, --chunk 1 one latent frame.
Videos longer than 81 frames keep an attention window of --max-frames latent frames (the first
block stays as an attention sink), so the time per block stays flat.
"""
import argparse
import math
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import causal_wan as cw


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="text of the video")
    p.add_argument("--prompts-file", help="one prompt a line, one video each")
    p.add_argument("--jobs", help="tab-separated lines 'prompt<TAB>seed<TAB>out.mp4' (used by eval_vbench.sh)")
    p.add_argument("--model", default=cw.DEFAULT_MODEL, help="diffusers-format Wan: hub id or local folder")
    p.add_argument("--checkpoint", help="a generator trained by this repo (or Self Forcing's .pt)")
    p.add_argument("--no-ema", action="store_true", help="use the checkpoint's raw weights instead of its EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-videos", type=int, default=1, help="videos per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (81 = 5 s at 16 fps)")
    p.add_argument("--height", type=int, help="multiple of 16 (default 480; 64 with --tiny)")
    p.add_argument("--width", type=int, help="multiple of 16 (default 832; 64 with --tiny)")
    p.add_argument("--chunk", type=int, default=3, choices=[1, 3], help="latent frames per block: 3 chunk-wise, 1 frame-wise")
    p.add_argument("--max-frames", type=int, default=21, help="attention window in latent frames (long videos)")
    p.add_argument("--out", default="out.mp4", help="an .mp4 path for one video, else a folder")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--stream", action="store_true", help="fragmented mp4: playable while it is being written")
    p.add_argument("--tiny", action="store_true", help="random tiny Wan built on the fly (CPU demo; output is noise)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--benchmark", action="store_true", help="measure speed with random weights (see BENCHMARKS.md)")
    p.add_argument("--baseline-steps", type=int, default=50, help="benchmark: steps of diffusers' WanPipeline")
    p.add_argument("--long-frames", type=int, default=961, help="benchmark: video frames of the long-video run")
    args = p.parse_args(argv)
    if args.tiny:
        args.model = cw.tiny_model_dir() if args.model == cw.DEFAULT_MODEL else args.model
    args.height = args.height or (64 if args.tiny else 480)
    args.width = args.width or (64 if args.tiny else 832)
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
    if args.max_frames < 2 * args.chunk:
        raise cw.UserError(f"--max-frames {args.max_frames} must hold at least two blocks of --chunk {args.chunk}")


def read_jobs(args):
    """[(prompt, seed, out_path)] from --prompt / --prompts-file / --jobs."""
    if sum(x is not None for x in (args.prompt, args.prompts_file, args.jobs)) != 1:
        raise cw.UserError("give exactly one of --prompt, --prompts-file, --jobs")
    if args.jobs:
        jobs = []
        for n, line in enumerate(open(args.jobs, encoding="utf-8").read().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) != 3 or not parts[1].lstrip("-").isdigit():
                raise cw.UserError(f"{args.jobs}:{n}: expected 'prompt<TAB>seed<TAB>out.mp4'")
            jobs.append((parts[0], int(parts[1]), parts[2]))
        return jobs
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise cw.UserError(f"--prompts-file '{args.prompts_file}' does not exist")
        prompts = [line.strip() for line in open(args.prompts_file, encoding="utf-8") if line.strip()]
        if not prompts:
            raise cw.UserError(f"--prompts-file '{args.prompts_file}' has no prompts")
    else:
        prompts = [args.prompt]
    pairs = [(p, args.seed + k) for p in prompts for k in range(args.num_videos)]
    if len(pairs) == 1 and args.out.endswith(".mp4"):
        return [(pairs[0][0], pairs[0][1], args.out)]
    if args.out.endswith(".mp4"):
        raise cw.UserError(f"{len(pairs)} videos cannot all be written to '{args.out}': give a folder as --out")
    return [(p, s, os.path.join(args.out, f"{i:04d}_{slug(p)}-{s}.mp4")) for i, (p, s) in enumerate(pairs)]


def slug(text, n=60):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "video"


def load_generator(args, device, dtype):
    if args.tiny:
        if args.model == cw.tiny_model_dir():
            cw.make_tiny_wan(args.model)  # built once, then reused
        print("--tiny: random-init tiny Wan, the video is noise (it tests the pipeline, not the model)", file=sys.stderr)
    model = cw.from_pretrained(args.model, dtype=torch.float32)
    if args.checkpoint:
        state_dict = cw.generator_state_dict(cw.load_checkpoint(args.checkpoint), use_ema=not args.no_ema)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise cw.UserError(f"checkpoint '{args.checkpoint}' does not fit the model of '{args.model}' ({str(e).splitlines()[1].strip()[:120]})") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def open_writer(path, fps, stream):
    import imageio
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # a fragmented mp4 has its index up front: players can start before the last block exists
    params = ["-movflags", "frag_keyframe+empty_moov+default_base_moof"] if stream else None
    return imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_params=params)


@torch.no_grad()
def generate(model, vae, prompt_kv, noise, chunk, max_frames, on_frames, generator=None, progress=None):
    """Roll out the latent video and decode each block as soon as it is done. on_frames gets the
    uint8 frames [T, H, W, 3] of every block (1 + 4(n - 1) frames for the first block, 4n after)."""
    def on_block(b, x0, kv_cache):
        on_frames(cw.to_uint8_frames(cw.vae_decode(vae, x0, first=b == 0)[0]))
        if progress is not None:
            progress.update(1)
    return cw.rollout(model, noise, prompt_kv, block_size=chunk, max_frames=max_frames, generator=generator, on_block=on_block)


def main(args):
    check_args(args)
    if args.benchmark:
        return benchmark(args)
    jobs = read_jobs(args)
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = load_generator(args, device, dtype)
    tokenizer, encoder = cw.load_text_encoder(args.model, dtype=dtype, device=device)
    contexts = {p: cw.encode_prompts(tokenizer, encoder, [p]) for p in dict.fromkeys(j[0] for j in jobs)}
    del tokenizer, encoder  # the text encoder (5.7B for Wan) is not needed during generation
    vae = cw.load_vae(args.model, dtype=dtype, device=device)
    latent_frames, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    blocks = math.ceil(latent_frames / args.chunk)
    bar = tqdm(total=blocks * len(jobs), unit="block", desc="generating")
    for prompt, seed, path in jobs:
        prompt_kv = model.prompt_kv(contexts[prompt])
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same video on every device
        noise = torch.randn(1, 16, latent_frames, h, w, generator=g).to(device, dtype)
        tmp = path + ".part.mp4"
        with open_writer(tmp, args.fps, args.stream) as writer:
            generate(model, vae, prompt_kv, noise, args.chunk, args.max_frames,
                     lambda frames: [writer.append_data(f) for f in frames], generator=g, progress=bar)
        os.replace(tmp, path)  # a finished file is always a whole video
        bar.write(f"wrote {path} ({args.frames} frames, seed {seed}): {prompt[:80]}")
    bar.close()


# -----------------------------------------------------------------------------
# benchmark: python sample.py --benchmark [--tiny]


def benchmark(args):
    raise cw.UserError("--benchmark is not implemented yet")


if __name__ == "__main__":
    try:
        main(parse_args())
    except cw.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
