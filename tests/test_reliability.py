"""What a run leaves on disk can be trusted (issue 13), on the tiny models (CPU):

- sample videos at steps that are not save steps, with and without --resume, 1 process and
  torchrun x2 (the EMA used to stay unsharded after the sample rollout: crash one step later);
- an mp4 that does not decode to all its frames (ffmpeg failed, disk full) is removed, never
  reported written, in sample.py and in the trainers' sample videos;
- a checkpoint is written only if every tensor is finite; the divergence stop looks at the weights
  and the EMA after the update, and names the checkpoint that really stays;
- one run per folder (a lock a killed run does not leave behind); stale temporary files go;
- --resume refuses another script's or stage's checkpoint; a torn last log line is dropped;
- `train_ode.py generate` remakes a corrupt shard instead of exiting 0 with it.

Each test says in its docstring how it fails with the bug planted (for most, the code before
issue 13, run with this test file: all of them fail there).
"""
import json
import os
import signal
import subprocess
import sys

import imageio
import pytest
import torch

import causal_wan as cw
import common
import distill_dmd as dmd
import sample
import train_ode
import train_reward as tr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def store(tiny_wan, tmp_path_factory):
    """2 trajectories in 2 shards from a random tiny 4-step teacher (distill_dmd.py's checkpoint format)."""
    folder = tmp_path_factory.mktemp("ode")
    torch.manual_seed(1)
    sd = cw.CausalWan(cw.WanConfig.tiny()).state_dict()
    common.save_checkpoint(str(folder / "teacher.pt"),
                           {"model": sd, "ema": sd, "step": 0, "args": {"generator": "bidirectional"}})
    (folder / "prompts.txt").write_text("a red fox\na boat on a lake\n")
    flags = ["generate", "--tiny", "--model", tiny_wan, "--teacher", str(folder / "teacher.pt"), "--prompts",
             str(folder / "prompts.txt"), "--store", str(folder / "store"), "--trajectories", "2", "--shard-size", "1"]
    train_ode.main(train_ode.parse_args(flags))
    return str(folder / "store"), flags


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory):
    return tr.make_tiny_image_reward(str(tmp_path_factory.mktemp("imagereward")))


def trainer(name, tiny_wan, store, tiny_reward):
    """(module, flags) of a tiny run of one of the three training scripts (add --out, --max-steps, ...)."""
    if name == "distill_dmd":
        return dmd, ["--tiny", "--model", tiny_wan, "--critic-steps", "1", "--global-batch", "1"]
    if name == "train_ode":
        return train_ode, ["train", "--tiny", "--model", tiny_wan, "--store", store[0]]
    return tr, ["--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer", tiny_reward[1],
                "--global-batch", "1"]


