"""demo.py: the app through FastAPI's test client (WebSocket) on the tiny Wan (its frames, with a
switch, against sample.py's), load (several viewers, connect/disconnect cycles), bad flags, and one
end-to-end run in headless Chromium against `python demo.py --tiny`, started at this module's first
test so that its start-up runs beside the other tests."""
import contextlib
import gc
import io
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import types
import urllib.request
import weakref

import imageio
import numpy as np
import pytest
import torch

import causal_wan as cw
import common
import speedkit

fastapi = pytest.importorskip("fastapi", reason="the demo needs fastapi (pip install -r requirements.txt)")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

import demo  # noqa: E402
import sample  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # the app tests run at 16x16 (the VAE dominates the tiny model's time); the browser test at --tiny's 64x64


@pytest.fixture(scope="module")
def models(tiny_wan):
    return demo.load_models(demo.parse_args(["--tiny", "--model", tiny_wan]))


@contextlib.contextmanager
def client(models, folder, *flags):
    """The app on the shared tiny models, through FastAPI's test client; on exit, no worker runs."""
    args = demo.parse_args(["--tiny", "--height", str(SIZE), "--width", str(SIZE), *flags])
    app = demo.Demo(models, args, str(folder))
    try:
        with TestClient(demo.create_app(app)) as c:
            c.demo = app
            yield c
    finally:
        app.shutdown()


def recv(ws):
    """The next message from the server: bytes (a frame) or a dict."""
    m = ws.receive()
    if m["type"] == "websocket.close":
        raise AssertionError(f"the server closed the WebSocket ({m.get('code')})")
    return m["bytes"] if m.get("bytes") is not None else json.loads(m["text"])


def until(ws, kind):
    """Receive up to the first dict of type `kind`: (that dict, frames before it, dicts before it)."""
    frames, dicts = [], []
    while True:
        m = recv(ws)
        if isinstance(m, bytes):
            frames.append(m)
        elif m["type"] == kind:
            return m, frames, dicts
        else:
            dicts.append(m)


def connect(c, stack, **kw):
    """A viewer's WebSocket, open until `stack` (a contextlib.ExitStack) closes: (ws, hello)."""
    ws = stack.enter_context(c.websocket_connect("/ws", **kw))
    hello = recv(ws)
    assert hello["type"] == "hello"
    return ws, hello


def mp4_frames(data, path):
    path.write_bytes(data)
    with imageio.get_reader(str(path)) as r:
        return [f for f in r], r.get_meta_data()["fps"]


