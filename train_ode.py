r"""
Stage 2 of Reward Forcing: ODE initialization of the causal student (paper, section 3.2). `generate`
samples ~1.4K noise -> video trajectories from a bidirectional teacher into a store, `verify` checks
the store, `train` regresses the block-causal student onto them; train_reward.py starts from its checkpoint.

    # CPU demo with a tiny random Wan (built once in ~/.cache/reward_forcing/tiny_wan): 64x64 pixels,
    # 4 trajectories, 20 steps, seconds
    python distill_dmd.py --tiny --generator bidirectional --out runs/dmd_tiny
    python train_ode.py generate --tiny --teacher runs/dmd_tiny/ckpt.pt --prompts prompts/dmd_example.txt \
        --store runs/ode_tiny_store
    python train_ode.py verify --store runs/ode_tiny_store
    python train_ode.py train --tiny --store runs/ode_tiny_store --out runs/ode_tiny

    # one GPU (teacher: distill_dmd.py --generator bidirectional; PROMPTS: ~1.4K lines, one prompt a line)
    python train_ode.py generate --teacher runs/dmd_bidirectional/ckpt.pt --prompts PROMPTS --store runs/ode_store
    python train_ode.py verify --store runs/ode_store     # count, shapes, missing shards (exit code 2 if incomplete)
    python train_ode.py train --store runs/ode_store --out runs/ode --global-batch 8
    # or the public code's teacher (no stage 1): base Wan, Euler, shift 8, 48 steps, CFG 6
    python train_ode.py generate --teacher Wan-AI/Wan2.1-T2V-1.3B-Diffusers --recipe self-forcing \
        --prompts PROMPTS --store runs/ode_store

    # 8 GPUs (both phases split across ranks; generation skips finished shards when rerun)
    torchrun --nproc_per_node 8 train_ode.py generate --teacher runs/dmd_bidirectional/ckpt.pt \
        --prompts PROMPTS --store runs/ode_store
    torchrun --nproc_per_node 8 train_ode.py train --store runs/ode_store --out runs/ode
    python sample.py --checkpoint runs/ode/ckpt.pt --prompt "a red fox running in snow"   # render it

The loss
--------
Each trajectory keeps five latents: the noisy inputs at the student's four timesteps and the clean
end point x0. Each block of --block-size (3) latent frames takes its input from one of the four noisy
states, drawn at random per block, with that state's true t; the student is regressed onto x0 under the
block-causal mask, over all frames,

    L_ode = E || G(x_{t_f} per frame, t_f per frame) - x0 ||^2.

This stage teaches motion, not texture: on its own it gives the paper's "ODE only" row (VBench
total 68.77 / quality 73.27 / semantic 50.81). Its checkpoint is what train_reward.py starts from,
and what `sample.py --checkpoint` renders.

Which teacher. The paper's text supports two readings. Section 4.1: "first distilled into a 4-step model
using DMD. For ODE initialization, we also directly sample 1.4K trajectories from the bidirectional model"; the
conclusion: "initialize the autoregressive model directly using the ODE-based training of the original diffusion
model"; section 3.2: "an ODE solver with the pretrained teacher". So the teacher is either the 4-step
bidirectional DMD model (`--teacher runs/dmd_bidirectional/ckpt.pt`: 4 model calls per trajectory, its states
exactly at the student's timesteps) or the original Wan with an ODE solver, as Self Forcing's public code does
(`--teacher Wan-AI/Wan2.1-T2V-1.3B-Diffusers --recipe self-forcing`: no stage 1, 96 model calls per trajectory,
states a little off the student's timesteps; the true levels are stored). This README's chain (DMD -> ODE ->
reward) takes the first, the reading of section 4.1, which names the model the 1.4K trajectories come from; both
give ODE trajectories: the DMD model's steps reuse its own noise estimate (DMDTeacher; --fresh-noise for the
stochastic form), so x0 is a function of the initial noise alone. Pick the second to reproduce Self Forcing's ODE
initialization or to skip stage 1.

Training defaults: peers published no training recipe for this stage (Self Forcing issue #64), so they are ours
(reasons beside Config): AdamW lr 2e-6, betas (0.9, 0.999), weight decay 0.01, global batch 64, 1000 steps, grad
clip 10, EMA 0.99 averaging after --ema-start 100 updates, bf16 compute with fp32 master weights, FSDP2 and
activation checkpointing on GPU. The student starts from the base Wan weights (--model); --init CKPT starts it from
another generator (e.g. the distill_dmd checkpoint) instead. One GPU: add e.g. --global-batch 8 (the global batch
is reached by gradient accumulation). Beside the code: the store's format (the trajectory store), the sample
order and exact --resume (sample_position), the checkpoint (save). Time estimates: BENCHMARKS.md,
'train_ode.py: time (estimates)'.
"""
import argparse
import copy
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import causal_wan as cw
import common
import convert
from causal_wan import WAN_NEGATIVE_PROMPT
from common import UserError

SCRIPT = "train_ode.py"  # recorded in the checkpoint: --resume continues only this script's runs
STALE_OUT = ["ckpt.pt.tmp*", "sample_*.mp4.part.mp4"]  # what a crashed run can leave in --out / --store
STALE_STORE = ["index.json.tmp*", "shard_*.safetensors.tmp*"]
INDEX_KEYS = ("source", "num", "shard_size", "num_shards", "latent_shape", "timesteps", "seed", "prompts")


