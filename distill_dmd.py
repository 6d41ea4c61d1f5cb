"""
Stage 1 of Reward Forcing: distill Wan2.1 into a 4-step generator with DMD (Distribution Matching
Distillation; paper sections 3.1 and 4.1, recipe of Self Forcing). Its bidirectional generator is the
fast teacher of stage 2 (train_ode.py); its losses are the DMD term of train_reward.py --dmd-weight.

    # CPU demo with a tiny random Wan (built once in ~/.cache/reward_forcing/tiny_wan): under a second per step
    python distill_dmd.py --tiny --out runs/dmd_tiny
    python distill_dmd.py --tiny --out runs/dmd_tiny --resume --max-steps 20

    # one GPU (80 GB): the global batch of 64 by gradient accumulation (slow; memory and time estimates:
    # BENCHMARKS.md, 'distill_dmd.py: GPU memory, compute, host memory and disk (estimates)')
    python distill_dmd.py --generator bidirectional --out runs/dmd_bidirectional
    python distill_dmd.py --generator causal --init runs/ode/ckpt.pt --out runs/dmd_causal

    # 8 GPUs on one machine (FSDP: the three networks are sharded; bf16 compute, fp32 master weights)
    torchrun --nproc_per_node 8 distill_dmd.py --generator bidirectional --out runs/dmd_bidirectional
    torchrun --nproc_per_node 8 distill_dmd.py --generator causal --init runs/ode/ckpt.pt --out runs/dmd_causal
    # the paper's teacher ablation: 14B teacher, 1.3B generator and critic
    torchrun --nproc_per_node 8 distill_dmd.py --teacher Wan-AI/Wan2.1-T2V-14B-Diffusers --out runs/dmd_14b
    # continue a run exactly (weights, EMA, both optimizers, step; the noise follows from the step)
    torchrun --nproc_per_node 8 distill_dmd.py --generator causal --out runs/dmd_causal --resume

The three networks (--model, --teacher: a diffusers-format Wan, hub id or local folder; default
Wan-AI/Wan2.1-T2V-1.3B-Diffusers):
- teacher (real score): a bidirectional Wan (--teacher, default --model), frozen, loaded in bf16, with
  classifier-free guidance: real_x0 = uncond + guidance * (cond - uncond). Self Forcing's released config
  (configs/self_forcing_dmd.yaml) takes Wan2.1-T2V-14B as the real score with a 1.3B critic and generator;
  the default here stays the 1.3B, as the paper describes its DMD model ("based on Wan2.1-T2V-1.3B ... first
  distilled into a 4-step model") and finds no substantial difference with the 14B (section 5.3), and because
  the 14B multiplies the teacher's memory by 10 (28.6 vs 2.8 GB in bf16): pass --teacher
  Wan-AI/Wan2.1-T2V-14B-Diffusers for Self Forcing's setting;
- critic (fake score): a bidirectional Wan initialized from --model, conditional only, trained with the
  flow-matching loss on the generator's (detached) samples;
- generator: 4 steps (timesteps 1000, 750, 500, 250 shifted by 5), initialized from --model or from a
  checkpoint (--init: any checkpoint convert.generator_state_dict reads: train_ode.py's, or Self Forcing's
  ode_init.pt), with an EMA copy that is what sample.py renders. Two kinds, one flag:
  --generator causal (default) trains the block-causal model by self-rollout (Self Forcing): it makes
  the whole 21-latent-frame video in blocks of 3 frames with its own KV cache; all blocks stop after
  the same randomly drawn denoising step (identical on every rank) and the gradient flows through that
  step only, and (--cache-grad straight-through, the default) from later blocks through the KV cache into
  each block's exit step, as Self Forcing's training code computes it (tests/test_self_forcing.py; --cache-grad
  detach drops that term). --generator bidirectional distills the 4-step bidirectional model (the whole video is one
  block with full attention), the fast teacher of the ODE stage: `train_ode.py generate --teacher
  runs/dmd_bidirectional/ckpt.pt` (DMD -> ODE -> reward); `sample.py --checkpoint` renders it as one
  block with full attention.

The losses
----------
Each step is --critic-steps (5) critic updates followed by one generator update, each on
--global-batch fresh videos from the generator. The losses (module-level functions, also used by
train_reward.py --dmd-weight):

    grad L_DMD = E_t[ (s_fake(x_t) - s_real(x_t)) dG/dtheta ],   x_t = noised G(z)

    t   ~ U[0, 1000), shifted by 5, clamped to [20, 980]     one t per video (as Self Forcing)
    x_t = (1 - t/1000) x0 + t/1000 eps
    dmd_loss:    grad = (critic_x0(x_t) - real_x0(x_t)) / mean|x0 - real_x0(x_t)|   (per video)
                 loss = 0.5 * mse(x0, (x0 - grad).detach())                     in fp64
    critic_loss: mse(critic_velocity(x_t), eps - x0)                           (flow matching, x0 detached)

Optimizers: AdamW, betas (0.0, 0.999), weight decay 0.01, eps 1e-8; generator lr 2e-6, critic lr
4e-7; gradient clipping at 10 for both. Training is data free: prompts only (--prompts FILE, one a
line; prompts/dmd_example.txt is a 16-prompt example), each encoded once at start (UMT5-XXL, then
freed). Beside the code: the batch layout (Run), the defaults and their reasons (Config), the output
files (save, write_sample, train's log record).
"""
import argparse
import copy
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import causal_wan as cw
import common
import convert
from causal_wan import WAN_NEGATIVE_PROMPT
from common import UserError