def decode_jpeg(data):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def wait_for(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -----------------------------------------------------------------------------
# the app, one viewer


# the tiny model's cross-attention attends to all 512 text positions, the padding's included: a short
# prompt changes its frames by a level or two, this one (480 tokens: the tiny tokenizer is per character) by up to 24
BIRD = "a blue bird flies over the sea at dawn, " * 12


@pytest.mark.parametrize("flags,switch_frame", [([], 21), (["--overlap-decode"], 33)])
def test_frames_with_a_switch_are_the_frames_sample_py_writes(models, tiny_wan, tmp_path, monkeypatch, flags,
                                                              switch_frame):
    """A 2.5 s video (41 frames: blocks of 9, 12, 12, 8) switched to a second prompt by a viewer after
    its second block streams, in order, each block followed by its stats and the switch announced
    right before the frame it took effect at, exactly the uint8 frames `sample.py --frames 41
    --seed 3 --switch FRAME P2` writes (run in-process here, its frames taken on their way to the
    mp4 writer; the demo's on their way to the JPEG encoder); each message is the JPEG of its
    frame, and the download is a 41-frame mp4 of them (within x264 loss).
    The worker is held after block 1 until the server has handed the switch to the session, so
    the switch lands on the next boundary not yet generated on any machine: frame 21, or with
    --overlap-decode frame 33 (block 2 was generated while block 1 decoded). Planted:
    Session.switch asking the stream for frame self.frames + 1 (one block late) -> frame 21
    differs; the session's seed + 1 -> frame 0 differs; frames of a block sent in reverse order ->
    frame 0 differs; 'switched' sent with the first block after the switch was applied (not the
    block it starts) -> with --overlap-decode it comes before frame 21, fails."""
    sent, switch_asked = [], threading.Event()

    class HeldSession(demo.Session):
        def switch(self, prompt):
            super().switch(prompt)
            switch_asked.set()

        def _send_block(self, frames, switches_done):
            super()._send_block(frames, switches_done)
            if self.blocks == 2:  # the viewer switches now: wait until the server has passed it on
                assert switch_asked.wait(60)

    real_jpeg = demo.jpeg
    monkeypatch.setattr(demo, "Session", HeldSession)
    monkeypatch.setattr(demo, "jpeg", lambda frame: sent.append(frame.copy()) or real_jpeg(frame))  # the frames as sent
    with client(models, tmp_path / "videos", "--max-seconds", "2.5", *flags) as c, contextlib.ExitStack() as viewer:
        ws, hello = connect(c, viewer)
        assert (hello["fps"], hello["width"], hello["height"], hello["busy"], hello["switch"]) == (
            16, SIZE, SIZE, False, True)
        ws.send_json({"type": "start", "prompt": "a red fox", "seed": 3})
        started = recv(ws)
        assert started["type"] == "started" and started["frames_max"] == 41
        blocks, jpegs, switched = [], [], []
        while True:
            m = recv(ws)
            if isinstance(m, bytes):
                jpegs.append(m)
            elif m["type"] == "stats":
                blocks.append((m["block_frames"], len(jpegs)))
                if len(blocks) == 2:
                    ws.send_json({"type": "switch", "prompt": BIRD})
            elif m["type"] == "switched":
                switched.append((m["frame"], m["prompt"], len(jpegs)))
            else:
                break
        assert m["type"] == "stopped" and m["reason"] == "done" and m["frames"] == 41, m
        assert blocks == [(9, 9), (12, 21), (12, 33), (8, 41)]  # each stats message right after its block's frames
        mp4, fps = mp4_frames(c.get(m["download"]).content, tmp_path / "download.mp4")
    # the reference: sample.py's main, as a user runs it, with the same models on disk
    written = []
    real_write_video = sample.write_video

    def recording_write_video(path, blocks, *rest, **kw):
        return real_write_video(path, (written.append(b) or b for b in blocks), *rest, **kw)

    monkeypatch.setattr(sample, "write_video", recording_write_video)
    sample.main(sample.parse_args(["--tiny", "--model", tiny_wan, "--height", str(SIZE), "--width", str(SIZE),
                                   "--prompt", "a red fox", "--seed", "3", "--frames", "41",
                                   "--switch", str(switch_frame), BIRD, "--out", str(tmp_path / "sample.mp4"), *flags]))
    reference = np.concatenate(written)
    assert reference.shape == (41, SIZE, SIZE, 3) and len(sent) == len(jpegs) == 41
    for i, (got, want) in enumerate(zip(sent, reference)):
        assert np.array_equal(got, want), (f"frame {i} is not sample.py's "
                                           f"(largest difference {np.abs(got.astype(int) - want).max()})")
    assert jpegs == [real_jpeg(f) for f in reference]  # each message is its frame's JPEG
    assert switched == [(switch_frame, BIRD, switch_frame)]  # announced right before that frame
    # JPEG on 16x16 noise: ~13
    assert np.abs(np.stack([decode_jpeg(j) for j in jpegs]).astype(int) - reference).mean() < 20
    assert (len(mp4), fps, mp4[0].shape) == (41, 16.0, (SIZE, SIZE, 3))
    assert np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(mp4, reference)]) < 20  # x264 on noise


def test_a_switch_or_stop_before_the_first_block(models, tmp_path):
    """A switch asked before the stream exists (the first prompt still being encoded) is kept and
    the video starts with it: frames equal to a video started with that prompt, announced at
    frame 0; a stop before the stream exists ends the video without a frame. Planted: the kept
    switches not handed to the stream -> the frames are the first prompt's, fails; the kept stop
    not handed on -> the video runs to its end, fails."""
    args = demo.parse_args(["--tiny", "--height", str(SIZE), "--width", str(SIZE), "--max-seconds", "1"])

    def run(prompt, before=None):
        out, lock = [], threading.Lock()
        lock.acquire()
        session = demo.Session(models, args, prompt, 4, str(tmp_path / f"{len(os.listdir(tmp_path))}.mp4"),
                               out.append, lock.release)
        if before is not None:
            before(session)
        session.start()
        session.thread.join(60)
        assert not lock.locked()  # the device was released
        return [m for m in out if isinstance(m, bytes)], [m for m in out if isinstance(m, dict)]

    switched, messages = run("a red fox", lambda s: s.switch(BIRD))
    direct, _ = run(BIRD)
    assert messages[0] == {"type": "switched", "frame": 0, "prompt": BIRD}
    assert len(switched) == 17 and switched == direct  # the same JPEGs: the same frames
    frames, messages = run("a red fox", lambda s: s.stop())
    assert frames == [] and messages == [{"type": "stopped", "reason": "stop", "frames": 0, "error": None}]