def run(module, *argv):
    module.main(module.parse_args([str(a) for a in argv]))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_shard(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.get_tensor("latents").clone(), f.metadata()  # a copy: the test truncates the file


def frames_in(path):
    with imageio.get_reader(path, format="FFMPEG") as r:
        return sum(1 for _ in r)


# -----------------------------------------------------------------------------
# 1. sample videos between checkpoints


@pytest.mark.parametrize("name", ["distill_dmd", "train_ode", "train_reward"])
def test_sample_steps_that_are_not_save_steps(name, tiny_wan, store, tiny_reward, tmp_path):
    """A sample at step 1 (no save), then step 2; resumed, a sample at step 3 (no save), then step 4.
    Planted: shard_model without reshard_after_forward for frozen networks (the code before issue
    13): every run dies at step 2 in ema_update, 'got mixed torch.Tensor and DTensor'."""
    module, flags = trainer(name, tiny_wan, store, tiny_reward)
    out = tmp_path / "run"
    run(module, *flags, "--out", out, "--max-steps", 2, "--sample-every", 1, "--save-every", 2)
    run(module, *flags, "--out", out, "--max-steps", 4, "--sample-every", 3, "--save-every", 2, "--resume")
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    assert sorted(f for f in os.listdir(out) if f.endswith(".mp4")) == ["sample_1.mp4", "sample_2.mp4", "sample_3.mp4"]
    assert frames_in(out / "sample_3.mp4") == 21


def test_sample_steps_that_are_not_save_steps_torchrun(tiny_wan, tmp_path):
    """A sample at step 1 (no save), then step 2, under torchrun --nproc_per_node 2 (FSDP over gloo,
    each rank holds half of the EMA), and only rank 0 takes the folder's lock (two ranks locking
    would fail each other); the resumed half is the single-process test's. Planted: the old
    shard_model (dies at step 2); own_folder locking and raising on every rank (fails with 'in use
    by another run')."""
    out = tmp_path / "run"
    flags = ["distill_dmd.py", "--tiny", "--model", tiny_wan, "--critic-steps", "1", "--global-batch", "2",
             "--out", str(out), "--max-steps", "2", "--sample-every", "1", "--save-every", "2"]
    r = subprocess.run(TORCHRUN + flags, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert sorted(f for f in os.listdir(out) if f.endswith(".mp4")) == ["sample_1.mp4", "sample_2.mp4"]


# -----------------------------------------------------------------------------
# 2. an mp4 is reported written only if it decodes to all its frames


class BrokenCloseWriter:
    """imageio's writer, but on close the file loses its second half: what a full disk or a killed
    ffmpeg leaves behind, while imageio (which never reads ffmpeg's exit status) says nothing."""

    def __init__(self, path, real):
        self.path, self.real = path, real

    def append_data(self, frame):
        self.real.append_data(frame)

    def close(self):
        self.real.close()
        size = os.path.getsize(self.path)
        with open(self.path, "r+b") as f:
            f.truncate(size // 2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DyingWriter(BrokenCloseWriter):
    """ffmpeg dies after the first frames: imageio raises when it writes into the broken pipe."""

    def append_data(self, frame):
        raise OSError("[Errno 32] Broken pipe\n\nFFMPEG COMMAND:\nffmpeg ...")


@pytest.mark.parametrize("writer,stream", [(BrokenCloseWriter, False), (BrokenCloseWriter, True), (DyingWriter, False)])
def test_sample_mp4_that_does_not_decode_is_removed(tiny_wan, tmp_path, monkeypatch, writer, stream):
    """Planted: the code before issue 13 (no check after close): it printed 'wrote', renamed the
    truncated file into place (with --stream: left it), and for the dying ffmpeg left fox.mp4.part.mp4
    behind with a traceback."""
    real = imageio.get_writer
    monkeypatch.setattr(imageio, "get_writer", lambda path, **kw: writer(path, real(path, **kw)))
    out = tmp_path / "fox.mp4"
    args = (["--tiny", "--model", tiny_wan, "--prompt", "a red fox", "--frames", "9", "--out", str(out)]
            + (["--stream"] if stream else []))
    with pytest.raises(common.UserError, match=r"could not write '.*fox\.mp4': .*the partial file was removed") as e:
        sample.main(sample.parse_args(args))
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # neither fox.mp4 nor fox.mp4.part.mp4


def test_failing_ffmpeg_process(tiny_wan, tmp_path):
    """A real ffmpeg process that exits 1 without writing the file (IMAGEIO_FFMPEG_EXE points imageio
    at it): sample.py exits 2 with one line. Planted: no check after close (a FileNotFoundError
    traceback from the rename)."""
    import imageio_ffmpeg
    fake = tmp_path / "ffmpeg"
    fake.write_text(f'#!/bin/sh\ncase "$*" in *-version*) exec "{imageio_ffmpeg.get_ffmpeg_exe()}" "$@";; esac\n'
                    'cat >/dev/null\nexit 1\n')
    fake.chmod(0o755)
    out = tmp_path / "videos" / "fox.mp4"
    r = subprocess.run([sys.executable, "sample.py", "--tiny", "--model", tiny_wan, "--prompt", "a red fox",
                        "--frames", "5", "--out", str(out)], cwd=ROOT, env=dict(ENV, IMAGEIO_FFMPEG_EXE=str(fake)),
                       capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    assert errors[0].startswith(f"error: could not write '{out}'") and os.listdir(out.parent) == []


def test_trainer_sample_video_is_checked(tmp_path, monkeypatch):
    """common.save_video (the trainers' sample_<step>.mp4) takes the same check. Planted: save_video
    writing straight to its path (the old code): the truncated file stays and no error is raised."""
    real = imageio.mimwrite

    def truncating_mimwrite(path, frames, **kw):
        real(path, frames, **kw)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    pixels = torch.rand(3, 9, 32, 32) * 2 - 1
    common.save_video(str(tmp_path / "ok.mp4"), pixels)
    assert frames_in(tmp_path / "ok.mp4") == 9
    monkeypatch.setattr(imageio, "mimwrite", truncating_mimwrite)
    with pytest.raises(common.UserError, match=r"could not write '.*sample_3\.mp4'"):
        common.save_video(str(tmp_path / "sample_3.mp4"), pixels)
    assert sorted(os.listdir(tmp_path)) == ["ok.mp4"]


# -----------------------------------------------------------------------------
# 3. finite-only checkpoints, and a divergence stop that checks the weights


def test_checkpoint_with_a_nan_is_not_written(tmp_path):
    """Planted: save_checkpoint without the finiteness check: the NaN optimizer state replaces the good file."""
    path = str(tmp_path / "ckpt.pt")
    good = {"model": {"w": torch.ones(3)}, "step": 1}
    common.save_checkpoint(path, good)
    bad = {"model": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, float("nan")])}}},
           "step": 2}
    with pytest.raises(common.UserError,
                       match=r"not saving .*ckpt\.pt: 1 tensors hold NaN or inf \(optimizer/state/0/exp_avg\); "
                             r"the last good checkpoint, step 1, stays in"):
        common.save_checkpoint(path, bad)
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.parametrize("name", ["distill_dmd", "train_ode", "train_reward"])
def test_infinite_weights_after_a_finite_loss_stop_the_run(name, tiny_wan, store, tiny_reward, tmp_path, monkeypatch):
    """A weight that the update of step 1 made infinite (planted right after the optimizer step,
    where an overflowing update puts it) while the loss of step 1 was finite. Planted in the code:
    no weight check after the update (the code before issue 13): each script saved ckpt.pt with an
    inf generator and an inf EMA at step 1 and exited 0."""
    real = common.ema_update

    def overflowed_update(ema, model, decay):
        with torch.no_grad():
            next(model.parameters()).to_local().view(-1)[0] = float("inf")
        real(ema, model, decay)
    monkeypatch.setattr(common, "ema_update", overflowed_update)
    module, flags = trainer(name, tiny_wan, store, tiny_reward)
    out = tmp_path / "run"
    with pytest.raises(common.UserError,
                       match=r"training diverged at step 1 \(1 NaN/inf weights in the (generator|student), "
                             r"1 NaN/inf weights in the EMA\): stopped without saving; "
                             r"no checkpoint has been written yet"):
        run(module, *flags, "--out", out, "--max-steps", 1, "--save-every", 1, "--sample-every", 0)
    assert not (out / "ckpt.pt").exists()


