"""The bookkeeping half of eval_vbench.sh: VBench's prompt list, the video names, the check that
every video is there, and the Total / Quality / Semantic scores beside the paper's.

    python vbench_tools.py jobs   --prompt-list VBench_full_info.json --videos DIR/videos --jobs-dir DIR/jobs --shards 8
    python vbench_tools.py verify --prompt-list VBench_full_info.json --videos DIR/videos
    python vbench_tools.py score  RESULTS_DIR [--json scores.json]
    python vbench_tools.py dry-run-results --videos DIR/videos --results-dir DIR/vbench_dry_run   # stand-ins

Prompts and names
-----------------
The prompt list is VBench's own VBench_full_info.json (the same 946 lines as its prompts/all_dimension.txt,
in the same order; the pip wheel ships only the json). VBench's standard mode looks every entry up as
f"{prompt_en}-{i}.mp4", i = 0..4, in one folder (vbench/__init__.py, build_full_info_json), so that is
the name, untruncated: 72 prompts are longer than 100 characters, which peers truncate. Two prompts
appear twice in the list (with different dimensions); both entries read the same five files, so each
unique prompt is generated once: 944 prompts x 5 seeds = 4,720 videos of 81 frames, 480x832, 16 fps.
With --extended-prompts (a file line-aligned with the list) a video is generated from its line but
keeps the original prompt's name; a prompt listed twice is generated from its first line. Two prompts
differ only in case (`a fantasy landscape` and `A fantasy landscape`): use a case-sensitive file system.

`jobs` keeps every valid video and writes the rest round-robin into one job file per GPU. `verify`
decodes every expected file (frame count, size, fps); anything missing, invalid or unexpected in the
folder is listed and it exits 2.

Scores
------
Each raw score is normalized with VBench's Min/Max and weight (scripts/constant.py, not in the pip
wheel; DIMENSIONS below): Quality = weighted mean of the 7 quality dimensions (dynamic degree weighs
0.5), Semantic = mean of the 9 semantic ones, Total = (4 Quality + Semantic) / 5. `score` prints the
table (ours beside the paper's columns), writes it to --json, and its last line is
{"total": ..., "quality": ..., "semantic": ...} in %. A missing dimension, a NaN, or a dimension found
twice is an error naming it (VBench's own cal_final_score.py counts a missing dimension as 0).

Reference rows
--------------
The paper's numbers; ours go beside them once a checkpoint trained here has been scored (none yet).

    model (paper, Table 1)              Total   Quality  Semantic
    Wan2.1-1.3B (bidirectional)         84.26   85.30    80.09
    CausVid                             81.20   84.05    69.80
    Self Forcing (chunk-wise)           84.31   85.07    81.28
    Self Forcing (frame-wise)           84.26   85.25    80.30
    ODE init only (chunk-wise)          68.77   73.27    50.81
    Reward + DMD (ablation, Table 2)    82.55   83.20    79.96
    Reward Forcing (paper)              84.92   85.91    80.97

    dimension (paper, Table 3)   CausVid   Self Forcing   Reward Forcing (paper)
    subject_consistency          96.32     95.32          96.15
    background_consistency       94.65     96.30          95.83
    temporal_flickering          99.38     99.05          97.88
    motion_smoothness            98.00     98.35          97.99
    dynamic_degree               73.61     72.22          81.94
    aesthetic_quality            62.24     65.75          70.51
    imaging_quality              67.82     69.02          68.84
    object_class                 78.01     93.75          93.20
    multiple_objects             60.75     83.92          87.58
    human_action                 74.00     97.00          97.00
    color                        82.34     89.28          89.04
    spatial_relationship         67.74     83.38          83.78
    scene                        14.03     57.34          54.36
    appearance_style             21.23     24.40          24.06
    temporal_style               18.85     20.48          21.19
    overall_consistency          22.50     26.72          26.14
    Q / S / Total recomputed     84.25 / 63.09 / 80.02   85.08 / 81.35 / 84.33   85.91 / 81.22 / 84.97
      from this table
    printed in Table 1           84.05 / 69.80 / 81.20   85.07 / 81.28 / 84.31   85.91 / 80.97 / 84.92

The paper's two tables do not agree exactly, and we do not adjust for it. Recomputing Table 1 from
Table 3 with VBench's normalization (what tests/test_eval_vbench.py checks) gives the "recomputed"
row. Table 3 prints two decimals; that rounding moves any of the three scores by at most 0.009
points. It explains the Quality scores (85.08 vs 85.07, 85.91 vs 85.91) but not the Semantic ones
(81.35 vs 81.28 for Self Forcing, 81.22 vs 80.97 for Reward Forcing) nor, through them, the Totals:
the two tables presumably come from different evaluation runs or sources. CausVid's column does not
reproduce its Table 1 row at all (84.25 / 63.09 vs 84.05 / 69.80). Compare our own runs with the
recomputed row of the same table.
"""
import argparse
import json
import math
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SEEDS = range(5)  # video i of every prompt is generated with seed i
# temporal_flickering is scored on static videos only: VBench's maintainers prescribe sampling more than five
# videos per flickering prompt ("e.g., 40", Vchitect/VBench#94; its prompts/README.md says 25), running its
# static filter (which stops at 5 per prompt, in file-name order) and scoring the first 5 static ones
FLICKER_SEEDS = 40
FLICKER_DIMENSION = "temporal_flickering"
STATIC_SUMMARY = "temporal_flickering_static.json"  # what flicker-check writes beside VBench's results