def test_stop_ends_the_video_and_the_page_can_start_again(models, tmp_path):
    """Stop after two blocks: 'stopped' (reason stop) counts exactly the JPEG frames sent, which
    decode to the video size and match the downloadable mp4 (within JPEG/x264 loss); the same
    page can start again at once. Planted: stop ignored (the video runs on to its 60 s, reason
    'done'); the mp4 writer not closed when the video ends (frames missing from the download) -> fail."""
    with client(models, tmp_path / "videos") as c, contextlib.ExitStack() as viewer:
        ws, _ = connect(c, viewer)
        ws.send_json({"type": "start", "prompt": "a red fox", "seed": 1})
        assert recv(ws)["type"] == "started"
        jpegs, stats = [], []
        while True:
            m = recv(ws)
            if isinstance(m, bytes):
                jpegs.append(m)
            elif m["type"] == "stats":
                stats.append(m)
                if len(stats) == 2:
                    ws.send_json({"type": "stop"})
            elif m["type"] == "stopped":
                break
        assert m["reason"] == "stop" and m["frames"] == len(jpegs) == stats[-1]["frames"], m
        assert 21 <= len(jpegs) < 961
        mp4, _ = mp4_frames(c.get(m["download"]).content, tmp_path / "download.mp4")
        ws.send_json({"type": "start", "prompt": "a blue bird", "seed": 2})
        assert recv(ws)["type"] == "started"  # the device was freed by the stop
        ws.send_json({"type": "stop"})
        assert until(ws, "stopped")[0]["reason"] == "stop"
    shown = [decode_jpeg(j) for j in jpegs]
    assert len(mp4) == len(shown) and shown[0].shape == (SIZE, SIZE, 3)
    diffs = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(shown, mp4)]
    assert max(diffs) < 25, diffs