def test_nan_ema_stops_and_the_message_names_the_kept_checkpoint(tiny_wan, tmp_path, monkeypatch):
    """A NaN that reaches only the EMA (here planted into its update at step 2). On the old code a
    NaN EMA was saved at step 2 and the run exited 0; with the EMA left out of the weight check,
    save_checkpoint refuses it instead (another message, and the stop comes one check later)."""
    real, calls = common.ema_update, []

    def poisoned_ema_update(ema, model, decay):
        real(ema, model, decay)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(ema.parameters()).to_local().fill_(float("nan"))
    monkeypatch.setattr(common, "ema_update", poisoned_ema_update)
    out = tmp_path / "run"
    with pytest.raises(common.UserError,
                       match=r"diverged at step 2 \(\d+ NaN/inf weights in the EMA\): stopped without saving; "
                             r"the last good checkpoint, step 1, stays in .*ckpt\.pt"):
        run(dmd, "--tiny", "--model", tiny_wan, "--critic-steps", 1, "--global-batch", 1, "--out", out,
            "--max-steps", 3, "--save-every", 1, "--sample-every", 0)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1 and common.nonfinite_tensors(ckpt) == []


# -----------------------------------------------------------------------------
# 4-7. the run folder: one run at a time, no stale files, the right checkpoint, a torn log line