class UserError(Exception):
    """A problem with what the user pointed at: printed as one line `error: ...`, exit 2 (this file
    runs on the standard library alone, so it does not import causal_wan's)."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like a UserError, instead of the whole usage
        self.exit(2, f"error: {message} (see --help)\n")


def positive(kind):
    """argparse type: a finite number > 0 of the given kind (int for counts, float for fps)."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def flicker_seeds(text):
    """argparse type of --flicker-seeds: at least the 5 videos VBench scores per prompt."""
    value = int(text)
    if value < len(SEEDS):
        raise argparse.ArgumentTypeError(f"{text} is fewer than the {len(SEEDS)} videos VBench scores per prompt")
    return value


def read_text(path, what):
    """A text file the user pointed at, or a one-line error: missing, not a file, not UTF-8."""
    if not Path(path).is_file():
        raise UserError(f"{what} '{path}' does not exist or is not a file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror})") from None


def read_json(path, what, fix):
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} '{path}' is not valid JSON (line {e.lineno}: {e.msg}): {fix}") from None
    except RecursionError:  # Python's json parser recurses once per nesting level
        raise UserError(f"{what} '{path}' is nested too deeply to read (deeper than Python's json parser goes): "
                        f"{fix}") from None

# VBench's scripts/constant.py (not in the pip wheel): n = (raw - Min) / (Max - Min) * W;
# Quality = sum(n over quality) / sum(W), Semantic likewise, Total = (4 Quality + 1 Semantic) / 5.
DIMENSIONS = {  # name: (group, Min, Max, W), in the order of the paper's Table 3
    "subject_consistency": ("quality", 0.1462, 1.0, 1.0),
    "background_consistency": ("quality", 0.2615, 1.0, 1.0),
    "temporal_flickering": ("quality", 0.6293, 1.0, 1.0),
    "motion_smoothness": ("quality", 0.706, 0.9975, 1.0),
    "dynamic_degree": ("quality", 0.0, 1.0, 0.5),
    "aesthetic_quality": ("quality", 0.0, 1.0, 1.0),
    "imaging_quality": ("quality", 0.0, 1.0, 1.0),
    "object_class": ("semantic", 0.0, 1.0, 1.0),
    "multiple_objects": ("semantic", 0.0, 1.0, 1.0),
    "human_action": ("semantic", 0.0, 1.0, 1.0),
    "color": ("semantic", 0.0, 1.0, 1.0),
    "spatial_relationship": ("semantic", 0.0, 1.0, 1.0),
    "scene": ("semantic", 0.0, 0.8222, 1.0),
    "appearance_style": ("semantic", 0.0009, 0.2855, 1.0),
    "temporal_style": ("semantic", 0.0, 0.364, 1.0),
    "overall_consistency": ("semantic", 0.0, 0.364, 1.0),
}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4, 1