EXAMPLE_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "dmd_example.txt")
# A NaN or inf loss or gradient stops the run with `error: training diverged at step N (...)` before the optimizer
# step and without saving, so the last good checkpoint stays; this hint ends that message.
DIVERGED_HINT = "lower --lr / --critic-lr and --resume"
SCRIPT = "distill_dmd.py"  # recorded in the checkpoint: --resume continues only this script's runs
STALE = ["ckpt.pt.tmp*", "sample_*.mp4.part.mp4"]  # what a crashed run can leave in --out


@dataclass
class Config:
    """The defaults of the flags (parse_args: a flag left unset takes them); --seed (0) and --wandb (opt-in) are
    flags only."""
    generator: str = "causal"  # or "bidirectional"
    prompts: str = EXAMPLE_PROMPTS
    # the teacher's unconditional branch: Wan's own negative prompt, as Self Forcing does (--negative-prompt ""
    # gives WanPipeline's default, the encoding of the empty string)
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    height: int = 480
    width: int = 832
    frames: int = 81  # pixel frames -> 21 latent frames
    block_size: int = 3  # latent frames per block of the causal generator (1: frame-wise)
    # the generator's gradient through its KV cache, as Self Forcing's training code computes it (later blocks
    # read the clean keys/values, their gradient reaches each earlier block's exit step; cw.rollout), or none
    cache_grad: str = "straight-through"
    # Self Forcing's guidance_scale 3.0, which its code applies as cond + 3 (cond - uncond); written the
    # usual way used here (diffusers, Wan: uncond + g (cond - uncond)) that is g = 4
    guidance: float = 4.0
    critic_steps: int = 5  # critic updates per generator update (Self Forcing's dfake_gen_update_ratio)
    lr: float = 2e-6  # generator
    critic_lr: float = 4e-7
    ema_decay: float = 0.99
    # Self Forcing's ema_start_step (200 iterations = 40 generator updates): through update 40 the EMA is a
    # copy of the live weights and it averages from update 41 on, so the base model it starts from does not
    # linger in it (after 120 updates averaged from the start, 0.99^120 = 30% of it would remain)
    ema_start: int = 40
    grad_clip: float = 10.0  # both networks
    # videos per update over all GPUs (Self Forcing: 64 GPUs x 1 video), and per GPU per forward: gradient
    # accumulation is global / (GPUs x micro), an error if that is not whole
    global_batch: int = 64
    micro_batch: int = 1
    max_steps: int = 120  # generator updates: = Self Forcing's 600 iterations (a generator update every 5th)
    save_every: int = 20
    log_every: int = 1
    sample_every: int = 20  # 0: never

    @staticmethod
    def tiny():
        # 64x64 pixels, 21 frames -> latents [16, 6, 8, 8] (two causal blocks of 3); a step takes ~0.5 s;
        # the EMA averages from update 2 on, so a short run has both of its phases
        return Config(height=64, width=64, frames=21, critic_steps=2, lr=1e-4, critic_lr=1e-3, global_batch=2,
                      max_steps=10, save_every=5, sample_every=5, ema_start=1)


# -----------------------------------------------------------------------------
# the DMD losses (train_reward.py imports them for its --dmd-weight ablation)


