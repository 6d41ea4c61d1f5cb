"""
The paper's pipeline on the toy world, with the real stage scripts, and the toy Table 3. One command builds
everything it needs and prints the table at the end (toy/out/table.md, table.json):

    python toy/run.py              # toy/prepare.py, then DMD -> ODE -> reward and their rows (~34 min, 2 cores)
    python toy/run.py --all        # + the ablations and the recipe rows (~60 min in all)
    python toy/run.py --ship       # then copy the trained models into toy/weights/ (what sample.py --toy loads)

Run it again after an interruption: finished stages are kept (a `done` file beside their checkpoint), an
unfinished one continues with the script's own --resume, and the table is recomputed.

Each stage is the script a user runs on Wan, given the toy folders instead (the exact command lines are in
toy/out/runs/<stage>/command.txt; nothing in the stage scripts knows about the toy world):

    dmd          distill_dmd.py --generator bidirectional --model toy/out/wan     the 4-step bidirectional model
    store        train_ode.py generate --teacher runs/dmd/ckpt.pt                  its ODE trajectories
    ode          train_ode.py train --block-size 1                                 the causal student (ODE init)
    reward       train_reward.py --init runs/ode/ckpt.pt --reward pickscore        the paper's method: reward on
                 --reward-path toy/out/reward                                      the last frame
  --all adds:
    reward_random    --reward-frames random                 the paper's ablation: reward on a random frame
    reward_dmd       --dmd-weight 1                         reward + DMD (the critic and the teacher's real score)
    reward_detach    --cache-grad detach                    the recipe choice: no gradient through the KV cache
    store_teacher    train_ode.py generate --teacher toy/out/wan --teacher-steps 16 --guidance 3
    ode_teacher      the ODE student of the base teacher's trajectories (the other ODE-teacher route)

The world is 32x32 pixels, 9 frames (3 latent frames of 4x4): the causal models run frame-wise (--block-size 1,
three blocks, as Causal Forcing's frame-wise model), so the KV cache and the streaming matter as at full size.
Sizes, steps and learning rates of each stage are in STAGES; the paper's (Wan's) defaults stay the scripts' own.

The table: every row generates the same 48 held-out videos (prompts whose colour-shape-direction triple no
model trained on, seeds no training clip used) through sample.py's own FrameStream (the teacher: 25 Euler
steps with CFG 3) and measures them with toy/metrics.py's pixel detector, which is not the reward model:
alignment (colour, shape, direction), motion (dynamic degree, travel in pixels), background flicker, subject
consistency (the object's colour spread and area variation over time), the toy reward itself (the CLIP the
reward stage maximizes, on the last frame), and the FPS of one video at a time on this CPU.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see toy/prepare.py

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import causal_wan as cw  # noqa: E402
import common  # noqa: E402
import convert  # noqa: E402
from common import UserError  # noqa: E402
from toy import metrics as M  # noqa: E402
from toy import prepare as P  # noqa: E402
from toy import world as W  # noqa: E402

WORLD = W.World()
SIZE = ["--height", str(WORLD.height), "--width", str(WORLD.width), "--frames", str(WORLD.frames)]
REWARD = ["--reward", "pickscore", "--reward-path", "{out}/reward", "--reward-tokenizer", "{out}/reward"]
DMD = ["--guidance", "3", "--critic-steps", "5", "--critic-lr", "2e-4"]  # the teacher's CFG as prepare.py evaluates it
REWARD_RUN = ["train_reward.py", "--model", "{out}/wan", "--init", "{runs}/ode/ckpt.pt", "--prompts", "{train}",
              *SIZE, "--block-size", "1", *REWARD, "--max-steps", "150", "--global-batch", "16", "--micro-batch",
              "16", "--lr", "2e-5", "--ema-decay", "0.9", "--ema-start", "20", "--save-every", "25",
              "--sample-every", "0"]
ODE_RUN = ["train_ode.py", "train", "--model", "{out}/wan", "--store", "{runs}/{store}", "--block-size", "1",
           "--max-steps", "1000", "--global-batch", "32", "--micro-batch", "32", "--lr", "5e-4", "--ema-decay", "0.99",
           "--ema-start", "100", "--save-every", "100", "--sample-every", "0"]
# stage -> (the stages it needs, its command line; {out} toy/out, {runs} toy/out/runs, {train} the training
# prompts). The stage's output folder is appended as --out or --store.
STAGES = {
    "dmd": ([], ["distill_dmd.py", "--generator", "bidirectional", "--model", "{out}/wan", "--prompts", "{train}",
                 *SIZE, *DMD, "--max-steps", "300", "--global-batch", "16", "--micro-batch", "16", "--lr", "5e-5",
                 "--ema-decay", "0.95", "--ema-start", "50", "--save-every", "50", "--sample-every", "0"]),
    "store": (["dmd"], ["train_ode.py", "generate", "--model", "{out}/wan", "--teacher", "{runs}/dmd/ckpt.pt",
                        "--prompts", "{train}", *SIZE, "--trajectories", "2048", "--shard-size", "256"]),
    "ode": (["store"], [a.replace("{store}", "store") for a in ODE_RUN]),
    "reward": (["ode"], REWARD_RUN),
    "reward_random": (["ode"], REWARD_RUN + ["--reward-frames", "random"]),
    "reward_dmd": (["ode"], REWARD_RUN + ["--dmd-weight", "1", *DMD]),
    "reward_detach": (["ode"], REWARD_RUN + ["--cache-grad", "detach"]),
    "store_teacher": ([], ["train_ode.py", "generate", "--model", "{out}/wan", "--teacher", "{out}/wan",
                           "--teacher-steps", "16", "--guidance", "3", "--prompts", "{train}", *SIZE,
                           "--trajectories", "2048", "--shard-size", "256"]),
    "ode_teacher": (["store_teacher"], [a.replace("{store}", "store_teacher") for a in ODE_RUN]),
}
# --quick (the CI check, with prepare.py --quick): the same stages, shorter; a flag given twice takes the last
QUICK = {"dmd": ["--max-steps", "4", "--ema-start", "2", "--critic-steps", "2"], "store": ["--trajectories", "64"],
         "store_teacher": ["--trajectories", "64", "--teacher-steps", "8"],
         "ode": ["--max-steps", "30", "--ema-start", "5"], "ode_teacher": ["--max-steps", "30", "--ema-start", "5"],
         "reward": ["--max-steps", "4", "--ema-start", "2"]}
MAIN = ["dmd", "store", "ode", "reward"]
ABLATIONS = ["reward_random", "reward_dmd", "reward_detach", "store_teacher", "ode_teacher"]
# table row -> (its generator: a stage's checkpoint, or None for the teacher; its kind; what it is)
ROWS = {
    "teacher": (None, None, "the toy Wan (bidirectional), 25 Euler steps, CFG 3"),
    "dmd": ("dmd", "bidirectional", "bidirectional DMD, 4 steps"),
    "ode": ("ode", "causal", "ODE init only (causal, 4 steps)"),
    "reward": ("reward", "causal", "reward (last frame): the paper's method"),
    "reward_random": ("reward_random", "causal", "reward (random frames)"),
    "reward_dmd": ("reward_dmd", "causal", "reward + DMD"),
    "reward_detach": ("reward_detach", "causal", "reward, --cache-grad detach"),
    "ode_teacher": ("ode_teacher", "causal", "ODE init from the base teacher (UniPC, 16 steps, CFG 3)"),
}


def command(stage, out, quick=False):
    runs = os.path.join(out, "runs")
    argv = STAGES[stage][1] + (QUICK.get(stage, QUICK["reward"] if stage.startswith("reward") else []) if quick else [])
    argv = [a.format(out=out, runs=runs, train=os.path.join(out, "prompts", "train.txt")) for a in argv]
    folder = os.path.join(runs, stage)
    return [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:], "--store" if "generate" in argv else "--out",
            folder], folder


def run_stage(stage, out, minutes, quick=False):
    """Run one stage's script (resuming it when it has a checkpoint), unless its `done` file says it finished."""
    argv, folder = command(stage, out, quick)
    if os.path.isfile(os.path.join(folder, "done")):
        return
    if os.path.isfile(os.path.join(folder, "ckpt.pt")):
        argv.append("--resume")
    elif os.path.isdir(folder):
        shutil.rmtree(folder)  # a stage stopped before its first checkpoint (or a store half written): start over
    print(f"\n== {stage}: {' '.join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in argv[1:])}",
          flush=True)
    start = time.time()
    result = subprocess.run(argv, cwd=ROOT)
    if result.returncode != 0:
        raise UserError(f"stage '{stage}' failed (exit {result.returncode}); fix what it printed and run again: "
                        f"finished stages are kept")
    minutes[stage] = round(minutes.get(stage, 0) + (time.time() - start) / 60, 2)
    with open(os.path.join(folder, "command.txt"), "w") as f:
        f.write(" ".join(argv[1:]) + "\n")
    open(os.path.join(folder, "done"), "w").close()


