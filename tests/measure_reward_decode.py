"""Peak memory and time of train_reward.py's reward decode + backward (decode_reward_frames, the
last frame of the video, the gradient to its generator block) with the real Wan2.1 VAE architecture
(diffusers AutoencoderKLWan() default config, random weights, fp32). Not a test: a measurement.

    python tests/measure_reward_decode.py --count                                   # 480x832 in seconds, any machine
    python tests/measure_reward_decode.py --height 480 --width 832                 # GPU if there is one, else CPU
    python tests/measure_reward_decode.py --height 120 --width 208 --latent-frames 6 --no-checkpoint

--count runs the same code on fake tensors (torch's FakeTensorMode: shapes, no data) and adds up the
bytes of the tensors alive at each moment (PeakMemory): the peak a caching allocator must hold, in
seconds and without the memory. Checked against the measured peaks below (64x104 to 240x416, within
4%); it does not see a conv library's scratch space or allocator fragmentation.
GPU: torch.cuda.max_memory_allocated above what the VAE and the latents hold. CPU: growth of the
process's peak resident memory (VmHWM, reset just before), with glibc returning freed large blocks
(MALLOC_MMAP_THRESHOLD_ set below when unset) so that the peak counts live memory. The peak does not
depend on --latent-frames beyond 6 (the frames before the scored block only fill a cache of fixed
size); the time does (one no-grad decode per earlier latent frame)."""
import os
import sys

if "MALLOC_MMAP_THRESHOLD_" not in os.environ and __name__ == "__main__":  # set before the process starts: re-exec once
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import argparse  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import causal_wan as cw  # noqa: E402
import train_reward as tr  # noqa: E402


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
    pixels = tr.decode_reward_frames(vae, video, [4 * (video.shape[2] - 1)], block_size, checkpointed)  # [1, 3, H, W]
    (pixels[0] * weights).sum().backward()


def count(height, width, latent_frames=6, block_size=3, checkpointed=True, vae_config=None):
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--latent-frames", type=int, default=21)
    p.add_argument("--block-size", type=int, default=3)
    p.add_argument("--no-checkpoint", action="store_true", help="decode_reward_frames(checkpointed=False), to compare")
    p.add_argument("--count", action="store_true", help="count the peak on fake tensors (seconds, no memory) instead")
    args = p.parse_args()
    mode = "no checkpoint" if args.no_checkpoint else "checkpointed"
    if args.count:
        t0 = time.time()
        peak, alive = count(args.height, args.width, args.latent_frames, args.block_size, not args.no_checkpoint)
        print(f"counted | {args.height}x{args.width}, {args.latent_frames} latent frames, gradient to the last block "
              f"| {mode} | peak +{peak:.2f} GiB, alive after the backward {alive:.3f} GiB | {time.time() - t0:.0f} s")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    print(f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} | {args.height}x{args.width}, "
          f"{F} latent frames, gradient to {F - s} | {mode} | peak +{peak:.2f} GiB | {seconds:.1f} s "
          f"(a no-grad decode of the {s} frames before the block alone: {prefix_seconds:.1f} s) | "
          f"gradient norm per latent frame {[round(n, 3) for n in norms]}")


if __name__ == "__main__":
    main()