# The paper's numbers, printed beside ours: Table 3 (16 dimensions, %) and Table 1 (quality, semantic, total).
PAPER = {
    "Self Forcing": dict(zip(DIMENSIONS, [95.32, 96.30, 99.05, 98.35, 72.22, 65.75, 69.02, 93.75,
                                          83.92, 97.00, 89.28, 83.38, 57.34, 24.40, 20.48, 26.72]),
                         quality=85.07, semantic=81.28, total=84.31),
    "Reward Forcing": dict(zip(DIMENSIONS, [96.15, 95.83, 97.88, 97.99, 81.94, 70.51, 68.84, 93.20,
                                            87.58, 97.00, 89.04, 83.78, 54.36, 24.06, 21.19, 26.14]),
                           quality=85.91, semantic=80.97, total=84.92),
}


# ---- prompts and names ----

def read_entries(path):
    """The 946 entries of VBench_full_info.json ({"prompt_en": ..., "dimension": [...]}), in order."""
    fix = "use VBench_full_info.json of the vbench package"
    entries = read_json(path, "--prompt-list", fix)
    if not (isinstance(entries, list) and entries
            and all(isinstance(e, dict) and isinstance(e.get("prompt_en"), str) for e in entries)):
        raise UserError(f"--prompt-list '{path}' is not a list of {{'prompt_en': ...}} entries: {fix}")
    return entries


def read_prompt_list(path):
    """The 946 prompts of VBench_full_info.json, in order, duplicates included."""
    return [entry["prompt_en"] for entry in read_entries(path)]


def flicker_prompts(path):
    """The prompts of the temporal_flickering dimension (75, each listed once and for no other dimension)."""
    entries = read_entries(path)
    return list(dict.fromkeys(e["prompt_en"] for e in entries if FLICKER_DIMENSION in e.get("dimension", [])))


def video_name(prompt, i, width=1):
    name = f"{prompt}-{i:0{width}d}.mp4"
    if "/" in name or "\0" in name or len(name.encode()) > 255:
        raise UserError(f"prompt cannot be a file name as it is: {prompt!r}")
    return name


def to_generate(prompt_list, extended_prompts=None, limit=None):
    """{original prompt: the text to generate it from}, in the list's order.

    extended_prompts: a file line-aligned with the prompt list; the video is generated from its line
    but keeps the original prompt's name. For a prompt listed twice, its first line is used.
    limit: only the first `limit` unique prompts (the dry run).
    """
    prompts = read_prompt_list(prompt_list)
    source = prompts
    if extended_prompts:
        source = read_text(extended_prompts, "--extended-prompts").splitlines()
        if len(source) != len(prompts) or not all(line.strip() for line in source):
            raise UserError(f"{extended_prompts}: expected {len(prompts)} non-empty lines, line-aligned with "
                             f"{prompt_list}; got {len(source)} lines")
    texts = {}  # original prompt -> prompt to generate from (first occurrence wins)
    for prompt, line in zip(prompts, source):
        texts.setdefault(prompt, line)
    return texts if limit is None else dict(list(texts.items())[:limit])


def plan(prompt_list, extended_prompts=None, limit=None):
    """[(prompt to generate from, seed, file name)] for every video VBench will look for."""
    texts = to_generate(prompt_list, extended_prompts, limit)
    videos = [(line, seed, video_name(prompt, seed)) for prompt, line in texts.items() for seed in SEEDS]
    assert len({name for _, _, name in videos}) == len(videos), "two videos share a file name"
    return videos


def flicker_plan(prompt_list, seeds, extended_prompts=None, limit=None):
    """The temporal_flickering candidates of the flicker folder: (prompt to generate from, seed, file name,
    the main folder's file of the same video or None) for seeds 0..seeds-1 of every flickering prompt.
    Seeds 0-4 are the main folder's videos (linked, not generated again); the others are generated. Names
    are zero-padded (`{prompt}-07.mp4`) so that the static filter, which walks the folder in file-name order
    and stops at 5 static videos per prompt, keeps the 5 lowest static seeds (VBench's name parsing strips
    any `-<digits>` ending)."""
    texts = to_generate(prompt_list, extended_prompts, limit)
    flicker = set(flicker_prompts(prompt_list))
    width = len(str(seeds - 1))
    return [(line, seed, video_name(prompt, seed, width), video_name(prompt, seed) if seed in SEEDS else None)
            for prompt, line in texts.items() if prompt in flicker for seed in range(seeds)]