@pytest.mark.parametrize("message,error", [
    ("hello", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("[" * 20000 + "]" * 20000, "nests too deeply"),
    ('{"type": "start", "prompt": ' * 20000 + '"x"' + "}" * 20000, "nests too deeply"),
    ({"type": "dance"}, "expected a JSON object"),
    ({"type": "start"}, "empty prompt"),
    ({"type": "start", "prompt": "  \n"}, "empty prompt"),
    ({"type": "start", "prompt": "x" * 2001}, "at most 2000"),
    ({"type": "start", "prompt": "fox", "seed": "7"}, "not a whole number"),
    ({"type": "start", "prompt": "fox", "seed": True}, "not a whole number"),
    ({"type": "start", "prompt": "fox", "seed": -1}, "not a whole number"),
    ({"type": "start", "prompt": "fox", "seed": 1.5}, "not a whole number"),
    ({"type": "start", "prompt": "fox", "seed": 2**63}, "not a whole number"),
    ({"type": "switch", "prompt": 5}, "empty prompt"),
    (b"\x00\x01", "binary messages"),
    ({"type": "stop"}, "nothing to stop"),
    ({"type": "switch", "prompt": "a cat"}, "nothing to switch"),
])
def test_parse_message_refuses_malformed_messages(message, error):
    """Every malformed control message is a ValueError with a reason (the app turns it into an
    'error' message; the next test checks that). Planted: no prompt length cap; bool accepted as
    a seed -> those cases fail."""
    raw = ({"bytes": message} if isinstance(message, bytes)
           else {"text": message if isinstance(message, str) else json.dumps(message)})
    if error.startswith("nothing"):  # well-formed: refused by the app, not the parser
        assert demo.parse_message(raw)["type"] == message["type"]
        return
    with pytest.raises(ValueError, match=re.escape(error)):
        demo.parse_message(raw)


def test_malformed_and_refused_messages_get_an_error_and_the_server_keeps_serving(models, tmp_path):
    """Garbage, a stop or switch with nothing running, a second start: each gets an 'error'
    message and the same WebSocket then starts a video. Nothing the viewer sends
    is a path: /video/<anything else> is 404. Planted: parse errors not caught in the receive
    loop (the handler dies, the socket closes) -> fail."""
    with client(models, tmp_path / "videos") as c, contextlib.ExitStack() as viewer:
        ws, _ = connect(c, viewer)
        for text in ("hello", "{\"type\": \"dance\"}", json.dumps({"type": "start", "prompt": "x" * 3000})):
            ws.send_text(text)
            assert recv(ws)["type"] == "error"
        ws.send_bytes(b"\x00")
        assert "binary" in recv(ws)["message"]
        for m, error in (({"type": "stop"}, "nothing to stop"),
                         ({"type": "switch", "prompt": "a cat"}, "nothing to switch")):
            ws.send_json(m)
            reply = recv(ws)
            assert reply["type"] == "error" and error in reply["message"]
        ws.send_json({"type": "start", "prompt": "a red fox", "seed": 0})
        assert recv(ws)["type"] == "started"
        ws.send_json({"type": "start", "prompt": "a red fox", "seed": 0})
        assert "already being generated" in until(ws, "error")[0]["message"]
        ws.send_json({"type": "stop"})
        stopped = until(ws, "stopped")[0]
        assert stopped["reason"] == "stop"
        for path in ("/video/..%2f..%2fetc%2fpasswd", "/video/" + os.path.basename(str(tmp_path)), "/video/x.mp4"):
            assert c.get(path).status_code == 404
        assert c.get("/").text.count('id="video"') == 1


def test_a_deeply_nested_message_gets_an_error_without_a_traceback(models, tmp_path, capfd):
    """20,000 nested arrays (40 kB, under the 64 KiB WebSocket limit) would exhaust json's recursion
    limit: the viewer gets an 'error' message, nothing is logged, and the same WebSocket then starts a
    video. Before the fix: json.loads's RecursionError was not caught, the handler died and closed the
    WebSocket (a traceback in the server's log; the test client raises it here)."""
    with client(models, tmp_path / "videos") as c, contextlib.ExitStack() as viewer:
        ws, _ = connect(c, viewer)
        ws.send_text("[" * 20000 + "]" * 20000)
        reply = recv(ws)
        assert reply["type"] == "error" and "nests too deeply" in reply["message"], reply
        assert start(ws)["type"] == "started"
        ws.send_json({"type": "stop"})
        assert until(ws, "stopped")[0]["reason"] == "stop"
    logged = capfd.readouterr()
    assert "Traceback" not in logged.err + logged.out and "RecursionError" not in logged.err + logged.out


def test_a_page_of_another_site_cannot_connect(models, tmp_path):
    """The WebSocket refuses a browser Origin other than the server's own (another site's page
    could otherwise drive the GPU of someone who runs the demo locally); the own origin is
    accepted. Planted: no origin check -> fail."""
    with client(models, tmp_path / "videos") as c, contextlib.ExitStack() as viewer:
        with pytest.raises(WebSocketDisconnect) as e:
            with c.websocket_connect("/ws", headers={"origin": "http://evil.example"}):
                pass
        assert e.value.code == 1008
        connect(c, viewer, headers={"origin": "http://testserver"})


# -----------------------------------------------------------------------------
# the app, several viewers (load)


def start(ws, prompt="a red fox", seed=0):
    ws.send_json({"type": "start", "prompt": prompt, "seed": seed})
    return recv(ws)


def test_generation_is_paced_to_playback(models, tmp_path):
    """A 3 s video (49 frames: blocks of 9, then 12): when each block's stats arrive, the frames sent
    are at most the two blocks allowed plus the block just sent (+6 frames of slack for this
    machine's timing) ahead of a 16 fps clock started at the first block. So a switch shows at
    most ~two blocks after it is generated, however long the video. On a machine where the tiny
    model at 16x16 is faster than 16 fps (about 43-46 frames ahead unpaced here) this fails with
    Session._pace never waiting; the next test checks the wait itself on a clock."""
    with client(models, tmp_path / "videos", "--max-seconds", "3") as c, contextlib.ExitStack() as viewers:
        ws, _ = connect(c, viewers)
        assert start(ws)["type"] == "started"
        lead, t_first = [], None
        while True:
            m = recv(ws)
            if isinstance(m, bytes) or m["type"] not in ("stats", "stopped"):
                continue
            if m["type"] == "stopped":
                break
            now = time.perf_counter()
            t_first = now if t_first is None else t_first
            lead.append(m["frames"] - (now - t_first) * demo.FPS)  # frames sent minus frames played
        assert len(lead) == 5 and max(lead) <= 3 * 12 + 6, lead


@pytest.mark.parametrize("sent,elapsed,expected_wait", [
    (9, 0.0, None),                 # the first block: within two blocks of the clock
    (45, 0.5, (45 - 8 - 24) / 16),  # 8 frames played, 24 allowed ahead: wait for the 13 more
    (45, 2.0, None),                # playback has caught up
])
def test_pace_waits_until_two_blocks_ahead_of_playback(monkeypatch, sent, elapsed, expected_wait):
    """Session._pace on a fake clock: after a block of 12 frames, with `sent` frames sent and
    `elapsed` seconds since the first block, it waits (sent - 16 elapsed - 2 x 12) / 16 s if that
    is positive. Planted: never waiting, or waiting for one block instead of two -> fail."""
    waits = []
    session = demo.Session.__new__(demo.Session)
    session.t0, session.first_frame_s, session.frames, session.paused_s = 100.0, 1.0, sent, 0.0
    session.stopping = types.SimpleNamespace(wait=lambda s: waits.append(s))
    monkeypatch.setattr(demo.time, "perf_counter", lambda: 101.0 + elapsed)
    session._pace(12)
    assert waits == ([] if expected_wait is None else [pytest.approx(expected_wait)])


def test_three_viewers_one_generates_two_are_told_busy_then_one_takes_over(models, tmp_path):
    """A generates; B and C (C connects meanwhile and is told in hello) are told busy; after A's
    Stop, B starts and generates, C is still busy; after B's, C gets the device.
    Planted: no device lock (every Start starts) -> fail."""
    with client(models, tmp_path / "videos") as c, contextlib.ExitStack() as viewers:
        a, _ = connect(c, viewers)
        b, _ = connect(c, viewers)
        assert start(a)["type"] == "started"
        cc, hello = connect(c, viewers)
        assert hello["busy"] is True
        for ws in (b, cc):
            assert start(ws)["type"] == "busy"
        until(a, "stats")
        a.send_json({"type": "stop"})
        assert until(a, "stopped")[0]["reason"] == "stop"
        assert start(b, seed=1)["type"] == "started"
        assert start(cc)["type"] == "busy"
        stats, frames, _ = until(b, "stats")
        assert len(frames) == stats["block_frames"] == 9
        b.send_json({"type": "stop"})
        until(b, "stopped")
        assert start(cc)["type"] == "started"
        cc.send_json({"type": "stop"})
        until(cc, "stopped")


def test_a_viewer_who_disconnects_mid_stream_frees_the_device(models, tmp_path):
    """A closes its page while its video streams: its worker ends (the thread count is back to
    where it was) and B's Start gets the device, not 'busy'.
    Planted: the session not stopped on disconnect -> B busy, the worker runs on -> fail."""
    baseline = threading.active_count()
    with client(models, tmp_path / "videos") as c:
        with c.websocket_connect("/ws") as a:
            recv(a)
            assert start(a)["type"] == "started"
            until(a, "stats")
        with c.websocket_connect("/ws") as b:
            recv(b)
            assert start(b)["type"] == "started"  # waits for A's worker to end its block, if needed
            until(b, "stats")
            b.send_json({"type": "stop"})
            until(b, "stopped")
        assert not c.demo.device_lock.locked()
    assert wait_for(lambda: threading.active_count() <= baseline), [t.name for t in threading.enumerate()]


def tensor_bytes():
    """Bytes of the distinct storages of every live tensor (gc finds each tensor object; a frame's
    numpy array keeps its tensor alive)."""
    gc.collect()
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in gc.get_objects() if issubclass(type(t), torch.Tensor)}.values())


