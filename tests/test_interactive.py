"""Interactive generation on the tiny Wan: the streaming API (cw.VideoStream, sample.FrameStream),
prompt switches with re-cache, continuation and image-to-video, and their CLI (--switch,
--extend, --image, a bidirectional --checkpoint) with its one-line errors.

Each test names in its docstring the bug that was planted in the code to watch it fail."""
import re
import threading

import imageio
import numpy as np
import pytest
import torch

import causal_wan as cw
import common
import sample

HW = 4  # latent height and width: 32x32 pixels, 2x2 tokens a frame


@pytest.fixture(scope="module")
def model(tiny_wan):
    return cw.from_pretrained(tiny_wan).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae(tiny_wan):
    return cw.load_vae(tiny_wan)


@pytest.fixture(scope="module")
def contexts(model):
    g = torch.Generator().manual_seed(0)
    return {p: torch.randn(1, 12, model.cfg.text_dim, generator=g) for p in ("a fox", "a bird", "a fish")}


def seeded_noise(seed):
    """Each block's noise and re-noising generator from (seed, its first latent frame) only."""
    def noise(start, n):
        g = torch.Generator().manual_seed(1000 * seed + start)
        return torch.randn(1, 16, n, HW, HW, generator=g), g
    return noise


def no_decode(z, first):
    """A stand-in decoder for tests about latents: the right number of black frames."""
    return torch.zeros(1, 3, 4 * z.shape[2] - 3 * first, 1, 1)


def stream_of(model, contexts, decode=no_decode, prompt="a fox", latent_frames=None, **kw):
    """A FrameStream of the test size that keeps its latents; latent_frames=None: endless."""
    frames = None if latent_frames is None else 4 * (latent_frames - 1) + 1
    return sample.FrameStream(model, decode, model.prompt_kv(contexts[prompt]), encode=lambda p: contexts[p],
                              height=8 * HW, width=8 * HW, frames=frames, keep_latents=True, **kw)


def latents_of(stream):
    frames = [f for f in stream]
    return torch.cat(stream.latents, 2), frames


