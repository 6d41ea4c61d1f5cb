"""A training run that is stopped from outside leaves what it says it leaves (issue 32), on the tiny
models (CPU), for distill_dmd.py, train_ode.py and train_reward.py:

- a checkpoint, log line or sample video that does not fit (a full disk, `ulimit -f`) ends the run
  with one line naming the folder and the room needed, exit code 2; the temporary file goes, the last
  good checkpoint stays as it was, and --resume from it equals a run that was never stopped;
- Ctrl-C or SIGTERM, during a step or while the checkpoint is written, is a clean stop: one line with
  the step reached and the checkpoint that stays, exit code 130 / 143, no temporary file, the lock free,
  and --resume continues exactly;
- under torchrun, a rank killed with `kill -9`: --resume continues bit for bit;
- a finished run ends with one line naming its checkpoint, its step and its last loss.

The scripts' `__main__` blocks run in this process (runpy) where an exit code is checked, and the
signals are sent by the process to itself at a chosen moment, so each case takes seconds; one test
sends Ctrl-C to a real process group, one runs torchrun. Each docstring says how the test fails on
the code before issue 32.
"""
import contextlib
import fcntl
import os
import re
import resource
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_reliability import ENV, ROOT, TORCHRUN, run, store, tiny_reward, trainer  # noqa: F401 (fixtures)

import common
import train_ode

TRAINERS = ["distill_dmd", "train_ode", "train_reward"]
QUIET = ["--sample-every", "0", "--save-every", "1"]


class Killed(Exception):
    """SIGTERM with no handler of the script's: a real process would have died on the spot (exit code -15)."""


def died(signum, frame):
    raise Killed


