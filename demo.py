"""
Live demo: a web page that shows the video while it is generated, block by block.

    python demo.py                                     # the 1.3B Wan on a GPU; open http://127.0.0.1:7860
    python demo.py --checkpoint runs/reward/ckpt.pt    # a generator trained here (EMA weights)
    python demo.py --compile --overlap-decode          # sample.py's speed flags
    python demo.py --decoder tae --decoder-path taew2_1.pth --fp8 --offload  # and its speed kit (sample.load_models)
    python demo.py --host 0.0.0.0 --port 8000          # open to other machines: anyone who can reach it uses the GPU
    python demo.py --toy                               # CPU, the toy world's trained models: "a red ball moves right"
    python demo.py --tiny                              # CPU, random tiny Wan: the video is noise, the pipeline is real
    python demo.py --checkpoint longlive_base.pt --lora lora.pt --cache longlive   # a released model (sample.CACHES)

The page
--------
Type a prompt, press Start: each block's frames are sent as soon as they are decoded, and the page
plays them at the video's 16 fps (a queue absorbs the bursts of a block). Type another prompt and
press Switch while it plays: from the next block boundary on, the video follows it, with re-cache
(as `sample.py --switch`), and the page says at which frame it took effect when that frame is
shown. The page shows the frames shown so far, the generation FPS (after the first block: frames
per second of the blocks since; before: frames / seconds since Start), the latency from Start to
the first frame shown, the frame of the last switch, and a status line. Generation is paced to
playback: a generator faster than 16 fps waits while it is more than two blocks ahead of the page's
clock, so a switch is seen within about two blocks of being pressed however long the video runs
(`--no-pace` generates as fast as it can: the page's queue then grows, and so does the delay).

The video
---------
The video is the one `sample.py --prompt P --seed S --frames N --switch F Q ...` writes (tested),
N being --max-seconds as 4k+1 frames (961 for 60 s) and F the frames the switches took effect at:
a long video (attention sink + a window of --max-frames latent frames: flat time per block) whose
blocks' noise is drawn from the seed and the block's position, so memory stays flat however long
it runs. It ends at Stop or --max-seconds; Download then gets the mp4 the server wrote while
generating (sample.py's fragmented-mp4 writer).

Models and the device
---------------------
The models load once at start-up (the text encoder stays resident to encode each new prompt, at
Start and Switch: ~11 GB for UMT5-XXL in bf16; with --offload it stays in CPU memory and is on the
device only while it encodes, so a Switch briefly holds it there beside the generator). One
generation runs at a time on the device, in a worker thread (the server stays responsive): a
viewer who presses Start while another generates is told it is busy; a viewer who closes the page
stops its generation and frees the device.

The page (demo.html, plain JavaScript, nothing fetched from the internet) talks to the server over
one WebSocket per viewer, /ws: its messages are listed at the Viewer class.
"""
import argparse
import asyncio
import io
import ipaddress
import json
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass

import torch

import causal_wan as cw
import common
import sample
import speedkit

FPS = 16  # Wan's frame rate: the page plays at it, the mp4 is written at it
MAX_PROMPT_CHARS = 2000  # UMT5 reads 512 tokens; longer text is refused, not cut silently
JPEG_QUALITY = 90
KEEP_VIDEOS = 10  # finished mp4s kept for download; older ones are deleted
HTML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.html")


def parse_args(argv=None):
    p = common.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (other than loopback: anyone who can reach it uses the GPU)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="a video ends after this many seconds (16 fps) unless stopped")
    p.add_argument("--chunk", type=int, choices=[1, 3],
                   help="latent frames per block: 3 chunk-wise (default), 1 frame-wise (--toy's default)")
    sample.add_model_flags(p)  # the generator, decoder and speed flags of sample.py
    p.add_argument("--no-pace", action="store_true",
                   help="generate as fast as possible instead of at most two blocks ahead of playback")
    args = sample.model_defaults(p.parse_args(argv))
    args.chunk = args.chunk or 3
    return args


