"""train_ode.py on a tiny random Wan (CPU; `pytest tests/test_train_ode.py`, about a minute on 2 cores):

- generate -> verify -> train end to end: the stored trajectories are the DMD teacher's ODE
  trajectories (its own noise estimate re-noises each step; --fresh-noise: its sampling rollout), and the
  loss falls;
- resumed generation skips finished shards and reproduces the store; `train --resume` continues
  bit-exactly; --ema-start;
- the training forward never sees later frames; the timestep index is drawn per block;
- the diffusers teacher keeps the nearest solver latents with their true timesteps (--recipe
  pipeline and self-forcing);
- a NaN loss stops without saving;
- both phases under `torchrun --nproc_per_node 2`: the 2-process model equals the 1-process one."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import two_nodes
from safetensors import safe_open
from safetensors.torch import save_file

import causal_wan as cw
import common
import convert
import train_ode as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = "a red fox running in snow\na boat on a lake\n\na city street at night\n"  # the blank line is skipped


def run(*argv):
    T.main(T.parse_args([str(a) for a in argv]))


def read_shard(path):
    with safe_open(path, "pt") as f:
        return f.get_tensor("latents"), f.metadata()


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small for threads: one thread is ~10x faster on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """What distill_dmd.py writes: {'model', 'ema', 'step', 'args'} with a (here random) tiny generator."""
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    sd = cw.CausalWan(cw.WanConfig.tiny()).state_dict()
    common.save_checkpoint(str(folder / "ckpt.pt"),
                           {"model": sd, "ema": sd, "step": 0, "args": {"generator": "bidirectional"}})
    (folder / "prompts.txt").write_text(PROMPTS)
    return str(folder / "ckpt.pt"), str(folder / "prompts.txt")


@pytest.fixture(scope="module")
def store(teacher, tiny_wan, tmp_path_factory):
    """4 trajectories in 2 shards (3 + 1), from the tiny 4-step teacher."""
    path = str(tmp_path_factory.mktemp("stores") / "ode")
    run("generate", "--tiny", "--model", tiny_wan, "--teacher", teacher[0], "--prompts", teacher[1], "--store", path)
    return path


def eval_loss(model, store, tiny_wan):
    """L_ode on every stored trajectory with every frame at each kept timestep in turn (no sampling noise)."""
    tok, enc = cw.load_text_encoder(tiny_wan)
    x = torch.stack([store[k] for k in range(store.num)]).float()
    kv = model.prompt_kv(cw.encode_prompts(tok, enc, store.prompts))
    with torch.no_grad():
        return sum(T.ode_loss(T.student_x0(model, x, torch.full((x.shape[0], x.shape[3]), i), store.timesteps, kv, 3),
                              x[:, -1]).item()
                   for i in range(4)) / 4


def test_generate_then_train(store, teacher, tiny_wan, tmp_path):
    report = T.verify_store(store)
    assert (report["num"], report["present"], report["shards"], report["missing"], report["bad"]) == (4, 4, 2, [], [])
    assert report["trajectory_shape"] == [5, 16, 6, 8, 8]  # 4 noisy states + x0 of [C, F, H, W]
    assert report["timesteps"] == cw.DENOISING_TIMESTEPS + [0.0]
    data = T.TrajectoryStore(store)
    assert data.prompts == ["a red fox running in snow", "a boat on a lake", "a city street at night",
                            "a red fox running in snow"]
    latents, meta = read_shard(os.path.join(store, "shard_00001.safetensors"))
    assert latents.shape == (1, 5, 16, 6, 8, 8) and latents.dtype == torch.bfloat16
    assert json.loads(meta["seeds"]) == [3] and json.loads(meta["prompts"]) == [data.prompts[3]]

    # the stored trajectory is the teacher's ODE trajectory from the trajectory's initial noise (seed 0 + 2): each
    # state is the Euler step x' = (1 - s') x0 + s' eps from the one before, eps = (x - (1 - s) x0) / s the
    # teacher's own noise estimate, written out here
    net = cw.CausalWan(cw.WanConfig.tiny())
    net.load_state_dict(convert.generator_state_dict(convert.load_checkpoint(teacher[0])))
    tok, enc = cw.load_text_encoder(tiny_wan)
    noise = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0 + 2))
    kv = net.prompt_kv(cw.encode_prompts(tok, enc, [data.prompts[2]]))
    states, ts = [noise], cw.DENOISING_TIMESTEPS
    with torch.no_grad():
        for i, t in enumerate(ts):
            x0 = cw.predict_x0(net, states[-1], torch.full((1,), t), kv)
            if i + 1 < len(ts):
                s, s_next = t / 1000, ts[i + 1] / 1000
                states.append((1 - s_next) * x0 + s_next * ((states[-1] - (1 - s) * x0) / s))
    assert torch.equal(data[2], torch.cat(states + [x0]).to(torch.bfloat16))

    out = str(tmp_path / "run")
    run("train", "--tiny", "--model", tiny_wan, "--store", store, "--out", out)  # 20 steps, sample at 20
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 21)) and all(r["grad_norm"] > 0 for r in log)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 20 and {"model", "ema", "optimizer", "args"} <= ckpt.keys()
    assert os.path.getsize(os.path.join(out, "sample_20.mp4")) > 0
    student = cw.CausalWan(cw.WanConfig.tiny())
    student.load_state_dict(ckpt["ema"], strict=True)  # what sample.py and train_reward.py load
    before = eval_loss(cw.from_pretrained(tiny_wan), data, tiny_wan)
    student.load_state_dict(ckpt["model"], strict=True)
    after = eval_loss(student, data, tiny_wan)
    print(f"L_ode before {before:.3f} after {after:.3f}")
    # a tiny student fits four trajectories
    assert after < 0.75 * before, (before, after)
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    print(f"logged loss first 5 {first:.3f} last 5 {last:.3f}")
    assert last < 0.9 * first, (first, last)


def test_generation_resume_skips_finished_shards(store, teacher, tiny_wan, tmp_path):
    copy = str(tmp_path / "ode")
    shutil.copytree(store, copy)
    os.remove(os.path.join(copy, "shard_00001.safetensors"))
    with open(os.path.join(copy, "shard_00001.safetensors.tmp999"), "wb") as f:
        f.write(b"half a shard from a crashed run")
    # the verify command names what is missing, and fails as one line
    res = subprocess.run([sys.executable, "train_ode.py", "verify", "--store", copy], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "3 of 4 trajectories" in res.stdout and "missing shards: [1]" in res.stdout
    assert res.stderr.strip().startswith("error: store") and len(res.stderr.strip().splitlines()) == 1

    done = os.stat(os.path.join(copy, "shard_00000.safetensors")).st_mtime_ns
    run("generate", "--tiny", "--model", tiny_wan, "--teacher", teacher[0], "--prompts", teacher[1], "--store", copy)
    assert os.stat(os.path.join(copy, "shard_00000.safetensors")).st_mtime_ns == done  # not regenerated
    for i in range(2):
        (a, meta_a), (b, meta_b) = (read_shard(os.path.join(d, f"shard_{i:05d}.safetensors")) for d in (store, copy))
        assert torch.equal(a, b) and meta_a == meta_b
    with pytest.raises(common.UserError, match=r"other settings \(num, prompts differ\)"):
        run("generate", "--tiny", "--model", tiny_wan, "--teacher", teacher[0], "--prompts", teacher[1],
            "--store", copy, "--trajectories", 5)


def test_train_resume_is_exact(store, tiny_wan, tmp_path):
    flags = ["train", "--tiny", "--model", tiny_wan, "--store", store, "--sample-every", 0, "--save-every", 2]
    run(*flags, "--out", tmp_path / "a", "--max-steps", 4)
    run(*flags, "--out", tmp_path / "b", "--max-steps", 2)
    with pytest.raises(common.UserError, match="pass --resume"):
        run(*flags, "--out", tmp_path / "b", "--max-steps", 4)
    run(*flags, "--out", tmp_path / "b", "--max-steps", 4, "--resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[p][s], state_b[p][s]) for p in state_a for s in state_a[p])
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]


def test_ema_start(store, tiny_wan, tmp_path, ema_updates):
    """--ema-start 2: the EMA is the live weights through update 2, then the average with --ema-decay;
    1 step then --resume to 4 (across the start) equals 4 steps in one go (planted: averaging one
    update late, and counting this run's updates instead of the step: each fails)."""
    base = ["train", "--tiny", "--model", tiny_wan, "--store", store, "--sample-every", 0, "--save-every", 1,
              "--ema-start", 2, "--ema-decay", 0.5]
    ema_updates.check_start_and_resume(lambda out, *flags: run(*base, "--out", out, *flags), tmp_path,
                                       start=2, decay=0.5)


def test_student_never_sees_later_frames(tiny_wan):
    """The training forward itself (student_x0, as the loop calls it) under the block-causal mask:
    changing the frames and timesteps of the second block leaves the first block's x0 untouched."""
    model = cw.from_pretrained(tiny_wan)
    g = torch.Generator().manual_seed(0)
    trajectory = torch.randn(2, 5, 16, 6, 8, 8, generator=g)
    timesteps = torch.tensor(cw.DENOISING_TIMESTEPS + [0.0])
    index = torch.stack([T.timestep_index(6, 3, 4, g) for _ in range(2)])
    kv = model.prompt_kv(torch.randn(2, 512, 32, generator=g))
    changed, index2 = trajectory.clone(), index.clone()
    changed[:, :, :, 3:] = torch.randn(2, 5, 16, 3, 8, 8, generator=g)
    index2[:, 3:] = (index2[:, 3:] + 1) % 4
    with torch.no_grad():
        a = T.student_x0(model, trajectory, index, timesteps, kv, block_size=3)
        b = T.student_x0(model, changed, index2, timesteps, kv, block_size=3)
        full_a = T.student_x0(model, trajectory, index, timesteps, kv, block_size=None)
        full_b = T.student_x0(model, changed, index2, timesteps, kv, block_size=None)
    assert (a[:, :, :3] - b[:, :, :3]).abs().max() == 0
    assert (a[:, :, 3:] - b[:, :, 3:]).abs().max() > 1e-2
    assert (full_a[:, :, :3] - full_b[:, :, :3]).abs().max() > 1e-3  # the same change does leak without the mask


def test_timestep_index_is_per_block():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([T.timestep_index(7, 3, 4, g) for _ in range(200)])  # [200, 7]: blocks 0-2, 3-5, 6
    assert (torch.equal(draws[:, :3], draws[:, :1].expand(-1, 3))
            and torch.equal(draws[:, 3:6], draws[:, 3:4].expand(-1, 3)))
    assert set(draws.flatten().tolist()) == {0, 1, 2, 3}
    assert (draws[:, 0] != draws[:, 3]).any()  # blocks draw independently


def test_diffusers_teacher(teacher, tiny_wan, tmp_path):
    """A diffusers-format Wan through diffusers' own WanPipeline: the kept latents are the solver's,
    at the grid points nearest the student's timesteps, with their true timesteps recorded."""
    from diffusers import WanPipeline
    path = str(tmp_path / "ode")
    run("generate", "--tiny", "--model", tiny_wan, "--teacher", tiny_wan, "--prompts", teacher[1], "--store", path,
        "--trajectories", 1, "--teacher-steps", 8)
    index = T.read_index(path)
    pipe = WanPipeline.from_pretrained(tiny_wan)
    pipe.scheduler.set_timesteps(8)
    levels = (pipe.scheduler.sigmas.double() * 1000).tolist()
    assert index["source"] == "diffusers" and index["timesteps"][-1] == 0.0
    for t, kept in zip(cw.DENOISING_TIMESTEPS, index["timesteps"]):
        assert kept in levels and abs(kept - t) == min(abs(level - t) for level in levels[:-1])
    stored = T.TrajectoryStore(path)[0]
    noise = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = pipe(prompt="a red fox running in snow", negative_prompt=index["negative_prompt"],
              height=64, width=64, num_frames=21, num_inference_steps=8, guidance_scale=5.0, latents=noise.clone(),
              output_type="latent").frames
    assert torch.equal(stored[0], noise[0].to(torch.bfloat16))
    assert torch.equal(stored[-1], x0[0].to(torch.bfloat16))
    assert stored[1:4].float().std() > 0.1 and not torch.equal(stored[1], stored[2])


def test_self_forcing_recipe(teacher, tiny_wan, tmp_path):
    """--recipe self-forcing: the solver of Self Forcing's generate_ode_pairs.py (Euler on the
    velocity, shift 8, 48 steps, CFG 6) inside diffusers' WanPipeline. The stored states equal an
    Euler loop written here on the pipeline's own transformer, at the grid points nearest the
    student's timesteps, with their true timesteps. Planted: shift 5, diffusers' default Euler grid,
    and the recipe ignored (UniPC): each fails."""
    from diffusers import WanPipeline
    path = str(tmp_path / "ode")
    run("generate", "--tiny", "--model", tiny_wan, "--teacher", tiny_wan, "--prompts", teacher[1], "--store", path,
        "--trajectories", 1, "--recipe", "self-forcing")
    index = T.read_index(path)
    assert (index["recipe"], index["teacher_steps"], index["guidance"]) == ("self-forcing", 48, 6.0)
    grid = [8 * s / (1 + 7 * s) for s in (1 - k / 48 for k in range(48))] + [0.0]  # noise levels, shift 8
    keep = [min(range(48), key=lambda k: abs(1000 * grid[k] - t)) for t in (1000, 937.5, 2500 / 3, 625)]
    assert index["timesteps"] == pytest.approx([1000 * grid[k] for k in keep] + [0.0], abs=1e-3)

    pipe = WanPipeline.from_pretrained(tiny_wan)
    cond, uncond = pipe.encode_prompt("a red fox running in snow", index["negative_prompt"], max_sequence_length=512)
    x = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0))  # trajectory 0's noise (seed 0)
    states = []
    with torch.no_grad():
        for k in range(48):
            states.append(x)
            t = torch.full((1,), 1000 * grid[k])
            v_cond, v_uncond = (pipe.transformer(x, t, c, return_dict=False)[0] for c in (cond, uncond))
            x = x + (grid[k + 1] - grid[k]) * (v_uncond + 6.0 * (v_cond - v_uncond))
    states.append(x)
    stored = T.TrajectoryStore(path)[0].float()  # [5, C, F, H, W] bf16
    for state, k in zip(stored, keep + [48]):
        assert (state - states[k][0]).abs().max() < 1e-2 * states[k].abs().max(), k  # bf16 rounding
    assert (stored[-1] - stored[0]).abs().max() > 0.1  # it moved
    with pytest.raises(common.UserError, match="--recipe self-forcing is a solver for a diffusers-format --teacher"):
        run("generate", "--tiny", "--model", tiny_wan, "--teacher", teacher[0], "--prompts", teacher[1],
            "--store", str(tmp_path / "x"), "--recipe", "self-forcing")


