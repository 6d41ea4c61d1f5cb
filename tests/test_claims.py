"""Tests of claims the README makes about the core (issue 17), each against a reference written out
here, not the code's own helpers or constants, at a tolerance the bug it guards against exceeds:
the long-video KV cache keeps its attention sink and the newest frames, the EMA formula, the ODE
student's inputs and regression target, the atomic checkpoint save, and that CI runs the README's
setup commands. Each docstring names the bug that was planted in the code to watch the test fail."""
import io
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import causal_wan as cw
import common
import convert
import train_ode as T


@pytest.fixture(scope="module")
def model(tiny_wan):
    return cw.from_pretrained(tiny_wan).eval()


def noise_and_text(model, frames, hw, seed=0):
    """Latent noise [1, 16, frames, hw, hw] and a prompt's cross-attention keys/values (10 text
    tokens, the last 3 zero padding: never a multiple of the 4 tokens per latent frame at hw=4)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, hw, hw, generator=g)
    ctx = torch.randn(1, 10, model.cfg.text_dim, generator=g)
    ctx[:, 7:] = 0
    with torch.no_grad():
        return x, model.prompt_kv(ctx)


# -----------------------------------------------------------------------------
# the long-video KV cache: attention sink + the most recent frames

# A 15-frame video in blocks of 3 with a window of max_frames=9 and the first block as the sink:
# when block b runs, the cache holds block 0 and the 9 - 3 - 3 = 3 most recent frames, i.e. block
# b - 1 (blocks 1 and 2 still see everything before them: the window is not full yet).
VISIBLE_BLOCKS = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 2, 3], 4: [0, 3, 4]}


@pytest.mark.parametrize("static", [False, True])
def test_long_video_keeps_the_sink_and_the_newest_frames(model, static, monkeypatch):
    """The rollout of a video longer than the window (both cache storages) equals a reference that
    regenerates every block with plain full attention over the whole prefix (earlier blocks clean at
    t=0, all at their absolute RoPE positions) under a mask written here from VISIBLE_BLOCKS; and
    after eviction the cache still starts with exactly block 0's keys and values.

    Planted in KVCache.append: evicting from frame 0 instead of from sink_frames (the sink is
    dropped) -> the cache's first frames are no longer block 0's from block 2 on, and the latents
    differ from the reference by 0.052; keeping the oldest recent frames instead of the newest (the
    sink stays) -> the latents differ by 0.062. Both storages."""
    x, kv = noise_and_text(model, frames=15, hw=4)
    tokens_per_block = 3 * 2 * 2  # 3 frames of 2 x 2 patches
    sink = []  # per block: the first 3 frames' keys/values of every layer, as the cache holds them

    def on_block(b, x0, cache):
        sink.append([(k[:, :, :tokens_per_block].clone(), v[:, :, :tokens_per_block].clone()) for k, v in cache.kv])

    with torch.no_grad():
        video = cw.rollout(model, x, kv, block_size=3, max_frames=9, static_cache=static,
                           generator=torch.Generator().manual_seed(1), on_block=on_block)
        unbounded = cw.rollout(model, x, kv, block_size=3, max_frames=64, static_cache=static,
                               generator=torch.Generator().manual_seed(1))
    for b in range(1, 5):  # block 0's own keys/values, written by its clean pass, never moved or evicted
        assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(sink[b], sink[0])), b

    visible = torch.zeros(5, 5, dtype=torch.bool)  # [query block, key block]
    for b, blocks in VISIBLE_BLOCKS.items():
        visible[b, blocks] = True
    mask = visible.repeat_interleave(tokens_per_block, 0).repeat_interleave(tokens_per_block, 1)  # [60, 60] tokens
    full_attention = cw.attention

    def windowed_attention(q, k, v):  # self-attention of the prefix under the window mask; text as it is
        if k.shape[2] != q.shape[2]:
            return full_attention(q, k, v)
        n = q.shape[2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:n, :n])
    monkeypatch.setattr(cw, "attention", windowed_attention)

    g = torch.Generator().manual_seed(1)  # the rollout's re-noising draws, in order
    steps = cw.DENOISING_TIMESTEPS
    done = []
    with torch.no_grad():
        for b in range(5):
            xb = x[:, :, 3 * b:3 * b + 3]
            for i, tt in enumerate(steps):
                t = torch.tensor([[0.0] * 3 * b + [tt] * 3])  # clean prefix at t=0, the block at its step
                velocity = model(torch.cat(done + [xb], 2), t, kv)[:, :, 3 * b:]  # no block_size, no cache
                x0 = xb - tt / 1000 * velocity
                if i + 1 < len(steps):
                    s = steps[i + 1] / 1000
                    xb = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
            done.append(x0)
    error = (video - torch.cat(done, 2)).abs().max().item()
    assert error < 1e-5, error
    assert (video - unbounded)[:, :, 9:].abs().max() > 1e-2  # the window really changed blocks 3 and 4


# -----------------------------------------------------------------------------
# EMA


def test_ema_update_is_the_formula():
    """ema <- 0.9 ema + 0.1 model, parameter by parameter; the model is left alone.

    Planted in ema_update: lerp_(p, decay) instead of lerp_(p, 1 - decay) (0.1 ema + 0.9 model) ->
    off by 0.8 |model - ema|, up to 1.18 here."""
    torch.manual_seed(0)
    ema, model = nn.Linear(8, 4), nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.add_(1.0)  # far from the EMA: the two possible weightings differ clearly
    ema_before = {n: p.detach().clone() for n, p in ema.named_parameters()}
    model_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    common.ema_update(ema, model, 0.9)
    for n, p in ema.named_parameters():
        error = (p - (0.9 * ema_before[n] + 0.1 * model_before[n])).abs().max().item()
        assert error < 1e-6, (n, error)
    assert all(torch.equal(p, model_before[n]) for n, p in model.named_parameters())
    assert (model_before["weight"] - ema_before["weight"]).abs().min() > 0.1


# -----------------------------------------------------------------------------
# checkpoints


def test_a_save_that_fails_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save dies after writing half the file (disk full, a killed process): the good checkpoint
    already at the path still loads, with its own contents, and no partial file replaced it.

    Planted in save_checkpoint: torch.save(ckpt, path) straight to the path -> ckpt.pt is half a
    file: 'checkpoint ... is not a readable torch checkpoint'."""
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"model": {"w": torch.ones(4096)}, "step": 1})
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[:len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(half)
        else:
            f.write(half)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises((OSError, common.UserError), match="No space left on device"):
        common.save_checkpoint(path, {"model": {"w": torch.full((4096,), 2.0)}, "step": 2})
    monkeypatch.undo()
    ckpt = convert.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(4096))