def check_args(args):
    """Everything that can be checked before the models load (a minute for the real ones)."""
    common.check_video_size(args, frames=False)
    sample.check_window(args)
    if not args.max_seconds > 0 or not math.isfinite(args.max_seconds):
        raise common.UserError(f"--max-seconds {args.max_seconds} must be a positive number of seconds")
    if not 1 <= args.port <= 65535:
        raise common.UserError(f"--port {args.port} is not a TCP port (1-65535)")
    common.check_device(args.device)  # the checks sample.py makes too
    sample.check_weights(args)  # --checkpoint, --lora
    sample.check_speed_kit(args)  # --decoder, --decoder-path, --fp8 (the tiny decoder's file: loaded first)
    try:  # the port must be free now, not after the models have loaded
        family, _, _, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(address)
    except OSError as e:
        raise common.UserError(f"cannot listen on --host {args.host} --port {args.port} ({e.strerror or e}): "
                               f"choose another --port"
                               + (" or --host" if isinstance(e, socket.gaierror) else "")) from None


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def video_frames(max_seconds):
    """Frames of a --max-seconds video: the first 4k+1 (the VAE's frame counts) that last that long."""
    return 4 * math.ceil(max_seconds * FPS / 4) + 1


@dataclass
class Models:
    model: torch.nn.Module  # the causal generator
    tokenizer: object
    encoder: torch.nn.Module  # UMT5: kept, every Start and Switch encodes a new prompt
    decode: object  # decode(z, first) for sample.FrameStream: the Wan VAE's or the tiny decoder's
    device: torch.device
    dtype: torch.dtype

    def encode(self, prompt):
        """A prompt -> text context [1, 512, text_dim]: the one place the text encoder runs (in the
        generation thread, for the first prompt and every switch). With --offload its weights live
        in CPU memory and are on the device only while it encodes."""
        with speedkit.on_device(self.encoder, self.device):  # a no-op unless --offload
            return cw.encode_prompts(self.tokenizer, self.encoder, [prompt])


def load_models(args):
    """The generator, text encoder and decoder, with sample.py's loaders and speed flags; one line
    per component. --decoder tae loads the tiny decoder first (small: a wrong file is said at once).
    --offload: the text encoder and the decoder load into CPU memory (Models.encode and
    sample.load_decoder put them on the device while they run); the generator stays on the device."""
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    home = torch.device("cpu") if args.offload else device  # where the text encoder and decoder live
    t0, step = time.perf_counter(), iter(range(1, 4))
    say = lambda what: print(f"loading {next(step)}/3: {what}", file=sys.stderr, flush=True)  # noqa: E731
    tae = None
    if args.decoder == "tae":
        path = args.decoder_path or speedkit.tiny_decoder_path()
        say(f"the tiny decoder from {path}")
        tae = speedkit.load_tiny_decoder(path, home, dtype)
    say(f"the generator from {args.model}" + "".join(f" + {f}" for f in (args.checkpoint, args.lora) if f))
    model = sample.load_generator(args, device, dtype)
    if args.fp8:
        speedkit.quantize_fp8(model)  # on the GPU, before torch.compile
    say("the text encoder" + (" (in CPU memory: --offload)" if args.offload else ""))
    tokenizer, encoder = cw.load_text_encoder(args.model, dtype=dtype, device=home)
    if tae is None:
        say("the VAE" + (" (in CPU memory: --offload)" if args.offload else ""))
    decode, _ = sample.load_decoder(args, device, tae)
    if args.compile:
        speedkit.compile_blocks(model, args.compile)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    print(f"models loaded in {time.perf_counter() - t0:.1f} s on {device} ({args.dtype})"
          + ("; the first video pays the compilation" if args.compile or args.compile_vae else ""),
          file=sys.stderr, flush=True)
    return Models(model, tokenizer, encoder, decode, device, dtype)