def test_nan_loss_stops_without_saving(store, tiny_wan, tmp_path):
    bad = str(tmp_path / "ode")
    shutil.copytree(store, bad)
    for i in range(2):
        latents, meta = read_shard(os.path.join(bad, f"shard_{i:05d}.safetensors"))
        save_file({"latents": latents * float("nan")}, os.path.join(bad, f"shard_{i:05d}.safetensors"), metadata=meta)
    out = tmp_path / "run"
    with pytest.raises(common.UserError, match="loss is nan at step 1: stopped without saving"):
        run("train", "--tiny", "--model", tiny_wan, "--store", bad, "--out", out, "--max-steps", 2)
    assert not os.path.exists(out / "ckpt.pt")


def test_two_nodes(store, teacher, tiny_wan, tmp_path):
    """Both phases on two nodes of one process each (torchrun's c10d rendezvous, gloo): generation splits the
    shards between the ranks and gives the single-process store; training (FSDP, global batch 2 = 2 ranks x 1)
    gives the same model as one process accumulating 2 micro-batches."""
    path = str(tmp_path / "ode")
    # --trajectories 4 (the tiny preset's): torchrun reads the options after the script too (--num was ambiguous)
    nodes = two_nodes("train_ode.py", "generate", "--tiny", "--model", tiny_wan, "--teacher", teacher[0],
                      "--prompts", teacher[1], "--store", path, "--trajectories", 4)
    assert all(code == 0 for code, _ in nodes), "\n".join(out[-3000:] for _, out in nodes)
    for i in range(2):
        (a, meta_a), (b, meta_b) = (read_shard(os.path.join(d, f"shard_{i:05d}.safetensors")) for d in (store, path))
        assert torch.equal(a, b) and meta_a == meta_b

    flags = ["train", "--tiny", "--model", tiny_wan, "--store", path, "--max-steps", 2, "--global-batch", 2,
             "--micro-batch", 1, "--sample-every", 0]
    nodes = two_nodes("train_ode.py", *flags, "--out", tmp_path / "two")
    assert all(code == 0 for code, _ in nodes), "\n".join(out[-3000:] for _, out in nodes)
    run(*flags, "--out", tmp_path / "one")
    two, one = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("two", "one"))
    # equal up to float summation order (Adam's first steps, ~lr = 1e-2 per weight, amplify it to ~1e-5)
    assert all(torch.allclose(two["model"][k], one["model"][k], atol=1e-4) for k in one["model"])
    init = cw.from_pretrained(tiny_wan).state_dict()
    assert not all(torch.equal(two["model"][k], init[k]) for k in init)  # it trained
    losses = [[r["loss"] for r in read_log(tmp_path / d)] for d in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_dmd_teacher_trajectories_are_ode_solutions(teacher, tiny_wan):
    """The default DMD route is deterministic: a trajectory's states and x0 are the same whatever random stream
    follows its initial noise, and each state is the Euler step x + (s' - s) v from the one before (its x0
    re-noised with its own noise estimate), x0 the last step's x - s v. --fresh-noise keeps the sampling form:
    the teacher's rollout with fresh noise from the trajectory's generator, which changes with that stream.
    Planted: the default drawing fresh noise -> the two streams differ, fails."""
    from types import SimpleNamespace
    cpu, prompt = torch.device("cpu"), "a red fox running in snow"
    ode = T.DMDTeacher(SimpleNamespace(model=tiny_wan, teacher=teacher[0], fresh_noise=False), cpu)
    fresh = T.DMDTeacher(SimpleNamespace(model=tiny_wan, teacher=teacher[0], fresh_noise=True), cpu)
    noise = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = {name: [sampler(prompt, noise, torch.Generator().manual_seed(seed)) for seed in (1, 2)]
            for name, sampler in (("ode", ode), ("fresh", fresh))}
    assert len(runs["ode"][0]) == 5 and all(torch.equal(a, b) for a, b in zip(*runs["ode"]))
    assert not torch.equal(runs["fresh"][0][-1], runs["fresh"][1][-1])  # x0 depends on the later noise
    kv = ode.model.prompt_kv(cw.encode_prompts(ode.tokenizer, ode.encoder, [prompt]))
    states, s = runs["ode"][0], [t / 1000 for t in cw.DENOISING_TIMESTEPS] + [0.0]
    with torch.no_grad():
        for i in range(4):  # the 3 re-noised states, then x0 (s' = 0)
            v = ode.model(states[i], torch.full((1,), 1000 * s[i]), kv)
            assert torch.allclose(states[i + 1], states[i] + (s[i + 1] - s[i]) * v, atol=1e-5), i
        steps = []
        x0 = cw.rollout(fresh.model, noise, kv, block_size=6, generator=torch.Generator().manual_seed(1),
                        trajectory=steps)
    assert all(torch.equal(a, b) for a, b in zip(runs["fresh"][0], steps[0] + [x0]))