def main_block(name, *argv):
    """`python NAME.py ARGV` in this process: its __main__ block (runpy), its exit code, stderr via capsys.
    What the block leaves uncaught fails the test: a KeyboardInterrupt (a traceback), a SIGTERM it installs
    no handler for (Killed); pytest's own SIGTERM handler is put back afterwards."""
    handler = signal.signal(signal.SIGTERM, died)
    old_argv = sys.argv
    sys.argv = [f"{name}.py"] + [str(a) for a in argv]
    try:
        runpy.run_path(os.path.join(ROOT, f"{name}.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    except (KeyboardInterrupt, Killed) as e:
        pytest.fail(f"{name}.py left {type(e).__name__} uncaught")
    finally:
        sys.argv = old_argv
        signal.signal(signal.SIGTERM, handler)
    return 0


def one_line(stderr, pattern):
    """The one line that matches `pattern` (re.search), checked to be the only `error:` or `interrupted` line and
    without a traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("error: ", "interrupted "))]
    assert len(lines) == 1 and re.search(pattern, lines[0]), stderr[-3000:]
    return lines[0]


@contextlib.contextmanager
def file_size_limit(nbytes):
    """`ulimit -f` for this process (and what it starts, ffmpeg): a write past nbytes fails with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def assert_same_checkpoint(a, b):
    """Every tensor of two checkpoints equal, bit for bit (their 'args' differ: --out, --resume, --max-steps)."""
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    assert a.keys() == b.keys() and a["step"] == b["step"]

    def same(x, y, name):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), name
            for k in x:
                same(x[k], y[k], f"{name}/{k}")
        elif isinstance(x, (list, tuple)):  # AdamW's betas: a tuple, a list once resumed
            assert len(x) == len(y), name
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{name}/{i}")
        elif torch.is_tensor(x):
            assert torch.equal(x, y), name
        else:
            assert x == y, name
    for key in a.keys() - {"args"}:
        same(a[key], b[key], key)


def lock_is_free(out):
    with open(os.path.join(out, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if a run still held it
    return True


# -----------------------------------------------------------------------------
# 1. a full disk or a file-size limit


@pytest.mark.parametrize("name", TRAINERS)
def test_checkpoint_that_does_not_fit(name, tiny_wan, store, tiny_reward, tmp_path, capsys):  # noqa: F811
    """2 steps; --resume under a file-size limit of half the checkpoint: the save of step 3 fails. Before
    issue 32: a RuntimeError traceback from torch's zip writer ('unexpected pos'), ckpt.pt.tmp<pid> left."""
    module, flags = trainer(name, tiny_wan, store, tiny_reward)
    flags += QUIET
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    run(module, *flags, "--out", stopped, "--max-steps", 2)
    good = (stopped / "ckpt.pt").read_bytes()
    capsys.readouterr()
    with file_size_limit(len(good) // 2):
        code = main_block(name, *flags, "--out", stopped, "--max-steps", 4, "--resume")
    assert code == 2
    one_line(capsys.readouterr().err,
             rf"^error: could not write {re.escape(str(stopped / 'ckpt.pt'))} \(.*\): it needs [\d.]+ MB in "
             rf"'{re.escape(str(stopped))}', which has [\d.]+ [MG]B free and a file-size limit \(ulimit -f\) of "
             r"[\d.]+ MB: free space \(or raise the limit\); the last good checkpoint, step 2, stays in .*ckpt\.pt: "
             r"--resume continues it$")
    assert (stopped / "ckpt.pt").read_bytes() == good
    assert sorted(os.listdir(stopped)) == [".lock", "ckpt.pt", "log.jsonl"]  # no ckpt.pt.tmp<pid>
    run(module, *flags, "--out", stopped, "--max-steps", 4, "--resume")
    run(module, *flags, "--out", whole, "--max-steps", 4)
    assert_same_checkpoint(stopped / "ckpt.pt", whole / "ckpt.pt")


def test_log_line_and_sample_video_that_do_not_fit(tiny_wan, store, tmp_path, capsys):  # noqa: F811
    """The sample video (ffmpeg, killed by SIGXFSZ) and the log line (EFBIG) under a file-size limit: one line
    each, exit code 2, no partial file. Before issue 32 the log's OSError was a traceback (the video was
    already one line: common.save_video)."""
    module, flags = trainer("train_ode", tiny_wan, store, None)
    with file_size_limit(2000):  # the log's first line fits, a 21-frame mp4 does not
        code = main_block("train_ode", *flags, "--out", tmp_path / "video", "--max-steps", 1, "--sample-every", 1)
    assert code == 2
    one_line(capsys.readouterr().err, r"^error: could not write '.*sample_1\.mp4': .*the partial file was removed")
    assert sorted(os.listdir(tmp_path / "video")) == [".lock", "log.jsonl"]
    with file_size_limit(50):  # not even one line of the log
        code = main_block("train_ode", *flags, "--out", tmp_path / "log", "--max-steps", 1, "--sample-every", 0)
    assert code == 2
    one_line(capsys.readouterr().err,
             r"^error: could not append step 1 to .*log\.jsonl \(File too large\): '.*log' has [\d.]+ [MG]B free and "
             r"a file-size limit \(ulimit -f\) of 0\.00 MB: free space \(or raise the limit\), then --resume$")


# -----------------------------------------------------------------------------
# 2. Ctrl-C and SIGTERM


@pytest.mark.parametrize("name,signum,moment", [("distill_dmd", signal.SIGINT, "save"),
                                                ("train_ode", signal.SIGTERM, "save"),
                                                ("train_reward", signal.SIGTERM, "step"),
                                                ("train_ode", signal.SIGINT, "step")])
def test_interrupt_is_a_clean_stop(name, signum, moment, tiny_wan, store, tiny_reward, tmp_path, capsys,  # noqa: F811
                                   monkeypatch):
    """The signal arrives while the checkpoint of step 2 is written (save: the temp file is complete, not yet
    renamed) or in step 3 (step: at its EMA update); checkpoints every step. Before issue 32: a KeyboardInterrupt
    traceback, ckpt.pt.tmp<pid> left by the interrupted save; SIGTERM killed the process (exit -15) without a word."""
    module, flags = trainer(name, tiny_wan, store, tiny_reward)
    flags += QUIET
    out, whole = tmp_path / "run", tmp_path / "whole"
    if moment == "save":
        real = torch.save

        def save_then_signal(obj, f, *args, **kwargs):
            real(obj, f, *args, **kwargs)
            if isinstance(obj, dict) and obj.get("step") == 2:
                os.kill(os.getpid(), signum)  # Python runs the handler here, before save_checkpoint's rename
        monkeypatch.setattr(torch, "save", save_then_signal)
        kept = 1
    else:
        real, calls = common.ema_update, []

        def signal_at_third_update(*args):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signum)
            real(*args)
        monkeypatch.setattr(common, "ema_update", signal_at_third_update)
        kept = 2
    code = main_block(name, *flags, "--out", out, "--max-steps", 9)
    monkeypatch.undo()
    assert code == 128 + signum
    what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    one_line(capsys.readouterr().err,
             rf"^interrupted \({what}\) after step 2 of 9: the last good checkpoint, step {kept}, stays in "
             rf"{re.escape(str(out / 'ckpt.pt'))}: --resume continues it$")
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "log.jsonl"] and lock_is_free(out)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == kept
    run(module, *flags, "--out", out, "--max-steps", 3, "--resume")
    run(module, *flags, "--out", whole, "--max-steps", 3)
    assert_same_checkpoint(out / "ckpt.pt", whole / "ckpt.pt")


def test_ctrl_c_to_a_real_process_group(tiny_wan, store, tmp_path):  # noqa: F811
    """Ctrl-C as a terminal sends it (SIGINT to the process group) once the first checkpoint exists. Before
    issue 32: exit code 1 and a KeyboardInterrupt traceback."""
    out = tmp_path / "run"
    _, flags = trainer("train_ode", tiny_wan, store, None)
    p = subprocess.Popen([sys.executable, "train_ode.py", *flags, *QUIET, "--out", str(out), "--max-steps", "100000"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, stderr[-3000:]
    line = one_line(stderr, r"^interrupted \(Ctrl-C\) after step (\d+) of 100000: the last good checkpoint, step "
                            r"(\d+), stays in .*ckpt\.pt: --resume continues it$")
    done, kept = map(int, re.search(r"after step (\d+) .* step (\d+),", line).groups())
    assert kept == torch.load(out / "ckpt.pt", weights_only=True)["step"] and kept in (done - 1, done)
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt", "log.jsonl"] and lock_is_free(out)


# -----------------------------------------------------------------------------
# 3. torchrun with one rank killed


def worker_pids(launcher_pid):
    """{RANK: pid} of torchrun's workers: the processes whose parent is torchrun."""
    workers = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == launcher_pid:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
                workers[int(env[b"RANK"])] = int(pid)
    return workers


def test_resume_after_a_rank_is_killed_under_torchrun(tiny_wan, tiny_reward, tmp_path):  # noqa: F811
    """train_reward.py under torchrun --nproc_per_node 2 (gloo, FSDP): once a checkpoint exists, rank 0 (the
    one that writes it and holds the lock) is killed with -9; torchrun reports the failure; --resume under
    torchrun continues, and every tensor equals an uninterrupted 2-process run's. Before issue 32 this held
    already (atomic save, flock, stale temp files removed); the test keeps it so."""
    flags = ["train_reward.py", "--tiny", "--model", tiny_wan, "--reward-path", tiny_reward[0], "--reward-tokenizer",
             tiny_reward[1], "--global-batch", "2", *QUIET]
    out, whole = tmp_path / "killed", tmp_path / "whole"
    launcher = subprocess.Popen(TORCHRUN + flags + ["--out", str(out), "--max-steps", "100000"], cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "ckpt.pt").exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(worker_pids(launcher.pid)[0], signal.SIGKILL)
        output = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and "Signal 9 (SIGKILL)" in output, output[-3000:]
    steps = torch.load(out / "ckpt.pt", weights_only=True)["step"] + 1
    for folder, more in ((out, ["--resume"]), (whole, [])):
        r = subprocess.run(TORCHRUN + flags + ["--out", str(folder), "--max-steps", str(steps), *more], cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert_same_checkpoint(out / "ckpt.pt", whole / "ckpt.pt")


# -----------------------------------------------------------------------------
# 5. the last line of a run


@pytest.mark.parametrize("name", TRAINERS)
def test_a_finished_run_says_what_it_saved(name, tiny_wan, store, tiny_reward, tmp_path, capsys):  # noqa: F811
    """Before issue 32 nothing followed the progress bar."""
    module, flags = trainer(name, tiny_wan, store, tiny_reward)
    run(module, *flags, *QUIET, "--out", tmp_path, "--max-steps", 2)
    last = capsys.readouterr().out.splitlines()[-1]
    values = {"distill_dmd": r"loss \S+, critic_loss \S+", "train_ode": r"loss \S+",
              "train_reward": r"reward \S+, loss \S+"}[name]
    assert re.fullmatch(rf"saved {re.escape(str(tmp_path / 'ckpt.pt'))} at step 2 \(last {values}\)", last), last


def test_generate_says_what_it_wrote(store, tmp_path, capsys):  # noqa: F811
    """train_ode.py generate ends with the store's report (it did before issue 32 too)."""
    flags = list(store[1])
    flags[flags.index("--store") + 1] = str(tmp_path / "store")
    train_ode.main(train_ode.parse_args(flags))
    assert re.match(rf"store {re.escape(str(tmp_path / 'store'))}: 2 of 2 trajectories in 2 of 2 shards",
                    capsys.readouterr().out.splitlines()[-1])