@dataclass
class Config:
    """The defaults of the flags (parse_args: a flag left unset takes them). The paper gives none for training
    in this stage: these are ours and not tuned at full size: watch `loss` in runs/ode/log.jsonl and the
    sample_<step>.mp4 videos, and stop once motion is coherent."""
    # generate
    num: int = 1400  # trajectories (paper: 1.4K)
    shard_size: int = 16  # trajectories per shard file (~335 MB at full size)
    height: int = 480
    width: int = 832
    frames: int = 81  # pixel frames -> 21 latent frames
    teacher_steps: int = 50  # solver steps of a diffusers-format teacher (Wan's default)
    guidance: float = 5.0  # its CFG scale (WanPipeline's default)
    # train
    block_size: int = 3  # latent frames per causal block (chunk-wise; 1 = frame-wise)
    max_steps: int = 1000  # ~46 passes over 1.4K trajectories
    global_batch: int = 64  # reached by gradient accumulation on fewer GPUs (one GPU: e.g. --global-batch 8)
    micro_batch: int = 1
    lr: float = 2e-6  # CausVid's ODE regression (AdamW, betas and weight decay: setup)
    ema_decay: float = 0.99
    # the student starts from the bidirectional base Wan, not from a trained causal generator: the EMA
    # is the live weights for the first 100 updates (one EMA horizon, 1 / (1 - 0.99)), then averages
    # (with --init from a trained causal generator, --ema-start 0 is as good)
    ema_start: int = 100
    grad_clip: float = 10.0
    save_every: int = 100
    log_every: int = 10
    sample_every: int = 200

    @staticmethod
    def tiny():
        # 64x64 pixels, 21 frames -> latents [16, 6, 8, 8] (two blocks of 3); a tiny student fits
        # four trajectories visibly within 20 steps; the EMA averages from update 2 on
        return Config(num=4, shard_size=3, height=64, width=64, frames=21, teacher_steps=8, max_steps=20,
                      global_batch=2, micro_batch=2, lr=1e-2, ema_decay=0.9, ema_start=1, save_every=10, log_every=1,
                      sample_every=20)


# -----------------------------------------------------------------------------
# the trajectory store
#
# DIR/index.json holds the settings, the latent shape, the five timesteps and every trajectory's prompt;
# DIR/shard_00000.safetensors, ... hold `latents` [n, 5, C, F, H, W] in bf16 (noisiest first, x0 last) with the
# prompts and seeds as metadata. Shard i holds trajectories [i*S, (i+1)*S) (S = --shard-size, 16). Trajectory k
# is drawn from seed + k alone, and a shard is written to a temp file and renamed, so the store is:
# - resumable: rerunning the same `generate` command (any number of GPUs) skips finished shards and regenerates
#   the missing ones identically; changed flags are refused with the list of settings that differ;
# - split across ranks: rank r generates shards r, r + world, ...;
# - verifiable: `verify` checks every shard's shape, dtype, prompts and seeds against the index.
# Prompts come from --prompts (one per line, cycled with new seeds if --trajectories is larger).
#
# Disk size at full size (832x480, 81 frames -> latents 16 x 21 x 60 x 104): one trajectory is
# 21 x 16 x 60 x 104 values x 5 kept states x 2 bytes = 20,966,400 bytes = 21.0 MB (20.0 MiB), so
# 1K trajectories = 21.0 GB (19.5 GiB) and the paper's 1.4K = 29.4 GB (27.3 GiB), in 88 shards of ~335 MB.


def latent_shape(args, channels=16):
    """[C, F, H, W] of the Wan VAE's latents for the pixel size (4x time, 8x space compression)."""
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise UserError(f"--frames must be 4k+1 and --height/--width multiples of 16 "
                        f"(got {args.frames}, {args.height}x{args.width})")
    return [channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8]


def shard_path(store, i):
    return os.path.join(store, f"shard_{i:05d}.safetensors")


def shard_range(index, i):
    start = i * index["shard_size"]
    return range(start, min(start + index["shard_size"], index["num"]))


def read_index(store):
    path = os.path.join(store, "index.json")
    if not os.path.isfile(path):
        raise UserError(f"'{store}' is not a trajectory store (no index.json): make one with `train_ode.py generate`")
    fix = "delete the store and run `train_ode.py generate` again"
    index = common.read_json(path, "store index", fix)
    if not isinstance(index, dict) or any(k not in index for k in INDEX_KEYS):
        lacks = [k for k in INDEX_KEYS if k not in index] if isinstance(index, dict) else 'everything'
        raise UserError(f"store index '{path}' lacks {lacks}: {fix}")
    return index