def test_one_run_per_folder_and_stale_files_go(tiny_wan, tmp_path):
    """Another process holding OUT/.lock refuses the run before anything loads; once that process
    is killed (-9) the lock is gone; the run then removes what a crashed run left (ckpt.pt.tmp*,
    sample_*.mp4.part.mp4) and nothing else. Planted: own_folder without the flock (the second run
    went ahead), and without the cleanup (the 40 GB-sized tmp files stayed)."""
    out = tmp_path / "run"
    out.mkdir()
    stale = ["ckpt.pt.tmp4242", "sample_20.mp4.part.mp4"]
    for name in stale + ["notes.txt"]:
        (out / name).write_text("left behind")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); "
                               "print('locked', flush=True); time.sleep(600)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        flags = ["--tiny", "--model", tiny_wan, "--critic-steps", 1, "--global-batch", 1, "--out", out,
                 "--max-steps", 1, "--sample-every", 0]
        with pytest.raises(common.UserError,
                           match=r"--out '.*run' is in use by another run \(pid 4242, lock .*\.lock\): wait for it"):
            run(dmd, *flags)
        assert sorted(os.listdir(out)) == sorted(stale + ["notes.txt", ".lock"])  # the other run's files are untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run(dmd, *flags)
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "log.jsonl", "notes.txt"]


def test_two_runs_never_share_a_folder(tiny_wan, tmp_path):
    """A run of our own code holds OUT (common._lock_folder, as own_folder takes it): a second run is refused.
    Planted: the lock taken shared (LOCK_SH): both runs get it, this test fails; the test above does not see
    it (its holder takes LOCK_EX, which a LOCK_SH request still meets)."""
    out = tmp_path / "run"
    held = common._lock_folder(str(out), "--out")
    try:
        with pytest.raises(common.UserError, match=rf"--out '.*run' is in use by another run \(pid {os.getpid()},"):
            run(dmd, "--tiny", "--model", tiny_wan, "--critic-steps", 1, "--global-batch", 1, "--out", out,
                "--max-steps", 1, "--sample-every", 0)
    finally:
        held.close()
    assert sorted(os.listdir(out)) == [".lock"]


def test_a_failed_run_takes_back_what_it_created(tiny_wan, tmp_path):
    """A run that fails before its first checkpoint removes the folder it made (with its .lock and empty
    log.jsonl), and in a folder that was there only what it added and left empty; a failed --resume keeps the
    run it failed to continue. Before issue 32: .lock (and log.jsonl) stayed in a new folder."""
    flags = ["--tiny", "--model", tiny_wan, "--critic-steps", 1, "--global-batch", 1, "--max-steps", 2,
             "--sample-every", 0]
    (tmp_path / "empty.txt").write_text("")
    new = tmp_path / "new"
    with pytest.raises(common.UserError, match="nothing to resume"):  # before the log is opened
        run(dmd, *flags, "--out", new, "--resume")
    with pytest.raises(common.UserError, match="has no prompts"):  # after
        run(dmd, *flags, "--out", new, "--prompts", tmp_path / "empty.txt")
    assert not new.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("")
    with pytest.raises(common.UserError, match="has no prompts"):
        run(dmd, *flags, "--out", mine, "--prompts", tmp_path / "empty.txt")
    assert os.listdir(mine) == ["notes.txt"]
    run(dmd, *flags, "--out", mine, "--max-steps", 1)
    with pytest.raises(common.UserError, match="has no prompts"):
        run(dmd, *flags, "--out", mine, "--resume", "--prompts", tmp_path / "empty.txt")
    assert sorted(os.listdir(mine)) == [".lock", "ckpt.pt", "log.jsonl", "notes.txt"]
    assert [r["step"] for r in read_log(mine)] == [1]