# ---- checking videos ----

def check_video(path, frames, height, width, fps):
    """None if `path` decodes to `frames` frames of height x width at `fps`, else what is wrong with it."""
    import imageio.v2 as imageio  # only these subcommands need it; `score` runs on the standard library

    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            meta = reader.get_meta_data()
            n = sum(1 for _ in reader)  # decode every frame: a broken stream fails here, not in VBench
    except Exception as e:
        return f"unreadable ({type(e).__name__}: {e})"
    found = (n, meta["size"][1], meta["size"][0], meta["fps"])
    if found != (frames, height, width, fps):
        return f"{n} frames {found[1]}x{found[2]} at {found[3]} fps, expected {frames} {height}x{width} at {fps}"
    return None


def check_videos(paths, spec):
    """{path: problem or None}, decoding in parallel (ffmpeg does the work in its own processes)."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return dict(zip(paths, pool.map(lambda p: check_video(p, *spec), paths)))


def write_jobs(args):
    """One tab-separated job file per GPU (prompt, seed, output path) for the videos not yet valid: the
    main folder's, and with --flicker-videos the extra temporal_flickering seeds of the flicker folder."""
    spec = (args.frames, args.height, args.width, args.fps)
    todo = missing_videos(plan(args.prompt_list, args.extended_prompts, args.limit), args.videos, "--videos", spec,
                          where=f", over {args.shards} shard(s)")
    if args.flicker_videos:  # the extra seeds of the temporal_flickering prompts (0-4 are the main folder's)
        extra = [(line, seed, name) for line, seed, name, main in
                 flicker_plan(args.prompt_list, args.flicker_seeds, args.extended_prompts, args.limit) if main is None]
        todo += missing_videos(extra, args.flicker_videos, "--flicker-videos", spec, kind="extra temporal_flickering "
                               "videos", where=f" in {args.flicker_videos}")
    for prompt, seed, path in todo:
        if "\t" in prompt or "\n" in prompt:
            raise UserError(f"a prompt contains a tab or newline, which the job file cannot hold: {prompt!r}")
    jobs_dir = Path(args.jobs_dir)
    make_folder(jobs_dir, "--jobs-dir")
    for shard in range(args.shards):  # round robin: every video lands in exactly one shard
        lines = [f"{prompt}\t{seed}\t{path}\n" for prompt, seed, path in todo[shard :: args.shards]]
        (jobs_dir / f"shard_{shard}.tsv").write_text("".join(lines))


def missing_videos(videos, folder, what, spec, kind="videos", where=""):
    """The (prompt, seed, path) of `videos` [(prompt, seed, name)] that are not valid files in `folder` yet;
    says how many there are."""
    out_dir = Path(folder).resolve()
    make_folder(out_dir, what)
    existing = [out_dir / name for _, _, name in videos if (out_dir / name).exists()]
    valid = {path for path, problem in check_videos(existing, spec).items() if problem is None}
    todo = [(prompt, seed, out_dir / name) for prompt, seed, name in videos if out_dir / name not in valid]
    print(f"{len(videos)} {kind} expected: {len(valid)} valid already, {len(todo)} to generate "
          f"({len(existing) - len(valid)} of them exist but are invalid and will be overwritten){where}")
    return todo


def verify(args):
    """Every expected video exists exactly once, decodes with the right frames/size/fps; nothing else is there.
    With --flicker-videos, the same for the flicker folder, after linking the main folder's seeds 0-4 into it."""
    spec = (args.frames, args.height, args.width, args.fps)
    names = [name for _, _, name in plan(args.prompt_list, limit=args.limit)]
    verify_folder(Path(args.videos), "--videos", names, names, spec)
    print(f"verified: all {len(names)} videos present exactly once, {args.frames} frames "
          f"{args.height}x{args.width} at {args.fps} fps")
    if not args.flicker_videos:
        return
    flicker, folder = flicker_plan(args.prompt_list, args.flicker_seeds, limit=args.limit), Path(args.flicker_videos)
    if not folder.is_dir():
        raise UserError(f"--flicker-videos '{folder}' is not a folder: generate the videos first (eval_vbench.sh)")
    for _, _, name, main in flicker:
        if main is not None:  # the same video as the main folder's: a hard link (a copy across file systems)
            link(Path(args.videos) / main, folder / name)
    names = [name for _, _, name, _ in flicker]
    verify_folder(folder, "--flicker-videos", names, [name for _, _, name, main in flicker if main is None], spec)
    print(f"verified: all {len(names)} temporal_flickering candidates present exactly once in {folder} "
          f"({args.flicker_seeds} seeds of each of the {len(names) // args.flicker_seeds} prompts)")


