"""sample.py end to end on the tiny Wan, and its one-line errors on bad input: mp4s with the requested
frame counts (chunk-wise, frame-wise, a shorter last block, prompt files, jobs, checkpoints,
streaming); the speed flags give the same video (--compile changes latents by fp32 rounding only,
< 1e-5 on the CPU: inductor's CPU backend, not its GPU one); --overlap-decode gives the same frames
in the same order and passes a decode error on; the benchmark runs on --tiny (CI runs it) and its
FLOP count matches torch's counter."""
import os
import re
import subprocess
import sys
from functools import partial

import imageio
import numpy as np
import pytest
import torch

import causal_wan as cw
import sample

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
    cw.save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": sd, "ema": sd, "step": 1, "args": {}})
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
    (["--prompt", "fox", "--checkpoint", "BIDI", "--chunk", "3"], "is a bidirectional generator: it renders the whole video as one block, so --chunk"),
    (["--prompt", "fox", "--height", "0"], "not a positive multiple of 16"),
])
def test_bad_input_is_a_user_error(tiny_wan, tmp_path, args, message):
    import sample
    (tmp_path / "bad.pt").write_bytes(b"\x00not a checkpoint")
    wrong = cw.CausalWan(cw.WanConfig(dim=48, ffn_dim=64, num_heads=3, num_layers=2, text_dim=32, freq_dim=32))
    cw.save_checkpoint(str(tmp_path / "wrong.pt"), {"model": wrong.state_dict()})
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cw.save_checkpoint(str(tmp_path / "bidi.pt"), {"ema": cw.from_pretrained(tiny_wan).state_dict(), "args": {"generator": "bidirectional"}})
    names = {"CORRUPT": "bad.pt", "WRONG": "wrong.pt", "LIST": "list.pt", "BIDI": "bidi.pt"}
    args = [str(tmp_path / names[a]) if a in names else a for a in args]
    with pytest.raises(cw.UserError, match=re.escape(message)) as e:
        sample.main(sample.parse_args(["--tiny", "--model", tiny_wan, "--frames", "5", "--out", str(tmp_path / "x.mp4"), *args]))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.mp4").exists()


