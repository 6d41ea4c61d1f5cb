"""
The toy world (toy/): its grammar and detector, the whole pipeline at CI size (`toy/run.py --quick`: prepare.py's
models, then DMD -> ODE -> reward through the real stage scripts, then the table), and what the shipped toy
models (toy/weights, `sample.py --toy`) do, measured from the frames by toy/metrics.py's pixel detector: the
trained teacher follows held-out prompts and a random one does not, the reward stage raises the toy reward on
held-out prompts, a switch changes the object, --image and --extend continue the still or clip. (The page's switch
in Chromium: tests/test_demo.py.) Each test names the bug planted to see it fail.
"""
import functools
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import causal_wan as cw  # noqa: E402
import convert  # noqa: E402
import sample  # noqa: E402
from toy import metrics as M  # noqa: E402
from toy import prepare as P  # noqa: E402
from toy import world as W  # noqa: E402

WEIGHTS = sample.TOY_WEIGHTS
WAN = os.path.join(WEIGHTS, "wan")
HELD_OUT = W.split(W.all_specs())[1]


def test_grammar_and_split():
    specs = W.all_specs()
    assert len({s.prompt for s in specs}) == len(specs) == 432
    assert all(W.parse_prompt(s.prompt) == s for s in specs)
    train, heldout = W.split(specs)
    assert len({s.triple for s in heldout}) == 12 and not {s.triple for s in train} & {s.triple for s in heldout}
    # every pair of attributes of a held-out triple still occurs in training
    pairs = {(a, b) for s in train for a, b in [s.triple[:2], s.triple[1:], s.triple[::2]]}
    assert all(p in pairs for s in heldout for p in [s.triple[:2], s.triple[1:], s.triple[::2]])
    with pytest.raises(ValueError, match="not a prompt of the toy world"):
        W.parse_prompt("a purple ball moves left")


def test_detector_reads_ground_truth():
    world = W.World()
    specs = W.sample_specs(W.all_specs(), 120, seed=1)
    videos = np.stack([W.render(s, 1000 + i, world) for i, s in enumerate(specs)])
    assert videos.shape[1:] == (world.frames, world.height, world.width, 3)
    assert np.array_equal(videos[0], W.render(specs[0], 1000, world))  # deterministic
    m = M.video_metrics(videos, [s.prompt for s in specs], world)
    assert m["acc_all"] == 1.0 and m["dynamic_degree"] == 1.0 and m["flicker"] < 0.5
    still = np.repeat(videos[:, :1], world.frames, axis=1)  # no motion: the detector must not see any
    assert M.video_metrics(still, [s.prompt for s in specs], world)["dynamic_degree"] == 0.0


def test_colors_survive_the_vae_clamp():
    video = W.to_model(W.render(W.Spec("yellow", "ball", "left"), 0)[None])
    assert video.abs().max() < 0.95


def test_quick_pipeline_through_the_real_scripts(tmp_path):
    """`toy/run.py --quick` (~2.5 min): prepare.py --quick (every model of the world, briefly trained), the stages
    through the real scripts, the table. Each part learns something (the VAE beats a grey picture's 18.7 dB, the
    teacher's videos are steadier than a random teacher's, the reward tells colours apart); what trained models do
    is tested on the shipped ones below."""
    out = str(tmp_path / "toy")
    subprocess.run([sys.executable, os.path.join(ROOT, "toy", "run.py"), "--quick", "--out", out], check=True,
                   cwd=ROOT, capture_output=True)
    report, table = (json.load(open(os.path.join(out, f))) for f in ("report.json", "table.json"))
    assert report["vae"]["psnr"] > 19
    trained, random = report["teacher"]["heldout_25_steps_cfg"], report["teacher"]["random_teacher_25_steps_cfg"]
    assert trained["flicker"] < random["flicker"] / 3
    assert report["reward"]["top1_color"] >= 0.9  # chance 0.25
    assert list(table["rows"]) == ["teacher", "dmd", "ode", "reward"]
    assert all(np.isfinite(v) for row in table["rows"].values() for v in row.values())
    for stage, script in [("dmd", "distill_dmd.py"), ("store", "train_ode.py generate"), ("ode", "train_ode.py train"),
                          ("reward", "train_reward.py")]:
        assert script in open(os.path.join(out, "runs", stage, "command.txt")).read()
    cw.check_model(os.path.join(out, "wan"))
    assert os.path.getsize(os.path.join(out, "samples", "reward.mp4")) > 0