@pytest.mark.parametrize("chunk,latent_frames,max_frames", [(3, 7, 21), (1, 5, 21), (3, 14, 10)])
def test_stream_without_switch_is_rollout(model, contexts, chunk, latent_frames, max_frames):
    """The streaming path (FrameStream over VideoStream.next_block) is the training rollout,
    exactly: chunk-wise with a short last block, frame-wise, and past the window (sink + eviction).
    Planted: a spurious re-cache at every block boundary (set_prompt on each block) -> fails past the window."""
    noise = torch.randn(1, 16, latent_frames, HW, HW, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    stream = stream_of(model, contexts, latent_frames=latent_frames, chunk=chunk, max_frames=max_frames,
                       noise=lambda start, n: (noise[:, :, start:start + n], g))
    streamed, _ = latents_of(stream)
    with torch.no_grad():
        rolled = cw.rollout(model, noise, model.prompt_kv(contexts["a fox"]), block_size=chunk, max_frames=max_frames,
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(streamed, rolled)
    assert [z.shape[2] for z in stream.latents][-1] == latent_frames - chunk * ((latent_frames - 1) // chunk)


def test_frames_before_a_switch_equal_the_single_prompt_run(model, vae, contexts):
    """Pixels and latents before the switch are the single-prompt video's; the switch happens at
    the first block boundary at or after the frame asked (15 -> 21), and is reported there.
    Planted: switches taken one block early (due when r[0] <= frame + 12) -> fails."""
    decode = lambda z, first: cw.vae_decode(vae, z, first)  # noqa: E731
    single = stream_of(model, contexts, decode, latent_frames=9, noise=seeded_noise(0))
    switched = stream_of(model, contexts, decode, latent_frames=9, noise=seeded_noise(0))
    switched.switch("a bird", frame=15)
    (z1, f1), (z2, f2) = latents_of(single), latents_of(switched)
    f1, f2 = np.concatenate(f1), np.concatenate(f2)
    assert switched.switches_done == [(21, "a bird", True)]
    assert f1.shape == f2.shape == (33, 32, 32, 3)
    assert np.array_equal(f1[:21], f2[:21]) and torch.equal(z1[:, :, :6], z2[:, :, :6])
    assert not np.array_equal(f1[21:], f2[21:]) and (z1[:, :, 6:] - z2[:, :, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk,max_frames,blocks", [(3, 21, 2), (3, 10, 4), (1, 4, 6)])
def test_switch_with_recache_equals_continuing_under_the_new_prompt(model, contexts, chunk, max_frames, blocks):
    """A switch with re-cache after `blocks` blocks gives exactly the blocks of a video that
    continues the first `blocks` blocks' latents under the new prompt (same noise): inside the
    window, and past it with the attention sink and eviction (max_frames 10: sink 3 + 4 recent
    frames, a partial block; frame-wise: sink 1 + 2 recent).
    Planted: prefill holds the sink and the frames right after it (not the most recent ones) -> fails past the
    window."""
    total = chunk * blocks + 2 * chunk
    at = sample.pixel_frame(chunk * blocks)
    switched = stream_of(model, contexts, latent_frames=total, chunk=chunk, max_frames=max_frames,
                         noise=seeded_noise(1))
    switched.switch("a bird", frame=at)
    z, _ = latents_of(switched)
    assert switched.switches_done == [(at, "a bird", True)]
    continued = stream_of(model, contexts, prompt="a bird", latent_frames=total, chunk=chunk, max_frames=max_frames,
                          noise=seeded_noise(1), prefix=z[:, :, :chunk * blocks])
    z2, _ = latents_of(continued)
    assert torch.equal(z, z2)
    assert (chunk * blocks > max_frames - chunk) == (max_frames < 21)  # the window is exceeded where meant to be


def test_recache_rebuilds_the_window_at_its_positions(model, contexts):
    """Independent reference for a re-cache past the window: a fresh cache filled, under the new
    prompt, by the clean passes of the held frames in their blocks at their own RoPE positions
    (sink 0-2; frame 8, the rest of its block evicted; block 9-11), then the few-step denoising of
    the next block at position 12. Chunk 3, window 10.
    Planted: the replay caches the held frames at positions 0, 1, 2, ... (kv_cache.pos not set) -> fails."""
    kv1, kv2 = model.prompt_kv(contexts["a fox"]), model.prompt_kv(contexts["a fish"])
    noise = seeded_noise(2)
    stream = cw.VideoStream(model, kv1, block_size=3, max_frames=10)
    with torch.no_grad():
        video = torch.cat([stream.next_block(*noise(start, 3)) for start in range(0, 12, 3)], 2)
        stream.set_prompt(kv2)
        assert stream.held_pos == [0, 1, 2, 8, 9, 10, 11]
        got = stream.next_block(*noise(12, 3))

        cache = cw.KVCache(len(model.blocks), max_frames=10, sink_frames=3, static=True)
        for first, last in [(0, 3), (8, 9), (9, 12)]:  # the runs of frames cached together
            cache.pos = first
            model(video[:, :, first:last], torch.zeros(1), kv2, kv_cache=cache, update_cache=True)
        x, g = noise(12, 3)
        for i, t in enumerate(cw.DENOISING_TIMESTEPS):
            x0 = cw.predict_x0(model, x, torch.tensor([t]), kv2, kv_cache=cache)
            if i + 1 < len(cw.DENOISING_TIMESTEPS):
                s = cw.DENOISING_TIMESTEPS[i + 1] / 1000
                x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    assert cache.pos == 12 and cache.frames == 7
    assert torch.equal(got, x0)


@pytest.mark.parametrize("chunk,max_frames,keep,total", [(3, 9, 2, 5), (1, 4, 3, 7)])
def test_continuing_a_video_gives_its_remaining_blocks(model, vae, contexts, chunk, max_frames, keep, total):
    """Continuing from the first `keep` blocks (inside the window) of a generated video gives
    exactly its remaining blocks, those generated after eviction starts included; decoded with the
    decoder primed by the prefix, the whole output equals one decode of the whole latent video.
    Planted: prefill replays the prefix as one block (held_block all 0) -> latents differ; the
    prefix's first block decoded with first=False (decoder not reset) -> pixels differ."""
    latent_frames = chunk * total
    decode = lambda z, first: cw.vae_decode(vae, z, first)  # noqa: E731
    original, _ = latents_of(stream_of(model, contexts, latent_frames=latent_frames, chunk=chunk, max_frames=max_frames,
                                       seed=3))
    assert chunk * keep <= max_frames - chunk < latent_frames  # the prefix fits the window, the video does not
    go_on = stream_of(model, contexts, decode, latent_frames=latent_frames, chunk=chunk, max_frames=max_frames, seed=3,
                      prefix=original[:, :, :chunk * keep])
    z, frames = latents_of(go_on)
    assert torch.equal(z, original)
    with torch.no_grad():
        whole = common.to_uint8_frames(vae.decode(original * torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
                                              + torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)).sample[0])
    frames = np.concatenate(frames)
    assert frames.shape == whole.shape == (4 * latent_frames - 3, 32, 32, 3)
    assert np.abs(frames.astype(int) - whole).max() <= 1 and (frames != whole).mean() < 1e-3  # fp32 order of ops only


def test_clip_encoding_is_causal_and_normalized_as_decoding_expects(vae):
    """vae_encode: 9 frames -> 3 latent frames, the first from frame 0 alone (causal: changing
    frames 1-8 leaves it), normalized with the VAE's latents mean/std the other way round from
    cw.vae_decode. Planted: normalized like decoding (mu * std + mean) -> fails."""
    frames = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    later = frames.copy()
    later[1:] = 255 - later[1:]
    z, z_later = sample.vae_encode(vae, frames, "cpu"), sample.vae_encode(vae, later, "cpu")
    assert z.shape == (1, 16, 3, 4, 4)
    assert torch.equal(z[:, :, 0], z_later[:, :, 0]) and (z[:, :, 1:] - z_later[:, :, 1:]).abs().max() > 1e-3
    with torch.no_grad():
        x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        mu = vae.encode(x).latent_dist.mean
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (vae.config.latents_mean, vae.config.latents_std))
    assert torch.allclose(z * std + mean, mu, atol=1e-5)


def test_no_recache_differs_from_recache(model, contexts):
    """--no-recache switches only the cross-attention: its next blocks differ from the re-cached
    switch's and from no switch at all; the blocks before are the same.
    Planted: set_prompt ignores recache=False (always re-caches) -> fails."""
    runs = {}
    for name, recache in [("none", None), ("recache", True), ("cross-attention", False)]:
        stream = stream_of(model, contexts, latent_frames=9, noise=seeded_noise(4))
        if recache is not None:
            stream.switch("a bird", recache=recache, frame=9)
        runs[name], _ = latents_of(stream)
    assert all(torch.equal(runs["none"][:, :, :3], z[:, :, :3]) for z in runs.values())
    diffs = {(a, b): (runs[a][:, :, 3:6] - runs[b][:, :, 3:6]).abs().max().item() for a in runs for b in runs if a < b}
    assert min(diffs.values()) > 1e-3, diffs


def test_switch_and_stop_from_another_thread(model, contexts):
    """An endless stream driven from another thread, as the demo does: a switch asked while the
    consumer holds block 0 lands at the next block boundary (frame 9), exactly as a switch queued
    for frame 9 before the start; a stop asked while it holds block 2 ends the iteration there.
    Planted: the boundary check moved after next_block (switch one block late) -> fails; stop()
    not setting the event -> the stream runs on (caught by the block limit)."""
    stream = stream_of(model, contexts, noise=seeded_noise(5))  # frames=None: endless
    got_block, asked = [threading.Event() for _ in range(3)], [threading.Event() for _ in range(3)]

    def controller():
        got_block[0].wait(60)
        stream.switch("a bird")
        asked[0].set()
        got_block[2].wait(60)
        stream.stop()
        asked[2].set()

    thread = threading.Thread(target=controller)
    thread.start()
    blocks = 0
    for b, frames in enumerate(stream):
        blocks += 1
        if b in (0, 2):
            got_block[b].set()
            assert asked[b].wait(60)
        if blocks == 8:
            break
    thread.join(60)
    assert blocks == 3 and stream.switches_done == [(9, "a bird", True)] and stream.frames_done == 9 + 2 * 12
    planned = stream_of(model, contexts, latent_frames=9, noise=seeded_noise(5))
    planned.switch("a bird", frame=9)
    assert torch.equal(torch.cat(stream.latents, 2), latents_of(planned)[0])


def test_finite_video_is_the_first_frames_of_an_endless_stream(model, vae, contexts):
    """sample.py's default noise is drawn per block from (seed, first latent frame): a finite
    video is the first frames of the endless stream with the same seed (up to its short last
    block, which attends within itself). Planted: the first block's noise drawn for the whole
    video (randn of its length, sliced), as sample.py drew it before -> fails."""
    decode = lambda z, first: cw.vae_decode(vae, z, first)  # noqa: E731
    finite = [np.concatenate(latents_of(stream_of(model, contexts, decode, latent_frames=n, seed=7))[1])
              for n in (6, 7)]
    endless = stream_of(model, contexts, decode, seed=7)
    frames = []
    for block in endless:
        frames.append(block)
        if len(frames) == 3:
            endless.stop()
    frames = np.concatenate(frames)
    assert frames.shape == (33, 32, 32, 3) and finite[1].shape == (25, 32, 32, 3)
    assert np.array_equal(finite[0], frames[:21]) and np.array_equal(finite[1][:21], frames[:21])
    assert not np.array_equal(finite[1][21:], frames[21:25])  # a 1-frame last block is not the 3-frame one


def test_each_block_starts_from_noise_of_its_own(model, contexts, monkeypatch):
    """sample.py's default noise: each block starts from block_noise(seed, its first latent frame),
    drawn anew for every block (chunk-wise 0, 3, 6; frame-wise 0, 1, 2, ...), so no two blocks
    start from the same noise. Planted: every block drawing the first block's noise, by block_noise
    ignoring `start` or FrameStream's default noise asking for position 0 -> fails, and no other test
    of test_sample.py or this file does; by self.noise(0, n) in FrameStream._latent_blocks -> fails,
    as test_stream_without_switch_is_rollout does."""
    drawn, real = [], sample.block_noise

    def spy(seed, start, shape, device, dtype):
        noise, generator = real(seed, start, shape, device, dtype)
        drawn.append((start, noise[:, :, 0]))  # [1, 16, h, w]: a block's first frame (the last block has one)
        return noise, generator

    monkeypatch.setattr(sample, "block_noise", spy)
    for chunk, starts in ((3, [0, 3, 6]), (1, list(range(7)))):
        drawn.clear()
        latents_of(stream_of(model, contexts, latent_frames=7, chunk=chunk, seed=3))
        assert [start for start, _ in drawn] == starts
        firsts = [noise for _, noise in drawn]
        assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])


@pytest.mark.parametrize("chunk,overlap", [(3, False), (1, True)])
def test_streamed_frames_are_one_decode_of_the_whole_video(model, vae, contexts, chunk, overlap):
    """Each block is decoded as soon as it is generated, the VAE's causal cache carried from block to
    block (first=True only for the first): the frames are exactly one cw.vae_decode of the whole
    latent video, bit for bit, in line and overlapped. Planted: the decoder reset on every block
    (FrameStream yielding first=True for each; or cw.vae_decode clearing the VAE's cache at every call)
    -> fails; so do the frame counts of test_sample.py and this file (the reset decoder makes fewer
    frames) and the pixel checks of the continuation and switch tests."""
    decode = lambda z, first: cw.vae_decode(vae, z, first)  # noqa: E731
    z, frames = latents_of(stream_of(model, contexts, decode, latent_frames=7, chunk=chunk, seed=4, overlap=overlap))
    with torch.no_grad():
        whole = common.to_uint8_frames(cw.vae_decode(vae, z)[0])
    frames = np.concatenate(frames)
    assert frames.shape == whole.shape == (25, 32, 32, 3) and np.array_equal(frames, whole)


# -----------------------------------------------------------------------------
# the CLI


def cli(tiny_wan, tmp_path, *args):
    return sample.main(sample.parse_args(["--tiny", "--model", tiny_wan, "--height", "32", "--width", "32",
                                          *map(str, args)]))


def frame_count(path):
    with imageio.get_reader(path) as r:
        return r.count_frames(), r.get_data(0).shape


def bidirectional_checkpoint(tiny_wan, path):
    sd = cw.from_pretrained(tiny_wan).state_dict()
    common.save_checkpoint(str(path), {"ema": sd, "model": sd, "step": 1, "args": {"generator": "bidirectional"}})
    return path


def test_cli_switch_extend_image_bidirectional(tiny_wan, tmp_path, capsys):
    """The issue's commands on the tiny model write playable mp4s of the stated length (--frames
    counts the whole output: an --extend clip's frames included).
    Planted: the prefix primes the decoder but its frames are not yielded -> the --extend mp4 has 16 frames, fails."""
    from PIL import Image
    cli(tiny_wan, tmp_path, "--prompt", "a corgi", "--frames", 25, "--switch", 10, "the corgi jumps",
        "--out", tmp_path / "switch.mp4")
    assert "switch at frame 21 (asked for 10): the corgi jumps" in capsys.readouterr().out
    assert frame_count(tmp_path / "switch.mp4") == (25, (32, 32, 3))
    cli(tiny_wan, tmp_path, "--prompt", "a corgi", "--frames", 41, "--extend", tmp_path / "switch.mp4",
        "--out", tmp_path / "ext.mp4", "--switch", 30, "it swims")
    assert "the first 25 from" in capsys.readouterr().out
    assert frame_count(tmp_path / "ext.mp4") == (41, (32, 32, 3))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "first.png")
    cli(tiny_wan, tmp_path, "--prompt", "a corgi", "--frames", 13, "--image", tmp_path / "first.png",
        "--out", tmp_path / "image.mp4")
    assert "is 40x50: resized and center-cropped to 32x32" in capsys.readouterr().err
    assert frame_count(tmp_path / "image.mp4") == (13, (32, 32, 3))
    cli(tiny_wan, tmp_path, "--prompt", "a corgi", "--frames", 13,
        "--checkpoint", bidirectional_checkpoint(tiny_wan, tmp_path / "bidi.pt"), "--out", tmp_path / "bidi.mp4")
    assert "rendered as one block with full attention" in capsys.readouterr().err
    assert frame_count(tmp_path / "bidi.mp4") == (13, (32, 32, 3))


