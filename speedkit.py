"""
The speed kit of sample.py and demo.py, none of it on by default: a tiny streaming decoder instead of
the Wan VAE (--decoder tae), float8 linear layers (--fp8), weights in CPU memory while their model is
not running (--offload), and torch.compile of the transformer blocks and the VAE decoder (--compile,
--compile-vae). What each one measured: BENCHMARKS.md (bench.py).
"""
import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, save_checkpoint
from convert import tiny_model_dir

# -----------------------------------------------------------------------------
# tiny streaming decoder for Wan latents: the decoder of TAEW2.1 (madebyollin/taehv)
#
# `taew2_1.pth` from https://github.com/madebyollin/taehv is the tiny autoencoder for the Wan 2.1
# latent space that Self Forcing's demo and ComfyUI load. Its decoder is 9.8M parameters of 2-D
# convolutions: 0.54 TFLOP per latent frame at 480x832, against 13.55 for the Wan VAE's causal 3-D
# ones (torch's FlopCounterMode on meta tensors; 11.4 vs 275 TFLOP for 81 frames). Three stages, each
# three memory blocks (a residual conv stack that sees the frame and the previous frame's input),
# 2x nearest upsampling, a temporal grow (a 1x1 conv that turns one frame into 1, 2, 2 frames: 4 per
# latent frame) and a 3x3 conv to the next width. Module names follow taehv.py's nn.Sequential
# (decoder.0 ... decoder.22), so the published file loads with strict=True. From taehv.py and its
# README: latents go in as the diffusion model produces them (no latents_mean / latents_std: "TAEHV
# encodes / decodes exactly what diffusion models use"; the TAEW2.1 diffusers notebook sets mean 0,
# std 1), so our transformer's normalized latents need no conversion; frames come out in [0, 1];
# the first t_upscale - 1 = 3 output frames are warm-up and dropped, which gives the Wan VAE's
# counts: latent frame 0 -> 1 frame, each later one -> 4. Its image quality is the published
# model's: nothing here measures it (the tests use random weights).

TAE_DOWNLOAD = "download taew2_1.pth from https://github.com/madebyollin/taehv (the tiny autoencoder for Wan 2.1)"
TAE_WARMUP_FRAMES = 3  # taehv.py's frames_to_trim = 4 - 1


def tae_conv(n_in, n_out, bias=True):
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class TAEClamp(nn.Module):
    """Soft clamp of the latents to (-3, 3), the decoder's first layer."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class TAEMemBlock(nn.Module):
    """Residual conv stack over [frame, input of the previous frame] (the temporal memory)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Sequential(tae_conv(2 * ch, ch), nn.ReLU(), tae_conv(ch, ch), nn.ReLU(), tae_conv(ch, ch))

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class TAEGrow(nn.Module):
    """Temporal upsampling: a 1x1 conv makes `stride` consecutive frames out of each frame."""

    def __init__(self, ch, stride):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch * stride, 1, bias=False)

    def forward(self, x):  # [N, C, H, W] -> [N * stride, C, H, W]; frame n's outputs stay in order
        return self.conv(x).reshape(-1, *x.shape[1:])


class TinyDecoder(nn.Module):
    """TAEW2.1's decoder. widths: channels of the three stages and of the output head; the published
    file has (256, 128, 64, 64). `memory` holds, per memory block, the input of the last frame it saw:
    the causal state that tae_decode carries from one block of latents to the next."""

    def __init__(self, widths=(256, 128, 64, 64), latent_channels=16):
        super().__init__()
        layers = [TAEClamp(), tae_conv(latent_channels, widths[0]), nn.ReLU()]
        for ch, ch_next, grow in zip(widths[:3], widths[1:], (1, 2, 2)):
            layers += [TAEMemBlock(ch), TAEMemBlock(ch), TAEMemBlock(ch), nn.Upsample(scale_factor=2),
                       TAEGrow(ch, grow), tae_conv(ch, ch_next, bias=False)]
        layers += [nn.ReLU(), tae_conv(widths[3], 3)]
        self.decoder = nn.Sequential(*layers)
        self.memory = None

    def decode_frame(self, z):
        """One latent frame [B, C, h, w] -> 4 frames [B, 3, 4, 8h, 8w] in ~[0, 1], after self.memory."""
        B = z.shape[0]
        x = z  # [B * T, C, H, W]: T frames per video, 1 then 2 then 4 after the temporal grows
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, TAEMemBlock):
                frames = x.view(B, -1, *x.shape[1:])  # [B, T, C, H, W]
                before = torch.zeros_like(frames[:, 0]) if self.memory[i] is None else self.memory[i]
                past = torch.cat([before[:, None], frames[:, :-1]], 1).flatten(0, 1)  # each frame's predecessor
                self.memory[i] = frames[:, -1]
                x = layer(x, past)
            else:
                x = layer(x)
        return x.view(B, -1, *x.shape[1:]).transpose(1, 2)


