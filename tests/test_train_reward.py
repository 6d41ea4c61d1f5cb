"""train_reward.py on a tiny random Wan and a tiny random ImageReward (CPU; `pytest tests/test_train_reward.py`,
a few minutes on 2 cores; tests/test_rewards.py covers the reward models themselves):

- test_reward_rises_and_only_the_generator_learns: `train_reward.py --tiny` (20 steps) raises the
  reward of the last frame of 4 fixed evaluation videos, every one of them (the measured margins are
  in the test); the reward model and the VAE end with no gradients and unchanged weights; every
  micro-batch scored pixel frame 20 of 21; samples and checkpoint are written and the EMA loads with
  strict=True into CausalWan (what sample.py does);
- test_reward_decode_gradient_equals_the_full_decode: the decoded frame and the gradient on its
  block equal those of one decode of the whole video, checkpointed or not; `random` draws cover
  all 21 frames;
- test_reward_decode_memory_is_checkpointed_and_freed: with Wan2.1's VAE architecture, counted on
  fake tensors, the checkpointed decode + backward peaks under a quarter of the plain one's and
  leaves nothing alive;
- test_grad_blocks_keeps_the_gradient: running the unreached blocks without a graph leaves the
  generator's gradient unchanged, for --cache-grad straight-through (every block is reached) and detach
  (the last one only), whose gradients differ;
- test_random_frames_and_pickscore_in_the_loop: --reward-frames random --reward pickscore scores one
  frame per video from the whole video;
- test_joint_gradient_puts_both_terms_on_the_same_scale: two losses 7e6 apart in gradient size push
  with equal norms; the factor follows the running means;
- test_dmd_weight_and_exact_resume: with --dmd-weight 1 --teacher the critic trains, both terms enter
  at the same scale (the logged factor follows the running means of the logged norms), and a run
  resumed at step 2 equals a straight 4-step run bit for bit (generator, EMA, critic, both
  optimizers, normalizers, log);
- --ema-start, --dmd-weight's default teacher, the NaN stop, one-line errors, --init from our
  checkpoint or Self Forcing's;
- test_torchrun_two_processes: `torchrun --nproc_per_node 2` (FSDP over gloo) gives the model of one
  process with 2 accumulation steps, and the same logged reward, loss and grad norm."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import two_nodes

import causal_wan as cw
import common
import convert
import train_reward as tr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red car on the sea", "a dog running in the sky", "a man with a green tree", "a cat on a blue car"]


def run(*argv):
    tr.main(tr.parse_args([str(a) for a in argv]))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory):
    return tr.make_tiny_image_reward(str(tmp_path_factory.mktemp("imagereward")))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sensitive_wan(tiny_wan, tmp_path_factory):
    """The tiny Wan with its VAE decoder's convs re-initialized variance-preserving (std 1.5/sqrt(fan_in)).
    With the default init the random tiny decoder barely looks at the latent frame it decodes: noise of
    0.1 on the last latent frame moves the last pixel frame by 0.002 (the same noise on the first latent
    frame, through the causal cache: 0.05), so almost no reward gradient reaches the generator; after the
    re-init 0.045 (and 0.07)."""
    from diffusers import AutoencoderKLWan
    folder = str(tmp_path_factory.mktemp("models") / "sensitive_wan")
    shutil.copytree(tiny_wan, folder)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae"))
    torch.manual_seed(0)
    for m in vae.decoder.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.normal_(m.weight, std=1.5 / math.sqrt(m.weight[0].numel()))
    vae.save_pretrained(os.path.join(folder, "vae"))
    return folder


@torch.no_grad()
def eval_rewards(model_dir, state_dict, reward):
    """Reward of the last frame of 4 fixed videos (fixed noise, all 4 steps, as sample.py makes them) -> [4]."""
    model = cw.from_pretrained(model_dir)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    tok, enc = cw.load_text_encoder(model_dir)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(4, 16, 6, 8, 8, generator=g)
    video = cw.rollout(model, noise, model.prompt_kv(cw.encode_prompts(tok, enc, PROMPTS)), block_size=3, generator=g)
    return tr.load_reward("imagereward", *reward)(cw.vae_decode(cw.load_vae(model_dir), video)[:, :, -1], PROMPTS)


def test_reward_rises_and_only_the_generator_learns(sensitive_wan, tiny_reward, prompts_file, tmp_path, monkeypatch):
    frozen, scored = {}, []
    real_load_reward, real_load_vae, real_decode = tr.load_reward, cw.load_vae, tr.decode_reward_frames

    def load_reward(*a, **kw):  # the real loaders, keeping the frozen models to inspect after training
        fn = real_load_reward(*a, **kw)
        frozen["reward"] = fn.model
        return fn

    def load_vae(*a, **kw):
        frozen["vae"] = real_load_vae(*a, **kw)
        return frozen["vae"]

    def decode_reward_frames(vae, video, pixel_frames, block_size, checkpointed):
        scored.append((video.shape[2], list(pixel_frames), block_size, checkpointed))
        return real_decode(vae, video, pixel_frames, block_size, checkpointed)
    monkeypatch.setattr(tr, "load_reward", load_reward)
    monkeypatch.setattr(cw, "load_vae", load_vae)
    monkeypatch.setattr(tr, "decode_reward_frames", decode_reward_frames)
    out = tmp_path / "run"
    # the --tiny preset: 20 steps, global batch 2, lr 1e-2, samples at 10 and 20
    run("--tiny", "--model", sensitive_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
        "--prompts", prompts_file, "--out", out)
    monkeypatch.undo()

    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 21)) and all(r["grad_norm"] > 0 for r in log)
    assert all(r["loss"] == pytest.approx(-r["reward"]) for r in log)  # L_reward = -E[R(x_T)]
    assert [r["step"] for r in log if r.get("sample_reward") is not None] == [10, 20]
    assert all(os.path.getsize(out / f"sample_{s}.mp4") > 0 for s in (10, 20))
    # every micro-batch scored the last of its 21 frames (CPU: no checkpoints)
    assert scored == [(6, [20], 3, False)] * 40

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 20 and {"model", "ema", "optimizer", "args"} <= ckpt.keys() and "critic" not in ckpt
    student = cw.CausalWan(cw.WanConfig.tiny())
    student.load_state_dict(ckpt["ema"], strict=True)  # what sample.py loads

    before = eval_rewards(sensitive_wan, None, tiny_reward)
    after = eval_rewards(sensitive_wan, ckpt["model"], tiny_reward)
    print(f"eval rewards before {before.tolist()} after {after.tolist()}")
    # measured over seeds 0, 1 with the gradient of the scored latent frame only: +0.018 to +0.042 per
    # video, +0.023 to +0.037 on average; with the exact gradient to the whole block (seed 0): +0.047 to
    # +0.059, +0.053 on average. The same run with the default tiny VAE (no signal reaches the generator)
    # drifted by -0.003 to -0.012, and with the loss's sign flipped the mean fell by 0.13
    assert (after > before).all() and (after - before).mean() > 0.01, (before, after)

    # only the generator learned: the reward model and the VAE got no gradients and kept their weights
    for name in ("reward", "vae"):
        assert all(not p.requires_grad and p.grad is None for p in frozen[name].parameters()), name
    reward_sd = torch.load(os.path.join(tiny_reward[0], "ImageReward.pt"), weights_only=True)
    assert all(torch.equal(v, reward_sd[k]) for k, v in frozen["reward"].state_dict().items() if k in reward_sd)
    vae_sd = cw.load_vae(sensitive_wan).state_dict()
    assert all(torch.equal(v, vae_sd[k]) for k, v in frozen["vae"].state_dict().items())


def test_reward_decode_gradient_equals_the_full_decode(sensitive_wan):
    """decode_reward_frames (checkpointed, as training on GPU runs it, and plain) gives the scored
    pixels and, on every latent frame of the generator block that made them, the gradient of autograd
    through one plain decode of the whole video (1e-5 relative): the last frame, a frame inside the
    last latent frame, the first frames, middle frames as --reward-frames random draws them, and
    frame-wise blocks of 1. Planted: decoding only the scored latent frame with gradient (the old
    truncation), a cache list shared instead of copied in CheckpointedCacheModule or decode_frame:
    each fails."""
    plain = cw.load_vae(sensitive_wan)
    vae = cw.load_vae(sensitive_wan)
    # 21 pixel frames
    video = torch.randn(2, 16, 6, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # a linear stand-in for the reward
    full = [cw.vae_decode(plain, video[b:b + 1]) for b in range(2)]  # one plain decode per video, [1, 3, 21, 32, 32]
    middle = tr.reward_frame_indices("random", 6, 2, torch.Generator().manual_seed(5))
    assert middle == [8, 12]  # latent frames 2 (the end of the first block) and 3 (the start of the second)
    cases = [([20, 20], 3, False), ([20, 20], 3, True), ([18, 17], 3, True), ([0, 4], 3, True), (middle, 3, True),
             ([20, 13], 1, True)]
    for frames, block_size, checkpointed in cases:
        video.grad = None
        pixels = tr.decode_reward_frames(vae, video, frames, block_size, checkpointed)  # [2, 3, 32, 32]
        (pixels * weights).sum().backward()
        for b, p in enumerate(frames):
            # [C, 6, h, w]
            reference = torch.autograd.grad((full[b][0, :, p] * weights[b]).sum(), video, retain_graph=True)[0][b]
            assert (pixels[b] - full[b][0, :, p]).abs().max() < 1e-5
            j = 0 if p == 0 else (p - 1) // 4 + 1  # the latent frame that decodes to pixel frame p
            s = j - j % block_size  # first latent frame of its generator block
            got = video.grad[b]
            rel = (got[:, s:j + 1] - reference[:, s:j + 1]).norm() / reference[:, s:j + 1].norm()
            assert rel < 1e-5, (frames, block_size, checkpointed, b, rel)
            assert all(reference[:, f].abs().sum() > 0 for f in range(s, j + 1))  # every frame of s..j matters
            # earlier blocks: no graph in training
            assert got[:, :s].abs().sum() == 0 and got[:, j + 1:].abs().sum() == 0
    assert isinstance(vae.decoder.mid_block, tr.CheckpointedCacheModule)  # checkpointed=True wrapped the decoder
    # the whole prefix is needed for the pixels: starting the decode one latent frame later changes the last frame
    with torch.no_grad():
        assert (cw.vae_decode(plain, video[:, :, 1:])[:, :, -1]
                - cw.vae_decode(plain, video)[:, :, -1]).abs().max() > 1e-2

    g = torch.Generator().manual_seed(0)
    assert tr.reward_frame_indices("last", 6, 3, g) == [20, 20, 20]
    picks = [p for _ in range(300) for p in tr.reward_frame_indices("random", 6, 4, g)]  # 1200 draws over 21 frames
    counts = torch.bincount(torch.tensor(picks), minlength=21)
    assert len(counts) == 21 and counts.min() > 20  # every frame of the video, ~57 each


@pytest.mark.parametrize("cache_grad", ["straight-through", "detach"])
def test_grad_blocks_keeps_the_gradient(tiny_wan, cache_grad):
    """A rollout that gives a graph only to the blocks the reward of the last frame reaches (tr.graph_blocks: with
    --cache-grad straight-through, every block; with detach, the last one), as training runs it, gives the
    generator the same gradient as one with a graph for every block. The two kinds of gradient differ (planted:
    graph_blocks returning the last block for straight-through -> the first block's share is lost, fails)."""
    model = cw.from_pretrained(tiny_wan)
    vae = cw.load_vae(tiny_wan)
    noise = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    kv = model.prompt_kv(torch.randn(1, 512, 32, generator=torch.Generator().manual_seed(1)))
    grads, other = {}, "detach" if cache_grad == "straight-through" else "straight-through"
    for mode, grad_blocks in [(cache_grad, None), (cache_grad, tr.graph_blocks({1}, cache_grad)), (other, None)]:
        blocks = []
        model.zero_grad(set_to_none=True)
        video = cw.rollout(model, noise, [(k.detach(), v.detach()) for k, v in kv], block_size=3, exit_steps=[2, 2],
                           generator=torch.Generator().manual_seed(2), grad_blocks=grad_blocks,
                           on_block=lambda b, x0, kv_cache: blocks.append(x0), cache_grad=mode)
        first_has_graph = grad_blocks is None or 0 in grad_blocks
        assert [x0.grad_fn is not None for x0 in blocks] == [first_has_graph, True]
        tr.decode_reward_frames(vae, video, [20], 3).square().mean().backward()
        grads[(mode, grad_blocks is None)] = {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}
    full, trained, other = grads[(cache_grad, True)], grads[(cache_grad, False)], grads[(other, True)]
    assert full.keys() == trained.keys() and len(full) > 0
    assert all(torch.allclose(full[n], trained[n], rtol=1e-5, atol=1e-10) for n in full)
    assert not all(torch.allclose(full[n], other[n], rtol=1e-3, atol=1e-8) for n in full)
    assert list(tr.graph_blocks({1}, cache_grad)) == ([0, 1] if cache_grad == "straight-through" else [1])


def test_random_frames_and_pickscore_in_the_loop(tiny_wan, prompts_file, tmp_path_factory, tmp_path, monkeypatch):
    """--reward-frames random scores frames from the whole video (one per video); --reward pickscore."""
    pickscore = tr.make_tiny_pickscore(str(tmp_path_factory.mktemp("pickscore")))
    scored = []
    original = tr.decode_reward_frames

    def decode_reward_frames(vae, video, pixel_frames, *args, **kwargs):
        scored.extend(pixel_frames)
        return original(vae, video, pixel_frames, *args, **kwargs)
    monkeypatch.setattr(tr, "decode_reward_frames", decode_reward_frames)
    run("--tiny", "--model", tiny_wan, "--reward", "pickscore", "--reward-path", pickscore[0],
        "--reward-tokenizer", pickscore[1], "--prompts", prompts_file, "--reward-frames", "random", "--max-steps", 5,
        "--global-batch", 4, "--micro-batch", 2, "--sample-every", 0, "--out", tmp_path / "run")
    log = read_log(tmp_path / "run")
    assert len(log) == 5 and all(math.isfinite(r["reward"]) and r["grad_norm"] > 0 for r in log)
    assert len(scored) == 20 and all(0 <= p <= 20 for p in scored)  # one frame per video, 4 videos x 5 steps
    assert len(set(scored)) >= 8 and sum(p < 10 for p in scored) >= 3  # spread over the video, early frames too


def test_joint_gradient_puts_both_terms_on_the_same_scale():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 16, 6, 8, 8, generator=g, requires_grad=True)
    a, b = torch.randn(video.shape, generator=g), torch.randn(video.shape, generator=g)
    loss_reward = -1e3 * (video * a).mean()  # gradient norms 9 and 1.3e-6: 7e6 apart
    loss_dmd = 0.5e-4 * (video - b).square().mean()
    grad, norms, factor = tr.joint_gradient(video, loss_reward, loss_dmd, {"reward": None, "dmd": None}, dmd_weight=1.0)
    grad_reward, grad_dmd = -1e3 * a / a.numel(), 1e-4 * (video - b).detach() / a.numel()
    assert norms["reward"] / norms["dmd"] > 1e6
    assert torch.allclose(grad, grad_reward + grad_dmd * norms["reward"] / norms["dmd"], rtol=1e-4, atol=1e-6)
    dmd_part = grad - grad_reward
    assert dmd_part.norm() == pytest.approx(grad_reward.norm().item(), rel=1e-4)  # equal pushes for W = 1
    # with running means: W * s_reward / s_dmd times the DMD gradient, the reward's own gradient unchanged
    loss_reward = -1e3 * (video * a).mean()
    loss_dmd = 0.5e-4 * (video - b).square().mean()
    grad, _, factor = tr.joint_gradient(video, loss_reward, loss_dmd, {"reward": 2.0, "dmd": 0.5}, dmd_weight=0.3)
    assert factor.item() == pytest.approx(4.0)
    assert torch.allclose(grad, grad_reward + 0.3 * 4.0 * grad_dmd, rtol=1e-4, atol=1e-6)