def test_twenty_connect_disconnect_cycles_leak_no_thread_session_or_memory(models, tmp_path, monkeypatch, request):
    """Twenty viewers in turn connect, start and leave (every other one after its first block):
    every Start gets the device, afterwards no thread is left over, no Session object is alive,
    what cycles 5-19 allocated is freed (live tensor storages, which hold the frames, and Python's
    own allocations by tracemalloc, which hold the JPEGs: no frame's worth of tensors, < 128 KiB),
    and no departed viewer's video is left on disk. Planted: sessions kept in a list -> 'session
    alive' fails; every frame or every JPEG kept in a list -> the tensor or tracemalloc check
    fails; the session not stopped on disconnect -> the next Start is busy -> fail. (The process's
    resident memory was the measure before: a pytest-xdist worker's grew by up to 95 MiB here,
    from its own history; flat in a process of its own.)"""
    alive = weakref.WeakSet()

    class TrackedSession(demo.Session):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            alive.add(self)

    monkeypatch.setattr(demo, "Session", TrackedSession)
    baseline = threading.active_count()
    with client(models, tmp_path / "videos") as c:
        for cycle in range(20):
            with c.websocket_connect("/ws") as ws:
                recv(ws)
                assert start(ws, seed=cycle)["type"] == "started", f"cycle {cycle}"
                if cycle % 2 == 1:
                    until(ws, "stats")
            if cycle == 4:  # warmed up: two mid-stream disconnects and three at the start are done
                assert wait_for(lambda: not c.demo.device_lock.locked())
                tensors_after_5 = tensor_bytes()
                tracemalloc.start()  # counts what Python allocates from here on and is still alive
                request.addfinalizer(tracemalloc.stop)  # also when an assertion fails on the way
        assert wait_for(lambda: not c.demo.device_lock.locked())
        assert os.listdir(tmp_path / "videos") == []  # nobody is left to download a departed viewer's video
    assert wait_for(lambda: threading.active_count() <= baseline), [t.name for t in threading.enumerate()]
    gc.collect()
    assert len(alive) == 0, "Session objects are still referenced after their viewers left"
    kept, tensors = tracemalloc.get_traced_memory()[0], tensor_bytes() - tensors_after_5
    assert tensors < 64 * 64 * 3, f"{tensors / 1024:.0f} KiB more in live tensors than after cycle 5"  # < 1 frame
    assert kept < 128 * 1024, f"{kept / 1024:.0f} KiB that Python allocated in cycles 5-19 are still alive"