def sample_timesteps(batch, generator, device, shift=5.0, min_t=20.0, max_t=980.0):
    """One noise level per video for the DMD and critic losses, as Self Forcing samples it (its
    uniform_timestep): t ~ U[0, 1000) warped with the shift of the 4-step schedule (towards high noise), then
    kept in [20, 980] -> [B]."""
    s = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s) * 1000).clamp(min_t, max_t).float()


def add_noise(x0, t, generator):
    """x_t = (1 - s) x0 + s eps with s = t / 1000 (one t per video): returns x_t and eps, fp32."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    s = (t / 1000).view(-1, *[1] * (x0.dim() - 1))
    return (1 - s) * x0.float() + s * eps, eps


def dmd_loss(x0, teacher, critic, context, uncond_context, guidance, generator):
    """The distribution matching loss (paper section 3.1; DMD eqs. 7-8) of the generator's videos.

    x0 [B, C, F, H, W]: the generator's output, with its graph. teacher / critic: the bidirectional
    real and fake scores (CausalWan, called with full attention). context [B, 512, text_dim]: the
    prompts' embeddings; uncond_context [1 or B, 512, text_dim]: the negative prompt's. The real score
    is the teacher's x0 with CFG, uncond + guidance (cond - uncond); the fake score is the critic's
    conditional x0. The gradient of the loss w.r.t. x0 is (fake - real) / mean|x0 - real| (per video)
    / numel: the loss value itself only measures the size of that step. Returns (loss, logs)."""
    B = x0.shape[0]
    with torch.no_grad():
        t = sample_timesteps(B, generator, x0.device)  # [B]
        x_t, _ = add_noise(x0.detach(), t, generator)
        kv = teacher.prompt_kv(torch.cat([context, uncond_context.expand_as(context)]))  # cond and uncond in one batch
        real_cond, real_uncond = cw.predict_x0(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), kv).float().chunk(2)
        real = real_uncond + guidance * (real_cond - real_uncond)
        fake = cw.predict_x0(critic, x_t, t, critic.prompt_kv(context)).float()
        # DMD's normalization makes the step size independent of how far the sample is from the
        # teacher's; the clamp only avoids 0/0 (a NaN from the networks still reaches the loss)
        normalizer = (x0.detach().float() - real).abs().mean(dim=list(range(1, x0.dim())), keepdim=True)
        grad = (fake - real) / normalizer.clamp_min(1e-12)
    x0 = x0.double()  # fp64 as Self Forcing: the step is tiny next to x0
    loss = 0.5 * F.mse_loss(x0, (x0 - grad.double()).detach())
    return loss, dict(dmd_t=t.mean(), dmd_grad=grad.abs().mean())


def critic_loss(x0, critic, context, generator):
    """The fake score's denoising loss on the generator's videos (detached): flow matching, i.e. the
    critic's velocity against eps - x0 at x_t = (1 - s) x0 + s eps, with t drawn as in dmd_loss (training on
    the velocity is equivalent to x0 prediction weighted by 1/s^2). x0 [B, C, F, H, W], context
    [B, 512, text_dim]. Returns (loss, logs)."""
    x0 = x0.detach().float()
    t = sample_timesteps(x0.shape[0], generator, x0.device)
    x_t, eps = add_noise(x0, t, generator)
    v = critic(x_t, t, critic.prompt_kv(context))
    return F.mse_loss(v.float(), eps - x0), dict(critic_t=t.mean())


def generate(model, noise, context, exit_step, block_size, generator, cache_grad="straight-through"):
    """The generator's videos for the losses: the self-rollout (Self Forcing; DMD2's backward
    simulation) in which every block stops after denoising step `exit_step` (0..3) and returns that
    step's x0. With grad enabled the gradient flows through that step only; the earlier steps and
    the KV-cache passes run without it, and cache_grad says whether a block's gradient also reaches
    the earlier blocks through the cache (cw.rollout). block_size >= frames is the bidirectional generator."""
    num_blocks = math.ceil(noise.shape[2] / block_size)
    return cw.rollout(model, noise, model.prompt_kv(context), block_size=block_size,
                      exit_steps=[exit_step] * num_blocks, generator=generator, cache_grad=cache_grad)


# -----------------------------------------------------------------------------
# training


@torch.no_grad()
def write_sample(args, ema, vae, context, latent_shape, block_size, step, rank, device):
    """OUT/sample_<step>.mp4: a video from the EMA generator with all 4 steps, of the first prompt, from the
    same noise every time (every rank takes part: the weights are sharded), decoded and written by rank 0."""
    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn([1] + latent_shape, generator=g, device=device)
    video = cw.rollout(ema, noise, ema.prompt_kv(context), block_size=block_size, generator=g)
    if rank == 0:
        common.save_video(os.path.join(args.out, f"sample_{step}.mp4"), cw.vae_decode(vae, video.float())[0])


def main(args):
    rank, world, device = common.init_distributed()
    try:
        with common.own_folder(args.out, STALE):  # one run per --out: it owns OUT/.lock
            train(args, rank, world, device)
            dist.barrier()  # no rank tears the group down while rank 0 still writes the checkpoint
    finally:
        dist.destroy_process_group()


@dataclass
class Run:
    """What the training loop works with, built once by setup().

    The batch layout, why one GPU and 8 GPUs train the same model: the global batch is `slots` =
    global/micro groups of micro_batch videos; this rank runs `my_slots` (slots [rank*accum, (rank+1)*accum)).
    Slot j of update u draws its noise, prompts and timesteps from its own generator step_generator(seed, u, j),
    and its prompts from its own share of the prompt file (lines j, j + slots, ...). So the update does not
    depend on how the slots are spread over GPUs: one GPU with accumulation and N GPUs compute the same step
    (tested: 2 processes = 1 process with 2 accumulation steps)."""
    rank: int
    device: torch.device
    accum: int  # micro-batches per rank per update
    my_slots: range
    shares: dict  # slot -> the prompt lines it draws from
    contexts: dict  # prompt line -> its embedding [n, text_dim] (CPU, padding cut off)
    uncond: torch.Tensor  # the negative prompt's embedding [1, 512, text_dim]
    teacher: torch.nn.Module  # real score, frozen
    critic: torch.nn.Module  # fake score
    generator: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer  # the generator's
    critic_opt: torch.optim.Optimizer
    step: int  # generator updates done (from the checkpoint with --resume)
    latent_shape: list  # [C, F, h, w] of one video
    block_size: int  # latent frames per rollout block (all of them for the bidirectional generator)
    vae: torch.nn.Module  # for the sample videos (rank 0, --sample-every), else None
    ckpt_path: str
    log_path: str
    stage: str  # recorded in the checkpoint: --resume continues only the same --generator
    wandb: object  # the wandb run on rank 0 with --wandb, else None


def setup(args, rank, world, device):
    """Check the flags and files (before any model loads), read the prompts and encode them, load the
    three networks, shard them, and restore them with the optimizers from OUT/ckpt.pt on --resume."""
    if args.global_batch % (world * args.micro_batch):
        raise UserError(f"--global-batch {args.global_batch} is not divisible by world size {world} "
                        f"x --micro-batch {args.micro_batch}")
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise UserError(f"--frames must be 4k+1 and --height/--width multiples of 16 "
                        f"(got {args.frames}, {args.height}x{args.width})")
    slots = args.global_batch // args.micro_batch
    accum = slots // world
    my_slots = range(rank * accum, (rank + 1) * accum)
    for model, flag in ((args.model, "--model"), (args.teacher, "--teacher")):
        cw.check_model(model, flag)
    if args.init:
        convert.check_checkpoint(args.init, "--init checkpoint")
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    stage = f"with --generator {args.generator}"
    ckpt = common.load_resume(ckpt_path, args, SCRIPT, stage)
    wandb = None
    if rank == 0:
        wandb = common.open_log(log_path, ckpt["step"] if ckpt else 0, args.resume, config=vars(args),
                            wandb_name=f"dmd-{os.path.basename(os.path.abspath(args.out))}" if args.wandb else None)

    prompts = common.read_prompts(args.prompts)
    prompts = prompts * math.ceil(slots / len(prompts))  # every slot needs at least one line
    shares = {j: list(range(j, len(prompts), slots)) for j in my_slots}
    needed = {i for share in shares.values() for i in share} | {0}  # + prompt 0 for the sample videos
    bf16 = device.type == "cuda"  # bf16 compute with fp32 master weights on GPU; fp32 on CPU
    contexts, uncond = cw.text_contexts(args.model, {i: prompts[i] for i in needed}, device,
                                        torch.bfloat16 if bf16 else torch.float32, args.negative_prompt,
                                        progress=rank == 0)

    teacher = cw.from_pretrained(args.teacher, torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)
    generator = cw.from_pretrained(args.model, torch.float32)  # the base model (1.3B): generator and critic
    critic = copy.deepcopy(generator)
    if args.init:
        convert.load_generator_weights(generator, args.init, kind=args.generator)
    if (teacher.cfg.in_channels, teacher.cfg.text_dim) != (critic.cfg.in_channels, critic.cfg.text_dim):
        raise UserError(f"--teacher '{args.teacher}' does not share latent channels and text encoder "
                        f"with --model '{args.model}'")
    ema = copy.deepcopy(generator).requires_grad_(False)
    generator.gradient_checkpointing = critic.gradient_checkpointing = bf16  # per block, on GPU
    for net in (teacher, critic, generator, ema):  # one code path for 1 and N GPUs, 1.3B and 14B teachers
        common.shard_model(net, bf16, cw.keeps_fp32)
    # betas (0.0, 0.999): no momentum, as DMD2 and Self Forcing; both targets move every step
    opt = torch.optim.AdamW(generator.parameters(), lr=args.lr, betas=(0.0, 0.999), weight_decay=0.01, eps=1e-8)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.0, 0.999), weight_decay=0.01,
                                   eps=1e-8)
    step = 0
    if ckpt is not None:
        common.load_full_state_dict(generator, ckpt["model"])
        common.load_full_state_dict(ema, ckpt["ema"])
        common.load_full_state_dict(generator, ckpt["optimizer"], opt)
        common.load_full_state_dict(critic, ckpt["critic"])
        common.load_full_state_dict(critic, ckpt["critic_optimizer"], critic_opt)
        step = ckpt["step"]
        del ckpt

    latent_shape = [generator.cfg.in_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8]
    block_size = args.block_size if args.generator == "causal" else latent_shape[1]
    vae = cw.load_vae(args.model, device=device) if rank == 0 and args.sample_every else None
    return Run(rank=rank, device=device, accum=accum, my_slots=my_slots, shares=shares, contexts=contexts,
               uncond=uncond, teacher=teacher, critic=critic, generator=generator, ema=ema, opt=opt,
               critic_opt=critic_opt, step=step, latent_shape=latent_shape, block_size=block_size, vae=vae,
               ckpt_path=ckpt_path, log_path=log_path, stage=stage, wandb=wandb)


def draw(args, run, update, slot):
    """This slot's noise [B, C, F, H, W] and prompt embeddings, and the generator for the rest of its draws
    (the batch layout: Run)."""
    g = common.step_generator(args.seed, update, slot, run.device)
    share = run.shares[slot]
    ids = [share[k] for k in torch.randint(len(share), (args.micro_batch,), generator=g, device=run.device).tolist()]
    noise = torch.randn([args.micro_batch] + run.latent_shape, generator=g, device=run.device)
    return noise, cw.padded(run.contexts, ids, run.device), g


def exit_step(args, update):
    """Where every block of this update's rollouts stops: one exit step per update, shared by all blocks,
    samples and ranks (Self Forcing's same_step_across_blocks: true), so all ranks run the same number of
    sharded forwards; a fresh draw for every critic and generator update."""
    g = common.step_generator(args.seed, update, -1, "cpu")  # slot -1: a stream no slot uses
    return int(torch.randint(len(cw.DENOISING_TIMESTEPS), (1,), generator=g))


def critic_update(args, run, update, step):
    """One critic update on fresh detached rollouts of the generator: flow matching on its videos, so
    the critic follows the score of the generator's current distribution. Returns (loss, grad norm)."""
    k = exit_step(args, update)
    loss_sum = torch.zeros((), device=run.device)
    for slot in run.my_slots:
        noise, context, g = draw(args, run, update, slot)
        with torch.no_grad():
            x0 = generate(run.generator, noise, context, k, run.block_size, g, args.cache_grad)
        loss, _ = critic_loss(x0, run.critic, context, g)
        (loss / run.accum).backward()
        loss_sum += loss.detach() / run.accum
    loss, norm = common.all_mean(loss_sum), common.grad_norm(run.critic, args.grad_clip)
    common.stop_if_diverged(step, run.ckpt_path, dict(critic_loss=loss, critic_grad_norm=norm), DIVERGED_HINT)
    run.critic_opt.step()
    run.critic_opt.zero_grad(set_to_none=True)
    return loss, norm


def generator_update(args, run, update, step):
    """One DMD step of the generator through its rollout, scored by the teacher (real) and the critic
    (fake), then the EMA. Returns (loss, grad norm, mean |DMD step|, exit step)."""
    k = exit_step(args, update)
    loss_sum, dmd_grad = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    for slot in run.my_slots:
        noise, context, g = draw(args, run, update, slot)
        x0 = generate(run.generator, noise, context, k, run.block_size, g, args.cache_grad)
        loss, logs = dmd_loss(x0, run.teacher, run.critic, context, run.uncond, args.guidance, g)
        (loss / run.accum).backward()
        loss_sum += loss.detach().float() / run.accum
        dmd_grad += logs["dmd_grad"] / run.accum
    loss, norm = common.all_mean(loss_sum), common.grad_norm(run.generator, args.grad_clip)
    common.stop_if_diverged(step, run.ckpt_path, dict(loss=loss, grad_norm=norm), DIVERGED_HINT)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    # --ema-start N: through update N the EMA is a copy of the live weights, then it averages
    common.ema_update(run.ema, run.generator, args.ema_decay if step > args.ema_start else 0.0)
    common.stop_if_diverged(step, run.ckpt_path, hint=DIVERGED_HINT,
                            nets=dict(generator=run.generator, EMA=run.ema, critic=run.critic))
    return loss, norm, common.all_mean(dmd_grad), k


def save(args, run, step):
    """OUT/ckpt.pt, a plain dict (torch.load(weights_only=True)): 'model', 'ema', 'optimizer' (the
    generator's), 'critic', 'critic_optimizer', 'step', 'args', and 'script' + 'stage' (--resume continues only
    a run of this script with the same --generator). Gathered by every rank, written by rank 0, atomically and
    only if every tensor is finite. `sample.py --checkpoint OUT/ckpt.pt` renders its EMA."""
    ckpt = dict(model=common.full_state_dict(run.generator), ema=common.full_state_dict(run.ema),
                optimizer=common.full_state_dict(run.generator, run.opt), critic=common.full_state_dict(run.critic),
                critic_optimizer=common.full_state_dict(run.critic, run.critic_opt), step=step, args=vars(args),
                script=SCRIPT, stage=run.stage)
    if run.rank == 0:
        common.save_checkpoint(run.ckpt_path, ckpt)


def train(args, rank, world, device):
    run = setup(args, rank, world, device)
    step = run.step
    bar = tqdm(initial=step, total=args.max_steps, desc=f"dmd {args.generator}", disable=rank != 0)
    # Ctrl-C / SIGTERM: one line, the steps done (step, read when it comes) and the checkpoint that stays
    with common.interruptible(lambda: f"after step {step} of {args.max_steps}: "
                                      f"{common.kept_checkpoint(run.ckpt_path, resume=True)}"):
        while step < args.max_steps:
            t0 = time.time()
            updates = step * (args.critic_steps + 1)  # this step's update numbers: critic ..., generator
            # critic: learn the score of the generator's current distribution (its videos detached)
            critic_logs = [critic_update(args, run, updates + c, step + 1) for c in range(args.critic_steps)]
            # generator: one DMD step through the rollout, scored by the teacher (real) and the critic (fake)
            loss, grad_norm, dmd_grad, k = generator_update(args, run, updates + args.critic_steps, step + 1)
            step += 1

            # one line of OUT/log.jsonl per logged step: loss, critic_loss, grad_norm, critic_grad_norm, dmd_grad,
            # exit_step, step_time, gpu_mem_gb
            critic_losses, critic_norms = [c[0] for c in critic_logs], [c[1] for c in critic_logs]
            record = dict(step=step, loss=loss, grad_norm=grad_norm,
                          critic_loss=sum(critic_losses) / max(len(critic_losses), 1),
                          critic_grad_norm=sum(critic_norms) / max(len(critic_norms), 1), dmd_grad=dmd_grad,
                          exit_step=k, step_time=time.time() - t0)
            if device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            bar.update()
            bar.set_postfix(loss=f"{record['loss']:.2e}", critic=f"{record['critic_loss']:.4f}",
                            gnorm=f"{record['grad_norm']:.3f}", s=f"{record['step_time']:.2f}",
                            **({"mem": f"{record['gpu_mem_gb']:.1f}G"} if "gpu_mem_gb" in record else {}))
            if rank == 0 and (step % args.log_every == 0 or step == args.max_steps):
                common.log_step(run.log_path, record, run.wandb)
            if args.sample_every and step % args.sample_every == 0:
                write_sample(args, run.ema, run.vae, cw.padded(run.contexts, [0], device), run.latent_shape,
                             run.block_size, step, rank, device)
            if step % args.save_every == 0 or step == args.max_steps:
                save(args, run, step)
        bar.close()
        if rank == 0:
            common.print_done(run.ckpt_path, step, loss=record["loss"], critic_loss=record["critic_loss"])


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Wan, small sizes (CPU demo, tests)")
    p.add_argument("--model", help=f"base diffusers-format Wan (folder or hub id): generator and critic init, "
                                   f"text encoder, VAE (default {cw.DEFAULT_MODEL}; with --tiny the cached tiny Wan)")
    p.add_argument("--teacher", help="diffusers-format Wan of the real score, loaded in bf16 and frozen "
                                     "(default: --model; Wan-AI/Wan2.1-T2V-14B-Diffusers for the paper's ablation)")
    p.add_argument("--init", help="start the generator from this checkpoint's weights "
                                  "(e.g. train_ode.py's, or Self Forcing's ode_init.pt)")
    p.add_argument("--generator", choices=["causal", "bidirectional"],
                   help="causal: self-rollout in blocks (default); bidirectional: the 4-step full-attention model")
    p.add_argument("--cache-grad", choices=cw.CACHE_GRAD,
                   help="straight-through: a block's gradient also reaches the blocks it attended to through the KV "
                        "cache, as in Self Forcing's training code (default); detach: it does not")
    p.add_argument("--prompts", help="text file, one prompt per line (default prompts/dmd_example.txt)")
    p.add_argument("--negative-prompt", help="unconditional branch of the teacher's CFG (default: Wan's own)")
    p.add_argument("--guidance", type=common.nonnegative_float,
                   help="teacher CFG, uncond + g (cond - uncond) (4.0 = Self Forcing's 3.0)")
    p.add_argument("--height", type=common.positive_int)
    p.add_argument("--width", type=common.positive_int)
    p.add_argument("--frames", type=common.positive_int, help="pixel frames, 4k+1 (81)")
    p.add_argument("--block-size", type=common.positive_int, help="latent frames per causal block (3)")
    p.add_argument("--critic-steps", type=common.positive_int, help="critic updates per generator update (5)")
    p.add_argument("--out", required=True, help="folder for ckpt.pt, log.jsonl, sample_<step>.mp4")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/ckpt.pt")
    p.add_argument("--max-steps", type=common.positive_int, help="generator updates (120)")
    p.add_argument("--global-batch", type=common.positive_int, help="videos per update, all ranks (64)")
    p.add_argument("--micro-batch", type=common.positive_int, help="videos per rank per forward (1)")
    p.add_argument("--lr", type=common.learning_rate, help="generator learning rate (2e-6)")
    p.add_argument("--critic-lr", type=common.learning_rate, help="critic learning rate (4e-7)")
    p.add_argument("--ema-decay", type=common.decay, help="EMA of the generator (0.99)")
    p.add_argument("--ema-start", type=common.nonnegative_int,
                   help="generator updates before the EMA starts averaging: until then it is a copy of the live "
                        "weights (40, Self Forcing's ema_start_step of 200 iterations)")
    p.add_argument("--grad-clip", type=common.positive_float, help="gradient norm clipping, both networks (10)")
    p.add_argument("--save-every", type=common.positive_int)
    p.add_argument("--log-every", type=common.positive_int)
    p.add_argument("--sample-every", type=common.nonnegative_int,
                   help="write OUT/sample_<step>.mp4 from the EMA generator (0: never)")
    p.add_argument("--seed", type=common.seed, default=0)
    p.add_argument("--wandb", action="store_true")  # opt-in: nothing goes to wandb without it
    args = p.parse_args(argv)
    preset = Config.tiny() if args.tiny else Config()
    for name, value in asdict(preset).items():
        if getattr(args, name) is None:  # flags left unset take the preset
            setattr(args, name, value)
    if args.model is None:
        args.model = convert.make_tiny_wan(convert.tiny_model_dir()) if args.tiny else cw.DEFAULT_MODEL
    args.teacher = args.teacher or args.model
    return args


if __name__ == "__main__":
    common.run_script(main, parse_args)