def test_error_exit_is_one_line_without_traceback(tmp_path):
    r = run("--prompt", "fox", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: model '{tmp_path / 'missing'}' is neither a diffusers-format folder nor a hub id like {cw.DEFAULT_MODEL}"]


RESULT_LINE = re.compile(r"CPU \| torch \S+ \| fp32 \| \d+ frames 64x64 \| (.+) \| frame-wise .+ \| fps=([\d.]+) first_block_s=([\d.]+)")


def test_benchmark_tiny_reports_speed(tiny_wan):
    """The whole benchmark on the CPU: every section, one result line per measured row, and the
    compilations of the --compile row counted (4 block variants per block shape, none in the timed
    runs); the tiny decoder's row keeps the latents and says its pixels are another decoder's, the
    --offload row after it changes nothing, the --fp8 row says why the CPU skips it. Planted:
    attend_to_cache left inside the compiled blocks (a new variant per cache length: the run no
    longer ended within the 300 s; test_compile_variants_and_cuda_graph_steps counts it); the
    pixel differences always against row 1 (row 11's was 164, not 0); cw.offloaded passing
    first=True on every call (row 11's pixels differ)."""
    r = run("--benchmark", "--tiny", "--model", tiny_wan, "--frames", "21", "--long-frames", "93", "--baseline-steps", "4")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    m = re.fullmatch(r"fps=([\d.]+) first_block_s=([\d.]+) kv_speedup=([\d.]+)", lines[-1])
    assert m and all(float(v) > 0 for v in m.groups()), lines[-1]
    parity = next(line for line in lines if line.startswith("parity with diffusers"))
    assert float(parity.rsplit(" ", 1)[1]) < 1e-5  # the benchmarked model is the diffusers network
    kv = next(line for line in lines if line.startswith("KV cache:"))
    assert float(kv.rsplit(" ", 1)[1]) < 1e-5  # cached rollout == recomputed prefix on the same noise
    assert any(line.startswith("baseline WanPipeline (4 steps") for line in lines)
    assert any(line.startswith("long video: 93 frames (8 blocks)") for line in lines)
    ladder = {lever.label: next((line for line in lines if line.startswith(f"  {n}. {lever.label}:")), None)
              for n, lever in enumerate(sample.LEVERS, 1)}
    assert all(ladder.values()), ladder  # every optimization has its row (measured, skipped on the CPU, or failed)
    assert all("FAILED" not in line for line in ladder.values()), ladder
    diffs = {label: [(float(a), int(b)) for a, b in re.findall(r"diff ([\d.e+-]+) / (\d+)", line)] for label, line in ladder.items()}
    assert diffs[sample.LEVERS[1].label] == [(0.0, 0), (0.0, 0)]  # in-place cache: the same latents and pixels
    assert diffs[sample.LEVERS[2].label] == [(0.0, 0), (0.0, 0)]  # overlapped decode: the same pixels
    assert all(dl < 1e-5 and dp <= 1 for dl, dp in diffs[sample.LEVERS[4].label])  # torch.compile: fp32 rounding only
    assert "skipped (needs a GPU)" in ladder[sample.LEVERS[5].label]
    assert "skipped (its compilation takes" in ladder[sample.LEVERS[6].label]
    tae, offload = sample.LEVERS[8].label, sample.LEVERS[10].label
    assert [dl for dl, _ in diffs[tae]] == [dl for dl, _ in diffs[sample.LEVERS[4].label]]  # the decoder leaves the latents alone
    assert all(dp > 10 for _, dp in diffs[tae]) and ladder[tae].count("(another decoder)") == 2  # its pixels vs the VAE's
    assert diffs[offload] == [(dl, 0) for dl, _ in diffs[tae]] and "another decoder" not in ladder[offload]  # the same video
    assert "skipped (needs a GPU of compute capability >= 8.9)" in ladder[sample.LEVERS[9].label]
    decoders = next(line for line in lines if line.startswith("  tiny decoder alone (fp32, --decoder tae): "))
    assert re.search(r"the VAE takes [\d.]+x its FLOPs and [\d.]+x its time", decoders), decoders
    # --compile: each block shape compiles the block in 4 pieces (split around the attention over the
    # cache), chunk-wise in the warm-up, frame-wise once more (a new shape); nothing in the timed runs
    warm = [(int(b), int(v)) for b, v in re.findall(r"warm-up [\d.]+ s compiled (\d+) block, (\d+) VAE variants", ladder[sample.LEVERS[4].label])]
    timed = re.findall(r"timed run compiled (\d+) block, (\d+) VAE variants", ladder[sample.LEVERS[4].label])
    assert len(warm) == 2 and all(1 <= b <= 4 and v == 0 for b, v in warm), warm
    assert timed == [("0", "0"), ("0", "0")], timed
    assert re.findall(r"compiled (\d+) block, (\d+) VAE", ladder[sample.LEVERS[7].label]) == [("0", "0")] * 4  # row 5's code, reused
    assert "compiled" not in ladder[sample.LEVERS[2].label]  # an eager row compiles nothing
    assert not any("WARNING" in line for line in lines)  # nothing compiled in the fastest row's section or the long video
    results = [RESULT_LINE.fullmatch(line) for line in lines if line.startswith("CPU | ")]
    whats = [m.group(1).split(":")[0] for m in results]
    assert whats[:7] == ["row 1", "row 2", "row 3", "row 5", "row 8", "row 9", "row 11"], whats
    assert re.fullmatch(r"fastest, [1235]", whats[7]), whats  # the fp32 VAE's rows only
    assert [m.group(1).split(": ")[1] for m in results[5:7]] == ["--compile default --overlap-decode --decoder tae",
                                                                  "--compile default --overlap-decode --decoder tae --offload"]
    assert all(m and float(m.group(2)) > 0 and float(m.group(3)) > 0 for m in results)


def test_benchmark_cut_after_the_ladder_keeps_what_it_measured(tiny_wan):
    """A run killed once the ladder is done (a GPU taken back mid-run) has already written every
    section it measured into its pipe, each as it was measured, without PYTHONUNBUFFERED. Planted:
    no line buffering (every line arrived at once, when the process ended)."""
    import time
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, "sample.py", "--benchmark", "--tiny", "--model", tiny_wan, "--frames", "9", "--levers", "1,3,8",
                          "--long-frames", "0", "--baseline-steps", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    lines, arrived = [], []
    try:
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            arrived.append(time.perf_counter())
            if line.startswith("fastest"):  # the first line after the ladder: cut the run here
                p.kill()
                break
        lines += p.stdout.read().splitlines()  # what was in the pipe when it died
    finally:
        p.kill()
        p.wait()
    assert arrived[-1] - arrived[0] > 1, lines  # the first line came when it was printed, not when the process ended
    assert not any(line.startswith("fps=") for line in lines), lines  # it was cut before the end
    starts = ["device: CPU", "text encoding", "KV cache:", "parity with diffusers", "optimizations, each on top"]
    assert all(any(line.startswith(s) for line in lines) for s in starts), lines
    rows = [line.split(".")[0].strip() for line in lines if re.match(r"  \d+\. ", line)]
    assert rows == ["1", "3", "4", "6", "7", "8", "10"], lines
    assert [RESULT_LINE.fullmatch(line).group(1)[:5] for line in lines if line.startswith("CPU | ")] == ["row 1", "row 3", "row 8"]


@pytest.mark.parametrize("chunk,max_frames", [(3, 21), (1, 21), (3, 9)])
def test_flop_count_matches_torch_counter(chunk, max_frames):
    """sample.py's analytic transformer FLOPs (the TFLOP/s it reports) agree with torch's own
    FlopCounterMode over a rollout with the real layer sizes, on meta tensors (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = cw.WanConfig(num_layers=2)  # Wan2.1-1.3B's dims, 2 of its 30 layers
    with torch.device("meta"):
        model = cw.CausalWan(cfg).eval().requires_grad_(False)
        context, noise = torch.randn(1, 512, cfg.text_dim), torch.randn(1, 16, 13, 60, 104)  # 480x832: attention is half the work
    prompt_kv = model.prompt_kv(context)  # once per prompt: not part of the count
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        cw.rollout(model, noise, prompt_kv, block_size=chunk, max_frames=max_frames)
    counted = counter.get_total_flops()
    analytic = sample.rollout_flops(cfg, 13, 30 * 52, chunk, max_frames)
    assert abs(counted / analytic - 1) < 0.01, (counted, analytic)  # the rest: patch embedding, time MLP, output head


def test_tiny_decoder_flop_count_matches_conv_arithmetic():
    """The tiny decoder's FLOPs the benchmark prints (FlopCounterMode on a meta copy) are the sum
    of its convolutions written out here: per latent frame, stage s at resolution 2^s (h, w) with
    1, 1, 2 frames in its memory blocks, 4 frames at the output head. 0.544 TFLOP per latent frame at
    480x832 (BENCHMARKS.md). Planted: decode_flops counting the first block only -> fails."""
    def conv(c_in, c_out, k, pixels, frames):
        return 2 * c_in * c_out * k * k * pixels * frames

    def per_latent_frame(widths, h, w):
        total, pixels, frames = conv(16, widths[0], 3, h * w, 1), h * w, 1
        for ch, ch_next, grow in zip(widths[:3], widths[1:], (1, 2, 2)):
            total += 3 * (conv(2 * ch, ch, 3, pixels, frames) + 2 * conv(ch, ch, 3, pixels, frames))  # 3 memory blocks
            pixels *= 4  # 2x upsampling
            total += conv(ch, ch * grow, 1, pixels, frames)  # temporal grow: 1x1 conv
            frames *= grow
            total += conv(ch, ch_next, 3, pixels, frames)
        return total + conv(widths[3], 3, 3, pixels, frames)

    assert sample.tae_decode_flops(cw.TinyDecoder(), 7, 60, 104, 3) == 7 * per_latent_frame((256, 128, 64, 64), 60, 104)
    assert per_latent_frame((256, 128, 64, 64), 60, 104) == 544_151_961_600
    assert sample.tae_decode_flops(cw.TinyDecoder((32, 16, 8, 8)), 4, 8, 8, 1) == 4 * per_latent_frame((32, 16, 8, 8), 8, 8)


def test_benchmark_fp8_row_on_the_cpu(tiny_wan, monkeypatch, capsys):
    """Row 10 (--fp8) on the CPU, where the ladder skips it: torchao's float8 kernels run there with
    its hardware assert lifted (as in tests/test_speed_levers.py), on the tiny model in bf16. With
    cw.check_fp8 in place the row says its message and is skipped; without it the row is measured
    after row 2, its latents are those of a float8 copy made here (the same torchao call on a deep
    copy, with its own prompt_kv), it differs from row 2, the bf16 model keeps its plain weights,
    and the float8 copy is freed after its row. Planted: quantize_fp8 on the model itself (no copy),
    the bf16 prompt_kv given to the copy, the copy kept after its row -> each fails."""
    import copy
    import gc
    import weakref
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8Tensor
    n = next(n for n, lever in enumerate(sample.LEVERS) if lever.change.get("fp8"))
    levers = list(sample.LEVERS)
    monkeypatch.setattr(sample, "LEVERS", levers)
    levers[n] = levers[n]._replace(cpu_skip=None)
    args = sample.parse_args(["--benchmark", "--tiny", "--model", tiny_wan, "--frames", "9", "--dtype", "bf16", "--levers", str(n + 1)])
    sample.check_args(args)
    bench = sample.build_benchmark(args)
    assert sample.measure_ladder(bench) == []
    assert f"  {n + 1}. + float8 linear layers (--fp8): skipped (--fp8 needs a CUDA GPU with compute capability >= 8.9" in capsys.readouterr().out

    levers[n] = levers[n]._replace(check=None)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    copies, real_copy = [], sample.float8_copy
    monkeypatch.setattr(sample, "float8_copy", lambda bench: copies.append(real_copy(bench)) or copies[-1])
    bench.args.levers = [2, n + 1]
    rows = sample.measure_ladder(bench)
    out = capsys.readouterr().out
    assert [row["label"].split(".")[0] for row in rows] == ["2", str(n + 1)] and len(copies) == 1, out
    assert "--decoder tae --fp8 |" in out  # its result line (rows 3, 8 and 9 pass on their settings)
    fp8 = weakref.ref(copies.pop()[0])
    gc.collect()
    assert bench.fp8 is None and fp8() is None  # freed after its row
    assert not any(isinstance(m.weight, Float8Tensor) for m in bench.model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        reference = cw.quantize_fp8(copy.deepcopy(bench.model))
        for chunk in (3, 1):
            want = cw.rollout(reference, bench.noise(3), reference.prompt_kv(bench.context), block_size=chunk,
                              generator=torch.Generator().manual_seed(1))
            assert torch.equal(rows[1][chunk]["latents"], want)
            assert not torch.equal(rows[1][chunk]["latents"], rows[0][chunk]["latents"])


def test_benchmark_subset_of_levers(tiny_wan):
    """--levers: the rows left out pass on their cheap settings, not their compilation (row 8 after
    an unmeasured row 5 is eager); bad lengths and rows are one-line errors before any model loads.
    Planted: unmeasured rows passing on everything (row 8 then compiles the blocks)."""
    r = run("--benchmark", "--tiny", "--model", tiny_wan, "--frames", "9", "--long-frames", "0", "--levers", "3,8", "--baseline-steps", "0")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if re.match(r"  \d+\. ", line)]
    assert [row.split(".")[0].strip() for row in rows] == ["3", "4", "6", "7", "8", "10"], rows  # 4, 6, 7, 10: not on a CPU
    assert "diff 0.0e+00 / 0" in rows[0] and "diff 0.0e+00 / 0" not in rows[-2]  # the bf16 VAE row differs from row 3
    flags = [line for line in r.stdout.splitlines() if line.startswith(("CPU |", "  sample.py flags"))]
    assert "compiled" not in rows[-2] and not any("--compile" in line for line in flags), (rows[-2], flags)
    assert "baseline WanPipeline: skipped" in r.stdout and "long video: skipped" in r.stdout
    bad = run("--benchmark", "--tiny", "--model", tiny_wan, "--levers", "0,12")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --levers takes row numbers 1-11")
    for flags, message in [(["--levers", "4,6,10"], "--levers 4,6,10: only rows that need a GPU"),
                           (["--frames", "17"], "--frames 17 is 5 latent frames, not whole blocks of 3"),
                           (["--long-frames", "161"], "--long-frames 161 must be 12k-3 frames"),
                           (["--long-frames", "61"], "longer than the --max-frames 21 latent frame window: try 93")]:
        with pytest.raises(cw.UserError, match=re.escape(message)) as e:  # before any model loads: the model does not exist
            sample.main(sample.parse_args(["--benchmark", "--tiny", "--model", "/no/such/model", *flags]))
        assert "\n" not in str(e.value)


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
    rollout = lambda chunk: cw.rollout(model, noise, kv, block_size=chunk, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = {chunk: rollout(chunk) for chunk in (3, 1)}
        torch._dynamo.reset()
        counters.clear()
        real_mark = torch.compiler.cudagraph_mark_step_begin
        torch.compiler.cudagraph_mark_step_begin = lambda: marks.append(1)
        try:
            sample.compile_blocks(model, "reduce-overhead", backend="eager")
            graphs, out = [], {}
            for chunk in (3, 1, 3):
                calls.clear(), marks.clear()
                out[chunk] = rollout(chunk)
                graphs.append(counters["stats"]["unique_graphs"])
                assert len(marks) == len(calls) == 4 * (9 // chunk) + 9 // chunk - 1  # 4 steps per block + the cache passes
            sample.compile_blocks(model, None)
            marks.clear()
            rollout(3)
        finally:
            torch.compiler.cudagraph_mark_step_begin = real_mark
    print(f"block graphs compiled: chunk-wise {graphs[0]}, frame-wise {graphs[1] - graphs[0]}, chunk-wise again {graphs[2] - graphs[1]}")
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
    decode = lambda chunk: [cw.vae_decode(vae, z[:, :, s:s + chunk], first=s == 0) for s in range(0, 6, chunk)]
    with torch.no_grad():
        eager = {chunk: decode(chunk) for chunk in (3, 1)}
        torch._dynamo.reset()
        counters.clear()
        counter = sample.CompileCounter()
        try:
            sample.compile_vae(vae, True, backend="eager")
            compiled = {chunk: decode(chunk) for chunk in (3, 1)}
        finally:
            sample.compile_vae(vae, False)
            counter.close()
    print(f"VAE decoder variants compiled: {counters['stats']['unique_graphs']} (CompileCounter: {dict(counter.counts)})")
    assert counters["stats"]["unique_graphs"] == 3 and dict(counter.counts) == {"VAE": 3}
    assert all(torch.equal(a, b) for c in (3, 1) for a, b in zip(compiled[c], eager[c]))


def test_benchmark_casts_diffusers_as_diffusers_loads(tiny_wan):
    """The benchmark's reference (parity line, WanPipeline baseline) in bf16 has the dtypes diffusers'
    own from_pretrained(dtype=bf16) gives it: its _keep_in_fp32_modules in fp32. Planted: a plain
    .to(bf16) (the time embedder, scale-shift tables and norm2 differ)."""
    from diffusers import WanTransformer3DModel
    folder = os.path.join(tiny_wan, "transformer")
    loaded = WanTransformer3DModel.from_pretrained(folder, dtype=torch.bfloat16)
    cast = sample.as_diffusers_loads(WanTransformer3DModel.from_pretrained(folder), torch.bfloat16)
    dtypes = lambda m: {n: t.dtype for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    assert dtypes(cast) == dtypes(loaded)
    assert {torch.float32, torch.bfloat16} <= set(dtypes(cast).values())


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
    assert diff.mean() < 0.3 and (diff > 0).mean() < 0.05, (diff.mean(), (diff > 0).mean())  # compile's fp32 rounding, through H.264
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
        sample.generate(model, partial(cw.vae_decode, vae), kv, noise, 3, 21, got[overlap].append, generator=torch.Generator().manual_seed(1), overlap=overlap)
    assert [len(f) for f in got[True]] == [9, 12, 4]
    assert all((a == b).all() for a, b in zip(got[False], got[True]))

    def broken(frames):
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        sample.generate(model, partial(cw.vae_decode, vae), kv, noise, 3, 21, broken, overlap=True)


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
