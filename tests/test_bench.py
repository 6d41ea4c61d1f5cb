"""bench.py on the tiny Wan (CI runs it): every section of the sampling benchmark, a result line per
measured row, a run cut short keeps what it printed, --levers picks rows, the fp8 row on the CPU with
torchao's hardware check lifted; its FLOP counts match torch's counter; the reward decode's count is
tested in tests/test_train_reward.py."""
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import causal_wan as cw
import common
import speedkit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    """bench.py in a process of its own (its line buffering and compile counts, its errors)."""
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sample_benchmark_points_to_bench(tmp_path):
    """`sample.py --benchmark ...` (the old command) says in one line which command replaced it."""
    r = subprocess.run([sys.executable, "sample.py", "--benchmark", "--tiny", "--levers", "1,3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: the benchmark is bench.py now: python bench.py --tiny --levers 1,3"]


RESULT_LINE = re.compile(r"CPU \| torch \S+ \| fp32 \| \d+ frames 64x64 \| (.+) \| frame-wise .+ \| "
                         r"fps=([\d.]+) first_block_s=([\d.]+)")


def test_benchmark_tiny_reports_speed(tiny_wan):
    """The whole benchmark on the CPU: every section, one result line per measured row, and the
    compilations of the --compile row counted (4 block variants per block shape, none in the timed
    runs); the tiny decoder's row keeps the latents and says its pixels are another decoder's, the
    --offload row after it changes nothing, the --fp8 row says why the CPU skips it. Planted:
    attend_to_cache left inside the compiled blocks (a new variant per cache length: the run no
    longer ended within the 300 s; test_compile_variants_and_cuda_graph_steps counts it); the
    pixel differences always against row 1 (row 11's was 164, not 0); speedkit.offloaded passing
    first=True on every call (row 11's pixels differ)."""
    r = run("--tiny", "--model", tiny_wan, "--frames", "21", "--long-frames", "93", "--baseline-steps", "4")
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
              for n, lever in enumerate(bench.LEVERS, 1)}
    assert all(ladder.values()), ladder  # every optimization has its row (measured, skipped on the CPU, or failed)
    assert all("FAILED" not in line for line in ladder.values()), ladder
    diffs = {label: [(float(a), int(b)) for a, b in re.findall(r"diff ([\d.e+-]+) / (\d+)", line)]
             for label, line in ladder.items()}
    assert diffs[bench.LEVERS[1].label] == [(0.0, 0), (0.0, 0)]  # in-place cache: the same latents and pixels
    assert diffs[bench.LEVERS[2].label] == [(0.0, 0), (0.0, 0)]  # overlapped decode: the same pixels
    assert all(dl < 1e-5 and dp <= 1 for dl, dp in diffs[bench.LEVERS[4].label])  # torch.compile: fp32 rounding only
    assert "skipped (needs a GPU)" in ladder[bench.LEVERS[5].label]
    assert "skipped (its compilation takes" in ladder[bench.LEVERS[6].label]
    tae, offload = bench.LEVERS[8].label, bench.LEVERS[10].label
    # the decoder leaves the latents alone
    assert [dl for dl, _ in diffs[tae]] == [dl for dl, _ in diffs[bench.LEVERS[4].label]]
    # its pixels vs the VAE's
    assert all(dp > 10 for _, dp in diffs[tae]) and ladder[tae].count("(another decoder)") == 2
    # the same video
    assert diffs[offload] == [(dl, 0) for dl, _ in diffs[tae]] and "another decoder" not in ladder[offload]
    assert "skipped (needs a GPU of compute capability >= 8.9)" in ladder[bench.LEVERS[9].label]
    decoders = next(line for line in lines if line.startswith("  tiny decoder alone (fp32, --decoder tae): "))
    assert re.search(r"the VAE takes [\d.]+x its FLOPs and [\d.]+x its time", decoders), decoders
    # --compile: each block shape compiles the block in 4 pieces (split around the attention over the
    # cache), chunk-wise in the warm-up, frame-wise once more (a new shape); nothing in the timed runs
    warm = [(int(b), int(v)) for b, v in re.findall(r"warm-up [\d.]+ s compiled (\d+) block, (\d+) VAE variants",
                                                    ladder[bench.LEVERS[4].label])]
    timed = re.findall(r"timed run compiled (\d+) block, (\d+) VAE variants", ladder[bench.LEVERS[4].label])
    assert len(warm) == 2 and all(1 <= b <= 4 and v == 0 for b, v in warm), warm
    assert timed == [("0", "0"), ("0", "0")], timed
    assert re.findall(r"compiled (\d+) block, (\d+) VAE",
                      ladder[bench.LEVERS[7].label]) == [("0", "0")] * 4  # row 5's code, reused
    assert "compiled" not in ladder[bench.LEVERS[2].label]  # an eager row compiles nothing
    # nothing compiled in the fastest row's section or the long video
    assert not any("WARNING" in line for line in lines)
    results = [RESULT_LINE.fullmatch(line) for line in lines if line.startswith("CPU | ")]
    whats = [m.group(1).split(":")[0] for m in results]
    assert whats[:7] == ["row 1", "row 2", "row 3", "row 5", "row 8", "row 9", "row 11"], whats
    assert re.fullmatch(r"fastest, [235]", whats[7]), whats  # the fp32 VAE's rows sample.py runs (not row 1)
    assert [m.group(1).split(": ")[1] for m in results[5:7]] == [
        "--compile default --overlap-decode --decoder tae",
        "--compile default --overlap-decode --decoder tae --offload"]
    assert all(m and float(m.group(2)) > 0 and float(m.group(3)) > 0 for m in results)