# -----------------------------------------------------------------------------
# the shipped toy models (toy/weights, made by toy/run.py --ship; provenance in toy/weights/PROVENANCE.md)

@pytest.fixture(scope="module")
def toy():
    tokenizer, encoder = cw.load_text_encoder(WAN)
    specs, seeds = P.eval_specs(P.Config(), HELD_OUT, 12, 7)
    prompts = [s.prompt for s in specs]
    contexts = cw.encode_prompts(tokenizer, encoder, prompts)
    negative = cw.encode_negative_prompt(tokenizer, encoder, cw.WAN_NEGATIVE_PROMPT)
    return dict(prompts=prompts, seeds=seeds, contexts=contexts, negative=negative, vae=cw.load_vae(WAN))


def teacher_alignment(model, toy, steps=8):
    noise = torch.stack([torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(s)) for s in toy["seeds"]])
    z = P.euler_sample(model, toy["contexts"], toy["negative"], noise, steps, 3.0, 3.0)
    return M.video_metrics(W.to_uint8(cw.vae_decode(toy["vae"], z)), toy["prompts"])


def test_the_trained_teacher_follows_held_out_prompts_and_a_random_one_does_not(toy):
    """12 held-out prompts (colour-shape-direction triples no model trained on), 8 Euler steps with CFG 3. Planted:
    the prompt embeddings shuffled across the videos -> the colour accuracy drops to chance."""
    trained = cw.from_pretrained(WAN).eval()
    random = cw.CausalWan(trained.cfg).eval()
    with torch.no_grad():
        good, bad = teacher_alignment(trained, toy), teacher_alignment(random, toy)
    assert good["acc_color"] >= 0.9 and good["acc_direction"] >= 0.75, good
    assert bad["acc_color"] <= 0.5, bad


def held_out_reward(checkpoint, toy):
    """The toy reward (train_reward.py's pickscore on toy/weights/reward) of the last frame of the 12 held-out
    videos the causal generator of `checkpoint` makes through sample.py's FrameStream, frame-wise."""
    import train_reward
    model = convert.load_generator_weights(cw.from_pretrained(WAN), checkpoint).eval()
    last = []
    with torch.no_grad():
        for context, seed in zip(toy["contexts"], toy["seeds"]):
            stream = sample.FrameStream(model, functools.partial(cw.vae_decode, toy["vae"]),
                                        model.prompt_kv(context[None]), height=32, width=32, seed=seed, frames=9,
                                        chunk=1)
            last.append(list(stream)[-1][-1])
        reward_dir = os.path.join(WEIGHTS, "reward")
        reward = train_reward.load_reward("pickscore", reward_dir, reward_dir)
        return float(reward(W.to_model(np.stack(last)[:, None])[:, :, 0], toy["prompts"]).mean())