def jpeg(frame):
    """uint8 frame [H, W, 3] -> JPEG bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class Session:
    """One video on the device, generated in a worker thread: the adapter between a viewer and
    sample.FrameStream. start() / stop() / switch() are called from the server's event loop; emit(item)
    gets every message for the viewer (JPEG bytes or a dict), from the worker thread; release()
    frees the device lock. Each block's frames are written to the mp4, sent as JPEGs (after a
    'switched' message if the block is the first under a new prompt), then a stats message; after
    the last one (Stop, --max-seconds, an error) the mp4 is closed, the device released, and
    'stopped' sent, in that order: a viewer told 'stopped' can start at once."""

    def __init__(self, models, args, prompt, seed, video_path, emit, release):
        self.models, self.args, self.prompt, self.seed = models, args, prompt, seed
        self.video_path, self.emit, self.release = video_path, emit, release
        self.stopping, self.finished = threading.Event(), threading.Event()
        self.reason = "done"
        self.frames = self.blocks = self.switches = 0  # sent so far
        self.paused_s = 0.0  # time spent waiting for playback (not generation time)
        # the stream exists once the worker has encoded the first prompt; until then a stop or
        # switch is kept here, under the lock, and handed to it when it exists
        self.lock, self.stream, self.pending_switches = threading.Lock(), None, []
        self.thread = threading.Thread(target=self._run, name="demo-generation", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self, reason="stop"):
        """End the video after the block being generated (its frames are still sent)."""
        with self.lock:
            if self.stopping.is_set():
                return
            self.reason = reason
            self.stopping.set()
            if self.stream is not None:
                self.stream.stop()

    def switch(self, prompt):
        """Generate `prompt` from the next block boundary on, with re-cache (sample.py --switch)."""
        with self.lock:
            if self.stream is None:
                self.pending_switches.append(prompt)
            else:
                self.stream.switch(prompt, recache=True)

    def _run(self):
        error = None
        try:
            m = self.models
            if m.device.type == "cuda" and m.device.index is not None:
                torch.cuda.set_device(m.device)  # --device cuda:1: the current device is per thread
            self.t0 = time.perf_counter()
            self.writer = sample.open_writer(self.video_path, FPS, True, 4 * self.args.chunk)
            try:
                self._generate()
            finally:  # not `with`: imageio's writer leaves the file unfinished when the block raises
                self.writer.close()
        except Exception as e:  # the viewer sees one line; the server log keeps the traceback
            self.reason, error = "error", f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        finally:
            if self.models.device.type == "cuda":
                torch.cuda.empty_cache()
            self.finished.set()
            self.release()
            self.emit({"type": "stopped", "reason": self.reason, "frames": self.frames, "error": error})

    @torch.no_grad()
    def _generate(self):
        """The video as `sample.py --prompt P --seed S --frames N --switch ...` makes it (N: --max-seconds
        as 4k+1 frames; each block's noise drawn from the seed and the block's position, so memory
        stays flat however long the video), switched where the viewer asked, ended by stop()."""
        m, a = self.models, self.args
        stream = sample.FrameStream(m.model, m.decode, m.model.prompt_kv(m.encode(self.prompt)),
                                    encode=m.encode, height=a.height, width=a.width, seed=self.seed,
                                    frames=video_frames(a.max_seconds), chunk=a.chunk, max_frames=a.max_frames,
                                    overlap=a.overlap_decode, options=sample.stream_options(a),
                                    log=lambda line: print(f"demo: {line}", file=sys.stderr, flush=True))
        with self.lock:
            self.stream = stream
            for prompt in self.pending_switches:  # asked before the first block: it starts with the last one
                stream.switch(prompt, recache=True)
            if self.stopping.is_set():  # stopped (or the viewer left) while the prompt was encoded
                stream.stop()
        for frames in stream:
            self._send_block(frames, stream.switches_done)

    def _send_block(self, frames, switches_done):
        """uint8 frames [T, H, W, 3] of the next block, in order; switches_done: the stream's
        [(frame, prompt, recache)] so far (with --overlap-decode it may hold the next block's too)."""
        now = time.perf_counter() - self.t0
        if self.frames == 0:
            self.first_frame_s, self.first_block_frames = now, len(frames)
        for frame, prompt, _ in switches_done[self.switches:]:
            if frame >= self.frames + len(frames):  # takes effect in a later block
                break
            self.emit({"type": "switched", "frame": frame, "prompt": prompt})
            self.switches += 1
        for frame in frames:
            self.writer.append_data(frame)
            self.emit(jpeg(frame))
        self.frames += len(frames)
        # generation FPS: over the blocks after the first (steady state), else over the first
        later = now - self.first_frame_s - self.paused_s
        fps = (self.frames - self.first_block_frames) / later if later > 0 else self.frames / now
        self.emit({"type": "stats", "block": self.blocks, "block_frames": len(frames), "frames": self.frames,
                   "fps": round(fps, 2), "first_frame_s": round(self.first_frame_s, 3)})
        self.blocks += 1
        if not self.args.no_pace:
            self._pace(len(frames))

    def _pace(self, block_frames):
        """Wait (in the generation thread, so the next block starts later) while the frames sent are
        more than two blocks ahead of playback: the page plays FPS frames a second from the first
        one, so what is generated, a switch included, is shown at most ~two blocks later. Without
        it a fast GPU would run ever further ahead and a switch would show ever later."""
        played = (time.perf_counter() - self.t0 - self.first_frame_s) * FPS
        ahead = self.frames - played - 2 * block_frames
        if ahead > 0:
            t = time.perf_counter()
            self.stopping.wait(ahead / FPS)  # a stop ends the wait at once
            self.paused_s += time.perf_counter() - t


def parse_message(message):
    """A viewer's WebSocket message (at most 64 KiB: uvicorn's ws_max_size, see main) -> a valid control
    dict; ValueError(why) for anything else, a message nested too deeply for json's parser included."""
    text = message.get("text")
    if text is None:
        raise ValueError("binary messages are not understood: send JSON text")
    try:
        m = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("not JSON: send {\"type\": \"start\", \"prompt\": ..., \"seed\": ...}, "
                         "{\"type\": \"switch\", ...} or {\"type\": \"stop\"}") from None
    except RecursionError:  # json recurses once per level: thousands of nested arrays fit in the 64 KiB message limit
        raise ValueError("the message nests too deeply (arrays or objects inside one another): send a flat JSON "
                         "object, {\"type\": ...}") from None
    if not isinstance(m, dict) or m.get("type") not in ("start", "switch", "stop"):
        raise ValueError("expected a JSON object with \"type\": \"start\", \"switch\" or \"stop\"")
    if m["type"] in ("start", "switch"):
        prompt = m.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("empty prompt: give a text description of the video")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    if m["type"] == "start":
        seed = m.get("seed", 0)
        if type(seed) is not int or not 0 <= seed < 2**63:
            raise ValueError(f"seed {json.dumps(seed)[:20]} is not a whole number from 0 to 2^63-1")
    return m


class Demo:
    """What every viewer shares: the models, the lock that gives the device to one video at a time,
    and the finished videos (token -> mp4 path, newest last)."""

    def __init__(self, models, args, video_dir):
        self.models, self.args, self.video_dir = models, args, video_dir
        self.device_lock = threading.Lock()
        self.current = None  # the Session that holds the device lock
        self.videos, self.videos_lock = OrderedDict(), threading.Lock()  # published by the workers, read by the routes
        self.model_name = ("tiny random Wan (the video is noise)" if args.tiny else
                           "the toy world (toy/weights: coloured shapes, 32x32)" if args.toy else
                           os.path.basename(args.checkpoint) if args.checkpoint else args.model)

    def new_video(self):
        """A server-chosen name for the next mp4: (token, path)."""
        token = secrets.token_urlsafe(12)
        return token, os.path.join(self.video_dir, f"{token}.mp4")

    def publish(self, token, path):
        """Offer a finished mp4 for download (keep the newest KEEP_VIDEOS); its URL."""
        with self.videos_lock:
            self.videos[token] = path
            while len(self.videos) > KEEP_VIDEOS:
                _, old = self.videos.popitem(last=False)
                if os.path.exists(old):
                    os.remove(old)
        return f"/video/{token}"

    def video(self, token):
        with self.videos_lock:
            return self.videos.get(token)

    def release(self):
        """The worker's last act on the device: free it for the next video."""
        self.current = None
        self.device_lock.release()

    def shutdown(self, timeout=60):
        """Stop the video being generated, if any, and wait for its worker (torch must not be
        running in a thread when the interpreter exits)."""
        session = self.current
        if session is not None:
            session.stop("shutdown")
            session.thread.join(timeout)


class Viewer:
    """One page's WebSocket: its control messages in, its frames and stats out, at most one Session.

    The protocol, over one WebSocket per viewer, /ws:

      viewer -> server, JSON text:
        {"type": "start", "prompt": str, "seed": int}   start a video (prompt <= 2000 characters)
        {"type": "switch", "prompt": str}               change the prompt from the next block boundary on
        {"type": "stop"}                                end the video
      server -> viewer:
        binary: one JPEG per frame, in order
        {"type": "hello", "fps", "width", "height", "chunk", "max_seconds", "max_prompt_chars", "model", "busy",
         "switch"}                                                     on connecting
        {"type": "started", "prompt", "seed", "frames_max"}            the device is this viewer's
        {"type": "switched", "frame", "prompt"}                        right before the JPEG of the frame the
                                                                       switch took effect at
        {"type": "stats", "block", "block_frames", "frames", "fps", "first_frame_s"}   after each block's JPEGs
        {"type": "stopped", "reason": "stop"|"done"|"error", "frames", "download": url or null,
         "error": str or null}                                         the device is free
        {"type": "busy", "message"}, {"type": "error", "message"}      a refused or malformed message; the
                                                                       server keeps serving

    The download url is /video/<token>, a server-chosen random name; nothing a viewer sends is used
    as a file path. The finished videos live in a temporary folder (the newest 10), removed on exit.
    """

    def __init__(self, ws, demo):
        self.ws, self.demo, self.session = ws, demo, None
        self.loop = asyncio.get_running_loop()
        self.outbox = asyncio.Queue()  # everything sent goes through one task, in order

    def emit(self, item):
        """Queue a message for this viewer, from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            if self.session is not None:
                self.session.stop("disconnect")

    async def send_all(self):
        try:
            while True:
                item = await self.outbox.get()
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_text(json.dumps(item))
        except Exception:  # the connection is gone: the receive loop sees the disconnect
            pass

    async def serve(self):
        a = self.demo.args
        sender = asyncio.create_task(self.send_all())
        self.emit({"type": "hello", "fps": FPS, "width": a.width, "height": a.height, "chunk": a.chunk,
                   "max_seconds": a.max_seconds, "max_prompt_chars": MAX_PROMPT_CHARS, "model": self.demo.model_name,
                   "busy": self.demo.device_lock.locked(), "switch": True})
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    await self.on_message(parse_message(message))
                except (ValueError, common.UserError) as e:
                    self.emit({"type": "error", "message": str(e)})
        finally:  # a viewer who leaves frees the device: the worker ends at the next block
            if self.session is not None:
                self.session.stop("disconnect")
            sender.cancel()

    async def on_message(self, m):
        running = self.session is not None and not self.session.finished.is_set()
        if m["type"] == "stop":
            if not running:
                raise ValueError("nothing to stop: no video is being generated for this page")
            self.session.stop("stop")
        elif m["type"] == "switch":
            if not running:
                raise ValueError("nothing to switch: press Start first")
            self.session.switch(m["prompt"])
        elif running:
            raise ValueError("a video is already being generated for this page: press Stop first")
        elif not await self.acquire_device():
            self.emit({"type": "busy", "message": "busy: another viewer is generating a video; try again when it ends"})
        else:
            self.start(m["prompt"], m.get("seed", 0))

    async def acquire_device(self, patience_s=30):
        """The device lock (True), or False when another viewer's video holds it. A video that is
        ending (Stop, its viewer gone) frees the device within one block: wait for that."""
        deadline = time.monotonic() + patience_s
        while not self.demo.device_lock.acquire(blocking=False):
            current = self.demo.current  # None: its worker is releasing the lock right now
            if (current is not None and not current.stopping.is_set()) or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def start(self, prompt, seed):
        """With the device lock held: a new Session, whose mp4 is published when it ends."""
        token, path = self.demo.new_video()

        def emit(item):
            if isinstance(item, dict) and item["type"] == "stopped":
                item["download"] = None
                if item["frames"] and item["reason"] not in ("disconnect", "shutdown"):
                    item["download"] = self.demo.publish(token, path)
                elif os.path.exists(path):  # nobody is left to download it
                    os.remove(path)
            self.emit(item)

        a = self.demo.args
        self.session = self.demo.current = Session(self.demo.models, a, prompt, seed, path, emit, self.demo.release)
        self.emit({"type": "started", "prompt": prompt, "seed": seed, "frames_max": video_frames(a.max_seconds)})
        try:
            self.session.start()
        except RuntimeError:  # no thread could be started: give the device back
            self.demo.release()
            self.session = None
            raise ValueError("the server could not start a generation thread") from None


def create_app(demo):
    from fastapi import FastAPI, HTTPException, WebSocket
    from fastapi.responses import FileResponse, HTMLResponse
    app = FastAPI(title="Reward Forcing live demo", docs_url=None, redoc_url=None, openapi_url=None)
    with open(HTML, encoding="utf-8") as f:
        page = f.read()

    @app.get("/")
    def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/video/{token}")
    def video(token: str):
        path = demo.video(token)  # only names the server made; the token is never a path
        if path is None or not os.path.exists(path):
            raise HTTPException(404, "no such video (the server keeps the newest 10)")
        return FileResponse(path, media_type="video/mp4", filename="reward_forcing.mp4")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
        if origin is not None and origin.split("://", 1)[-1] != host:  # another site's page in this browser
            await websocket.close(code=1008)
            return
        await websocket.accept()
        await Viewer(websocket, demo).serve()

    return app


def main(args):
    video_dir = None

    def stopped():  # what a Ctrl-C or SIGTERM leaves: the one line common.run_script prints
        return ("before the server started" if video_dir is None else
                f"while serving: the server stopped and its videos ({video_dir}) were deleted")

    with common.interruptible(stopped):
        check_args(args)
        if not is_loopback(args.host):
            print(f"warning: listening on {args.host}: anyone who can reach port {args.port} can use this GPU",
                  file=sys.stderr)
        models = load_models(args)
        import uvicorn
        video_dir, demo = tempfile.mkdtemp(prefix="reward_forcing_demo_"), None
        try:
            demo = Demo(models, args, video_dir)
            app = create_app(demo)
            print(f"serving on http://{args.host}:{args.port} (Ctrl+C to quit)", file=sys.stderr, flush=True)
            # uvicorn shuts down gracefully on Ctrl-C and SIGTERM, then raises the signal again: a KeyboardInterrupt
            # here (common.Terminated for SIGTERM). Not uvicorn.run, which swallows it
            uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                          ws_max_size=64 * 1024, timeout_graceful_shutdown=5)).run()
        finally:
            if demo is not None:
                demo.shutdown()  # the video being generated, if any, is stopped
            shutil.rmtree(video_dir, ignore_errors=True)


if __name__ == "__main__":
    common.run_script(main, parse_args)  # a UserError: one line, exit 2; Ctrl-C or SIGTERM: stopped(), exit 130/143