def verify_folder(folder, what, names, to_decode, spec):
    """`names` are all in `folder` and nothing else is; those of `to_decode` decode to `spec`."""
    if not folder.is_dir():
        raise UserError(f"{what} '{folder}' is not a folder: generate the videos first (eval_vbench.sh)")
    present = set(os.listdir(folder))
    missing = [name for name in names if name not in present]
    extra = sorted(present - set(names))  # VBench takes the suffix from the first file it lists
    problems = check_videos([folder / name for name in to_decode if name in present], spec)
    invalid = [f"{path.name}: {problem}" for path, problem in problems.items() if problem]
    for title, items in [("missing", missing), ("invalid", invalid), ("unexpected files", extra)]:
        if items:
            print(f"{title} in {folder} ({len(items)}):", *items, sep="\n  ", file=sys.stderr)
    if missing or invalid or extra:
        raise UserError(f"verification failed: {len(missing)} missing, {len(invalid)} invalid, "
                         f"{len(extra)} unexpected")


def link(source, target):
    """target is the file `source` (a hard link, or a copy where links cannot cross file systems)."""
    if target.exists() and os.path.samefile(source, target):
        return
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def flicker_check(args):
    """After VBench's static filter: how many static videos it kept per temporal_flickering prompt (at most 5,
    the first ones in file-name order), written to --summary for `score`. None at all is an error here:
    VBench would stop with an IndexError on the empty folder."""
    prompts = flicker_prompts(args.prompt_list)
    if args.limit is not None:
        limited = set(to_generate(args.prompt_list, limit=args.limit))
        prompts = [p for p in prompts if p in limited]
    path = Path(args.filter_results) / "filtered_static_video.json"
    found = read_json(path, "VBench's static filter result", fix="rerun VBench's static filter")
    if not isinstance(found, dict) or not all(isinstance(v, dict) and isinstance(v.get("static_count"), int)
                                              for v in found.values()):
        raise UserError(f"VBench's static filter result '{path}' is not {{prompt: {{'static_count': n, ...}}}}: "
                        f"rerun VBench's static filter")
    counts = {p: min(found.get(p, {}).get("static_count", 0), len(SEEDS)) for p in prompts}
    kept, expected = sum(counts.values()), len(SEEDS) * len(prompts)
    fewer = sorted(p for p, n in counts.items() if 0 < n < len(SEEDS))
    none = sorted(p for p, n in counts.items() if n == 0)
    if kept == 0:
        raise UserError(f"VBench's static filter found no static video among the {args.flicker_seeds} seeds of any "
                        f"of the {len(prompts)} temporal_flickering prompts, so that dimension cannot be scored "
                        f"(VBench would stop with an IndexError): generate more seeds (--flicker-seeds)")
    summary = dict(videos=kept, expected=expected, seeds=args.flicker_seeds, prompts=len(prompts),
                   fewer_than_5=fewer, none=none, counts=counts)
    Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"temporal_flickering: {describe_static(summary)}; wrote {args.summary}")


def describe_static(summary):
    text = (f"scored on {summary['videos']} of {summary['expected']} static videos (the first 5 static of "
            f"{summary['seeds']} seeds per prompt)")
    if summary["fewer_than_5"] or summary["none"]:
        text += (f"; fewer than 5 static for {len(summary['fewer_than_5']) + len(summary['none'])} of "
                 f"{summary['prompts']} prompts, none for {len(summary['none'])}")
    return text


# ---- scores ----

