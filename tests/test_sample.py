"""sample.py end to end on the tiny Wan, and its one-line errors on bad input: mp4s with the requested
frame counts (chunk-wise, frame-wise, a shorter last block, prompt files, jobs, checkpoints,
streaming); the speed flags give the same video (--compile changes latents by fp32 rounding only,
< 1e-5 on the CPU: inductor's CPU backend, not its GPU one); --overlap-decode gives the same frames
in the same order and passes a decode error on; the benchmark runs on --tiny (CI runs it), its
FLOP count matches torch's counter, and its fastest row is one sample.py runs; a --jobs seed is
digits 0-9. Ctrl-C and SIGTERM: test_interrupts.py."""
import os
import re
import subprocess
import sys
from functools import partial

import imageio
import numpy as np
import pytest
import torch

import bench
import causal_wan as cw
import common
import sample
import speedkit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    """sample.py in a process of its own: the benchmark (its line buffering and compile counts), errors."""
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def run_here(*args):
    """sample.py's main in this process, as `python sample.py ARGS` runs it, without starting Python
    (its imports take most of a tiny run's time)."""
    sample.main(sample.parse_args([str(a) for a in args]))


def frames_of(path):
    with imageio.get_reader(path) as r:
        return r.count_frames(), r.get_meta_data()["fps"], r.get_data(0).shape


@pytest.mark.parametrize("chunk,frames", [(3, 21), (1, 21), (3, 17)])  # 17 frames: a shorter last block
def test_tiny_writes_the_requested_frames(tiny_wan, tmp_path, chunk, frames):
    out = tmp_path / "fox.mp4"
    run_here("--tiny", "--model", tiny_wan, "--prompt", "a red fox", "--frames", frames, "--chunk", chunk, "--out", out)
    assert frames_of(out) == (frames, 16.0, (64, 64, 3))
    assert not os.path.exists(str(out) + ".part.mp4")


def test_prompts_file_checkpoint_and_stream(tiny_wan, tmp_path):
    model = cw.from_pretrained(tiny_wan)
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": sd, "ema": sd, "step": 1, "args": {}})
    (tmp_path / "prompts.txt").write_text("a red fox\n\na blue bird\n")
    outs = []
    for ckpt in ([], ["--checkpoint", str(tmp_path / "ckpt.pt")]):
        out = tmp_path / f"videos{len(ckpt)}"
        run_here("--tiny", "--model", tiny_wan, "--prompts-file", tmp_path / "prompts.txt", "--num-videos", "2",
                 "--frames", "9", "--stream", "--out", out, *ckpt)
        files = sorted(os.listdir(out))
        assert len(files) == 4 and files[0] == "0000_a_red_fox-0.mp4"
        assert all(frames_of(out / f)[0] == 9 for f in files)
        with imageio.get_reader(out / files[0]) as rd:
            outs.append(rd.get_data(4).astype(float))
    assert abs(outs[0] - outs[1]).mean() > 1  # the checkpoint's weights were used


def test_jobs_file(tiny_wan, tmp_path):
    jobs = tmp_path / "jobs.tsv"
    jobs.write_text(f"a red fox\t3\t{tmp_path / 'a fox, (odd) name-3.mp4'}\n")
    run_here("--tiny", "--model", tiny_wan, "--jobs", jobs, "--frames", "5")
    assert frames_of(tmp_path / "a fox, (odd) name-3.mp4")[0] == 5


