"""distill_dmd.py on CPU (`pytest tests/test_distill_dmd.py`, about a minute on 2 idle cores):

- the DMD gradient w.r.t. x0 equals the paper's formula (Gaussian scores with a known answer);
- DMD + critic updates move a Gaussian generator from N(0, 1) onto the teacher's N(2, 0.5^2);
- a 25-step tiny-Wan run shrinks (by about half) the distance between the generator's samples and
  the teacher's 24-step CFG samples (a sign error in the gradient blows it up instead);
- the empty negative prompt is encoded as WanPipeline encodes it;
- the CLI writes a checkpoint for both generator kinds whose `ema` loads with strict=True into
  CausalWan, and `sample.py --checkpoint` renders it;
- --resume after 2 steps equals 4 steps in one go, bit for bit; --ema-start;
- `torchrun --nproc_per_node 2` (gloo, FSDP over 2 ranks) equals one process with accumulation;
- at every optimizer step only that optimizer's network holds gradients; the teacher never changes;
- a NaN loss stops the run without saving; the last checkpoint stays."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import two_nodes

import causal_wan as cw
import common
import convert
import distill_dmd as dmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread per process: the tiny model is far too small for two, and on a busy machine threads
# that wait for each other make a step 10x slower
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(tiny_wan, out, *flags):
    """An in-process run of the script (a world of one)."""
    dmd.main(dmd.parse_args(["--tiny", "--model", tiny_wan, "--out", str(out), "--sample-every", "0", *flags]))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def script(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


# -----------------------------------------------------------------------------
# the losses, on Gaussian scores whose answer is known


class GaussianScore(nn.Module):
    """The exact flow-matching denoiser of data ~ N(mean, std^2) (every element independent), with
    the network's interface: prompt_kv(context), forward(x, t, prompt_kv) -> velocity. The context's
    first value picks the distribution: 0 unconditional, 1 conditional."""

    def __init__(self, means, stds):
        super().__init__()
        self.means = nn.Parameter(torch.tensor(means))
        self.log_stds = nn.Parameter(torch.tensor(stds).log())

    def prompt_kv(self, context):
        return context[:, 0, 0].long()

    def x0(self, x, t, kv):  # E[x0 | x_t] of the Gaussian
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        m, var = self.means[kv].view(-1, 1, 1, 1, 1), self.log_stds[kv].exp().pow(2).view(-1, 1, 1, 1, 1)
        return m + (1 - s) * var / ((1 - s) ** 2 * var + s ** 2) * (x - (1 - s) * m)

    def forward(self, x, t, kv):
        return (x - self.x0(x, t, kv)) / (t / 1000).view(-1, 1, 1, 1, 1)


def test_dmd_gradient_is_the_papers_formula():
    """d loss / d x0 = (fake - real) / mean|x0 - real| / numel, real = uncond + g (cond - uncond), at
    x_t = (1 - s) x0 + s eps with Self Forcing's shifted t, all written out here (not the script's
    sample_timesteps / add_noise). Planted: x_t = s x0 + (1 - s) eps in add_noise, or shift 3
    instead of 5 in sample_timesteps -> the gradient is off (both passed when the expected value
    was built with the script's own helpers)."""
    teacher = GaussianScore([0.0, 2.0], [1.0, 0.5]).requires_grad_(False)
    critic = GaussianScore([0.0, 0.7], [1.0, 1.3])
    x0 = torch.randn(3, 2, 2, 4, 4, requires_grad=True)
    ctx, unc = torch.ones(3, 1, 1), torch.zeros(1, 1, 1)
    loss, _ = dmd.dmd_loss(x0, teacher, critic, ctx, unc, 3.0, torch.Generator().manual_seed(0))
    loss.backward()
    g = torch.Generator().manual_seed(0)  # the same draws: t, then eps
    u = torch.rand(3, generator=g, dtype=torch.float64)
    t = (5 * u / (1 + 4 * u) * 1000).clamp(20, 980).float()  # U[0, 1000) warped with shift 5, kept in [20, 980]
    s = (t / 1000).view(3, 1, 1, 1, 1)
    x_t = (1 - s) * x0.detach() + s * torch.randn(x0.shape, generator=g)
    cond, uncond = teacher.x0(x_t, t, torch.ones(3).long()), teacher.x0(x_t, t, torch.zeros(3).long())
    real = uncond + 3.0 * (cond - uncond)
    fake = critic.x0(x_t, t, torch.ones(3).long())
    expected = (fake - real) / (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True) / x0.numel()
    assert torch.allclose(x0.grad, expected, rtol=1e-4, atol=1e-9)
    assert loss.dtype == torch.float64
    assert critic.means.grad is None and critic.log_stds.grad is None  # the fake score only scores
    assert 20 <= t.min() and t.max() <= 980


def test_dmd_moves_a_gaussian_generator_onto_the_teacher():
    """Generator x0 = b + a z starts at N(0, 1); the teacher's conditional data is N(2, 0.5^2). The
    critic (trained by critic_loss on the generator's samples) and dmd_loss together must bring
    (a, b) to (0.5, 2): the whole DMD loop with the script's optimizer settings and 5 critic updates."""
    teacher = GaussianScore([0.0, 2.0], [1.0, 0.5]).requires_grad_(False)
    critic = GaussianScore([0.0, 0.0], [1.0, 1.0])
    a, b = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(0.0))
    opt = torch.optim.AdamW([a, b], lr=0.02, betas=(0.0, 0.999), weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=0.05, betas=(0.0, 0.999), weight_decay=0.0)
    ctx, unc = torch.ones(16, 1, 1), torch.zeros(1, 1, 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        for _ in range(5):
            loss, _ = dmd.critic_loss(b + a * torch.randn(16, 1, 1, 4, 4, generator=g), critic, ctx, g)
            critic_opt.zero_grad()
            loss.backward()
            critic_opt.step()
        loss, _ = dmd.dmd_loss(b + a * torch.randn(16, 1, 1, 4, 4, generator=g), teacher, critic, ctx, unc, 1.0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(b.item() - 2.0) < 0.05 and abs(a.item() - 0.5) < 0.05
    assert abs(critic.means[1].item() - 2.0) < 0.1  # the critic followed the generator there


def test_empty_negative_prompt_matches_wan_pipeline(tiny_wan):
    from diffusers import WanPipeline
    tok, enc = cw.load_text_encoder(tiny_wan)
    ours = cw.encode_negative_prompt(tok, enc, "")
    pipe = WanPipeline.from_pretrained(tiny_wan)
    _, theirs = pipe.encode_prompt("a fox", negative_prompt="", max_sequence_length=512, device="cpu")
    assert ours.shape == theirs.shape == (1, 512, 32)
    assert (ours - theirs).abs().max() < 1e-6
    assert ours[0, 0].abs().sum() > 0 and ours[0, 1:].abs().max() == 0  # </s>, then zeros


# -----------------------------------------------------------------------------
# the script


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_cli_run_writes_a_checkpoint_sample_py_loads(tiny_wan, tmp_path, kind):
    out = tmp_path / "run"
    r = script("distill_dmd.py", "--tiny", "--model", tiny_wan, "--generator", kind, "--max-steps", "2",
               "--critic-steps", "1", "--sample-every", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "critic", "critic_optimizer", "step", "args"} <= ckpt.keys()
    assert ckpt["step"] == 2 and ckpt["args"]["generator"] == kind
    model = cw.CausalWan(cw.WanConfig.tiny())
    model.load_state_dict(convert.generator_state_dict(convert.load_checkpoint(str(out / "ckpt.pt"))), strict=True)
    assert not torch.equal(ckpt["ema"]["proj_out.weight"], ckpt["model"]["proj_out.weight"])  # EMA lags the model
    assert (out / "sample_2.mp4").stat().st_size > 0
    assert [rec["step"] for rec in read_log(out)] == [1, 2]
    if kind == "causal":  # sample.py renders the causal generator (chunks of 3)
        r = script("sample.py", "--tiny", "--model", tiny_wan, "--checkpoint", str(out / "ckpt.pt"),
                   "--prompt", "a red fox", "--frames", "21", "--out", str(tmp_path / "fox.mp4"))
        assert r.returncode == 0, r.stderr[-2000:]
        assert (tmp_path / "fox.mp4").stat().st_size > 0


def test_cli_errors_are_one_line(tiny_wan, tmp_path):
    r = script("distill_dmd.py", "--tiny", "--model", tiny_wan, "--global-batch", "3", "--micro-batch", "2",
               "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --global-batch 3 is not divisible by world size 1 x --micro-batch 2"]


def moments_distance(x, ref):
    """Distance between two sets of latent videos: per-channel means and standard deviations."""
    dims = (0, 2, 3, 4)
    return ((x.mean(dims) - ref.mean(dims)).norm() + (x.std(dims) - ref.std(dims)).norm()).item()


def test_tiny_run_moves_the_generator_towards_the_teacher(tiny_wan, tmp_path):
    """The teacher is known: the tiny Wan sampled with 24 Euler steps and CFG 4 (what the real score
    describes). The generator starts as the same network run with 4 steps, whose samples are far off;
    25 DMD steps must shrink the distance (a sign error in the DMD gradient blows it up instead)."""
    run(tiny_wan, tmp_path, "--max-steps", "25", "--critic-steps", "1", "--global-batch", "1", "--lr", "2e-3",
        "--critic-lr", "2e-3", "--save-every", "25")
    teacher = cw.from_pretrained(tiny_wan).eval()
    tok, enc = cw.load_text_encoder(tiny_wan)
    ctx = cw.encode_prompts(tok, enc, common.read_prompts(dmd.EXAMPLE_PROMPTS)[:4]).repeat(4, 1, 1)  # 16 videos
    unc = cw.encode_negative_prompt(tok, enc, dmd.WAN_NEGATIVE_PROMPT)
    noise = torch.randn(16, 16, 6, 8, 8, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        kv = teacher.prompt_kv(torch.cat([ctx, unc.expand_as(ctx)]))
        ts = cw.shift_timesteps(torch.linspace(1000, 0, 25).tolist())
        x = noise
        for a, b in zip(ts[:-1], ts[1:]):
            cond, uncond = teacher(torch.cat([x, x]), torch.full((32,), a), kv).chunk(2)
            x = x + (b - a) / 1000 * (uncond + 4.0 * (cond - uncond))
        reference = x
        trained = cw.CausalWan(teacher.cfg)
        saved = convert.load_checkpoint(str(tmp_path / "ckpt.pt"))
        trained.load_state_dict(convert.generator_state_dict(saved, use_ema=False))
        before, after = [moments_distance(cw.rollout(m, noise, m.prompt_kv(ctx), block_size=3,
                                                     generator=torch.Generator().manual_seed(5)), reference)
                         for m in (teacher, trained)]
    assert after < 0.75 * before, (before, after)


def test_resume_continues_exactly(tiny_wan, tmp_path):
    """2 steps, then --resume to 4, equals 4 steps in one go: same losses, same weights."""
    flags = ["--critic-steps", "1", "--global-batch", "2", "--save-every", "2"]
    run(tiny_wan, tmp_path / "a", "--max-steps", "2", *flags)
    run(tiny_wan, tmp_path / "a", "--max-steps", "4", "--resume", *flags)
    run(tiny_wan, tmp_path / "b", "--max-steps", "4", *flags)
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    keys = ["step", "loss", "critic_loss", "grad_norm", "critic_grad_norm", "exit_step"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert len({r["exit_step"] for r in a}) > 1  # the exit step varies from step to step
    ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    for name in ("model", "ema", "critic"):
        assert all(torch.equal(ca[name][k], cb[name][k]) for k in ca[name]), name
    with pytest.raises(common.UserError, match="pass --resume"):  # never overwrites a run by accident
        run(tiny_wan, tmp_path / "b", "--max-steps", "5", *flags)


def test_ema_start(tiny_wan, tmp_path, ema_updates):
    """--ema-start 2: the EMA is the live weights through generator update 2, then the average with
    --ema-decay; 1 step then --resume to 4 (across the start) equals 4 steps in one go.
    Planted: `step > args.ema_start` (averaging one update late) and a counter of this run's updates
    instead of the step (a resumed run restarts the copy phase): each fails."""
    flags = ["--critic-steps", "1", "--global-batch", "1", "--frames", "5", "--save-every", "1", "--ema-start", "2",
             "--ema-decay", "0.5"]  # short videos: the EMA is what is tested
    ema_updates.check_start_and_resume(lambda out, *more: run(tiny_wan, out, *map(str, more), *flags), tmp_path,
                                       start=2, decay=0.5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_rank_with_accumulation(tiny_wan, tmp_path):
    """Two nodes of one process each (torchrun's c10d rendezvous, gloo, FSDP over 2 ranks) and one process
    accumulating 2 micro-batches draw the same videos and take the same steps: the ranks agree on the exit step
    (a disagreement would hang the sharded forwards) and the sharded update is the full one."""
    flags = ["distill_dmd.py", "--tiny", "--model", tiny_wan, "--max-steps", "2", "--critic-steps", "1",
             "--global-batch", "2", "--sample-every", "0"]
    nodes = two_nodes(*flags, "--out", tmp_path / "two")
    assert all(code == 0 for code, _ in nodes), "\n".join(out[-3000:] for _, out in nodes)
    r = script(*flags, "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr[-2000:]
    two, one = read_log(tmp_path / "two"), read_log(tmp_path / "one")
    for a, b in zip(two, one, strict=True):
        assert a["exit_step"] == b["exit_step"]
        for k in ("loss", "critic_loss", "grad_norm", "critic_grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("two", "one"))
    for name in ("model", "ema", "critic"):
        assert max((ca[name][k] - cb[name][k]).abs().max().item() for k in ca[name]) < 1e-5, name


def test_gradients_reach_only_the_network_being_trained(tiny_wan, tmp_path, monkeypatch):
    """At every optimizer step of a real run, exactly that optimizer's network holds gradients
    (critic steps: the critic; generator steps: the generator) and the teacher never changes."""
    nets, emas, seen, teacher_before = [], [], [], {}
    shard_model, ema_update, adamw_step = common.shard_model, common.ema_update, torch.optim.AdamW.step

    def spy_shard(model, bf16, keeps_fp32):  # the script shards teacher, critic, generator, EMA in this order
        if not nets:
            teacher_before.update({k: v.clone() for k, v in model.state_dict().items()})
        nets.append(model)
        return shard_model(model, bf16, keeps_fp32)

    def spy_step(optimizer, *args, **kwargs):
        mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trained = [i for i, n in enumerate(nets) if id(next(n.parameters())) in mine]
        assert len(trained) == 1
        for i, n in enumerate(nets):
            grads = [p.grad for p in n.parameters()]
            if i == trained[0]:
                assert all(g is not None for g in grads) and any(g.to_local().abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads), f"network {i} has gradients at a step of network {trained[0]}"
        seen.append(trained[0])
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(common, "shard_model", spy_shard)
    monkeypatch.setattr(common, "ema_update",
                        lambda ema, model, decay: emas.append(ema) or ema_update(ema, model, decay))
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    run(tiny_wan, tmp_path, "--max-steps", "2", "--critic-steps", "2")
    assert seen == [1, 1, 2, 1, 1, 2]  # critic, critic, generator, per step
    assert len(emas) == 2 and all(e is nets[3] for e in emas)
    teacher = nets[0]
    assert not any(p.requires_grad for p in teacher.parameters())
    after = {k: v.full_tensor() for k, v in teacher.state_dict().items()}
    assert after.keys() == teacher_before.keys() and all(torch.equal(after[k], teacher_before[k]) for k in after)


def test_nan_loss_stops_without_saving(tiny_wan, tmp_path, monkeypatch):
    calls = []
    real_loss = dmd.dmd_loss

    def nan_on_third(*args):
        calls.append(1)
        loss, logs = real_loss(*args)
        return (loss * float("nan") if len(calls) == 3 else loss), logs

    monkeypatch.setattr(dmd, "dmd_loss", nan_on_third)
    with pytest.raises(common.UserError, match=r"training diverged at step 3 \(loss = nan"):
        run(tiny_wan, tmp_path, "--max-steps", "5", "--critic-steps", "1", "--global-batch", "1", "--save-every", "1")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2  # the last good checkpoint stays
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


def test_cache_grad_reaches_the_rollout(tiny_wan, tmp_path, monkeypatch):
    """--cache-grad (default straight-through, Self Forcing's gradient through the KV cache, compared with its own
    pipeline in tests/test_self_forcing.py) is what every rollout of the run gets, and the two choices train
    different generators. Planted: generate() not passing it on (both runs equal) -> fails."""
    seen, rollout = [], cw.rollout
    monkeypatch.setattr(cw, "rollout", lambda *a, **kw: seen.append(kw["cache_grad"]) or rollout(*a, **kw))
    for mode in ([], ["--cache-grad", "detach"]):
        run(tiny_wan, tmp_path / (mode[-1] if mode else "default"), "--max-steps", "1", "--critic-steps", "1", *mode)
    n = len(seen) // 2  # per run: the critic update's rollouts, then the generator update's
    assert n > 0 and seen == ["straight-through"] * n + ["detach"] * n
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("default", "detach"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