def write_atomic(path, write):
    """write(tmp), then rename: a crash mid-write never leaves a file that looks finished, and a failed or
    interrupted write (a full disk, Ctrl-C) removes its temp file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, SafetensorError)):  # safetensors' I/O errors are SafetensorError
            raise
        raise UserError(f"could not write {path} ({str(e)[:100]}): {common.no_room(path)}, then rerun the same "
                        f"command") from None


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def verify_store(store):
    """Check every shard against the index: count, shapes, dtype, prompts, seeds. Returns a report."""
    index = read_index(store)
    shape = [len(index["timesteps"])] + index["latent_shape"]
    present, missing, bad = 0, [], []
    for i in range(index["num_shards"]):
        path, ids = shard_path(store, i), shard_range(index, i)
        if not os.path.isfile(path):
            missing.append(i)
            continue
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
                got = f.get_slice("latents").get_shape()
                dtype = f.get_slice("latents").get_dtype()
            ok = (got == [len(ids)] + shape and dtype == "BF16"
                  and json.loads(meta["seeds"]) == [index["seed"] + k for k in ids]
                  and json.loads(meta["prompts"]) == [index["prompts"][k] for k in ids])
        except Exception:
            ok = False
        if ok:
            present += len(ids)
        else:
            bad.append(i)
    return dict(num=index["num"], present=present, shards=index["num_shards"], missing=missing, bad=bad,
                trajectory_shape=shape, dtype="bfloat16", timesteps=index["timesteps"], source=index["source"])


def print_report(store, r):
    bytes_per = 2 * math.prod(r["trajectory_shape"])
    print(f"store {store}: {r['present']} of {r['num']} trajectories in "
          f"{r['shards'] - len(r['missing']) - len(r['bad'])} of {r['shards']} shards; "
          f"per trajectory latents {r['trajectory_shape']} {r['dtype']} ({bytes_per / 1e6:.1f} MB), "
          f"timesteps {[round(t, 1) for t in r['timesteps']]}, teacher {r['source']}")
    if r["missing"] or r["bad"]:
        print(f"missing shards: {r['missing']}; unreadable or inconsistent shards: {r['bad']} "
              f"(delete those, then rerun generate)")


class TrajectoryStore:
    """Random access to the stored trajectories; each read maps one trajectory from its shard."""

    def __init__(self, store):
        report = verify_store(store)
        if report["missing"] or report["bad"]:
            raise UserError(f"store '{store}' is incomplete ({len(report['missing'])} missing, "
                            f"{len(report['bad'])} bad shards): run `train_ode.py generate` again with the same flags "
                            f"to finish it")
        self.dir, self.index = store, read_index(store)
        self.num, self.prompts = self.index["num"], self.index["prompts"]
        self.timesteps = torch.tensor(self.index["timesteps"], dtype=torch.float32)  # [K+1], noisiest first, 0 last
        self.shards = {}

    def __getitem__(self, k):
        """Trajectory k: [K+1, C, F, H, W] bf16 (K noisy states, then x0)."""
        i, j = divmod(k, self.index["shard_size"])
        if i not in self.shards:
            self.shards[i] = safe_open(shard_path(self.dir, i), "pt")
        return self.shards[i].get_slice("latents")[j:j + 1][0]


# -----------------------------------------------------------------------------
# generate: trajectories from the teacher


class DMDTeacher:
    """A checkpoint file of distill_dmd.py as --teacher: its 4-step bidirectional generator, the whole video
    one block. The inputs of its four steps (the noisy latents at DENOISING_TIMESTEPS) are exactly at the
    student's timesteps (1000, 937.5, 833.3, 625). Between steps it re-noises its x0 prediction to the next
    timestep with its own noise estimate, eps = (x_t - (1 - s) x0) / s (s = t / 1000), so that
    x_next = (1 - s') x0 + s' eps = x_t + (s' - s) v: an Euler step of the flow ODE, and x0 a function of the
    initial noise alone (a trajectory of an ODE, as the paper's section 3.2 asks). --fresh-noise re-noises with
    fresh noise instead (from the trajectory's `generator`), as the student's own rollout samples: then x0 also
    depends on noise its early states do not hold, and L_ode has a floor there (the student can only learn the
    mean x0 given its input). --model (the base Wan folder) gives the network config and the text encoder."""
    timesteps = cw.DENOISING_TIMESTEPS + [0.0]

    def __init__(self, args, device):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = cw.CausalWan(cw.read_wan_config(cw.resolve_folder(args.model, "transformer")))
        # a checkpoint of distill_dmd.py --generator bidirectional
        convert.load_generator_weights(self.model, args.teacher, kind="bidirectional")
        self.model = cw.cast_model(self.model, dtype, device).eval().requires_grad_(False)  # bf16 as Wan keeps it
        self.tokenizer, self.encoder = cw.load_text_encoder(args.model, dtype, device)
        self.fresh_noise = args.fresh_noise

    @torch.no_grad()
    def __call__(self, prompt, noise, generator):
        prompt_kv = self.model.prompt_kv(cw.encode_prompts(self.tokenizer, self.encoder, [prompt]))
        x = noise.to(self.model.patch_embedding.weight.dtype)
        if self.fresh_noise:  # the rollout's own sampling: fresh noise between the steps
            steps = []
            x0 = cw.rollout(self.model, x, prompt_kv, block_size=noise.shape[2], generator=generator, trajectory=steps)
            return steps[0] + [x0]  # 4 step inputs + x0, each [1, C, F, H, W]
        return ode_trajectory(self.model, x, prompt_kv, cw.DENOISING_TIMESTEPS)


def ode_trajectory(model, x, prompt_kv, timesteps):
    """The bidirectional model's trajectory from noise x [B, C, F, H, W] over `timesteps` (one block, full
    attention), each step's x0 re-noised with the step's own noise estimate (DMDTeacher): [x at each timestep,
    then x0]. Computed in fp32, kept in x's dtype."""
    states = []
    for i, t in enumerate(timesteps):
        states.append(x)
        x0 = cw.predict_x0(model, x, torch.full((x.shape[0],), t, device=x.device), prompt_kv).float()
        if i + 1 < len(timesteps):
            s, s_next = t / 1000, timesteps[i + 1] / 1000
            eps = (x.float() - (1 - s) * x0) / s  # the noise the model sees in x: x = (1 - s) x0 + s eps
            x = ((1 - s_next) * x0 + s_next * eps).to(x.dtype)
    return states + [x0.to(x.dtype)]


def self_forcing_scheduler(shift=8.0):
    """The ODE solver of Self Forcing's scripts/generate_ode_pairs.py (FlowMatchScheduler(shift=8,
    sigma_min=0, extra_one_step=True)) as a diffusers scheduler for WanPipeline: deterministic Euler
    on the velocity, x <- x + (s_next - s) v, over s_k = shift (1 - k/N) for k = 0..N-1, then 0
    (shift(s) = shift s / (1 + (shift - 1) s)). diffusers' FlowMatchEulerDiscreteScheduler takes the
    Euler steps; its default grid would end at s = 0.008 instead of 1/N, so set_timesteps passes this one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class SelfForcingEuler(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            unshifted = torch.linspace(1, 0, num_inference_steps + 1)[:-1].tolist()  # the scheduler shifts them
            super().set_timesteps(sigmas=unshifted, device=device)
    return SelfForcingEuler(shift=shift)


class DiffusersTeacher:
    """A diffusers-format Wan (folder or hub id) as --teacher, run by diffusers' own WanPipeline:
    `--teacher-steps` steps, classifier-free guidance `--guidance` and `--negative-prompt` (Wan's own by
    default; these apply to this teacher only), with its own scheduler (`--recipe pipeline`: UniPC, flow shift 3,
    50 steps, CFG 5) or with `--recipe self-forcing`: the recipe of Self Forcing's scripts/generate_ode_pairs.py,
    Euler on the velocity over its grid of 48 steps with shift 8, CFG 6 (CausVid's: the same with
    `--teacher-steps 50`).

    A deterministic ODE solve: the kept latents are the solver's latents nearest to the student's timesteps;
    their true timesteps go into the store and training uses them (the solver grid does not hit 937.5 or 625
    exactly: with --recipe self-forcing the states are at 935.8, 827.6, 615.4 for 937.5, 833.3, 625). The
    latents the pipeline's transformer sees are VAE-normalized, the same space our transformer works in, so they
    are stored as they are (output_type='latent' skips the denormalization before the VAE)."""

    def __init__(self, args, device):
        from diffusers import WanPipeline
        cw.resolve_folder(args.teacher, "transformer")  # a clear error for a wrong path
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            self.pipe = WanPipeline.from_pretrained(args.teacher, torch_dtype=dtype).to(device)
        except OSError as e:
            raise UserError(f"could not load the diffusers Wan '{args.teacher}' ({str(e)[:150]})") from None
        if args.recipe == "self-forcing":
            self.pipe.scheduler = self_forcing_scheduler()
        self.pipe.set_progress_bar_config(disable=True)
        self.args = args
        # the pipeline calls set_timesteps(steps) itself; a copy of its scheduler tells us in advance
        # the noise level of the latent before each step (1000 * sigma; sigma_N = 0 after the last)
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(args.teacher_steps)
        levels = (scheduler.sigmas.double() * 1000).tolist()  # [N + 1]
        self.keep = [min(range(args.teacher_steps), key=lambda k: abs(levels[k] - t)) for t in cw.DENOISING_TIMESTEPS]
        if len(set(self.keep)) < len(self.keep):
            raise UserError(f"--teacher-steps {args.teacher_steps} is too few: the student's timesteps "
                            f"{[round(t, 1) for t in cw.DENOISING_TIMESTEPS]} share solver steps")
        self.keep.append(args.teacher_steps)  # the end point x0
        # true noise level of each kept latent (Self Forcing issue #64: the solver grid misses 937.5, 625)
        self.timesteps = [levels[k] for k in self.keep[:-1]] + [0.0]

    def __call__(self, prompt, noise, generator):
        latents = {0: noise}  # latent k is the transformer's input at step k; the callback sees latent i + 1

        def record(pipe, i, t, tensors):
            latents[i + 1] = tensors["latents"].clone()
            return {}
        self.pipe(prompt=prompt, negative_prompt=self.args.negative_prompt, height=self.args.height,
                  width=self.args.width, num_frames=self.args.frames, num_inference_steps=self.args.teacher_steps,
                  guidance_scale=self.args.guidance, latents=noise, output_type="latent", callback_on_step_end=record)
        return [latents[k] for k in self.keep]


def load_teacher(args, device):
    """The teacher --teacher names (checked before it loads), and whether it is a distill_dmd.py checkpoint."""
    cw.check_model(args.model)
    dmd = os.path.isfile(args.teacher)  # a checkpoint file; otherwise a diffusers-format Wan
    if dmd and args.recipe != "pipeline":
        raise UserError(f"--recipe {args.recipe} is a solver for a diffusers-format --teacher; '{args.teacher}' is a "
                        f"distill_dmd.py checkpoint, which samples with its own 4 steps (drop --recipe)")
    if not dmd and args.fresh_noise:
        raise UserError(f"--fresh-noise is for a distill_dmd.py checkpoint as --teacher; '{args.teacher}' is a "
                        f"diffusers-format Wan, sampled by an ODE solver (--recipe): drop --fresh-noise")
    if not dmd:
        cw.check_model(args.teacher, "--teacher")
    return (DMDTeacher(args, device) if dmd else DiffusersTeacher(args, device)), dmd


def open_store(args, index, rank):
    """Rank 0 writes DIR/index.json for a new store; every rank then checks that an existing store was made
    with the same settings, so a rerun finishes it identically."""
    path = os.path.join(args.store, "index.json")
    if rank == 0:
        os.makedirs(args.store, exist_ok=True)
        if not os.path.isfile(path):
            write_atomic(path, lambda tmp: write_json(tmp, index))
    dist.barrier()
    old = read_index(args.store)
    if old != index:
        diff = sorted(k for k in index.keys() | old.keys() if old.get(k) != index.get(k))
        raise UserError(f"store '{args.store}' was made with other settings ({', '.join(diff)} differ): "
                        f"use the same flags to finish it, or another --store")


def shards_to_make(args, index, rank, world):
    """This rank's shards (r, r + world, ...) that are missing, or that fail verification (a corrupt file is
    made again, like a missing one)."""
    bad = set(verify_store(args.store)["bad"])
    todo = [i for i in range(rank, index["num_shards"], world)
            if not os.path.isfile(shard_path(args.store, i)) or i in bad]
    for i in sorted(bad & set(todo)):
        print(f"shard {shard_path(args.store, i)} is unreadable or does not match index.json: generating it again",
              file=sys.stderr)
    return todo


def write_shard(args, teacher, index, prompts, shape, i, device, bar):
    """Shard i: the teacher's kept latents of its trajectories [n, 5, C, F, H, W] bf16, with their prompts and
    seeds as metadata, written atomically."""
    trajectories = []
    for k in shard_range(index, i):
        g = torch.Generator(device).manual_seed(args.seed + k)  # noise and re-noising of trajectory k
        noise = torch.randn([1] + shape, generator=g, device=device)
        kept = teacher(prompts[k], noise, g)
        trajectories.append(torch.stack([x[0] for x in kept]).to(torch.bfloat16).cpu())  # [5, C, F, H, W]
        bar.update()
    ids = shard_range(index, i)
    meta = dict(prompts=json.dumps([prompts[k] for k in ids], ensure_ascii=False),
                seeds=json.dumps([args.seed + k for k in ids]))  # safetensors metadata is str -> str
    write_atomic(shard_path(args.store, i),
                 lambda tmp: save_file({"latents": torch.stack(trajectories)}, tmp, metadata=meta))


@torch.no_grad()
def generate(args, rank, world, device):
    """Sample the trajectories into --store (the trajectory store, above): rank r makes its missing shards, then
    every rank verifies the whole store; exit 0 only for a complete one."""
    lines = common.read_prompts(args.prompts)
    prompts = [lines[k % len(lines)] for k in range(args.num)]  # cycled (with new seeds) if --trajectories > lines
    shape = latent_shape(args)
    teacher, dmd = load_teacher(args, device)
    index = dict(source="dmd_checkpoint" if dmd else "diffusers", teacher=args.teacher, num=args.num,
                 shard_size=args.shard_size, num_shards=-(-args.num // args.shard_size), latent_shape=shape,
                 dtype="bfloat16", timesteps=teacher.timesteps, seed=args.seed, prompts=prompts,
                 **(dict(renoise="fresh" if args.fresh_noise else "ode") if dmd else
                    dict(recipe=args.recipe, teacher_steps=args.teacher_steps, guidance=args.guidance,
                         negative_prompt=args.negative_prompt)))
    open_store(args, index, rank)
    todo = shards_to_make(args, index, rank, world)
    bar = tqdm(total=sum(len(shard_range(index, i)) for i in todo), desc=f"trajectories (rank 0 of {world})",
               disable=rank != 0)
    with common.interruptible(lambda: f"after {bar.n} of {bar.total} trajectories of this rank: the finished shards "
                                      f"stay in {args.store}; the same command finishes the store"):
        for i in todo:
            write_shard(args, teacher, index, prompts, shape, i, device, bar)
    bar.close()
    dist.barrier()
    report = verify_store(args.store)
    if rank == 0:
        print_report(args.store, report)
    if report["missing"] or report["bad"]:  # exit 0 only for a complete store
        raise UserError(f"store '{args.store}' is still incomplete after generate: see the shards named above")


# -----------------------------------------------------------------------------
# train: regress the causal student onto the trajectories


def timestep_index(num_frames, block_size, num_noisy, generator):
    """Which kept state each latent frame is taken from: one per block of `block_size` frames, as at
    inference, where all frames of a block share a timestep (CausVid and Self Forcing's ODE regression
    do the same) -> [F] in [0, num_noisy)."""
    per_block = torch.randint(0, num_noisy, (-(-num_frames // block_size),), generator=generator)
    return per_block.repeat_interleave(block_size)[:num_frames]


def student_x0(model, trajectory, index, timesteps, prompt_kv, block_size):
    """The student's x0 from noisy frames picked out of the teacher's trajectories, under the
    block-causal mask. trajectory [B, K+1, C, F, H, W] (K noisy states, then x0), index [B, F] in
    [0, K), timesteps [K+1] (true t of each state) -> x0 [B, C, F, H, W]."""
    B, _, C, nF, H, W = trajectory.shape
    pick = index.view(B, 1, 1, nF, 1, 1).expand(B, 1, C, nF, H, W)
    x_t = trajectory.gather(1, pick)[:, 0]  # [B, C, F, H, W]: frame f from state index[b, f]
    t = timesteps[index]  # [B, F]
    return cw.predict_x0(model, x_t, t, prompt_kv, block_size=block_size)


def ode_loss(x0_pred, x0_teacher):
    """L_ode: mean squared error between the student's x0 and the teacher's, over all frames."""
    return F.mse_loss(x0_pred.float(), x0_teacher.float())


@functools.lru_cache(maxsize=4)
def epoch_order(seed, num, epoch):
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def sample_position(seed, num, position):
    """What global sample number `position` trains on: one stored trajectory (the store reshuffled every
    epoch) and a generator for its timesteps. Both depend on the seed and the position only, so a
    resumed run continues exactly and any world size / accumulation sees the same samples."""
    epoch, k = divmod(position, num)
    return epoch_order(seed, num, epoch)[k], torch.Generator().manual_seed(seed * 1_000_003 + 7919 * position + 1)


@torch.no_grad()
def write_sample(args, ema, vae, context, shape, step, rank, device):
    """A video from the EMA student by the real autoregressive rollout (every rank takes part: the
    weights are sharded), decoded and written by rank 0."""
    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn([1] + shape, generator=g, device=device)
    video = cw.rollout(ema, noise, ema.prompt_kv(context), block_size=args.block_size, generator=g)
    if rank == 0:
        common.save_video(os.path.join(args.out, f"sample_{step}.mp4"), cw.vae_decode(vae, video.float())[0])


@dataclass
class Run:
    """What the training loop works with, built once by setup()."""
    rank: int
    world: int
    device: torch.device
    accum: int  # micro-batches per rank per optimizer step
    store: TrajectoryStore
    contexts: dict  # prompt -> its embedding [n, text_dim] (CPU, padding cut off)
    timesteps: torch.Tensor  # [K+1] true t of each kept state (noisiest first, 0 last), on the device
    num_noisy: int  # K: the states a block's input is drawn from
    model: torch.nn.Module  # the student
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int  # optimizer steps done (from the checkpoint with --resume)
    vae: torch.nn.Module  # for the sample videos (rank 0, --sample-every), else None
    ckpt_path: str
    log_path: str
    wandb: object  # the wandb run on rank 0 with --wandb, else None


def setup(args, rank, world, device):
    """Check the flags and files (before any model loads), open the store and encode all its prompts once, load
    the student and its EMA, shard them, and restore them with the optimizer from OUT/ckpt.pt on --resume."""
    if args.global_batch % (world * args.micro_batch):
        raise UserError(f"--global-batch {args.global_batch} is not divisible by world size {world} "
                        f"x --micro-batch {args.micro_batch}")
    accum = args.global_batch // (world * args.micro_batch)
    cw.check_model(args.model)
    if args.init:
        convert.check_checkpoint(args.init, "--init checkpoint")
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    ckpt = common.load_resume(ckpt_path, args, SCRIPT)
    wandb = None
    if rank == 0:
        wandb = common.open_log(log_path, ckpt["step"] if ckpt else 0, args.resume, config=vars(args),
                                wandb_name=f"ode-{os.path.basename(os.path.abspath(args.out))}" if args.wandb else None)
    store = TrajectoryStore(args.store)
    bf16 = device.type == "cuda"  # bf16 compute with fp32 master weights on GPU; fp32 on CPU
    contexts, _ = cw.text_contexts(args.model, {p: p for p in store.prompts}, device,
                                   torch.bfloat16 if bf16 else torch.float32, progress=rank == 0)
    timesteps = store.timesteps.to(device)
    num_noisy = len(timesteps) - 1

    model = cw.from_pretrained(args.model, torch.float32, device)  # the student starts from Wan (or --init)
    if store.index["latent_shape"][0] != model.cfg.in_channels:
        raise UserError(f"store latents have {store.index['latent_shape'][0]} channels, "
                        f"the model takes {model.cfg.in_channels}")
    if args.init:
        convert.load_generator_weights(model, args.init)
    model.gradient_checkpointing = bf16
    ema = copy.deepcopy(model).requires_grad_(False)
    common.shard_model(model, bf16, cw.keeps_fp32)
    common.shard_model(ema, bf16, cw.keeps_fp32)
    # beta1 = 0.9 as in CausVid's ODE regression: this stage is plain supervised regression, where
    # momentum helps; the DMD/reward stages use (0.0, 0.999) for their moving targets
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    step = 0
    if ckpt is not None:
        common.load_full_state_dict(model, ckpt["model"])
        common.load_full_state_dict(ema, ckpt["ema"])
        common.load_full_state_dict(model, ckpt["optimizer"], optimizer)
        step = ckpt["step"]
        del ckpt
    vae = cw.load_vae(args.model, device=device) if rank == 0 and args.sample_every else None
    return Run(rank=rank, world=world, device=device, accum=accum, store=store, contexts=contexts,
               timesteps=timesteps, num_noisy=num_noisy, model=model, ema=ema, optimizer=optimizer, step=step,
               vae=vae, ckpt_path=ckpt_path, log_path=log_path, wandb=wandb)


def train_step(args, run, step):
    """Optimizer step number step + 1 on --global-batch trajectories (this rank's `accum` micro-batches, each
    sample from sample_position), then the EMA. A NaN/inf loss or gradient norm stops the run in one line,
    without saving. Returns the loss averaged over all ranks and the gradient norm (0-dim tensors)."""
    store, device = run.store, run.device
    step_loss = torch.zeros((), device=device)
    for m in range(run.accum):
        first = ((step * run.accum + m) * run.world + run.rank) * args.micro_batch
        picks = [sample_position(args.seed, store.num, first + b) for b in range(args.micro_batch)]
        trajectory = torch.stack([store[k] for k, _ in picks]).to(device, torch.float32)  # [B, 5, C, F, H, W]
        index = torch.stack([timestep_index(trajectory.shape[3], args.block_size, run.num_noisy, g)
                             for _, g in picks]).to(device)  # [B, F]
        context = cw.padded(run.contexts, [store.prompts[k] for k, _ in picks], device)
        x0 = student_x0(run.model, trajectory, index, run.timesteps, run.model.prompt_kv(context), args.block_size)
        loss = ode_loss(x0, trajectory[:, -1])
        (loss / run.accum).backward()
        step_loss += loss.detach() / run.accum
    dist.all_reduce(step_loss)  # gloo has no AVG
    step_loss /= run.world
    if not torch.isfinite(step_loss):
        raise UserError(f"loss is {step_loss.item()} at step {step + 1}: stopped without saving; "
                        f"{common.kept_checkpoint(run.ckpt_path)}")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip).full_tensor()
    if not torch.isfinite(grad_norm):  # clipping would turn the weights into NaN
        raise UserError(f"gradient norm is {grad_norm.item()} at step {step + 1}: stopped without saving; "
                        f"{common.kept_checkpoint(run.ckpt_path)}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    # --ema-start N: through update N the EMA is a copy of the live weights, then it averages
    common.ema_update(run.ema, run.model, args.ema_decay if step + 1 > args.ema_start else 0.0)
    common.stop_if_diverged(step + 1, run.ckpt_path, nets=dict(student=run.model, EMA=run.ema))
    return step_loss, grad_norm


def save(args, run, step):
    """OUT/ckpt.pt (every --save-every steps and at the end): a plain dict {'model', 'ema', 'optimizer', 'step',
    'args', 'script', 'stage'}, gathered by every rank, written by rank 0 atomically."""
    ckpt = dict(model=common.full_state_dict(run.model), ema=common.full_state_dict(run.ema),
                optimizer=common.full_state_dict(run.model, run.optimizer), step=step, args=vars(args), script=SCRIPT,
                stage=None)
    if run.rank == 0:
        common.save_checkpoint(run.ckpt_path, ckpt)


def train(args, rank, world, device):
    run = setup(args, rank, world, device)
    step = run.step
    bar = tqdm(initial=step, total=args.max_steps, desc="ode", disable=rank != 0)
    # Ctrl-C / SIGTERM: one line, the steps done (step, read when it comes) and the checkpoint that stays
    with common.interruptible(lambda: f"after step {step} of {args.max_steps}: "
                                      f"{common.kept_checkpoint(run.ckpt_path, resume=True)}"):
        while step < args.max_steps:
            t0 = time.time()
            step_loss, grad_norm = train_step(args, run, step)
            step += 1

            # one line of OUT/log.jsonl per logged step (rank 0; and to wandb with --wandb)
            record = dict(step=step, loss=step_loss.item(), grad_norm=grad_norm.item(), lr=args.lr,
                          step_time=time.time() - t0)
            if device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.4f}", gnorm=f"{record['grad_norm']:.3f}",
                            s=f"{record['step_time']:.2f}",
                            **({"mem_gb": f"{record['gpu_mem_gb']:.1f}"} if "gpu_mem_gb" in record else {}))
            if rank == 0 and (step % args.log_every == 0 or step == args.max_steps):
                common.log_step(run.log_path, record, run.wandb)
            if args.sample_every and step % args.sample_every == 0:
                write_sample(args, run.ema, run.vae, cw.padded(run.contexts, run.store.prompts[:1], device),
                             run.store.index["latent_shape"], step, rank, device)
            if step % args.save_every == 0 or step == args.max_steps:
                save(args, run, step)
        bar.close()
        if rank == 0:
            common.print_done(run.ckpt_path, step, loss=record["loss"])


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    summary = dict(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = common.ArgumentParser(**summary)  # --help: the docstring's first paragraph, for each subcommand too
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample trajectories from the teacher into a store", **summary)
    ver = sub.add_parser("verify", help="report a store's count, shapes and missing shards", **summary)
    tr = sub.add_parser("train", help="regress the causal student onto a store", **summary)
    for p in (gen, tr):
        p.add_argument("--tiny", action="store_true", help="tiny random Wan, small sizes (CPU demo, tests)")
        p.add_argument("--model", help=f"base diffusers-format Wan: config, text encoder, VAE, student init "
                                       f"(default {cw.DEFAULT_MODEL}; with --tiny the cached tiny Wan)")
        p.add_argument("--seed", type=common.seed, default=0)
    for p in (gen, ver, tr):
        p.add_argument("--store", required=True, help="trajectory store folder")
    gen.add_argument("--teacher", required=True,
                     help="distill_dmd.py checkpoint file, or a diffusers-format Wan (folder or hub id)")
    gen.add_argument("--prompts", required=True,
                     help="text file, one prompt per line (cycled if --trajectories is larger)")
    # not --num: torchrun reads every option after the script as well, and --num is ambiguous to it (--numa-binding)
    gen.add_argument("--trajectories", dest="num", type=common.positive_int, help="number of trajectories (1400)")
    gen.add_argument("--shard-size", type=common.positive_int, help="trajectories per shard (16)")
    gen.add_argument("--height", type=common.positive_int)
    gen.add_argument("--width", type=common.positive_int)
    gen.add_argument("--frames", type=common.positive_int, help="pixel frames, 4k+1 (81)")
    gen.add_argument("--fresh-noise", action="store_true",
                     help="a distill_dmd.py teacher re-noises with fresh noise between its 4 steps (as it samples) "
                          "instead of its own noise estimate (an ODE trajectory, the default)")
    gen.add_argument("--recipe", choices=["pipeline", "self-forcing"], default="pipeline",
                     help="solver of a diffusers teacher: pipeline = WanPipeline's own (UniPC, flow shift 3, "
                          "50 steps, CFG 5); self-forcing = Self Forcing's generate_ode_pairs.py (Euler, shift 8, "
                          "48 steps, CFG 6)")
    gen.add_argument("--teacher-steps", type=common.positive_int,
                     help="solver steps of a diffusers teacher (50; 48 with --recipe self-forcing)")
    gen.add_argument("--guidance", type=common.nonnegative_float,
                     help="CFG scale of a diffusers teacher (5.0; 6.0 with --recipe self-forcing)")
    gen.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT, help="of a diffusers teacher (default: Wan's)")
    tr.add_argument("--out", required=True, help="folder for ckpt.pt, log.jsonl, sample_<step>.mp4")
    tr.add_argument("--init", help="start the student from this checkpoint's generator instead of --model's weights")
    tr.add_argument("--resume", action="store_true", help="continue exactly from OUT/ckpt.pt")
    tr.add_argument("--block-size", type=common.positive_int, help="latent frames per causal block (3)")
    tr.add_argument("--max-steps", type=common.positive_int)
    tr.add_argument("--global-batch", type=common.positive_int, help="trajectories per optimizer step, all ranks (64)")
    tr.add_argument("--micro-batch", type=common.positive_int, help="trajectories per rank per forward (1)")
    tr.add_argument("--lr", type=common.learning_rate)
    tr.add_argument("--ema-decay", type=common.decay)
    tr.add_argument("--ema-start", type=common.nonnegative_int,
                    help="updates before the EMA starts averaging: until then it is a copy of the live weights (100)")
    tr.add_argument("--grad-clip", type=common.positive_float)
    tr.add_argument("--save-every", type=common.positive_int)
    tr.add_argument("--log-every", type=common.positive_int)
    tr.add_argument("--sample-every", type=common.nonnegative_int,
                    help="write OUT/sample_<step>.mp4 from the EMA student (0: never)")
    tr.add_argument("--wandb", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "generate" and args.recipe == "self-forcing":  # its steps and CFG, unless given
        args.teacher_steps = 48 if args.teacher_steps is None else args.teacher_steps
        args.guidance = 6.0 if args.guidance is None else args.guidance
    if args.command != "verify":
        preset = asdict(Config.tiny() if args.tiny else Config())
        for name, value in list(vars(args).items()):
            if value is None and name in preset:  # a flag left unset takes the preset's value
                setattr(args, name, preset[name])
        if args.model is None:
            args.model = convert.make_tiny_wan(convert.tiny_model_dir()) if args.tiny else cw.DEFAULT_MODEL
    return args


def main(args):
    if args.command == "verify":
        report = verify_store(args.store)
        print_report(args.store, report)
        if report["missing"] or report["bad"]:
            raise UserError(f"store '{args.store}' is incomplete: rerun `train_ode.py generate` with the same flags")
        return
    rank, world, device = common.init_distributed()
    if args.command == "generate":
        folder, what, stale = args.store, "--store", STALE_STORE
    else:
        folder, what, stale = args.out, "--out", STALE_OUT
    try:
        with common.own_folder(folder, stale, what):  # one run per --out (one generate per --store)
            (generate if args.command == "generate" else train)(args, rank, world, device)
            dist.barrier()  # no rank tears the group down while rank 0 still writes the checkpoint
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_script(main, parse_args)