@pytest.mark.parametrize("args,message", [
    (["--switch", 25, "x"], "--switch 25 is outside the frames a switch can name, 1-24"),
    (["--switch", 0, "x"], "--switch 0 is outside"),
    (["--switch", "ten", "x"], "FRAME must be a video frame number"),
    (["--switch", 10, "  "], "--switch 10: empty prompt"),
    (["--switch", 22, "x"], "the first block boundary at or after it is frame 33, after the video's last frame 24"),
    (["--switch", 10, "x", "--switch", 12, "y"], "--switch 10 and --switch 12 both take effect at frame 21"),
    (["--switch", 5, "x", "--extend", "CLIP"],
     "--switch 5 is outside the frames a switch can name, 9-24 (frames 0-8 come from"),
    (["--no-recache"], "--no-recache changes how --switch"),
    (["--extend", "CLIP", "--image", "PNG"], "--extend and --image together"),
    (["--extend", "TEXT"], "is not a readable video"),
    (["--extend", "/no/such.mp4"], "--extend '/no/such.mp4' does not exist"),
    (["--extend", "CLIP", "--frames", 9], "gives 9+ frames and --frames 9 counts the whole video"),
    (["--image", "TEXT"], "is not a readable image"),
    (["--checkpoint", "BIDI", "--switch", 9, "x"],
     "is a bidirectional generator: it renders the whole video as one block, so --switch"),
    (["--checkpoint", "BIDI", "--extend", "CLIP"], "so --extend does not apply"),
    (["--checkpoint", "BIDI", "--steps", 2], "so --steps 2 does not apply"),
    (["--checkpoint", "BIDI", "--cache", "longlive"], "so --cache longlive does not apply"),
])
def test_bad_interactive_input_is_one_line_before_any_model_loads(tiny_wan, tmp_path, monkeypatch, args, message):
    """Each bad input is a one-line UserError raised before a model is loaded (the loaders fail
    the test if called); sample.py prints it as one 'error:' line, exit 2, no traceback (that path:
    test_sample.py::test_error_exit_is_one_line_without_traceback).
    Planted: the --switch range check removed -> the frame-25 case fails."""
    paths = {"CLIP": tmp_path / "clip.mp4", "TEXT": tmp_path / "notes.txt", "PNG": tmp_path / "a.png",
             "BIDI": tmp_path / "bidi.pt"}
    with imageio.get_writer(paths["CLIP"], fps=16, macro_block_size=1) as w:
        for i in range(9):
            w.append_data(np.full((32, 32, 3), 20 * i, np.uint8))
    paths["TEXT"].write_text("not a video\n")
    paths["PNG"].write_bytes(b"\x89PNG truncated")
    bidirectional_checkpoint(tiny_wan, paths["BIDI"])

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    for name in ("from_pretrained", "load_text_encoder", "load_vae"):
        monkeypatch.setattr(cw, name, loaded)
    args = [str(paths.get(a, a)) for a in args]
    frames = [] if "--frames" in args else ["--frames", "25"]
    with pytest.raises(common.UserError, match=re.escape(message)) as e:
        cli(tiny_wan, tmp_path, "--prompt", "a fox", *frames, "--out", tmp_path / "x.mp4", *args)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.mp4").exists()