@pytest.mark.parametrize("seed", ["\u00b2", "\u0663", "\uff13", "3.0", "-1", ""])
def test_jobs_seed_must_be_written_in_ascii_digits(tmp_path, seed):
    """A --jobs line whose seed is not digits 0-9 is one line naming the line and the seed, before any model
    loads. Before the fix: str.isdigit() accepted '²' (superscript two), which int() refuses: a ValueError
    traceback; Arabic-Indic '٣' and fullwidth '３' were read as 3."""
    jobs = tmp_path / "jobs.tsv"
    jobs.write_text(f"a red fox\t0\t{tmp_path / 'a.mp4'}\na red fox\t{seed}\t{tmp_path / 'b.mp4'}\n")
    with pytest.raises(common.UserError, match=re.escape(f"{jobs}:2: seed '{seed}' is not a whole number in the "
                                                         f"digits 0-9")) as e:
        sample.read_jobs(sample.parse_args(["--tiny", "--jobs", str(jobs)]))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args,message", [
    (["--prompt", "   "], "empty prompt"),
    (["--prompt", "fox", "--frames", "20"], "not 4k+1"),
    (["--prompt", "fox", "--height", "100"], "not a positive multiple of 16"),
    (["--prompt", "fox", "--width", "8"], "not a positive multiple of 16"),
    (["--prompt", "fox", "--model", "/no/such/folder"], "neither a diffusers-format folder nor a hub id"),
    (["--prompt", "fox", "--checkpoint", "CORRUPT"], "not a readable torch checkpoint"),
    (["--prompt", "fox", "--checkpoint", "/no/such.pt"], "does not exist"),
    (["--prompt", "fox", "--checkpoint", "WRONG"], "does not fit the model"),
    (["--prompt", "fox", "--prompts-file", "/no/such.txt"], "exactly one of"),
    (["--jobs", "/no/such.tsv"], "--jobs '/no/such.tsv' does not exist"),
    (["--prompt", "fox", "--model", "./wan"], "neither a diffusers-format folder nor a hub id"),
    (["--prompt", "fox", "--checkpoint", "LIST"], "holds a list, not a dict"),
    (["--prompt", "fox", "--checkpoint", "BIDI", "--chunk", "3"],
     "is a bidirectional generator: it renders the whole video as one block, so --chunk"),
    (["--prompt", "fox", "--height", "0"], "not a positive multiple of 16"),
])
def test_bad_input_is_a_user_error(tiny_wan, tmp_path, args, message):
    import sample
    (tmp_path / "bad.pt").write_bytes(b"\x00not a checkpoint")
    wrong = cw.CausalWan(cw.WanConfig(dim=48, ffn_dim=64, num_heads=3, num_layers=2, text_dim=32, freq_dim=32))
    common.save_checkpoint(str(tmp_path / "wrong.pt"), {"model": wrong.state_dict()})
    torch.save([1, 2, 3], tmp_path / "list.pt")
    common.save_checkpoint(str(tmp_path / "bidi.pt"),
                           {"ema": cw.from_pretrained(tiny_wan).state_dict(), "args": {"generator": "bidirectional"}})
    names = {"CORRUPT": "bad.pt", "WRONG": "wrong.pt", "LIST": "list.pt", "BIDI": "bidi.pt"}
    args = [str(tmp_path / names[a]) if a in names else a for a in args]
    with pytest.raises(common.UserError, match=re.escape(message)) as e:
        sample.main(sample.parse_args(["--tiny", "--model", tiny_wan, "--frames", "5", "--out", str(tmp_path / "x.mp4"),
                                       *args]))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.mp4").exists()


def test_error_exit_is_one_line_without_traceback(tmp_path):
    r = run("--prompt", "fox", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: model '{tmp_path / 'missing'}' is neither a diffusers-format "
                                             f"folder nor a hub id like {cw.DEFAULT_MODEL}"]