# -----------------------------------------------------------------------------
# the speed kit: --decoder tae, --offload


def devices(module):
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


def test_the_tiny_decoder_with_offload_streams_frames(tiny_wan, tmp_path, monkeypatch):
    """`demo.py --tiny --decoder tae --offload`: a 1 s video arrives (blocks of 9 and 8 frames), each
    block decoded by the tiny decoder, none by the Wan VAE. Planted: Session decoding with
    partial(cw.vae_decode, ...) whatever --decoder says -> fails."""
    decoded = []
    for module, name in ((cw, "vae_decode"), (speedkit, "tae_decode")):
        def recording(decoder, z, first=True, real=getattr(module, name), kind=name[:3]):
            decoded.append((kind, first))
            return real(decoder, z, first)
        monkeypatch.setattr(module, name, recording)  # before load_models binds them
    tae_models = demo.load_models(demo.parse_args(["--tiny", "--model", tiny_wan, "--decoder", "tae", "--offload",
                                                   "--decoder-path",
                                                   speedkit.make_tiny_decoder(str(tmp_path / "taew2_1.pth"))]))
    with client(tae_models, tmp_path / "videos", "--max-seconds", "1") as c, contextlib.ExitStack() as viewer:
        ws, _ = connect(c, viewer)
        ws.send_json({"type": "start", "prompt": "a red fox", "seed": 0})
        stopped, jpegs, dicts = until(ws, "stopped")
    assert stopped["reason"] == "done" and stopped["frames"] == len(jpegs) == 17, stopped
    assert [m["block_frames"] for m in dicts if m["type"] == "stats"] == [9, 8]
    assert decoded == [("tae", True), ("tae", False)]
    assert decode_jpeg(jpegs[0]).shape == (SIZE, SIZE, 3)


def test_offload_puts_the_text_encoder_on_the_device_only_while_it_encodes(tiny_wan, monkeypatch):
    """Models.encode, the one place the demo's text encoder runs (Start, Switch), with the encoder
    in CPU memory (--offload) and the meta device standing in for the GPU: its weights are all on
    the device while it encodes, none after. (The encoder's output is a stand-in: UMT5 does not run
    on meta tensors.) Planted: Models.encode without speedkit.on_device -> fails."""
    tokenizer, encoder = cw.load_text_encoder(tiny_wan)
    during = []

    def encode_prompts(tokenizer, encoder, prompts):
        during.append(devices(encoder))
        return torch.zeros(1, 512, encoder.config.d_model, device=encoder.device)

    monkeypatch.setattr(cw, "encode_prompts", encode_prompts)
    models = demo.Models(None, tokenizer, encoder, None, torch.device("meta"), torch.float32)
    for prompt in ("a red fox", "a blue bird"):  # Start, then a Switch
        assert models.encode(prompt).device.type == "meta"
        assert devices(encoder) == {"cpu"}
    assert during == [{"meta"}, {"meta"}]


