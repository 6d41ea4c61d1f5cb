"""Bad input at every entry point (sample.py, distill_dmd.py, train_ode.py generate/verify/train,
train_reward.py, vbench_tools.py, eval_vbench.sh): one line `error: ...` on stderr naming the input,
exit code 2, no traceback, and found before any model loads.

Most cases run the script's main(parse_args(argv)) in this process, the way its `__main__` block
does, with every model loader replaced by one that fails the test (`no_model_loads`); each script's
real `__main__` block runs once (runpy), one case crosses a real process boundary, and
eval_vbench.sh runs under bash.

Planted on the fixed code to see these fail: no range in common.seed (the seed cases reach the model
loader); read_text decoding with errors='replace' (the non-UTF-8 cases pass the check);
check_outputs skipped (a folder in the way, a file in the way, an unwritable folder: found only
after the model loads); sample.check_speed_kit not called (--fp8 on the CPU and --decoder tae without
its file reach the model loaders); the tiny decoder loaded after the generator (a junk or wrong
--decoder-path is found only after the generator loads); the --checkpoint check of eval_vbench.sh moved after
ensure_vbench_venv (no one-line error: the venv build starts). On the code before issue 13, 93 of these 95 tests
fail (44 load a model first, the others end in a traceback or argparse's multi-line usage).
"""
import json
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

import causal_wan as cw
import common
import convert
import distill_dmd
import sample
import train_ode
import train_reward
import vbench_tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
NOT_UTF8 = b"a red fox\n\xff\xfe caf\xe9\n"
SCRIPTS = {"sample": sample, "distill_dmd": distill_dmd, "train_ode": train_ode, "train_reward": train_reward,
           "vbench_tools": vbench_tools}