# -----------------------------------------------------------------------------
# the ODE student (train_ode.py)

TIMESTEPS = [1000.0, 937.5, 2500 / 3, 625.0, 0.0]  # the 4 steps [1000, 750, 500, 250] warped with shift 5, and x0


def test_student_x0_reads_each_frame_at_its_state_and_timestep(model):
    """student_x0 = x_t - t/1000 * v(x_t, t) under the block-causal mask, where frame f of video b
    is taken from state index[b, f] with that state's timestep: the picking written out here.

    Planted in student_x0: timesteps[index + 1] (each frame's t one state later) -> off by 1.33;
    gathering the state index + 1 instead -> off by 6.7."""
    g = torch.Generator().manual_seed(0)
    trajectory = torch.randn(2, 5, 16, 6, 4, 4, generator=g)  # [B, K+1, C, F, H, W]
    index = torch.tensor([[0, 0, 0, 3, 3, 3], [2, 2, 2, 1, 1, 1]])  # [B, F]: one state per block of 3
    kv = model.prompt_kv(torch.randn(2, 10, model.cfg.text_dim, generator=g))
    with torch.no_grad():
        got = T.student_x0(model, trajectory, index, torch.tensor(TIMESTEPS), kv, block_size=3)
        x_t = torch.stack([torch.stack([trajectory[b, index[b, f], :, f] for f in range(6)], 1) for b in range(2)])
        t = torch.tensor([[TIMESTEPS[i] for i in row] for row in index.tolist()])  # [B, F]
        expected = x_t - (t / 1000).view(2, 1, 6, 1, 1) * model(x_t, t, kv, block_size=3)
    error = (got - expected).abs().max().item()
    assert got.shape == (2, 16, 6, 4, 4) and error < 1e-5, error