def tae_decode(tae, z, first=True):
    """Normalized latents [B, 16, n, h, w] -> pixels [B, 3, T, 8h, 8w] in [-1, 1], like vae_decode
    (functools.partial(tae_decode, tae) replaces partial(vae_decode, vae)): first=True starts a video
    (resets the memory and drops the 3 warm-up frames: T = 1 + 4(n - 1)), first=False continues the
    previous call's video (T = 4n). The memory carries over between calls, so decoding block by
    block gives the frames of one decode of the whole video. Latent frames go through one at a time:
    the activations of 4 frames at full size, not 4n."""
    if first:
        tae.memory = [None] * len(tae.decoder)
    elif tae.memory is None:
        raise ValueError("tae_decode(first=False) before any first=True call: nothing to continue")
    z = z.to(tae.decoder[1].weight.dtype)
    x = torch.cat([tae.decode_frame(z[:, :, i]) for i in range(z.shape[2])], 2)  # [B, 3, 4n, H, W]
    if first:
        x = x[:, :, TAE_WARMUP_FRAMES:]
    return (x * 2 - 1).clamp(-1, 1)


def load_tiny_decoder(path, device="cpu", dtype=torch.float32):
    """The TinyDecoder in a TAEHV checkpoint for Wan 2.1 (taew2_1.pth, or its .safetensors), loaded
    strictly: every decoder tensor present with its shape, nothing else but the encoder half (which
    the file also holds and sampling does not use). A wrong or corrupt file is a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"tiny decoder '{path}' does not exist: {TAE_DOWNLOAD}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"tiny decoder '{path}' is not a readable checkpoint ({type(e).__name__}): "
                        f"{TAE_DOWNLOAD}") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"tiny decoder '{path}' holds no state dict of tensors: {TAE_DOWNLOAD}")
    sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    try:
        widths = tuple(sd[f"decoder.{i}.weight"].shape[0] for i in (1, 8, 14, 20))
        latent_channels = sd["decoder.1.weight"].shape[1]
        if latent_channels != 16:
            raise UserError(f"tiny decoder '{path}' is for {latent_channels} latent channels, not Wan 2.1's 16: "
                            f"{TAE_DOWNLOAD}")
        tae = TinyDecoder(widths, latent_channels)
        tae.load_state_dict(sd, strict=True)
    except (KeyError, IndexError, RuntimeError) as e:
        raise UserError(f"tiny decoder '{path}' does not have TAEW2.1's decoder layout "
                        f"({' '.join(str(e).split())[:160]}): {TAE_DOWNLOAD}") from None
    return tae.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# FP8 linear layers (torchao) for the transformer blocks


def fp8_layer(module, name):
    """The layers --fp8 converts (torchao's filter_fn): every nn.Linear inside the transformer blocks
    (self- and cross-attention q/k/v/out, the FFN), 10 per block, which hold nearly all the FLOPs.
    The patch embedding, the timestep and text embedders (condition_embedder) and proj_out stay as
    they are; so do the norms, RoPE and the scale_shift_tables inside the blocks (not Linear)."""
    return isinstance(module, nn.Linear) and name.startswith("blocks.")


def check_fp8(device, dtype):
    """One-line UserError unless --fp8 can run here: a CUDA GPU of compute capability >= 8.9 (Ada,
    Hopper or newer: float8 tensor cores), a bf16 model, torchao installed. Cheap: call it before
    loading any model."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError(f"--fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer), "
                        f"not device '{device}'")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"--fp8 needs compute capability >= 8.9; "
                        f"{torch.cuda.get_device_name(device)} has {major}.{minor}")
    if dtype != torch.bfloat16:
        raise UserError("--fp8 keeps the rest of the transformer in bf16: use --dtype bf16")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise UserError("--fp8 needs torchao: pip install 'torchao>=0.18,<0.19'") from None