# -----------------------------------------------------------------------------
# the table

class Evaluator:
    """The held-out videos of every row, made by sample.py's own generation path, and their measures."""

    def __init__(self, out, n=48):
        self.out, self.wan = out, os.path.join(out, "wan")
        self.specs, self.seeds = P.eval_specs(P.Config(), W.split(W.all_specs())[1], n, 2)
        self.prompts = [s.prompt for s in self.specs]
        tokenizer, encoder = cw.load_text_encoder(self.wan)
        self.contexts = {p: cw.encode_prompts(tokenizer, encoder, [p]) for p in set(self.prompts)}
        self.negative = cw.encode_negative_prompt(tokenizer, encoder, cw.WAN_NEGATIVE_PROMPT)
        self.vae = cw.load_vae(self.wan)
        import train_reward
        reward = os.path.join(out, "reward")
        self.reward = train_reward.load_reward("pickscore", reward, reward)

    def videos_of(self, stage, kind):
        """uint8 [N, T, H, W, 3] of the held-out prompts and the seconds spent per video (generation + decode)."""
        import functools

        import sample
        model = cw.from_pretrained(self.wan).eval().requires_grad_(False)
        if stage is None:
            return self.teacher_videos(model)
        convert.load_generator_weights(model, os.path.join(self.out, "runs", stage, "ckpt.pt"), kind=kind)
        latent_frames = (WORLD.frames - 1) // 4 + 1
        chunk = latent_frames if kind == "bidirectional" else 1
        videos, seconds = [], []
        with torch.no_grad():
            for prompt, seed in zip(self.prompts, self.seeds):
                start = time.perf_counter()
                stream = sample.FrameStream(model, functools.partial(cw.vae_decode, self.vae),
                                            model.prompt_kv(self.contexts[prompt]), height=WORLD.height,
                                            width=WORLD.width, seed=seed, frames=WORLD.frames, chunk=chunk,
                                            max_frames=latent_frames)
                videos.append(np.concatenate(list(stream)))
                seconds.append(time.perf_counter() - start)
        return np.stack(videos), seconds

    def teacher_videos(self, model):
        cfg, videos, seconds = P.Config(), [], []
        shape = [1, 16, (WORLD.frames - 1) // 4 + 1, WORLD.height // 8, WORLD.width // 8]
        for prompt, seed in zip(self.prompts, self.seeds):
            start = time.perf_counter()
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            z = P.euler_sample(model, self.contexts[prompt], self.negative, noise, 25, cfg.guidance, cfg.shift)
            videos.append(W.to_uint8(cw.vae_decode(self.vae, z))[0])
            seconds.append(time.perf_counter() - start)
        return np.stack(videos), seconds

    def long_video(self, stage, seconds=60, n=4):
        """Drift over a 1-minute video (961 frames, 16 fps) of the stage's causal generator, for n held-out prompts:
        per 5-second segment, the share of frames with an object, the detector's colour accuracy, the object's
        area against the first segment's, and its centroid's distance from the frame's centre."""
        import functools

        import sample
        model = cw.from_pretrained(self.wan).eval().requires_grad_(False)
        convert.load_generator_weights(model, os.path.join(self.out, "runs", stage, "ckpt.pt"))
        segments = []
        with torch.no_grad():
            for prompt, seed in zip(self.prompts[:n], self.seeds[:n]):
                stream = sample.FrameStream(model, functools.partial(cw.vae_decode, self.vae),
                                            model.prompt_kv(self.contexts[prompt]), height=WORLD.height,
                                            width=WORLD.width, seed=seed, frames=16 * seconds + 1, chunk=1)
                video = np.concatenate(list(stream))
                objs = [M.frame_object(f) for f in video]
                color = W.parse_prompt(prompt).color
                per = []
                for s in range(0, len(video) - 1, 80):
                    found = [o for o in objs[s:s + 80] if o is not None]
                    per.append(dict(found=len(found) / 80,
                                    color=float(np.mean([M.nearest(o["color"], W.COLORS) == color for o in found]))
                                    if found else 0.0,
                                    area=float(np.mean([o["area"] for o in found])) if found else 0.0,
                                    offset=float(np.mean([np.hypot(o["cx"] - (WORLD.width - 1) / 2,
                                                                   o["cy"] - (WORLD.height - 1) / 2) for o in found]))
                                    if found else float("nan")))
                segments.append(per)
        mean = {k: [float(np.nanmean([v[i][k] for v in segments])) for i in range(len(segments[0]))]
                for k in segments[0][0]}
        mean["area"] = [a / mean["area"][0] if mean["area"][0] else 0.0 for a in mean["area"]]
        return mean

    def row(self, stage, kind):
        videos, seconds = self.videos_of(stage, kind)
        m = M.video_metrics(videos, self.prompts, WORLD)
        with torch.no_grad():
            last = W.to_model(videos[:, -1:])[:, :, 0]
            m["reward"] = float(self.reward(last, self.prompts).mean())
        m["fps"] = WORLD.frames * (len(seconds) - 1) / sum(seconds[1:])  # the first video warms up
        return m, videos


COLUMNS = [("acc_color", "colour"), ("acc_shape", "shape"), ("acc_direction", "direction"), ("acc_core", "all 3"),
           ("dynamic_degree", "dynamic"), ("motion", "travel px"), ("flicker", "flicker"),
           ("color_std", "colour std"), ("area_cv", "area cv"), ("reward", "toy reward"), ("fps", "FPS (CPU)")]


def table_markdown(rows):
    head = "| row | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, m in rows.items():
        cells = [f"{m[k]:.2f}" if k != "fps" else f"{m[k]:.0f}" for k, _ in COLUMNS]
        lines.append(f"| {ROWS[name][2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_gif(path, prompts, rows, scale=3, columns=4):
    """An animated GIF: the first `columns` held-out videos of each row (name -> uint8 [N, T, H, W, 3]) side by
    side, scaled up, with the row names on the left and the prompts on top (README's clip)."""
    from PIL import Image, ImageDraw
    size, left, top = WORLD.height * scale, 120, 30
    T = WORLD.frames
    canvas = np.full((T, top + len(rows) * (size + 4), left + columns * (size + 4), 3), 255, np.uint8)
    for r, videos in enumerate(rows.values()):
        for c in range(columns):
            y, x = top + r * (size + 4), left + c * (size + 4)
            canvas[:, y:y + size, x:x + size] = videos[c].repeat(scale, 1).repeat(scale, 2)
    frames = []
    for t in range(T):
        image = Image.fromarray(canvas[t])
        draw = ImageDraw.Draw(image)
        for c, prompt in enumerate(prompts[:columns]):
            for k, line in enumerate(prompt.removeprefix("a ").split(" moves ")):
                draw.text((left + c * (size + 4), 2 + 13 * k), line if k == 0 else "moves " + line, fill=(0, 0, 0))
        for r, name in enumerate(rows):
            draw.text((4, top + r * (size + 4) + size // 2 - 6), name, fill=(0, 0, 0))
        frames.append(np.asarray(image))
    import imageio
    imageio.mimsave(path, frames, duration=250, loop=0)


def write_table(out, stages, minutes, n=48):
    evaluator = Evaluator(out, n)
    rows, clips = {}, {}
    for name, (stage, kind, _) in ROWS.items():
        if stage is None or stage in stages:
            rows[name], videos = evaluator.row(stage, kind)
            if name in ("teacher", "ode", "reward"):
                clips[{"teacher": "teacher (25 steps)", "ode": "ODE init", "reward": "reward stage"}[name]] = videos
            P.write_grid(os.path.join(out, "samples", f"{name}.mp4"), videos[:12])
            print(f"{name}: {M.format_metrics(rows[name])} reward {rows[name]['reward']:.2f} fps "
                  f"{rows[name]['fps']:.0f}", flush=True)
    text = table_markdown(rows)
    if "reward" in stages:
        write_gif(os.path.join(out, "samples", "toy.gif"), evaluator.prompts, clips)
        drift = evaluator.long_video("reward", **(dict(seconds=10, n=1) if n < 48 else {}))
        text += ("\n\nLong videos of the reward-stage generator (1 minute, 961 frames, 4 held-out prompts; per 5 s: "
                 "frames with an object, colour right, area / first 5 s, centroid's distance from the centre, px):\n")
        for k, v in drift.items():
            text += f"- {k}: " + " ".join(f"{x:.2f}" for x in v) + "\n"
    else:
        drift = None
    report = common.read_json(os.path.join(out, "report.json"), "report.json")
    timing = dict(prepare=report["minutes"]["total"]["wall"], **minutes)
    text += "\n\nminutes on this machine: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(dict(rows=rows, long_video=drift, minutes=timing, held_out_videos=len(evaluator.prompts)), f,
                  indent=1)
    print("\n" + text)
    print(f"wrote {out}/table.md, {out}/table.json, {out}/samples/<row>.mp4 and toy.gif")


def ship(out, weights=os.path.join(ROOT, "toy", "weights")):
    """toy/weights/: wan/ (the diffusers folder), reward/ (the CLIP), generator/ and ode/ (the reward stage's and
    the ODE stage's EMA generators, exported with convert.py export), the prompt splits, PROVENANCE.md (how they
    were made, what they measure). Safetensors, json and text only."""
    tmp = weights + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(out, "wan"), os.path.join(tmp, "wan"))
    shutil.copytree(os.path.join(out, "reward"), os.path.join(tmp, "reward"))
    for stage, name in [("reward", "generator"), ("ode", "ode")]:
        subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "export", "--checkpoint",
                        os.path.join(out, "runs", stage, "ckpt.pt"), "--model", os.path.join(out, "wan"), "--out",
                        os.path.join(tmp, name)], check=True, cwd=ROOT)
    for split in ("train", "heldout"):
        shutil.copy(os.path.join(out, "prompts", f"{split}.txt"), os.path.join(tmp, f"{split}_prompts.txt"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    report, table = (common.read_json(os.path.join(out, f), f) for f in ("report.json", "table.json"))
    with open(os.path.join(tmp, "PROVENANCE.md"), "w") as f:
        f.write(f"# toy/weights\n\nMade by `python toy/run.py` (then `--ship`) at commit {commit.strip()} on "
                f"{time.strftime('%Y-%m-%d')}, 2 CPU cores, seed 0: the toy world's Wan (wan/: VAE, text encoder, "
                f"teacher), its reward (reward/), the reward stage's and the ODE stage's generators (generator/, ode/: "
                f"EMA, fp32), as "
                f"toy/prepare.py and toy/run.py describe them. They ship (4 MB) so that `sample.py --toy` and "
                f"`demo.py --toy` show a video in seconds instead of after a 34-minute build, and so that the tests "
                f"of what trained models do (tests/test_toy.py, the browser test) run in seconds. What they measure "
                f"(toy/out/report.json, table.json):"
                f"\n\n```\n{json.dumps(dict(vae_psnr=report['vae']['psnr'], table=table['rows']), indent=1)}\n```\n")
    shutil.rmtree(weights, ignore_errors=True)
    os.replace(tmp, weights)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(weights) for f in fs)
    print(f"wrote {weights} ({size / 2**20:.1f} MB): python sample.py --toy --prompt 'a red ball moves left'")


def main(args):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its "Loading weights" bar at every from_pretrained
    out = os.path.abspath(args.out)
    if not os.path.isfile(os.path.join(out, "report.json")):
        P.main(P.parse_args(["--out", out] + (["--quick"] if args.quick else [])))
    stages = MAIN + (ABLATIONS if args.all else [])
    minutes_path = os.path.join(out, "runs", "minutes.json")
    os.makedirs(os.path.dirname(minutes_path), exist_ok=True)
    minutes = common.read_json(minutes_path, "runs/minutes.json") if os.path.isfile(minutes_path) else {}
    for stage in stages:
        for need in STAGES[stage][0]:
            run_stage(need, out, minutes, args.quick)
        run_stage(stage, out, minutes, args.quick)
        with open(minutes_path, "w") as f:
            json.dump(minutes, f, indent=1)
    write_table(out, [s for s in STAGES if os.path.isfile(os.path.join(out, "runs", s, "done"))], minutes,
                n=6 if args.quick else 48)
    if args.ship:
        ship(out)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "toy", "out"), help="the toy folder (toy/out)")
    p.add_argument("--all", action="store_true", help="also the ablations and the recipe rows")
    p.add_argument("--ship", action="store_true", help="then copy the trained models into toy/weights (--toy's)")
    p.add_argument("--quick", action="store_true", help="prepare.py --quick and short stages (~2 min; the CI check)")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.run_script(P.resumable(main), parse_args)  # a UserError: one line, exit 2; Ctrl-C: one line, exit 130