def test_dmd_weight_and_exact_resume(tiny_wan, tiny_reward, prompts_file, tmp_path):
    """--dmd-weight 1 --teacher: the critic trains beside the generator, the DMD term enters at the
    reward's scale; a run resumed at step 2 equals one run straight to 4 (weights, optimizers, critic,
    normalizers, logged numbers)."""
    flags = ["--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
              "--prompts", prompts_file, "--dmd-weight", 1, "--teacher", tiny_wan, "--sample-every", 0,
              "--save-every", 2]
    run(*flags, "--out", tmp_path / "a", "--max-steps", 4)
    run(*flags, "--out", tmp_path / "b", "--max-steps", 2)
    with pytest.raises(common.UserError, match="pass --resume"):
        run(*flags, "--out", tmp_path / "b", "--max-steps", 4)
    with pytest.raises(common.UserError, match="trained with --dmd-weight: resume it with the same flags"):
        run(*flags[:-8], "--sample-every", 0, "--out", tmp_path / "b", "--max-steps", 4, "--resume")
    run(*flags, "--out", tmp_path / "b", "--max-steps", 4, "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 4 and a["loss_scales"] == b["loss_scales"]
    for key in ("model", "ema", "critic"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("optimizer", "critic_optimizer"):
        state_a, state_b = a[key]["state"], b[key]["state"]
        assert all(torch.equal(state_a[p][s], state_b[p][s]) for p in state_a for s in state_a[p]), key
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    drop = ("step_time",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in log_a]
            == [{k: v for k, v in r.items() if k not in drop} for r in log_b])

    base = cw.from_pretrained(tiny_wan).state_dict()
    assert not all(torch.equal(a["critic"][k], base[k]) for k in base)  # the critic trained
    # the DMD gradient enters at the reward's scale: at step 1 each video's two terms have equal norms (the
    # log averages over the 2 videos); then the factor is s_reward / s_dmd, running means of the logged norms
    # with decay 0.9 (written here, not read from the script: a planted LOSS_SCALE_DECAY = 0 fails at step 3)
    decay = 0.9
    assert all(r["dmd_loss"] > 0 and math.isfinite(r["critic_loss"]) for r in log_a)
    first = log_a[0]
    assert first["dmd_factor"] * first["dmd_grad_norm"] / first["reward_grad_norm"] == pytest.approx(1, rel=0.1)
    s_reward, s_dmd = first["reward_grad_norm"], first["dmd_grad_norm"]
    for r in log_a[1:]:
        assert r["dmd_factor"] == pytest.approx(s_reward / s_dmd, rel=1e-5)
        s_reward = decay * s_reward + (1 - decay) * r["reward_grad_norm"]
        s_dmd = decay * s_dmd + (1 - decay) * r["dmd_grad_norm"]
    assert a["loss_scales"] == pytest.approx({"reward": s_reward, "dmd": s_dmd}, rel=1e-5)


def test_ema_start(tiny_wan, tiny_reward, prompts_file, tmp_path, ema_updates):
    """--ema-start 2: the EMA is the live weights through update 2, then the average with --ema-decay;
    1 step then --resume to 4 (across the start) equals 4 steps in one go (planted: averaging one
    update late, and counting this run's updates instead of the step: each fails)."""
    base = ["--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
              "--prompts", prompts_file, "--sample-every", 0, "--save-every", 1, "--ema-start", 2, "--ema-decay", 0.5,
              "--frames", 5, "--global-batch", 1]  # short videos: the EMA is what is tested
    ema_updates.check_start_and_resume(lambda out, *flags: run(*base, "--out", out, *flags), tmp_path,
                                       start=2, decay=0.5)


def test_dmd_weight_defaults_the_teacher_to_the_model(tiny_wan, tiny_reward, prompts_file, tmp_path, monkeypatch):
    """`--tiny --dmd-weight 1` without --teacher runs, with --model (the base Wan) as the real score, as
    distill_dmd.py does (planted: the old 'needs --teacher' error, and the teacher from another
    folder: each fails)."""
    loaded = []
    from_pretrained = cw.from_pretrained
    monkeypatch.setattr(cw, "from_pretrained",
                        lambda model, *a, **kw: loaded.append(model) or from_pretrained(model, *a, **kw))
    run("--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
        "--prompts", prompts_file, "--dmd-weight", 1, "--max-steps", 1, "--global-batch", 1, "--frames", 5,
        "--sample-every", 0, "--out", tmp_path / "run")
    assert loaded == [tiny_wan] * 3  # generator, teacher, critic
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["teacher"] == tiny_wan and "critic" in ckpt
    assert read_log(tmp_path / "run")[0]["dmd_loss"] > 0


def test_nan_stops_without_saving(tiny_wan, tiny_reward, prompts_file, tmp_path, monkeypatch):
    calls = []
    original = tr.load_reward

    def load_reward(*a, **kw):
        fn = original(*a, **kw)

        def poisoned(frames, prompts):  # NaN from the 5th micro-batch on: step 3 of global batch 2
            calls.append(1)
            r = fn(frames, prompts)
            return r * float("nan") if len(calls) >= 5 else r
        return poisoned
    monkeypatch.setattr(tr, "load_reward", load_reward)
    out = tmp_path / "run"
    with pytest.raises(common.UserError,
                       match=r"training diverged at step 3 \(loss = nan, reward = nan.*stopped without saving"):
        run("--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
            "--prompts", prompts_file, "--out", out, "--max-steps", 4, "--save-every", 1, "--sample-every", 0)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2  # the last good checkpoint stays


def test_errors_are_one_line(tiny_wan, tiny_reward, prompts_file, tmp_path):
    res = subprocess.run([sys.executable, "train_reward.py", "--model", tiny_wan, "--out", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: --init is required: the ODE-initialized generator")
    flags = ["--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
              "--prompts", prompts_file, "--out", tmp_path / "y"]
    with pytest.raises(common.UserError, match="--global-batch 3 is not divisible by world size 1 x --micro-batch 2"):
        run(*flags, "--global-batch", 3, "--micro-batch", 2)
    with pytest.raises(common.UserError, match="checkpoint '.*nope.pt' does not exist"):
        run(*flags, "--init", tmp_path / "nope.pt")
    with pytest.raises(common.UserError, match="ImageReward weights not found at"):
        run(*flags[:3], "--reward-path", tmp_path, "--reward-tokenizer", tiny_reward[1], *flags[7:])


def test_init_from_ours_or_self_forcing(tiny_wan, tmp_path):
    """--init takes train_ode.py's checkpoint (its EMA) and Self Forcing's original-layout dict."""
    torch.manual_seed(3)
    ema = cw.CausalWan(cw.WanConfig.tiny()).state_dict()
    common.save_checkpoint(str(tmp_path / "ours.pt"), {"model": cw.CausalWan(cw.WanConfig.tiny()).state_dict(),
                                                    "ema": ema, "step": 7, "args": {}})
    original = {"model." + k: v for k, v in convert.diffusers_to_original(ema).items()}
    torch.save({"generator": original}, tmp_path / "ode_init.pt")  # Self Forcing's ode_init.pt layout
    args = tr.parse_args(["--tiny", "--model", tiny_wan, "--reward-path", str(tmp_path), "--out", str(tmp_path)])
    for path in ("ours.pt", "ode_init.pt"):
        sd = tr.load_generator(args, str(tmp_path / path)).state_dict()
        assert all(torch.equal(sd[k], ema[k]) for k in ema), path
    base = cw.from_pretrained(tiny_wan).state_dict()
    # --tiny, no --init
    assert all(torch.equal(v, base[k]) for k, v in tr.load_generator(args, None).state_dict().items())


def test_two_nodes(tiny_wan, tiny_reward, prompts_file, tmp_path):
    """Two nodes of one process each (torchrun's c10d rendezvous; FSDP over gloo, global batch 2 = 2 ranks x 1)
    give the model of one process accumulating 2 micro-batches, and both log the same numbers."""
    flags = ["--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
             "--prompts", prompts_file, "--max-steps", 2, "--global-batch", 2, "--sample-every", 0]
    nodes = two_nodes("train_reward.py", *flags, "--out", tmp_path / "two")
    assert all(code == 0 for code, _ in nodes), "\n".join(out[-3000:] for _, out in nodes)
    run(*flags, "--out", tmp_path / "one")
    two, one = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("two", "one"))
    # equal up to float summation order (Adam's first steps move each weight by ~lr = 1e-2 and amplify it)
    assert all(torch.allclose(two["model"][k], one["model"][k], atol=1e-4) for k in one["model"])
    init = cw.from_pretrained(tiny_wan).state_dict()
    assert not all(torch.equal(two["model"][k], init[k]) for k in init)  # it trained
    logs = [read_log(tmp_path / d) for d in ("two", "one")]
    for key in ("reward", "loss", "grad_norm"):
        assert [r[key] for r in logs[0]] == pytest.approx([r[key] for r in logs[1]], rel=1e-4), key


def test_reward_decode_memory_is_checkpointed_and_freed():
    """The reward decode + backward with Wan2.1's VAE architecture (32x32 pixels, the last frame of 6
    latent frames), its live tensor bytes counted on fake tensors (bench.py --reward-decode
    --count; it matched measured peaks within 5% from 64x104 to 240x416): checkpointed, the peak is
    under a quarter of the plain decode's (0.236 counted), and nothing stays alive after the backward
    (the VAE's cache included). Planted: the recompute leaving its cache in the VAE (alive 0.029 GiB,
    ratio 0.298), CheckpointedCacheModule copying the whole cache list for the recompute (0.267), the
    causal convs' cache gradients kept as views of their concatenation (0.311): each fails."""
    from bench import reward_decode_peak as count
    peak, alive = count(32, 32, checkpointed=True)
    plain, _ = count(32, 32, checkpointed=False)
    assert alive < 1e-3, f"{alive:.3f} GiB alive after the backward"
    assert peak < 0.25 * plain, (f"checkpointed peak {peak:.3f} GiB is {peak / plain:.3f} "
                                 f"of the plain decode's {plain:.3f}")


def test_cache_grad_reaches_the_rollout(tiny_wan, tiny_reward, prompts_file, tmp_path, monkeypatch):
    """--cache-grad (default straight-through: the last frame's reward reaches every block through the KV cache,
    as Self Forcing's training code computes it) is what the rollout gets, with the graph on every block; with
    detach only the last block has one; the two train different generators. Planted: rollout() not passing it
    on -> fails."""
    seen, rollout = [], cw.rollout
    monkeypatch.setattr(cw, "rollout", lambda *a, **kw: seen.append((kw["cache_grad"], list(kw["grad_blocks"])))
                        or rollout(*a, **kw))
    base = ["--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
            "--prompts", prompts_file, "--sample-every", 0, "--max-steps", 1, "--global-batch", 1]
    for mode in ([], ["--cache-grad", "detach"]):
        run(*base, "--out", tmp_path / (mode[-1] if mode else "default"), *mode)
    assert seen == [("straight-through", [0, 1]), ("detach", [1])]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("default", "detach"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