def quantize_fp8(model):
    """Convert the fp8_layer linear layers of a bf16 model in place with torchao: weights stored in
    float8 (e4m3) with one scale per output row, activations quantized to float8 per row (per token)
    at every call, matmuls in float8 with bf16 outputs. Call check_fp8 first, on the model already
    on its GPU and before torch.compile (compile_blocks). Returns model."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerRow, quantize_
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_layer)
    # torchao silently keeps a layer whose sizes are not multiples of 16: say so instead
    kept = [name for name, m in model.named_modules() if fp8_layer(m, name) and not isinstance(m.weight, Float8Tensor)]
    if kept:
        raise UserError(f"--fp8: {len(kept)} linear layers could not be converted "
                        f"(sizes must be multiples of 16), e.g. {kept[0]}")
    return model


# -----------------------------------------------------------------------------
# low memory (--offload): a model's weights on the generation device only while it runs


@contextlib.contextmanager
def on_device(module, device):
    """Run the with-block with module's weights (parameters and buffers) on `device`; afterwards they
    are the tensors they were before (e.g. in CPU memory) and the device copies are dropped, not
    copied back: inference does not change weights, so leaving costs no transfer."""
    # .to() either swaps a parameter's .data or puts a new Parameter in its place (meta), and puts new
    # tensors in the buffers' places: keep the objects and their data to put back
    home = [(m, kind, name, t, t.data) for m in module.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items() if t is not None]
    module.to(device)
    try:
        yield module
    finally:
        for m, kind, name, tensor, data in home:
            tensor.data = data
            getattr(m, kind)[name] = tensor


def offloaded(decode, module, device):
    """decode (e.g. partial(vae_decode, vae) or partial(tae_decode, tae)) with module's weights on
    `device` only during each call. The decoder's causal state (the VAE's feature cache, the tiny
    decoder's memory) is not a weight: it stays on the device between blocks."""
    def decode_on_device(*args, **kwargs):
        with on_device(module, device):
            return decode(*args, **kwargs)
    return decode_on_device


# --tiny's decoder: random weights in the published file's layout


def make_tiny_decoder(path, seed=0):
    """Write a random-init TinyDecoder in taew2_1.pth's layout (same keys, narrow widths) to path,
    atomically, for --tiny and the tests: it loads through load_tiny_decoder like the real file."""
    torch.manual_seed(seed)
    tae = TinyDecoder(widths=(32, 16, 8, 8))
    with torch.no_grad():  # PyTorch's default init gives near-black frames (~0.05); spread them around grey
        tae.decoder[22].weight.mul_(4)  # so that clamping to [0, 1] hides nothing in the tests
        tae.decoder[22].bias.fill_(0.5)
    save_checkpoint(path, tae.state_dict())
    return path


def tiny_decoder_path():
    """--tiny's decoder file, built once in its own cache folder (not inside tiny_wan/, whose
    completeness marker would not know about it)."""
    path = os.path.join(os.path.dirname(tiny_model_dir()), "tiny_taew2_1", "taew2_1.pth")
    return path if os.path.isfile(path) else make_tiny_decoder(path)


# -----------------------------------------------------------------------------
# torch.compile of the transformer blocks (--compile) and of the VAE decoder (--compile-vae)


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
    model.cuda_graph_step_hook = (
        model.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
        if mode == "reduce-overhead" else None)
    return model
