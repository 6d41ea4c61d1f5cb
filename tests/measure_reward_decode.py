"""Peak memory and time of train_reward.py's reward decode + backward (decode_reward_frames, the
last frame of the video, the gradient to its generator block) with the real Wan2.1 VAE architecture
(diffusers AutoencoderKLWan() default config, random weights, fp32). Not a test: a measurement.

    python tests/measure_reward_decode.py --height 480 --width 832                 # GPU if there is one, else CPU
    python tests/measure_reward_decode.py --height 120 --width 208 --latent-frames 6 --no-checkpoint

GPU: torch.cuda.max_memory_allocated above what the VAE and the latents hold. CPU: growth of the
process's peak resident memory (VmHWM, reset just before), with glibc returning freed large blocks
(MALLOC_MMAP_THRESHOLD_ set below when unset) so that the peak counts live memory. The peak does not
depend on --latent-frames beyond 6 (the frames before the scored block only fill a cache of fixed
size); the time does (one no-grad decode per earlier latent frame)."""
import os
import sys

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # must be set before the process starts: re-exec once
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import causal_wan as cw  # noqa: E402
import train_reward as tr  # noqa: E402


def peak_rss_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--latent-frames", type=int, default=21)
    p.add_argument("--block-size", type=int, default=3)
    p.add_argument("--no-checkpoint", action="store_true", help="decode_reward_frames(checkpointed=False), to compare")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to(device).eval().requires_grad_(False)  # Wan2.1's VAE architecture
    F = args.latent_frames
    video = torch.randn(1, 16, F, args.height // 8, args.width // 8, device=device, requires_grad=True)
    weights = torch.randn(3, args.height, args.width, device=device)  # a linear stand-in for the reward
    last = 4 * (F - 1)  # the last pixel frame
    s = (F - 1) // args.block_size * args.block_size  # its generator block starts at latent frame s

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
    pixels = tr.decode_reward_frames(vae, video, [last], args.block_size, checkpointed=not args.no_checkpoint)  # [1, 3, H, W]
    (pixels[0] * weights).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        peak = peak_rss_gib() - base
    seconds = time.time() - t0
    norms = video.grad[0].square().sum((0, 2, 3)).sqrt()[s:].tolist()
    print(f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} | {args.height}x{args.width}, "
          f"{F} latent frames, gradient to {F - s} | {'no checkpoint' if args.no_checkpoint else 'checkpointed'} | "
          f"peak +{peak:.2f} GiB | {seconds:.1f} s (a no-grad decode of the {s} frames before the block alone: {prefix_seconds:.1f} s) | "
          f"gradient norm per latent frame {[round(n, 3) for n in norms]}")


if __name__ == "__main__":
    main()