def test_resume_refuses_another_scripts_checkpoint(tiny_wan, store, tiny_reward, tmp_path):
    """A distill_dmd.py checkpoint resumed by train_reward.py or train_ode.py, and a train_reward.py
    one by distill_dmd.py. Planted: load_resume without the script check (the code before): the
    reward stage resumed it with a wrong message, the ODE stage ran on, distill_dmd.py died with a
    KeyError (the issue's report; this test stops at the first)."""
    out = tmp_path / "run"
    run(dmd, "--tiny", "--model", tiny_wan, "--critic-steps", 1, "--global-batch", 1, "--out", out, "--max-steps", 1,
        "--sample-every", 0)
    for name in ("train_reward", "train_ode"):
        module, flags = trainer(name, tiny_wan, store, tiny_reward)
        with pytest.raises(common.UserError,
                           match=rf"'.*ckpt\.pt' was written by distill_dmd\.py, not {name}\.py: resume it with "
                                 r"distill_dmd\.py, or start a new --out from it with --init"):
            run(module, *flags, "--out", out, "--max-steps", 2, "--resume")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt.update(script="train_reward.py", stage="without --dmd-weight", args={})
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(common.UserError, match=r"was written by train_reward\.py, not distill_dmd\.py"):
        run(dmd, "--tiny", "--model", tiny_wan, "--out", out, "--max-steps", 2, "--resume")


def test_resume_refuses_another_stage(tmp_path):
    """The stage: distill_dmd.py's --generator, train_reward.py's --dmd-weight. Planted: the stage
    check removed from load_resume (the bidirectional checkpoint is handed to the causal run)."""
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"step": 3, "script": "distill_dmd.py", "stage": "with --generator bidirectional"})
    args = dmd.parse_args(["--model", "a/b", "--out", str(tmp_path), "--resume", "--max-steps", "9"])
    with pytest.raises(common.UserError,
                       match=r"was trained with --generator bidirectional: resume it with the same flags "
                             r"\(this run: with --generator causal\)"):
        common.load_resume(path, args, "distill_dmd.py", "with --generator causal")
    assert common.load_resume(path, args, "distill_dmd.py", "with --generator bidirectional")["step"] == 3


def test_torn_last_log_line_is_dropped_on_resume(tmp_path, capsys):
    """Planted: open_log parsing every line (the old code): the torn line raised JSONDecodeError."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    common.open_log(str(log), 3, resume=True)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.startswith(f"warning: dropped the torn last line of {log}") and len(err.splitlines()) == 1
    common.open_log(str(log), 2, resume=True)  # lines after the checkpoint's step go, as before
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    log.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')  # damage in the middle is not a torn line: say where
    with pytest.raises(common.UserError, match=r"line 2 of .*log\.jsonl is not a log record: delete that line"):
        common.open_log(str(log), 2, resume=True)


# -----------------------------------------------------------------------------
# 10. generate does not exit 0 with a corrupt shard


def test_generate_remakes_a_corrupt_shard(store, tmp_path, capsys):
    """Planted: generate skipping every existing shard (the old code): the truncated shard stayed and
    generate exited 0; with the final verification kept but the remake removed, generate exits 2."""
    import shutil
    copy = str(tmp_path / "store")
    shutil.copytree(store[0], copy)
    shard = train_ode.shard_path(copy, 1)
    original = read_shard(shard)
    with open(shard, "r+b") as f:
        f.truncate(100)
    flags = list(store[1])
    flags[flags.index("--store") + 1] = copy
    train_ode.main(train_ode.parse_args(flags))
    assert torch.equal(original[0], read_shard(shard)[0]) and original[1] == read_shard(shard)[1]
    assert "is unreadable or does not match index.json: generating it again" in capsys.readouterr().err
    report = train_ode.verify_store(copy)
    assert report["present"] == 2 and report["bad"] == report["missing"] == []