def load_results(results_dir):
    """{dimension: raw score in [0, 1]} from VBench's *_eval_results.json files ({dim: [score, per_video]})."""
    files = sorted(Path(results_dir).rglob("*_eval_results.json"))
    found = {}  # dimension -> (score, file)
    for file in files:
        results = read_json(file, "VBench result file", fix="delete it and rerun VBench on that dimension")
        if not (isinstance(results, dict) and all(isinstance(v, list) and len(v) == 2 for v in results.values())):
            raise UserError(f"VBench result file '{file}' is not {{dimension: [score, per_video]}}: delete it and "
                            f"rerun VBench on that dimension")
        for dim, (score, _) in results.items():
            if dim in found:
                raise UserError(f"{dim} is in two result files: {found[dim][1]} and {file}; keep one")
            found[dim] = (score, file)
    missing = [dim for dim in DIMENSIONS if dim not in found]
    if missing:  # VBench's own cal_final_score.py would count these as 0
        raise UserError(f"missing VBench dimensions in {results_dir} ({len(files)} *_eval_results.json files): "
                         f"{', '.join(missing)}. A missing dimension is an error, never a 0: run "
                         f"`vbench evaluate --dimension NAME` for each and check its log.")
    unknown = sorted(set(found) - set(DIMENSIONS))
    failed = [f"{dim}={score!r} ({file})" for dim, (score, file) in found.items()
              if not (isinstance(score, (int, float)) and math.isfinite(score) and 0 <= score <= 1)]
    if unknown or failed:
        raise UserError(f"unexpected dimensions {unknown} / failed dimensions {failed} in {results_dir}")
    return {dim: found[dim][0] for dim in DIMENSIONS}


def vbench_scores(raw):
    """Raw scores in [0, 1] for all 16 dimensions -> {"quality", "semantic", "total"} in [0, 1]."""
    normalized = {dim: (raw[dim] - lo) / (hi - lo) * w for dim, (_, lo, hi, w) in DIMENSIONS.items()}
    group = {}
    for name in ("quality", "semantic"):
        dims = [dim for dim, (g, *_) in DIMENSIONS.items() if g == name]
        group[name] = sum(normalized[dim] for dim in dims) / sum(DIMENSIONS[dim][3] for dim in dims)
    total = ((QUALITY_WEIGHT * group["quality"] + SEMANTIC_WEIGHT * group["semantic"])
             / (QUALITY_WEIGHT + SEMANTIC_WEIGHT))
    return {**group, "total": total}


def score(args):
    if not Path(args.results_dir).is_dir():  # first: eval_vbench.sh --score-only puts --json inside it
        raise UserError(f"results folder '{args.results_dir}' does not exist or is not a folder: give the folder "
                        f"that holds VBench's *_eval_results.json (DIR/vbench of eval_vbench.sh --out DIR)")
    if args.json:  # before the work: a folder in the way or a missing folder
        parent = Path(args.json).resolve().parent
        if Path(args.json).is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"--json '{args.json}' cannot be written (a folder, or its folder is missing or read-only)")
    raw = load_results(args.results_dir)
    scores = vbench_scores(raw)
    ours = {**{dim: 100 * raw[dim] for dim in DIMENSIONS}, **{k: 100 * v for k, v in scores.items()}}
    refs = list(PAPER)
    print(f"{'dimension':<24}{'group':<10}{'ours':>8}" + "".join(f"{ref + ' *':>18}" for ref in refs))
    rows = [(dim, group, dim) for dim, (group, *_) in DIMENSIONS.items()]
    rows += [("Quality score", "", "quality"), ("Semantic score", "", "semantic"), ("Total score", "", "total")]
    static = static_summary(args.results_dir)
    for label, group, key in rows:
        mark = " +" if key == FLICKER_DIMENSION and static else ""
        print(f"{label + mark:<24}{group:<10}{ours[key]:>8.2f}" + "".join(f"{PAPER[ref][key]:>18.2f}" for ref in refs))
    print("* the paper's Table 3 (dimensions) and Table 1 (scores); dimensions are raw VBench scores in %, "
          "the three scores use VBench's Min/Max normalization and weights")
    if static:
        print(f"+ {FLICKER_DIMENSION}: {describe_static(static)}")
    if args.json:
        flicker = {}
        if static:
            flicker = {"temporal_flickering_static": {k: static[k] for k in ("videos", "expected", "seeds")}}
        Path(args.json).write_text(json.dumps({"dimensions": {dim: ours[dim] for dim in DIMENSIONS},
                                               **{k: ours[k] for k in scores}, **flicker}, indent=2) + "\n")
        print(f"wrote {args.json}")
    print(json.dumps({k: round(ours[k], 4) for k in ("total", "quality", "semantic")}))