def write_store(folder, latents, prompts):
    """A trajectory store in train_ode.py's on-disk format (its module docstring): index.json and one
    shard holding latents [n, 5, C, F, H, W] bf16, noisiest first, x0 last."""
    os.makedirs(folder)
    n = latents.shape[0]
    index = dict(source="dmd_checkpoint", teacher="hand-made", num=n, shard_size=n, num_shards=1,
                 latent_shape=list(latents.shape[2:]), dtype="bfloat16", timesteps=TIMESTEPS, seed=0, prompts=prompts)
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(index, f)
    meta = dict(prompts=json.dumps(prompts), seeds=json.dumps(list(range(n))))
    save_file({"latents": latents.to(torch.bfloat16).contiguous()}, os.path.join(folder, "shard_00000.safetensors"),
              metadata=meta)
    return folder


def test_ode_regression_pulls_the_student_towards_x0(tiny_wan, tmp_path):
    """train_ode.py train regresses the student onto the trajectories' x0. In this store the four
    noisy states are noise around -1 and x0 is noise around +1: after a few steps the student's x0
    (every frame at every state, as it is trained) must have come closer to the stored x0 and moved
    away from the t=625 state.

    Measured: distance to x0 4.52 -> 0.86, to the t=625 state 0.58 -> 5.69. Planted in the training
    loop: ode_loss(x0, trajectory[:, -2]) (the t=625 state as the target) -> 4.52 -> 4.53 and
    0.58 -> 0.38."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 5, 16, 6, 8, 8, generator=g) * 0.5  # [n, 5, C, F, H, W] at --tiny's size
    latents[:, :4] -= 1.0
    latents[:, 4] += 1.0
    prompts = ["a red fox running in snow", "a boat on a lake"]
    store = write_store(str(tmp_path / "store"), latents, prompts)
    out = tmp_path / "run"
    T.main(T.parse_args(["train", "--tiny", "--model", tiny_wan, "--store", store, "--out", str(out),
                         "--max-steps", "6", "--global-batch", "2", "--micro-batch", "2", "--sample-every", "0"]))

    tok, enc = cw.load_text_encoder(tiny_wan)
    student = cw.from_pretrained(tiny_wan)
    x = latents.to(torch.bfloat16).float()  # what the store holds

    def distances():
        """Mean squared distance of the student's x0 to the stored x0 and to the t=625 state."""
        kv = student.prompt_kv(cw.encode_prompts(tok, enc, prompts))
        with torch.no_grad():
            preds = [T.student_x0(student, x, torch.full((2, 6), i), torch.tensor(TIMESTEPS), kv, 3) for i in range(4)]
        return [sum(F.mse_loss(p, x[:, k]).item() for p in preds) / 4 for k in (4, 3)]
    before = distances()
    student.load_state_dict(torch.load(out / "ckpt.pt", weights_only=True)["model"], strict=True)
    after = distances()
    print(f"student x0: distance to x0 {before[0]:.3f} -> {after[0]:.3f}, "
          f"to the t=625 state {before[1]:.3f} -> {after[1]:.3f}")
    assert after[0] < 0.7 * before[0], (before, after)  # towards x0
    assert after[1] > before[1], (before, after)  # away from the t=625 state


def test_ci_runs_the_readme_setup_commands():
    """.ci/run runs exactly the README's setup and test commands (comments aside), so what a newcomer
    copies is what CI checks. Planted: `pip install -r requirements.txt torchao` in the README's
    Setup block -> the lists differ."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def commands(lines):
        return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]
    readme = open(os.path.join(root, "README.md")).read()
    setup = readme.split("\n## Setup\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    ci = open(os.path.join(root, ".ci", "run")).read().splitlines()
    ci = ci[ci.index('cd "$(dirname "$0")/.."') + 1:]  # what runs after the preamble
    assert commands(setup.splitlines()) == commands(ci)
    assert len(commands(ci)) == 4
