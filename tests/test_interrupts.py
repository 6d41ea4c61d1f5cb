"""Ctrl-C and SIGTERM: sample.py and demo.py stop with one line, no traceback, the shell's exit status
(130 for SIGINT, 143 for SIGTERM), and leave no half-written file under a final name, no temporary folder.

Each test runs the script in a process of its own, in a new session, and sends the signal to its whole
process group, as a terminal's Ctrl-C does (imageio starts ffmpeg in a process group of its own, so the
signal reaches sample.py alone either way)."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import imageio
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(script, log, *args, env=None):
    """`python SCRIPT ARGS` in a new session (its own process group), stdout and stderr into `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_for(process, condition, log, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited early ({process.returncode}): {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"condition never held: {log.read_text()[-3000:]}"
        time.sleep(0.02)


def stop(process, signum, condition, log):
    """Once condition() holds, send `signum` to the process group; (exit status, the log's lines)."""
    try:
        wait_for(process, condition, log)
        os.killpg(process.pid, signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # the progress bar's carriage returns: only the text after the last one is on screen
    return process.returncode, [line.rsplit("\r", 1)[-1] for line in log.read_text().splitlines()]


def frame_count(path):
    with imageio.get_reader(str(path)) as r:
        return r.count_frames()


def test_sample_jobs_stopped_by_ctrl_c_remove_the_partial_video(tiny_wan, tmp_path):
    """`sample.py --jobs` with 3 videos, Ctrl-C while the second is generated (its first block is in
    the file written aside): exit 130, one line naming the frame, the video and how many were written;
    the first video stays whole, the second's partial file is removed, the third never started.
    Before the fix: a KeyboardInterrupt traceback."""
    jobs = tmp_path / "jobs.tsv"
    jobs.write_text("".join(f"a red fox\t{i}\t{tmp_path / name}\n" for i, name in enumerate(["a.mp4", "b.mp4",
                                                                                            "c.mp4"])))
    log = tmp_path / "log"
    p = start("sample.py", log, "--tiny", "--model", tiny_wan, "--jobs", jobs, "--frames", 161)
    rc, lines = stop(p, signal.SIGINT, lambda: (tmp_path / "a.mp4").exists() and (tmp_path / "b.mp4.part.mp4").exists(),
                     log)
    assert rc == 130 and not any("Traceback" in line for line in lines), lines
    m = re.fullmatch(r"interrupted \(Ctrl-C\) at frame (\d+) of 161 in (\S+) \(video 2 of 3\): its partial file was "
                     r"removed; 1 of 3 videos written", lines[-1])
    assert m and m.group(2) == str(tmp_path / "b.mp4") and 9 <= int(m.group(1)) < 161, lines[-3:]
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "jobs.tsv", "log"]
    assert frame_count(tmp_path / "a.mp4") == 161


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sample_stream_stopped_keeps_the_frames_written(tiny_wan, tmp_path, signum):
    """`sample.py --stream` (a fragmented mp4, written in place), stopped after its first block is in
    the file: exit 128 + the signal, one line; the file keeps the frames written, decodes, and the line
    says how many. Before the fix: a traceback, and the file removed."""
    out, log = tmp_path / "long.mp4", tmp_path / "log"
    p = start("sample.py", log, "--tiny", "--model", tiny_wan, "--prompt", "a red fox", "--frames", 961, "--stream",
              "--out", out)
    rc, lines = stop(p, signum, lambda: out.exists() and os.path.getsize(out) > 4000, log)
    assert rc == 128 + signum and not any("Traceback" in line for line in lines), lines
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    m = re.fullmatch(rf"interrupted \({name}\) at frame (\d+) of 961 in {re.escape(str(out))} \(video 1 of 1\): "
                     rf"it keeps its first (\d+) frames and plays; 0 of 1 videos written", lines[-1])
    assert m, lines[-3:]
    assert 9 <= int(m.group(2)) <= int(m.group(1)) < 961
    assert frame_count(out) == int(m.group(2))
    assert sorted(os.listdir(tmp_path)) == ["log", "long.mp4"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("signum,when", [(signal.SIGINT, "loading"), (signal.SIGINT, "generating"),
                                         (signal.SIGTERM, "idle")])
def test_demo_stopped_shuts_down_cleanly(tiny_wan, tmp_path, signum, when):
    """`python demo.py --tiny`, stopped by Ctrl-C while its models load or while a viewer's video is
    generated, or by SIGTERM while idle: exit 128 + the signal, one line, no traceback, the temporary
    folder of its videos removed. Before the fix: a KeyboardInterrupt traceback (loading); exit 0 and
    no line (generating: uvicorn.run swallowed the KeyboardInterrupt); exit 143 and no line (idle)."""
    from websockets.sync.client import connect
    port, log, tmp = free_port(), tmp_path / "log", tmp_path / "tmp"
    tmp.mkdir()
    p = start("demo.py", log, "--tiny", "--model", tiny_wan, "--port", port, env={**os.environ, "TMPDIR": str(tmp)})

    def listening():
        if "serving on" not in log.read_text():
            return False
        with contextlib.suppress(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
            return True  # uvicorn listens once its event loop runs
        return False

    if when == "loading":
        rc, lines = stop(p, signum, lambda: "loading 1/3" in log.read_text(), log)
    elif when == "idle":
        rc, lines = stop(p, signum, listening, log)
    else:
        try:
            wait_for(p, listening, log)
            with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=30) as ws:
                assert json.loads(ws.recv(timeout=30))["type"] == "hello"
                ws.send(json.dumps({"type": "start", "prompt": "a red fox", "seed": 0}))
                while not isinstance(ws.recv(timeout=60), bytes):  # up to the first frame
                    pass
                rc, lines = stop(p, signum, lambda: True, log)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert rc == 128 + signum and not any("Traceback" in line for line in lines), lines
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    said = ("before the server started" if when == "loading" else
            rf"while serving: the server stopped and its videos \({re.escape(str(tmp))}/reward_forcing_demo_\w+\) "
            rf"were deleted")
    assert re.fullmatch(rf"interrupted \({name}\) {said}", lines[-1]), lines
    assert not [d for d in os.listdir(tmp) if d.startswith("reward_forcing_demo_")]