def test_the_reward_stage_raises_the_toy_reward_on_held_out_prompts(toy, tmp_path):
    """train_reward.py from the shipped ODE-initialized generator (toy/weights/ode), 12 steps on the training
    prompts: the held-out prompts' reward goes up. Planted: the loss's sign flipped (loss = +reward) -> it goes
    down and this fails."""
    out = tmp_path / "reward"
    subprocess.run([sys.executable, "train_reward.py", "--model", WAN, "--init", os.path.join(WEIGHTS, "ode"),
                    "--prompts", os.path.join(WEIGHTS, "train_prompts.txt"), "--height", "32", "--width", "32",
                    "--frames", "9", "--block-size", "1", "--reward", "pickscore", "--reward-path",
                    os.path.join(WEIGHTS, "reward"), "--reward-tokenizer", os.path.join(WEIGHTS, "reward"),
                    "--max-steps", "12", "--global-batch", "8", "--micro-batch", "8", "--lr", "5e-5",
                    "--ema-start", "12", "--save-every", "12", "--sample-every", "0", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    before, after = held_out_reward(os.path.join(WEIGHTS, "ode"), toy), held_out_reward(str(out / "ckpt.pt"), toy)
    assert after > before + 0.05, (before, after)


def read_mp4(path):
    import imageio
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        return np.stack([f for f in reader])  # not list(reader): its len() is inf for an mp4


def colors_of(path, frames):
    video = read_mp4(path)
    return [M.nearest(o["color"], W.COLORS) if (o := M.frame_object(video[f])) else None for f in frames]


def test_a_switch_changes_the_object(tmp_path):
    """sample.py --toy: a red ball, then from frame 17 a blue pillar: the frames before the switch show a red
    object, the last ones a blue one (read from the mp4). Planted: the switch ignored -> the end stays red."""
    out = tmp_path / "switch.mp4"
    subprocess.run([sys.executable, "sample.py", "--toy", "--prompt", "a red ball moves right", "--frames", "33",
                    "--switch", "17", "a blue pillar moves up", "--out", str(out)], check=True, cwd=ROOT,
                   capture_output=True)
    assert colors_of(out, range(1, 16)) == ["red"] * 15
    assert colors_of(out, range(25, 33)) == ["blue"] * 8


def test_image_to_video_continues_the_still(tmp_path):
    """sample.py --toy --image, prompt "a red ball moves left": from the first frame of a world clip of it (the ball
    right of the centre) every frame shows a red object, and it moves left by more than 6 pixels. From a still
    with the ball left of the centre, the same prompt and seed give other frames: the still is used, not only the
    prompt. (A still that contradicts the prompt's colour loses: the prompt's colour follows the first frame.)
    Planted: the still's latents not passed as the prefix -> both videos are the same and this fails."""
    spec = W.Spec("red", "ball", "left")
    videos = []
    for name, frame in [("start", 0), ("end", -1)]:
        iio.imwrite(tmp_path / f"{name}.png", W.render(spec, 3)[frame])
        out = tmp_path / f"{name}.mp4"
        subprocess.run([sys.executable, "sample.py", "--toy", "--image", str(tmp_path / f"{name}.png"), "--prompt",
                        spec.prompt, "--frames", "9", "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
        videos.append(read_mp4(out))
    objs = [M.frame_object(f) for f in videos[0]]
    assert all(o is not None and M.nearest(o["color"], W.COLORS) == "red" for o in objs)
    assert objs[-1]["cx"] < objs[0]["cx"] - 6, [round(o["cx"], 1) for o in objs]
    assert np.abs(videos[0][1:].astype(float) - videos[1][1:]).mean() > 2


def test_extend_continues_the_clip(tmp_path):
    """sample.py --toy --extend: a world clip of a red ball moving left (9 frames, the ball ending left of the
    centre), continued with its prompt to 21 frames: the 8 frames after the clip show the red ball further on,
    left of the centre (x < 12), and they are not the frames of the same prompt and seed without the clip (its
    frames are in the cache, not the generator's own). Planted: the clip's latents not passed as the prefix ->
    the video is the one without the clip and this fails."""
    import common
    spec = W.Spec("red", "ball", "left")
    clip = torch.from_numpy(W.render(spec, 3)).permute(3, 0, 1, 2).float() / 127.5 - 1
    common.save_video(str(tmp_path / "clip.mp4"), clip, fps=16)
    out = tmp_path / "extended.mp4"
    subprocess.run([sys.executable, "sample.py", "--toy", "--extend", str(tmp_path / "clip.mp4"), "--prompt",
                    spec.prompt, "--frames", "21", "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, "sample.py", "--toy", "--prompt", spec.prompt, "--frames", "21", "--out",
                    str(tmp_path / "new.mp4")], check=True, cwd=ROOT, capture_output=True)
    video, new = read_mp4(out), read_mp4(tmp_path / "new.mp4")
    objs = [M.frame_object(f) for f in video[9:17]]
    assert len(video) == 21 and np.abs(video[9:17].astype(float) - new[9:17]).mean() > 1
    assert all(o is not None and M.nearest(o["color"], W.COLORS) == "red" and o["cx"] < 12 for o in objs), [
        None if o is None else round(o["cx"], 1) for o in objs]