def test_a_wrong_tiny_decoder_file_is_said_before_the_generator_loads(tmp_path, monkeypatch):
    """Planted: the tiny decoder loaded after the generator -> the generator's loader fails the test."""
    (tmp_path / "taew2_1.pth").write_bytes(b"not a checkpoint")
    for module, name in [(sample, "load_generator"), (cw, "load_text_encoder"), (cw, "load_vae")]:
        monkeypatch.setattr(module, name,
                            lambda *a, **kw: pytest.fail("a model loaded before the tiny decoder's file was checked"))
    with pytest.raises(common.UserError, match=r"tiny decoder '.*taew2_1\.pth' is not a readable checkpoint") as e:
        demo.main(demo.parse_args(["--tiny", "--decoder", "tae", "--decoder-path", str(tmp_path / "taew2_1.pth"),
                                   "--port", str(free_port())]))
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# flags


@pytest.mark.parametrize("flags,message", [
    (["--height", "30"], "--height 30 is not a positive multiple of 16"),
    (["--max-frames", "4"], "--max-frames 4 must hold at least two blocks"),
    (["--max-seconds", "0"], "--max-seconds 0.0 must be a positive number"),
    (["--max-seconds", "nan"], "--max-seconds nan must be a positive number"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--device", "cuda"], "no CUDA GPU is available here"),
    (["--checkpoint", "/no/such.pt"], "checkpoint '/no/such.pt' does not exist"),
    (["--lora", "/no/such.pt"], "--lora '/no/such.pt' does not exist"),
    (["--cache", "reward-forcing", "--max-frames", "21"], "--cache reward-forcing keeps the released model's window"),
    (["--host", "no-such-host.invalid"], "cannot listen on --host no-such-host.invalid"),
    (["--port", "BUSY"], "choose another --port"),
    (["--decoder-path", "taew2_1.pth"], "--decoder-path 'taew2_1.pth' is the tiny decoder's file: add --decoder tae"),
    (["--decoder", "tae", "--compile-vae"], "--compile-vae sets how the Wan VAE decodes"),
    (["--fp8", "--device", "cpu"], "--fp8 needs a CUDA GPU with compute capability >= 8.9"),
])
def test_bad_flags_are_one_line_errors_before_loading(tmp_path, monkeypatch, flags, message):
    """load_models is replaced by a failure: every error comes before loading. Planted: no port
    check (uvicorn would fail only after the models load) -> the BUSY case fails; no CUDA check ->
    the cuda case fails; no sample.check_speed_kit -> the --decoder-path, --compile-vae and --fp8 cases fail."""
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(demo, "load_models", lambda args: pytest.fail("models loaded before the flags were checked"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        flags = [str(busy.getsockname()[1]) if f == "BUSY" else f for f in flags]
        with pytest.raises(common.UserError, match=re.escape(message)) as e:
            demo.main(demo.parse_args(["--tiny", *flags]))
    assert "\n" not in str(e.value)


def test_non_loopback_host_says_who_can_use_the_gpu(monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_models", lambda args: (_ for _ in ()).throw(common.UserError("stop here")))
    port = free_port()
    with pytest.raises(common.UserError, match="stop here"):
        demo.main(demo.parse_args(["--tiny", "--host", "0.0.0.0", "--port", str(port)]))
    assert capsys.readouterr().err.splitlines() == [
        f"warning: listening on 0.0.0.0: anyone who can reach port {port} can use this GPU"]


def test_error_exit_is_one_line_without_traceback(monkeypatch, capsys):
    """`python demo.py --tiny --height 30`: the script's __main__ block, run in this process (runpy;
    a new interpreter would spend seconds importing torch), exits 2 with one line on stderr.
    Planted: __main__ without its UserError catch -> the error escapes as a traceback, fails."""
    monkeypatch.setattr(sys, "argv", ["demo.py", "--tiny", "--height", "30"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "demo.py"), run_name="__main__")
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --height 30 is not a positive multiple of 16 (VAE 8x and patch 2x)"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -----------------------------------------------------------------------------
# a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=900,900"]

# distinct colours on the canvas: a blank (or single-colour) canvas has 1
CANVAS_COLOURS = """
const c = document.getElementById("video");
const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
const seen = new Set();
for (let i = 0; i < d.length; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
return seen.size;
"""


def browser_missing():
    """Why the browser test cannot run here, or None."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        return "Chromium is absent: `apt-get install -y chromium chromium-driver` (.ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    return None


@pytest.fixture(scope="module", autouse=True)
def demo_server(request, tmp_path_factory):
    """`python demo.py --toy` (the shipped toy world) on a free port for the browser test, started when this
    module's first test starts, so that its start-up (a new interpreter importing torch, then the models:
    the slowest part of the browser test) runs beside the other tests. None when the browser test is
    not among the tests run or cannot run here."""
    if browser_missing() or not any("test_demo.py::test_browser" in item.nodeid for item in request.session.items):
        yield None
        return
    port, log = free_port(), tmp_path_factory.mktemp("demo_server") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "demo.py", "--toy", "--port", str(port), "--max-seconds", "30"],
                                  cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        yield server, f"http://127.0.0.1:{port}", log
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_browser_start_switch_stop_download(demo_server, tmp_path):
    """`python demo.py --toy` (trained toy models, frame-wise: blocks of 1 + 4 + 4 ... frames), driven in headless
    Chromium as a person would: type "a red ball moves right" and a seed, press Start, wait until 21 frames are
    shown and the canvas holds a picture; type "a blue pillar moves up", press Switch, wait until the page shows
    the frame the switch took effect at (the one the server logs) and 12 frames more; press Stop and download
    the mp4 the page links to (as many frames as the page says were generated): its object is red before the
    switch and blue from 8 frames after it on (toy/metrics.py's detector). Saves a screenshot after the switch
    (demo.png in the test's tmp dir; docs/demo.png is one). Planted: frames not drawn on the canvas -> 'blank'
    fails; frames counted but not played (no queue tick) -> the counter never reaches 21; 'switched' ignored by
    the page -> the switch frame never shows; the switch's prompt not applied -> the object stays red."""
    if browser_missing():
        pytest.skip(browser_missing())
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, url, log = demo_server
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                              options=options)
    try:
        def serving():
            assert server.poll() is None, f"demo.py exited: {log.read_text()[-2000:]}"
            try:
                return urllib.request.urlopen(url, timeout=2).status == 200
            except OSError:
                return False

        assert wait_for(serving, timeout=120), f"demo.py did not serve the page: {log.read_text()[-2000:]}"
        driver.get(url)
        text = lambda i: driver.find_element(By.ID, i).text  # noqa: E731
        WebDriverWait(driver, 20).until(lambda d: text("status").startswith("ready"))
        prompt, seed = driver.find_element(By.ID, "prompt"), driver.find_element(By.ID, "seed")
        prompt.clear()
        prompt.send_keys("a red ball moves right")
        seed.clear()
        seed.send_keys("5")
        driver.find_element(By.ID, "start").click()
        WebDriverWait(driver, 30).until(lambda d: int(text("frames")) >= 21)
        assert driver.execute_script(CANVAS_COLOURS) > 20, "the canvas is blank"
        assert re.fullmatch(r"\d+\.\d\d s", text("latency")) and float(text("fps")) > 0
        assert (text("status").startswith("generating (seed 5): a red ball moves right")
                and text("switched") == "–")
        prompt.clear()
        prompt.send_keys("a blue pillar moves up")
        driver.find_element(By.ID, "switch").click()
        WebDriverWait(driver, 30).until(
            lambda d: text("switched") != "–" and int(text("frames")) >= int(text("switched")) + 12)
        frame = int(text("switched"))
        assert frame >= 21 and (frame - 1) % 4 == 0, frame  # a block boundary after the frames shown before
        assert text("status") == f"generating (seed 5): a blue pillar moves up (switched at frame {frame})"
        assert f"demo: switch at frame {frame}: a blue pillar moves up" in log.read_text()
        driver.save_screenshot(str(tmp_path / "demo.png"))
        driver.find_element(By.ID, "stop").click()
        WebDriverWait(driver, 20).until(lambda d: text("status").startswith("stopped"))
        said = re.fullmatch(r"stopped: (\d+) frames \(([\d.]+) s of video\) generated in ([\d.]+) s", text("status"))
        generated = int(said.group(1))
        assert abs(float(said.group(2)) - generated / 16) <= 0.05 and float(said.group(3)) > 0  # length, time taken
        link = driver.find_element(By.ID, "download")
        assert link.is_displayed() and generated >= frame + 12
        mp4, fps = mp4_frames(urllib.request.urlopen(link.get_attribute("href"), timeout=10).read(),
                              tmp_path / "download.mp4")
        assert (len(mp4), fps, mp4[0].shape) == (generated, 16.0, (32, 32, 3))
        from toy import metrics as M
        from toy import world as W
        colour = lambda f: M.nearest(M.frame_object(f)["color"], W.COLORS) if M.frame_object(f) else None  # noqa: E731
        assert [colour(f) for f in mp4[1:frame]] == ["red"] * (frame - 1)
        assert [colour(f) for f in mp4[frame + 8:frame + 12]] == ["blue"] * 4
    finally:
        driver.quit()