def test_compile_variants_and_cuda_graph_steps(tiny_wan):
    """What the compiled rows compile, counted with dynamo's own counter (backend "eager": the same
    graphs and guards as inductor, in seconds): the blocks, 4 pieces per block shape, reused by every
    block and step; --compile reduce-overhead marks one CUDA-graph step per model call (the blocks
    of one call chain their outputs inside one CUDA-graph generation) and changes nothing else; the
    mark goes with the mode. Planted: no mark_step hook (0 marks); attend_to_cache inside the
    compiled region (one more variant per cache length)."""
    from torch._dynamo.utils import counters
    model = cw.from_pretrained(tiny_wan).eval().requires_grad_(False)
    kv = model.prompt_kv(torch.randn(1, 12, model.cfg.text_dim))
    noise = torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(0))
    calls, marks = [], []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    def rollout(chunk):
        return cw.rollout(model, noise, kv, block_size=chunk, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = {chunk: rollout(chunk) for chunk in (3, 1)}
        torch._dynamo.reset()
        counters.clear()
        real_mark = torch.compiler.cudagraph_mark_step_begin
        torch.compiler.cudagraph_mark_step_begin = lambda: marks.append(1)
        try:
            speedkit.compile_blocks(model, "reduce-overhead", backend="eager")
            graphs, out = [], {}
            for chunk in (3, 1, 3):
                calls.clear(), marks.clear()
                out[chunk] = rollout(chunk)
                graphs.append(counters["stats"]["unique_graphs"])
                # 4 steps per block + the cache passes
                assert len(marks) == len(calls) == 4 * (9 // chunk) + 9 // chunk - 1
            speedkit.compile_blocks(model, None)
            marks.clear()
            rollout(3)
        finally:
            torch.compiler.cudagraph_mark_step_begin = real_mark
    print(f"block graphs compiled: chunk-wise {graphs[0]}, frame-wise {graphs[1] - graphs[0]}, "
          f"chunk-wise again {graphs[2] - graphs[1]}")
    assert 1 <= graphs[0] <= 4 and 1 <= graphs[1] - graphs[0] <= 4 and graphs[2] == graphs[1]
    assert all(torch.equal(out[c], eager[c]) for c in (3, 1))
    assert not marks and model.cuda_graph_step_hook is None


def test_compiled_vae_variants(tiny_wan):
    """--compile-vae compiles 3 variants of the decoder per dtype (first frame, cache filling, steady
    state), shared by chunk-wise and frame-wise decoding, counted by dynamo (backend "eager") and by
    the benchmark's CompileCounter; the frames are unchanged. Planted: vae_decode's frame slice not
    made contiguous (6 variants: each again for the 1-frame blocks)."""
    from torch._dynamo.utils import counters
    vae = cw.load_vae(tiny_wan)
    z = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    def decode(chunk):
        return [cw.vae_decode(vae, z[:, :, s:s + chunk], first=s == 0) for s in range(0, 6, chunk)]
    with torch.no_grad():
        eager = {chunk: decode(chunk) for chunk in (3, 1)}
        torch._dynamo.reset()
        counters.clear()
        counter = bench.CompileCounter()
        try:
            speedkit.compile_vae(vae, True, backend="eager")
            compiled = {chunk: decode(chunk) for chunk in (3, 1)}
        finally:
            speedkit.compile_vae(vae, False)
            counter.close()
    print(f"VAE decoder variants compiled: {counters['stats']['unique_graphs']} "
          f"(CompileCounter: {dict(counter.counts)})")
    assert counters["stats"]["unique_graphs"] == 3 and dict(counter.counts) == {"VAE": 3}
    assert all(torch.equal(a, b) for c in (3, 1) for a, b in zip(compiled[c], eager[c]))


def test_speed_flags_give_the_same_video(tiny_wan, tmp_path):
    """--overlap-decode and --compile do not change the video; --vae-dtype bf16 changes it a little."""
    videos = {}
    for name, flags in [("plain", []), ("fast", ["--overlap-decode", "--compile"]), ("bf16", ["--vae-dtype", "bf16"])]:
        out = tmp_path / f"{name}.mp4"
        run_here("--tiny", "--model", tiny_wan, "--prompt", "a red fox", "--frames", "21", "--out", out, *flags)
        with imageio.get_reader(out) as rd:
            videos[name] = np.stack([f.astype(int) for f in rd])
    assert videos["plain"].shape == videos["fast"].shape == (21, 64, 64, 3)
    diff = np.abs(videos["plain"] - videos["fast"])
    # compile's fp32 rounding, through H.264
    assert diff.mean() < 0.3 and (diff > 0).mean() < 0.05, (diff.mean(), (diff > 0).mean())
    assert 1 < np.abs(videos["plain"] - videos["bf16"]).mean() < 10  # seen: 0.06 (fast) and 3.7 (bf16 VAE)


def test_overlapped_decode_keeps_order_and_raises(tiny_wan):
    """The worker thread hands over every block in order, and a decode error reaches the caller."""
    model = cw.from_pretrained(tiny_wan).eval().requires_grad_(False)
    vae = cw.load_vae(tiny_wan)
    kv = model.prompt_kv(torch.randn(1, 12, model.cfg.text_dim))
    noise = torch.randn(1, 16, 7, 8, 8, generator=torch.Generator().manual_seed(0))
    got = {}
    for overlap in (False, True):
        got[overlap] = []
        sample.generate(model, partial(cw.vae_decode, vae), kv, noise, 3, 21, got[overlap].append,
                        generator=torch.Generator().manual_seed(1), overlap=overlap)
    assert [len(f) for f in got[True]] == [9, 12, 4]
    assert all((a == b).all() for a, b in zip(got[False], got[True]))

    def broken(frames):
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        sample.generate(model, partial(cw.vae_decode, vae), kv, noise, 3, 21, broken, overlap=True)


def test_the_fastest_row_is_one_sample_py_runs():
    """bench.py's fastest row (detailed, then timed against diffusers and over a long video, and its last
    line's fps=) is the fastest row sample.py can run: row 1, training's concatenating KV cache (benchmark
    only), is left out even when it is the fastest, as it can be on the tiny model; of the others, the rows
    that decode with the fp32 VAE. Before the fix: row 1 could be chosen as "fastest"."""
    def row(n, fps, **setting):
        return {"label": f"{n}. lever", "setting": {"static_cache": True, **setting}, 3: {"fps": fps}}
    rows = [row(1, 9.0, static_cache=False), row(2, 5.0), row(3, 6.0, overlap=True), row(8, 7.0, vae_dtype="bf16")]
    best, what = bench.fastest_row(rows)
    assert best["label"] == "3. lever"
    assert what == "of the rows sample.py runs (not row 1: benchmark only) with the fp32 VAE"
    assert bench.fastest_row(rows[:1]) == (rows[0], "(only row 1, benchmark only, was measured)")  # --levers 1


def test_stream_writes_each_block_while_generating(tmp_path):
    """--stream: every block is in the file (a fragmented mp4) as soon as it is appended, not at close
    (but its last frame: the muxer learns a frame's duration from the next one)."""
    import time

    import numpy as np

    import sample
    path = tmp_path / "s.mp4"
    rng = np.random.default_rng(0)
    sizes = []
    with sample.open_writer(str(path), 16, True, 12) as writer:
        for block in range(3):
            for _ in range(9 if block == 0 else 12):  # chunk-wise blocks: 1 + 4 * 2, then 4 * 3 frames
                writer.append_data(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
            before = sizes[-1] if sizes else 0
            deadline = time.time() + 20
            while (os.path.getsize(path) if path.exists() else 0) <= before and time.time() < deadline:
                time.sleep(0.05)
            sizes.append(os.path.getsize(path))
    assert sizes[0] > 1000 and sizes[0] < sizes[1] < sizes[2], sizes
    assert frames_of(path)[0] == 33