def test_benchmark_cut_after_the_ladder_keeps_what_it_measured(tiny_wan):
    """A run killed once the ladder is done (a GPU taken back mid-run) has already written every
    section it measured into its pipe, each as it was measured, without PYTHONUNBUFFERED. Planted:
    no line buffering (every line arrived at once, when the process ended)."""
    import time
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, "bench.py", "--tiny", "--model", tiny_wan, "--frames", "9",
                          "--levers", "1,3,8", "--long-frames", "0", "--baseline-steps", "0"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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
    assert [RESULT_LINE.fullmatch(line).group(1)[:5] for line in lines
            if line.startswith("CPU | ")] == ["row 1", "row 3", "row 8"]


@pytest.mark.parametrize("chunk,max_frames", [(3, 21), (1, 21), (3, 9)])
def test_flop_count_matches_torch_counter(chunk, max_frames):
    """bench.py's analytic transformer FLOPs (the TFLOP/s it reports) agree with torch's own
    FlopCounterMode over a rollout with the real layer sizes, on meta tensors (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = cw.WanConfig(num_layers=2)  # Wan2.1-1.3B's dims, 2 of its 30 layers
    with torch.device("meta"):
        model = cw.CausalWan(cfg).eval().requires_grad_(False)
        # 480x832: attention is half the work
        context, noise = torch.randn(1, 512, cfg.text_dim), torch.randn(1, 16, 13, 60, 104)
    prompt_kv = model.prompt_kv(context)  # once per prompt: not part of the count
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        cw.rollout(model, noise, prompt_kv, block_size=chunk, max_frames=max_frames)
    counted = counter.get_total_flops()
    analytic = bench.rollout_flops(cfg, 13, 30 * 52, chunk, max_frames)
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

    assert (bench.tae_decode_flops(speedkit.TinyDecoder(), 7, 60, 104, 3)
            == 7 * per_latent_frame((256, 128, 64, 64), 60, 104))
    assert per_latent_frame((256, 128, 64, 64), 60, 104) == 544_151_961_600
    assert (bench.tae_decode_flops(speedkit.TinyDecoder((32, 16, 8, 8)), 4, 8, 8, 1)
            == 4 * per_latent_frame((32, 16, 8, 8), 8, 8))


def test_benchmark_fp8_row_on_the_cpu(tiny_wan, monkeypatch, capsys):
    """Row 10 (--fp8) on the CPU, where the ladder skips it: torchao's float8 kernels run there with
    its hardware assert lifted (as in tests/test_speed_levers.py), on the tiny model in bf16. With
    speedkit.check_fp8 in place the row says its message and is skipped; without it the row is measured
    after row 2, its latents are those of a float8 copy made here (the same torchao call on a deep
    copy, with its own prompt_kv), it differs from row 2, the bf16 model keeps its plain weights,
    and the float8 copy is freed after its row. Planted: quantize_fp8 on the model itself (no copy),
    the bf16 prompt_kv given to the copy, the copy kept after its row -> each fails."""
    import copy
    import gc
    import weakref

    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8Tensor
    n = next(n for n, lever in enumerate(bench.LEVERS) if lever.change.get("fp8"))
    levers = list(bench.LEVERS)
    monkeypatch.setattr(bench, "LEVERS", levers)
    levers[n] = levers[n]._replace(cpu_skip=None)
    args = bench.parse_args(["--tiny", "--model", tiny_wan, "--frames", "9", "--dtype", "bf16", "--levers", str(n + 1)])
    bench.check_args(args)
    state = bench.build_benchmark(args)
    assert bench.measure_ladder(state) == []
    assert (f"  {n + 1}. + float8 linear layers (--fp8): skipped (--fp8 needs a CUDA GPU with compute capability >= 8.9"
            in capsys.readouterr().out)

    levers[n] = levers[n]._replace(check=None)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    copies, real_copy = [], bench.float8_copy
    monkeypatch.setattr(bench, "float8_copy", lambda state: copies.append(real_copy(state)) or copies[-1])
    state.args.levers = [2, n + 1]
    rows = bench.measure_ladder(state)
    out = capsys.readouterr().out
    assert [row["label"].split(".")[0] for row in rows] == ["2", str(n + 1)] and len(copies) == 1, out
    assert "--decoder tae --fp8 |" in out  # its result line (rows 3, 8 and 9 pass on their settings)
    fp8 = weakref.ref(copies.pop()[0])
    gc.collect()
    assert state.fp8 is None and fp8() is None  # freed after its row
    assert not any(isinstance(m.weight, Float8Tensor) for m in state.model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        reference = speedkit.quantize_fp8(copy.deepcopy(state.model))
        for chunk in (3, 1):
            want = cw.rollout(reference, state.noise(3), reference.prompt_kv(state.context), block_size=chunk,
                              generator=torch.Generator().manual_seed(1))
            assert torch.equal(rows[1][chunk]["latents"], want)
            assert not torch.equal(rows[1][chunk]["latents"], rows[0][chunk]["latents"])


def test_benchmark_subset_of_levers(tiny_wan):
    """--levers: the rows left out pass on their cheap settings, not their compilation (row 8 after
    an unmeasured row 5 is eager); bad lengths and rows are one-line errors before any model loads.
    Planted: unmeasured rows passing on everything (row 8 then compiles the blocks)."""
    r = run("--tiny", "--model", tiny_wan, "--frames", "9", "--long-frames", "0", "--levers", "3,8",
            "--baseline-steps", "0")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if re.match(r"  \d+\. ", line)]
    # 4, 6, 7, 10: not on a CPU
    assert [row.split(".")[0].strip() for row in rows] == ["3", "4", "6", "7", "8", "10"], rows
    assert "diff 0.0e+00 / 0" in rows[0] and "diff 0.0e+00 / 0" not in rows[-2]  # the bf16 VAE row differs from row 3
    flags = [line for line in r.stdout.splitlines() if line.startswith(("CPU |", "  bench.py flags"))]
    assert "compiled" not in rows[-2] and not any("--compile" in line for line in flags), (rows[-2], flags)
    assert "baseline WanPipeline: skipped" in r.stdout and "long video: skipped" in r.stdout
    bad = run("--tiny", "--model", tiny_wan, "--levers", "0,12")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: --levers takes row numbers 1-11")
    for flags, message in [(["--levers", "4,6,10"], "--levers 4,6,10: only rows that need a GPU"),
                           (["--frames", "17"], "--frames 17 is 5 latent frames, not whole blocks of 3"),
                           (["--long-frames", "161"], "--long-frames 161 must be 12k-3 frames"),
                           (["--long-frames", "61"], "longer than the --max-frames 21 latent frame window: try 93")]:
        # before any model loads: the model does not exist
        with pytest.raises(common.UserError, match=re.escape(message)) as e:
            bench.main(bench.parse_args(["--tiny", "--model", "/no/such/model", *flags]))
        assert "\n" not in str(e.value)


def test_benchmark_casts_diffusers_as_diffusers_loads(tiny_wan):
    """The benchmark's reference (parity line, WanPipeline baseline) in bf16 has the dtypes diffusers'
    own from_pretrained(dtype=bf16) gives it: its _keep_in_fp32_modules in fp32. Planted: a plain
    .to(bf16) (the time embedder, scale-shift tables and norm2 differ)."""
    from diffusers import WanTransformer3DModel
    folder = os.path.join(tiny_wan, "transformer")
    loaded = WanTransformer3DModel.from_pretrained(folder, dtype=torch.bfloat16)
    cast = bench.as_diffusers_loads(WanTransformer3DModel.from_pretrained(folder), torch.bfloat16)
    def dtypes(m):
        return {n: t.dtype for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    assert dtypes(cast) == dtypes(loaded)
    assert {torch.float32, torch.bfloat16} <= set(dtypes(cast).values())


def test_memory_plan_counts_every_training_step(capsys):
    """`bench.py --memory-plan --tiny`: a row per training step, each with its counted activations, where the
    straight-through cache gradient needs more than the detached cache (every block's graph against the last's)."""
    bench.main(bench.parse_args(["--memory-plan", "--tiny"]))
    rows = {line[:58].strip(): [float(x) for x in line[58:].split("(")[0].split()]
            for line in capsys.readouterr().out.splitlines() if line.startswith(("reward", "DMD", "ODE"))}
    assert len(rows) == 5 and all(len(r) == 5 and r[1] > 0 for r in rows.values()), rows
    straight = rows["reward (train_reward.py, --cache-grad straight-through)"]
    detach = rows["reward (--cache-grad detach)"]
    assert straight[1] > detach[1]
    assert all(abs(sum(r[:4]) - r[4]) < 0.02 for r in rows.values())  # the total is the sum of its parts