def static_summary(results_dir):
    """flicker-check's summary in the results folder (how many static videos temporal_flickering was scored
    on), or None where there is none (a run scored without it, the dry run)."""
    path = Path(results_dir) / STATIC_SUMMARY
    if not path.is_file():
        return None
    summary = read_json(path, "temporal_flickering's static-video summary", fix="rerun eval_vbench.sh")
    keys = {"videos", "expected", "seeds", "prompts", "fewer_than_5", "none"}
    if not (isinstance(summary, dict) and keys <= set(summary)):
        raise UserError(f"'{path}' is not flicker-check's summary: rerun eval_vbench.sh")
    return summary


def dry_run_results(args):
    """Stand-in result files for the dry run, in VBench's format: the paper's Table 3 numbers, not a measurement."""
    videos = sorted(str(p) for p in Path(args.videos).glob("*.mp4"))
    out = Path(args.results_dir)
    make_folder(out, "--results-dir")
    for dim in DIMENSIONS:
        per_video = [{"video_path": v, "video_results": PAPER["Reward Forcing"][dim] / 100} for v in videos]
        results = {dim: [PAPER["Reward Forcing"][dim] / 100, per_video]}
        (out / f"dry_run_{dim}_eval_results.json").write_text(json.dumps(results))


def make_folder(folder, what):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only disk
        raise UserError(f"{what} '{folder}' cannot be created ({e.strerror}): choose another location") from None


def parse_args(argv=None):
    parser = ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("jobs", "verify"):
        p = sub.add_parser(name)
        p.add_argument("--prompt-list", required=True, help="VBench_full_info.json of the installed vbench package")
        p.add_argument("--videos", required=True, help="the one folder holding the videos")
        p.add_argument("--limit", type=positive(int), help="only the first LIMIT unique prompts (dry run)")
        p.add_argument("--frames", type=positive(int), default=81)
        p.add_argument("--height", type=positive(int), default=480)
        p.add_argument("--width", type=positive(int), default=832)
        p.add_argument("--fps", type=positive(float), default=16.0)
        p.add_argument("--flicker-videos", help="the folder of the temporal_flickering candidates (their own folder)")
        p.add_argument("--flicker-seeds", type=flicker_seeds, default=FLICKER_SEEDS,
                       help=f"videos per temporal_flickering prompt before the static filter ({FLICKER_SEEDS})")
        if name == "jobs":
            p.add_argument("--extended-prompts", help="longer prompts to generate from, line-aligned with the list")
            p.add_argument("--jobs-dir", required=True)
            p.add_argument("--shards", type=positive(int), default=1, help="one job file per GPU")
    p = sub.add_parser("flicker-check")
    p.add_argument("--prompt-list", required=True, help="VBench_full_info.json of the installed vbench package")
    p.add_argument("--filter-results", required=True, help="the --result_path of VBench's static filter")
    p.add_argument("--summary", required=True, help=f"where to write the summary (`score` reads {STATIC_SUMMARY})")
    p.add_argument("--flicker-seeds", type=flicker_seeds, default=FLICKER_SEEDS)
    p.add_argument("--limit", type=positive(int), help="only the first LIMIT unique prompts (dry run)")
    p = sub.add_parser("score")
    p.add_argument("results_dir", help="folder searched recursively for VBench's *_eval_results.json")
    p.add_argument("--json", help="also write the table here")
    p = sub.add_parser("dry-run-results")
    p.add_argument("--videos", required=True)
    p.add_argument("--results-dir", required=True)
    return parser.parse_args(argv)


def main(args):
    commands = {"jobs": write_jobs, "verify": verify, "flicker-check": flicker_check, "score": score,
                "dry-run-results": dry_run_results}
    commands[args.command](args)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