def cli(module, argv):
    """What `python module.py argv` does, in this process: the exit code (stderr via capsys)."""
    try:
        module.main(module.parse_args([str(a) for a in argv]))
    except SystemExit as e:  # argparse
        return e.code
    except (common.UserError, getattr(vbench_tools, "UserError", common.UserError)) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def assert_one_line_error(code, stderr, message):
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, (code, stderr[-2000:])
    assert re.search(message, lines[0]), lines[0]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every loader of a model (transformer, text encoder, VAE, reward, diffusers pipeline) fails the test."""
    from diffusers import WanPipeline

    def loaded(*args, **kwargs):
        raise AssertionError("a model loaded before the bad input was found")
    for module, name in [(cw, "from_pretrained"), (cw, "load_text_encoder"), (cw, "load_vae"),
                         (convert, "load_generator_weights"), (train_reward, "load_reward"),
                         (WanPipeline, "from_pretrained")]:
        monkeypatch.setattr(module, name, loaded)


@pytest.fixture
def files(tmp_path, tiny_wan):
    """The bad (and good) files the cases point at, by name."""
    paths = {"TMP": tmp_path, "MODEL": tiny_wan}
    (tmp_path / "not_utf8.txt").write_bytes(NOT_UTF8)
    (tmp_path / "prompts.txt").write_text("a red fox\n")
    (tmp_path / "a_file").write_text("in the way")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "init.pt").write_bytes(b"")  # exists: the cases fail before it is read
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save({"decoder.1.weight": torch.zeros(8, 16, 3, 3)}, tmp_path / "wrong.pth")  # not TAEW2.1's decoder
    (tmp_path / "jobs_seed.tsv").write_text(f"a fox\t{2**40}\t{tmp_path / 'a.mp4'}\n")
    (tmp_path / "jobs_avi.tsv").write_text(f"a fox\t1\t{tmp_path / 'a.avi'}\n")
    for name, config in [("broken_json", "{'num_layers': 2,"), ("missing_keys", json.dumps({"num_layers": 2}))]:
        model = tmp_path / name
        for part in ("transformer", "vae", "text_encoder", "tokenizer"):
            (model / part).mkdir(parents=True)
        (model / "transformer" / "config.json").write_text(config)
    store = tmp_path / "store"
    store.mkdir()
    (store / "index.json").write_text('{"num": 4, "shard_si')  # cut short
    bad_keys = tmp_path / "store_keys"
    bad_keys.mkdir()
    (bad_keys / "index.json").write_text(json.dumps({"num": 4}))
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / "ImageReward.pt").write_bytes(b"")
    (reward / "med_config.json").write_text("{")
    results = tmp_path / "results"
    results.mkdir()
    (results / "a_eval_results.json").write_text('{"color": [0.5, ')
    shaped = tmp_path / "results_shape"
    shaped.mkdir()
    (shaped / "a_eval_results.json").write_text('{"color": 0.5}')
    (tmp_path / "list_broken.json").write_text("[{")
    (tmp_path / "list_entries.json").write_text('[{"prompt": "a fox"}]')
    (tmp_path / "list.json").write_text('[{"prompt_en": "a fox"}]')
    return paths


def unwritable_path(tmp_path):
    """A folder that cannot be created: under a read-only folder, or for root (who ignores permissions) under /sys."""
    if os.geteuid() == 0:
        if not os.path.ismount("/sys"):
            pytest.skip("running as root without /sys: no unwritable place to point at")
        return "/sys/reward_forcing_test/out"
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    return str(ro / "out")


def expand(argv, files):
    """Placeholders in the cases: TMP/x (a path under the test's folder), MODEL (the tiny Wan), UNWRITABLE."""
    out = []
    for a in argv:
        a = str(a)
        if a.startswith("UNWRITABLE"):
            a = unwritable_path(files["TMP"]) + a[len("UNWRITABLE"):]
        elif a == "MODEL":
            a = files["MODEL"]
        elif a == "TMP" or a.startswith("TMP/"):
            a = str(files["TMP"] / a[4:])
        out.append(a)
    return out


SAMPLE = ["--model", "MODEL", "--prompt", "a fox", "--frames", "5", "--height", "64", "--width", "64",
          "--device", "cpu"]
DMD = ["--model", "MODEL", "--out", "TMP/run", "--height", "64", "--width", "64", "--frames", "21"]
ODE_GEN = ["generate", "--model", "MODEL", "--teacher", "TMP/init.pt", "--prompts", "TMP/prompts.txt",
           "--store", "TMP/st"]
ODE_TRAIN = ["train", "--model", "MODEL", "--store", "TMP/store", "--out", "TMP/run"]
REWARD = ["--model", "MODEL", "--init", "TMP/init.pt", "--out", "TMP/run", "--height", "64", "--width", "64",
          "--frames", "21"]

CASES = [  # (script, argv, what the one line must say)
    # sample.py
    ("sample", SAMPLE + ["--fps", "0"], r"argument --fps: 0 is not a positive integer"),
    ("sample", SAMPLE + ["--seed", "-1"], r"argument --seed: -1 is not in 0\.\.4294967295"),
    ("sample", SAMPLE + ["--seed", str(2**70)], r"argument --seed: \d+ is not in"),
    ("sample", SAMPLE + ["--num-videos", "-2"], r"argument --num-videos: -2 is not a positive integer"),
    ("sample", SAMPLE + ["--max-frames", "0"], r"argument --max-frames"),
    ("sample", SAMPLE + ["--frames", "x"], r"argument --frames: invalid int value"),
    ("sample", SAMPLE + ["--device", "banana"], r"--device 'banana' is not a device"),
    ("sample", SAMPLE + ["--device", "cuda:99"], r"--device cuda:99: (no CUDA GPU|this machine has)"),
    ("sample", SAMPLE + ["--out", "TMP/fox.avi"], r"--out '.*fox\.avi' ends in '\.avi': videos are mp4"),
    ("sample", SAMPLE + ["--out", "TMP/folder.mp4"], r"'.*folder\.mp4' is a folder: the video cannot be written there"),
    ("sample", SAMPLE + ["--out", "TMP/a_file/fox.mp4"], r"output folder '.*a_file' is a file, not a folder"),
    ("sample", SAMPLE + ["--out", "UNWRITABLE/fox.mp4"], r"output folder '.*' cannot be written"),
    ("sample", SAMPLE[:2] + ["--prompts-file", "TMP/not_utf8.txt", "--out", "TMP/v"],
     r"--prompts-file '.*' is not UTF-8 text \(byte 10\)"),
    ("sample", SAMPLE[:2] + ["--prompts-file", "TMP", "--out", "TMP/v"],
     r"--prompts-file '.*' is a folder, not a file"),
    ("sample", SAMPLE[:2] + ["--jobs", "TMP/not_utf8.txt"], r"--jobs '.*' is not UTF-8 text"),
    ("sample", SAMPLE[:2] + ["--jobs", "TMP/jobs_seed.tsv"], r"jobs_seed\.tsv:1: seed 1099511627776 is not in"),
    ("sample", SAMPLE[:2] + ["--jobs", "TMP/jobs_avi.tsv"],
     r"jobs_avi\.tsv:1: expected 'prompt<TAB>seed<TAB>out\.mp4'"),
    ("sample", SAMPLE + ["--model", "TMP/broken_json"],
     r"transformer config '.*config\.json' is not valid JSON \(line 1"),
    ("sample", SAMPLE + ["--model", "TMP/missing_keys"], r"config\.json' is not a Wan transformer's \(KeyError"),
    ("sample", SAMPLE + ["--checkpoint", "TMP"], r"--checkpoint '.*' is a folder without \.safetensors weights"),
    ("sample", SAMPLE + ["--checkpoint", "TMP/none.pt"], r"--checkpoint '.*none\.pt' does not exist"),
    ("sample", SAMPLE + ["--decoder", "tae"],
     r"--decoder tae needs the tiny decoder's file: download taew2_1\.pth from https://github\.com/madebyollin/taehv "
     r".* --decoder-path taew2_1\.pth"),
    ("sample", SAMPLE + ["--decoder-path", "TMP/junk.pth"],
     r"--decoder-path '.*junk\.pth' is the tiny decoder's file: add --decoder tae"),
    ("sample", SAMPLE + ["--decoder", "tae", "--decoder-path", "TMP/none.pth"],
     r"tiny decoder '.*none\.pth' does not exist: download taew2_1\.pth"),
    ("sample", SAMPLE + ["--decoder", "tae", "--decoder-path", "TMP/junk.pth"],
     r"tiny decoder '.*junk\.pth' is not a readable checkpoint"),
    ("sample", SAMPLE + ["--decoder", "tae", "--decoder-path", "TMP/wrong.pth"],
     r"tiny decoder '.*wrong\.pth' does not have TAEW2\.1's decoder layout"),
    ("sample", SAMPLE + ["--decoder", "tae", "--decoder-path", "TMP/junk.pth", "--vae-dtype", "bf16"],
     r"--vae-dtype bf16 sets how the Wan VAE decodes, .* drop --vae-dtype bf16"),
    ("sample", SAMPLE + ["--decoder", "tae", "--decoder-path", "TMP/junk.pth", "--compile-vae"],
     r"--compile-vae sets how the Wan VAE decodes"),
    ("sample", SAMPLE + ["--fp8"], r"--fp8 needs a CUDA GPU with compute capability >= 8\.9 .*not device 'cpu'"),
    ("sample", SAMPLE + ["--cache", "longlive", "--max-frames", "21"],
     r"--cache longlive keeps the released model's window of 12 latent frames: drop --max-frames 21"),
    ("sample", SAMPLE + ["--cache", "reward-forcing", "--chunk", "1"],
     r"--cache reward-forcing is a released model's, which generates blocks of 3 latent frames: drop --chunk 1"),
    ("sample", SAMPLE + ["--cache", "self-forcing"], r"argument --cache: invalid choice: 'self-forcing'"),
    ("sample", SAMPLE + ["--steps", "3"], r"argument --steps: invalid choice: 3"),
    ("sample", SAMPLE + ["--lora-alpha", "8"], r"--lora-alpha 8\.0 scales a --lora: give --lora FILE too"),
    ("sample", SAMPLE + ["--lora", "TMP/none.pt"], r"--lora '.*none\.pt' does not exist"),
    ("sample", SAMPLE + ["--lora", "TMP/none.pt", "--lora-alpha", "0"], r"argument --lora-alpha: 0 is not"),
    ("sample", ["--toy", "--tiny", "--prompt", "a red ball moves left"],
     r"--toy and --tiny are two different small models: give one of them"),
    # distill_dmd.py
    ("distill_dmd", DMD + ["--lr", "inf"], r"argument --lr: inf is not a learning rate in \(0, 1\)"),
    ("distill_dmd", DMD + ["--lr", "0"], r"argument --lr: 0 is not a learning rate"),
    ("distill_dmd", DMD + ["--lr", "1e39"], r"argument --lr: 1e39 is not a learning rate"),  # AdamW's update overflowed
    ("distill_dmd", DMD + ["--critic-lr", "-1e-4"], r"argument --critic-lr"),
    ("distill_dmd", DMD + ["--ema-decay", "nan"], r"argument --ema-decay: nan is not in \[0, 1\)"),
    ("distill_dmd", DMD + ["--ema-decay", "1"], r"argument --ema-decay: 1 is not in \[0, 1\)"),
    ("distill_dmd", DMD + ["--guidance", "-2"], r"argument --guidance: -2 is not a finite number >= 0"),
    ("distill_dmd", DMD + ["--grad-clip", "nan"], r"argument --grad-clip"),
    ("distill_dmd", DMD + ["--max-steps", "0"], r"argument --max-steps: 0 is not a positive integer"),
    ("distill_dmd", DMD + ["--critic-steps", "-1"], r"argument --critic-steps"),
    ("distill_dmd", DMD + ["--height", "0"], r"argument --height: 0 is not a positive integer"),
    ("distill_dmd", DMD + ["--sample-every", "-1"], r"argument --sample-every: -1 is not an integer >= 0"),
    ("distill_dmd", DMD + ["--seed", str(2**40)], r"argument --seed"),
    ("distill_dmd", DMD + ["--prompts", "TMP/not_utf8.txt"], r"--prompts '.*' is not UTF-8 text"),
    ("distill_dmd", DMD + ["--prompts", "TMP/none.txt"], r"--prompts '.*none\.txt' does not exist"),
    ("distill_dmd", DMD + ["--out", "TMP/a_file"], r"--out '.*a_file' is a file, not a folder"),
    ("distill_dmd", DMD + ["--out", "UNWRITABLE"], r"--out '.*' cannot be written"),
    ("distill_dmd", DMD + ["--init", "TMP/none.pt"], r"--init checkpoint '.*none\.pt' does not exist"),
    ("distill_dmd", DMD + ["--teacher", "TMP/broken_json"], r"transformer config '.*' is not valid JSON"),
    ("distill_dmd", DMD + ["--teacher", "TMP/none"], r"--teacher '.*none' is neither a diffusers-format folder"),
    ("distill_dmd", DMD + ["--resume"], r"nothing to resume: '.*ckpt\.pt' does not exist"),
    # train_ode.py
    ("train_ode", ODE_GEN + ["--trajectories", "0"], r"argument --trajectories: 0 is not a positive integer"),
    ("train_ode", ODE_GEN + ["--trajectories", "-3"], r"argument --trajectories"),
    ("train_ode", ODE_GEN + ["--guidance", "inf"], r"argument --guidance"),
    ("train_ode", ODE_GEN + ["--teacher-steps", "0"], r"argument --teacher-steps"),
    ("train_ode", ODE_GEN + ["--teacher", "TMP/none"], r"--teacher '.*none' is neither a diffusers-format folder"),
    ("train_ode", ODE_GEN + ["--teacher", "TMP/runs/x/ckpt.pt"],
     r"^error: --teacher '.*runs/x/ckpt\.pt' does not exist$"),
    ("train_ode", ODE_GEN + ["--teacher", "runs_that_are_not_here/ckpt.pt"],  # an owner/name, as a hub id is
     r"^error: --teacher 'runs_that_are_not_here/ckpt\.pt' does not exist$"),
    ("distill_dmd", DMD + ["--model", "TMP/none.safetensors"], r"^error: model '.*none\.safetensors' does not exist$"),
    ("train_ode", ODE_GEN + ["--prompts", "TMP/not_utf8.txt"], r"--prompts '.*' is not UTF-8 text"),
    ("train_ode", ODE_GEN + ["--store", "TMP/a_file"], r"--store '.*a_file' is a file, not a folder"),
    ("train_ode", ODE_GEN + ["--model", "TMP/missing_keys"], r"is not a Wan transformer's"),
    ("train_ode", ODE_TRAIN, r"store index '.*index\.json' is not valid JSON .*run `train_ode.py generate` again"),
    ("train_ode", ODE_TRAIN + ["--store", "TMP/store_keys"], r"store index '.*' lacks \['source', 'shard_size'"),
    ("train_ode", ODE_TRAIN + ["--lr", "nan"], r"argument --lr"),
    ("train_ode", ODE_TRAIN + ["--ema-decay", "-0.1"], r"argument --ema-decay"),
    ("train_ode", ODE_TRAIN + ["--max-steps", "-5"], r"argument --max-steps"),
    ("train_ode", ODE_TRAIN + ["--out", "TMP/a_file"], r"--out '.*a_file' is a file"),
    ("train_ode", ["verify", "--store", "TMP/store"], r"store index '.*' is not valid JSON"),
    ("train_ode", ["verify", "--store", "TMP/none"], r"'.*none' is not a trajectory store"),
    # train_reward.py
    ("train_reward", REWARD + ["--dmd-weight", "nan"], r"argument --dmd-weight: nan is not a finite number >= 0"),
    ("train_reward", REWARD + ["--dmd-weight", "-1"], r"argument --dmd-weight"),
    ("train_reward", REWARD + ["--lr", "1e999"], r"argument --lr: 1e999 is not a learning rate"),
    ("train_reward", REWARD + ["--grad-clip=-inf"], r"argument --grad-clip: -inf is not a finite number > 0"),
    ("train_reward", REWARD + ["--critic-lr", "0"], r"argument --critic-lr"),
    ("train_reward", REWARD + ["--critic-steps", "0"], r"argument --critic-steps"),
    ("train_reward", REWARD + ["--init", "TMP/none.pt"], r"--init checkpoint '.*none\.pt' does not exist"),
    ("train_reward", REWARD + ["--reward-path", "TMP"],
     r"ImageReward weights not found at .* \(no ImageReward\.pt \+ med_config\.json\)"),
    ("train_reward", REWARD + ["--reward-path", "TMP/reward"], r"med_config\.json' is not valid JSON"),
    ("train_reward", REWARD + ["--out", "TMP/a_file"], r"--out '.*a_file' is a file"),
    ("train_reward", REWARD + ["--prompts", "TMP/not_utf8.txt"], r"--prompts '.*' is not UTF-8 text"),
    # vbench_tools.py
    ("vbench_tools", ["score", "TMP/results"], r"VBench result file '.*a_eval_results\.json' is not valid JSON"),
    ("vbench_tools", ["score", "TMP/results_shape"], r"is not \{dimension: \[score, per_video\]\}"),
    ("vbench_tools", ["score", "TMP/results", "--json", "TMP/none/s.json"], r"--json '.*' cannot be written"),
    ("vbench_tools", ["jobs", "--prompt-list", "TMP/list_broken.json", "--videos", "TMP/v", "--jobs-dir", "TMP/j"],
     r"--prompt-list '.*' is not valid JSON"),
    ("vbench_tools", ["jobs", "--prompt-list", "TMP/list_entries.json", "--videos", "TMP/v", "--jobs-dir", "TMP/j"],
     r"is not a list of \{'prompt_en': \.\.\.\} entries"),
    ("vbench_tools", ["jobs", "--prompt-list", "TMP/list.json", "--videos", "TMP/v", "--jobs-dir", "TMP/j",
                      "--shards", "0"], r"argument --shards: 0 is not a positive number"),
    ("vbench_tools", ["jobs", "--prompt-list", "TMP/list.json", "--videos", "TMP/v", "--jobs-dir", "TMP/a_file"],
     r"--jobs-dir '.*a_file' cannot be created"),
    ("vbench_tools", ["jobs", "--prompt-list", "TMP/list.json", "--videos", "TMP/v", "--jobs-dir", "TMP/j",
                      "--extended-prompts", "TMP/not_utf8.txt"], r"--extended-prompts '.*' is not UTF-8 text"),
    ("vbench_tools", ["verify", "--prompt-list", "TMP/list.json", "--videos", "TMP/none"],
     r"--videos '.*none' is not a folder"),
    ("vbench_tools", ["verify", "--prompt-list", "TMP/list.json", "--videos", "TMP/v", "--limit", "-1"],
     r"argument --limit"),
]


@pytest.mark.parametrize("script,argv,message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_before_any_model_loads(script, argv, message, files, no_model_loads, capsys):
    code = cli(SCRIPTS[script], expand(argv, files))
    assert_one_line_error(code, capsys.readouterr().err, message)


MAIN_CASES = [  # each script's own `__main__` block (its try/except and exit code)
    (["sample.py"] + SAMPLE + ["--out", "TMP/fox.avi"], r"ends in '\.avi'"),
    (["distill_dmd.py"] + DMD + ["--lr", "inf"], r"argument --lr"),
    (["train_ode.py"] + ODE_TRAIN, r"store index '.*' is not valid JSON"),
    (["train_reward.py"] + REWARD + ["--init", "TMP/none.pt"], r"--init checkpoint '.*' does not exist"),
    (["vbench_tools.py", "score", "TMP/results"], r"is not valid JSON"),
]


@pytest.mark.parametrize("argv,message", MAIN_CASES, ids=[c[0][0] for c in MAIN_CASES])
def test_scripts_main_exits_2_with_one_line(argv, message, files, no_model_loads, capsys, monkeypatch):
    """`python script.py ...` run in this process (runpy): what its __main__ block prints and exits with."""
    argv = expand(argv, files)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    assert_one_line_error(e.value.code, capsys.readouterr().err, message)


def test_a_real_process_exits_2_with_one_line(files):
    """The same across a real process boundary: stderr is exactly one line, the exit code 2."""
    r = subprocess.run([sys.executable, "sample.py"] + expand(SAMPLE + ["--fps", "0"], files), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: argument --fps: 0 is not a positive integer (see --help)"]


@pytest.mark.parametrize("script,argv,flag", [
    ("distill_dmd", DMD + ["--teacher", "someone/no-such-wan"], "--teacher"),
    ("train_reward", REWARD + ["--dmd-weight", "1", "--teacher", "someone/no-such-wan"], "--teacher"),
    ("train_ode", ODE_GEN[:3] + ["--teacher", "someone/no-such-wan"] + ODE_GEN[5:], "--teacher"),
    ("train_ode", ODE_TRAIN[:2] + ["someone/no-such-wan"] + ODE_TRAIN[3:], "--model"),
])
def test_a_hub_id_that_cannot_be_fetched_names_its_flag(script, argv, flag, files, no_model_loads, capsys,
                                                         monkeypatch):
    """No hub (snapshot_download fails as it does offline): one line naming the flag to pass the downloaded
    folder to, before any model loads. Before issue 32 the hub id passed the checks and the error came from
    the first load, without the flag (here: a model loads first, and the test fails on that)."""
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection, nothing in the cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code = cli(SCRIPTS[script], expand(argv, files))
    assert_one_line_error(code, capsys.readouterr().err,
                          rf"^error: could not get 'someone/no-such-wan' for {flag} \(LocalEntryNotFoundError\); "
                          rf"download it with `hf download someone/no-such-wan --local-dir DIR` and pass {flag} DIR$")


def test_torchrun_bad_flag_is_said_once(tmp_path):
    """torchrun --nproc_per_node 2 with a bad flag: the error line once (rank 0); rank 1 says nothing, stopped by
    torchrun, which reports the failed rank; nothing hangs. Before issue 32 each rank printed it (2 lines)."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train_reward.py", "--lr", "0", "--out", str(tmp_path / "run")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "(rank 1)" not in out
    assert [line for line in out.splitlines() if "error: " in line] == [
        "error: argument --lr: 0 is not a learning rate in (0, 1) (see --help)"], out[-3000:]


def eval_vbench(tmp_path, *argv):
    """eval_vbench.sh with VBench's venv pointed at a folder that must stay absent, and an interpreter
    that fails: any attempt to build the venv shows."""
    env = dict(ENV, VBENCH_VENV=str(tmp_path / "venv"), VBENCH_PYTHON="false")
    r = subprocess.run(["bash", "eval_vbench.sh", *expand(argv, {"TMP": tmp_path})], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert not (tmp_path / "venv").exists()
    return r


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "TMP/none.pt", "--out", "TMP/eval"], r"--checkpoint '.*none\.pt' does not exist"),
    (["--checkpoint", "TMP", "--out", "TMP/eval"], r"--checkpoint '.*' does not exist or is not a file"),
    (["--out", "TMP/eval", "--checkpoint"], r"--checkpoint needs a value"),
    (["--checkpoint", "TMP/ckpt.pt", "--out", "TMP/a_file"], r"--out '.*a_file' cannot be written"),
    (["--checkpoint", "TMP/ckpt.pt", "--out", "TMP/eval", "--extended-prompts", "TMP/none.txt"],
     r"--extended-prompts '.*' does not exist"),
    (["--checkpoint", "TMP/ckpt.pt", "--out", "TMP/eval", "--gpus", "0"], r"--gpus must be a positive integer"),
    (["--dry-run", "--out", "TMP/eval", "--prompt-list", "TMP/none.json"], r"--prompt-list '.*' does not exist"),
    (["--checkpoint", "TMP/ckpt.pt", "--out", "TMP/eval", "--bogus"], r"unknown argument --bogus"),
])
def test_eval_vbench_checks_inputs_before_building_vbench(tmp_path, argv, message):
    (tmp_path / "ckpt.pt").write_bytes(b"checkpoint")
    (tmp_path / "a_file").write_text("in the way")
    r = eval_vbench(tmp_path, *argv)
    assert_one_line_error(r.returncode, r.stderr, message)
    assert r.stdout == ""


def test_resume_at_or_past_max_steps_is_an_error(tmp_path):
    """--resume of a checkpoint that already reached --max-steps used to exit 0 having done nothing."""
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), {"step": 5, "script": "train_ode.py", "stage": None})
    args = train_ode.parse_args(["train", "--model", "x/y", "--store", "s", "--out", str(tmp_path), "--resume",
                                 "--max-steps", "5"])
    with pytest.raises(common.UserError, match=r"is at step 5 already: pass a --max-steps above 5"):
        common.load_resume(str(tmp_path / "ckpt.pt"), args, "train_ode.py")
    args.max_steps = 6
    assert common.load_resume(str(tmp_path / "ckpt.pt"), args, "train_ode.py")["step"] == 5


class Reached(Exception):
    pass


def test_good_input_passes_the_checks(files, monkeypatch):
    """The checks do not refuse what is right: a valid sample.py command (an upper-case .MP4 name in
    a folder still to be made) gets as far as loading the model."""
    def load_generator(*args):
        raise Reached
    monkeypatch.setattr(sample, "load_generator", load_generator)
    with pytest.raises(Reached):
        sample.main(sample.parse_args(expand(SAMPLE + ["--out", "TMP/ok/fox.MP4"], files)))
    assert os.path.isdir(files["TMP"] / "ok") and os.listdir(files["TMP"] / "ok") == []
