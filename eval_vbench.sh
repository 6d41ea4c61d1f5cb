#!/usr/bin/env bash
# VBench evaluation of a checkpoint, as in the paper's Tables 1 and 3: generate the 4,720 standard
# videos, score all 16 dimensions with VBench, print Total / Quality / Semantic.
#
#   bash eval_vbench.sh --checkpoint CKPT --out DIR [--extended-prompts FILE] [--gpus N] [--flicker-seeds N]
#   bash eval_vbench.sh --score-only RESULTS_DIR      # only the table, from VBench's *_eval_results.json
#   bash eval_vbench.sh --dry-run --out DIR --prompt-list VBench_full_info.json [--gpus N]
#
# Run it with the project's venv active (`python` is ours; sample.py generates).
# 1. Generate: every unique prompt of VBench's own prompt list (VBench_full_info.json of the installed
#    vbench package), seeds 0..4, 81 frames 480x832 at 16 fps, into DIR/videos/"{prompt}-{seed}.mp4"
#    (the original prompt, untruncated, even when --extended-prompts gives the text to generate from;
#    names and counts: vbench_tools.py's docstring). The videos are split round-robin over --gpus N
#    processes (CUDA_VISIBLE_DEVICES=0..N-1, one `sample.py --jobs` each, logs in DIR/logs/). A rerun
#    keeps every valid video and makes the rest. Then every one of the 4,720 files is decoded and
#    checked; anything missing, invalid or unexpected stops the script. The 75 temporal_flickering
#    prompts get more seeds (0..39, --flicker-seeds) in their own folder, DIR/videos_flicker/
#    "{prompt}-{seed:02d}.mp4" (seeds 0-4 hard-linked from DIR/videos), checked the same way.
# 2. Score: VBench 0.1.5 in its own venv ($VBENCH_VENV), created on first use from Python 3.10/3.11
#    with the pins below (they conflict with ours: they are here, never in requirements.txt); creating
#    it needs the network and nvcc of CUDA 12.x (detectron2 is built from source: from GitHub, or from
#    DETECTRON2_SRC, which also takes a prebuilt wheel and then needs no nvcc). Scoring itself is offline
#    (HF_HUB_OFFLINE=1) with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (torch >= 2.6 refuses VBench's old
#    checkpoints otherwise). Each dimension runs as its own `torchrun launch/evaluate.py` into
#    DIR/vbench/<dimension>/; a dimension with a result file is skipped on a rerun.
#    temporal_flickering is scored as VBench's maintainers prescribe (Vchitect/VBench#94, #110): its
#    static filter (RAFT) runs over DIR/videos_flicker and keeps the first 5 static videos of each prompt
#    (DIR/static_filter/filtered_videos), which are scored; fewer than 5 for a prompt is said in the table
#    (vbench_tools.py flicker-check), none at all stops the script (VBench itself would crash on the empty
#    folder with an IndexError). VBench's `vbench evaluate` exits 0 when a dimension fails;
#    here a failed run or a missing result file stops the script with the dimension's name.
# 3. Aggregate: VBench's Min/Max/weights -> table, DIR/vbench_scores.json, and a last JSON line
#    {"total": ..., "quality": ..., "semantic": ...} in % (vbench_tools.py score).
# Before anything is built or generated, a real run checks in seconds, each as one line `error: ...`: a GPU
#    (nvidia-smi, at least --gpus of them), the pre-placed weights (VBENCH_WEIGHTS), and, only while VBench's
#    venv is not built yet, DETECTRON2_SRC, nvcc's CUDA version, VBENCH_PYTHON, and that git reaches detectron2.
# --dry-run: the same flow on the CPU with `sample.py --tiny`, 3 prompts, small videos; VBench is
#    skipped and stand-in result files (the paper's numbers) go through the aggregation. The prompt list:
#      pip download --no-deps vbench==0.1.5
#      unzip -p vbench-0.1.5-py3-none-any.whl vbench/VBench_full_info.json > /tmp/VBench_full_info.json
#
# What it costs (estimates, not measurements):
# - Generation: 4,720 videos x 81 frames = 382,320 frames. At the paper's 17.0 FPS on one H100
#   (Table 1) that is about 22,500 s = 6.2 GPU-hours (about 47 minutes on 8 GPUs), plus model loading,
#   text encoding and mp4 writing. For scale, the bidirectional Wan2.1 at 0.78 FPS would need about
#   136 GPU-hours. The temporal_flickering candidates add 75 x 35 = 2,625 videos (+56%), ~3.5 GPU-hours.
# - Verification: every video is decoded once on the CPU, about 0.2 s per 81-frame 480x832 video
#   (measured on one synthetic video), in parallel over the cores: a few minutes on 16 cores.
# - VBench scoring of the 16 dimensions: not measured yet.
# - First use only: VBench's venv (torch 2.6 with its CUDA libraries) and the detectron2 build.
#
# What this script expects from sample.py (one video per job line):
#   python sample.py --jobs JOBS.tsv --frames F --height H --width W --fps FPS (--checkpoint CKPT | --tiny)
#   JOBS.tsv: no header; each line PROMPT<TAB>SEED<TAB>OUT_PATH. For each line, generate one video from
#   PROMPT with torch seed SEED and write it to OUT_PATH (mp4; overwrite; write a temporary file and
#   rename it, so that a file under OUT_PATH is always a whole video). Exit non-zero if any line fails.
#
# Environment: VBENCH_VENV (default ~/.cache/vbench_venv), VBENCH_CACHE_DIR (default ~/.cache/vbench,
# the weights listed in VBENCH_WEIGHTS below), VBENCH_PYTHON (python3.11: the interpreter for the venv),
# DETECTRON2_SRC (where GitHub is out of reach: a checkout of detectron2 at the commit below, or a wheel of it
# built for torch 2.6.0+cu124).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VBENCH_VENV=${VBENCH_VENV:-$HOME/.cache/vbench_venv}
VBENCH_CACHE_DIR=${VBENCH_CACHE_DIR:-$HOME/.cache/vbench}
VBENCH_PYTHON=${VBENCH_PYTHON:-python3.11}

# VBench pins transformers 4.33.2, numpy<2 and timm<=1.0.12; these are the versions its venv gets.
# detectron2 (GRiT: object_class, multiple_objects, color, spatial_relationship) is built from source
# against that torch, so creating the venv needs the network and nvcc.
VBENCH_PACKAGES=(torch==2.6.0 torchvision==0.21.0 vbench==0.1.5 pyiqa==0.1.10 timm==1.0.12
                 numpy==1.26.4 opencv-python==4.11.0.86)
DETECTRON2_REPO=https://github.com/facebookresearch/detectron2.git
DETECTRON2="detectron2 @ git+$DETECTRON2_REPO@02b5c4e295e990042a714712c21dc79b731e8833"

# Pre-placed under $VBENCH_CACHE_DIR (scoring runs offline; where to get each: the commands below).
# The script checks all of them before it starts and lists what is missing; it sets
# TORCH_HOME=$VBENCH_CACHE_DIR/torch and HF_HOME=$VBENCH_CACHE_DIR/huggingface.
VBENCH_WEIGHTS=(
  clip_model/ViT-B-32.pt                                    # background_consistency, appearance_style (CLIP ViT-B/32)
  clip_model/ViT-L-14.pt                                    # aesthetic_quality (CLIP ViT-L/14)
  aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth     # aesthetic_quality (LAION head)
  dino_model/facebookresearch_dino_main/hubconf.py          # subject_consistency (clone of facebookresearch/dino)
  dino_model/dino_vitbase16_pretrain.pth                    # subject_consistency (DINO ViT-B/16): VBench checks it is here,
  torch/hub/checkpoints/dino_vitbase16_pretrain.pth         #   DINO's hubconf loads it from $TORCH_HOME
  pyiqa_model/musiq_spaq_ckpt-358bb6af.pth                  # imaging_quality (MUSIQ, SPAQ)
  amt_model/amt-s.pth                                       # motion_smoothness (AMT-S)
  raft_model/models/raft-things.pth                         # dynamic_degree and the static filter (RAFT, things)
  grit_model/grit_b_densecap_objectdet.pth                  # object_class, multiple_objects, color, spatial_relationship (GRiT-B)
  caption_model/tag2text_swin_14m.pth                       # scene (Tag2Text Swin 14M)
  umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth         # human_action (UMT-L/16)
  ViCLIP/ViClip-InternVid-10M-FLT.pth                       # temporal_style, overall_consistency (ViCLIP)
  ViCLIP/bpe_simple_vocab_16e6.txt.gz                       # temporal_style, overall_consistency (CLIP's BPE vocabulary)
  "huggingface/hub/models--bert-base-uncased/snapshots/*/vocab.txt"          # GRiT and Tag2Text tokenizer
  "huggingface/hub/models--bert-base-uncased/snapshots/*/model.safetensors"  # Tag2Text (scene)
)
# On a machine with the network (the URLs are the ones VBench 0.1.5 downloads from):
#   C=${VBENCH_CACHE_DIR:-$HOME/.cache/vbench}
#   mkdir -p $C/aesthetic_model/emb_reader $C/torch/hub/checkpoints
#   wget -P $C/clip_model https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt
#   wget -P $C/clip_model https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt
#   wget -O $C/aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth 'https://github.com/LAION-AI/aesthetic-predictor/blob/main/sa_0_4_vit_l_14_linear.pth?raw=true'
#   git clone https://github.com/facebookresearch/dino $C/dino_model/facebookresearch_dino_main
#   wget -P $C/dino_model https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth
#   cp $C/dino_model/dino_vitbase16_pretrain.pth $C/torch/hub/checkpoints/
#   wget -P $C/pyiqa_model https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth
#   wget -P $C/amt_model https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth
#   wget -P $C/raft_model https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip && unzip -d $C/raft_model $C/raft_model/models.zip && rm $C/raft_model/models.zip
#   wget -P $C/grit_model https://datarelease.blob.core.windows.net/grit/models/grit_b_densecap_objectdet.pth
#   wget -P $C/caption_model https://huggingface.co/spaces/xinyu1205/recognize-anything/resolve/main/tag2text_swin_14m.pth
#   wget -P $C/umt_model https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/l16_ptk710_ftk710_ftk400_f16_res224.pth
#   wget -P $C/ViCLIP https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/ViClip-InternVid-10M-FLT.pth
#   wget -P $C/ViCLIP https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz
#   HF_HOME=$C/huggingface hf download bert-base-uncased \
#       config.json vocab.txt tokenizer_config.json tokenizer.json model.safetensors    # hf: in our venv
DIMENSIONS=(subject_consistency background_consistency temporal_flickering motion_smoothness
            dynamic_degree aesthetic_quality imaging_quality object_class multiple_objects human_action
            color spatial_relationship scene appearance_style temporal_style overall_consistency)

die() { echo "error: $*" >&2; exit 2; }  # a problem the user can fix: one line, exit 2 (as the Python scripts)

CHECKPOINT="" OUT="" EXTENDED="" GPUS=1 SCORE_ONLY="" DRY_RUN=0 PROMPT_LIST="" EXTENDED_ARGS=() FLICKER_SEEDS=""
while (($#)); do
  case $1 in
    --checkpoint|--out|--extended-prompts|--gpus|--score-only|--prompt-list|--flicker-seeds)
      [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)" ;;&
    --checkpoint) CHECKPOINT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --extended-prompts) EXTENDED=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --score-only) SCORE_ONLY=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --prompt-list) PROMPT_LIST=$2; shift 2 ;;
    --flicker-seeds) FLICKER_SEEDS=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 { if ($0 == "#" && ++n == 2) exit; print }' "${BASH_SOURCE[0]}"; exit 0 ;;  # the first paragraph and the commands
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

readable_file() {  # FLAG PATH: a file the user pointed at, checked before anything is built or generated
  [[ -f $2 ]] || die "$1 '$2' does not exist or is not a file"
  [[ -r $2 ]] || die "$1 '$2' cannot be read"
}

if [[ -n $SCORE_ONLY ]]; then
  exec python "$HERE/vbench_tools.py" score "$SCORE_ONLY" --json "$SCORE_ONLY/vbench_scores.json"
fi

[[ -n $OUT ]] || die "--out DIR is required"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$GPUS'"
[[ -z $FLICKER_SEEDS || ( $FLICKER_SEEDS =~ ^[1-9][0-9]*$ && $FLICKER_SEEDS -ge 5 ) ]] \
  || die "--flicker-seeds must be an integer >= 5 (VBench scores 5 static videos per prompt), got '$FLICKER_SEEDS'"
if ((DRY_RUN)); then
  [[ -z $CHECKPOINT ]] || die "--dry-run uses sample.py --tiny, not a checkpoint"
  [[ -n $PROMPT_LIST ]] || die "--dry-run needs --prompt-list VBench_full_info.json (e.g. unzip -p vbench-0.1.5-py3-none-any.whl vbench/VBench_full_info.json)"
  MODEL_ARGS=(--tiny) VIDEO_SPEC=(--frames 9 --height 64 --width 64 --fps 16) LIMIT=(--limit 3)
  FLICKER_SEEDS=${FLICKER_SEEDS:-7}
else
  [[ -n $CHECKPOINT ]] || die "--checkpoint CKPT is required"
  [[ -z $PROMPT_LIST ]] || die "--prompt-list is for --dry-run; a real run reads the list of the installed vbench"
  readable_file --checkpoint "$CHECKPOINT"  # before VBench's venv (over 1 GB) is built
  MODEL_ARGS=(--checkpoint "$CHECKPOINT") VIDEO_SPEC=(--frames 81 --height 480 --width 832 --fps 16) LIMIT=()
  FLICKER_SEEDS=${FLICKER_SEEDS:-40}
fi
[[ -z $PROMPT_LIST ]] || readable_file --prompt-list "$PROMPT_LIST"
[[ -z $EXTENDED ]] || { readable_file --extended-prompts "$EXTENDED"; EXTENDED_ARGS=(--extended-prompts "$EXTENDED"); }
FLICKER=(--flicker-videos "$OUT/videos_flicker" --flicker-seeds "$FLICKER_SEEDS")
mkdir -p "$OUT/videos" "$OUT/videos_flicker" "$OUT/jobs" "$OUT/logs" 2>/dev/null && [[ -w $OUT ]] && touch "$OUT/logs/.writable" 2>/dev/null \
  || die "--out '$OUT' cannot be written (a file in the way, no permission, or a read-only disk): choose another folder"
rm -f "$OUT/logs/.writable"

vbench_python() { "$VBENCH_VENV/bin/python" "$@"; }

check_nvcc() {  # before the venv is built: detectron2 is compiled against its torch (2.6.0, CUDA 12.4)
  # torch finds the toolkit as CUDA_HOME, else CUDA_PATH, else the folder above `nvcc` on PATH, else
  # /usr/local/cuda (torch/utils/cpp_extension.py); it refuses a CUDA major version other than its own
  local home=${CUDA_HOME:-${CUDA_PATH:-}} nvcc release
  if [[ -z $home ]]; then
    nvcc=$(command -v nvcc || true)
    home=$([[ -n $nvcc ]] && dirname "$(dirname "$(readlink -f "$nvcc")")" || echo /usr/local/cuda)
  fi
  [[ -x $home/bin/nvcc ]] || die "building detectron2 (VBench's GRiT) needs nvcc of CUDA 12.x and there is none in" \
    "$home: install a CUDA 12.x toolkit and set CUDA_HOME=/path/to/cuda-12.x"
  release=$("$home/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p' | head -n 1)
  [[ $release == 12.* ]] || die "nvcc in $home is CUDA ${release:-of an unknown version}, and VBench's torch 2.6.0" \
    "is built for CUDA 12.4: torch refuses to build detectron2 against another major version; install a CUDA 12.x" \
    "toolkit and set CUDA_HOME=/path/to/cuda-12.x (and TORCH_CUDA_ARCH_LIST, e.g. 9.0, where no GPU is visible)," \
    "or give a prebuilt wheel in DETECTRON2_SRC"
}

check_gpus() {  # generation and VBench: --gpus N processes on GPUs 0..N-1 (nvidia-smi lists them all, as they are
  # numbered here: CUDA_VISIBLE_DEVICES is set per process below); without nvidia-smi, what our torch sees
  local count source=nvidia-smi
  if command -v nvidia-smi >/dev/null; then
    count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU [0-9]') || true
  else
    source="torch (no nvidia-smi on PATH)"
    count=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || count=0
  fi
  ((count > 0)) || die "generating the videos and VBench need a GPU and $source lists none (no GPU or no driver" \
    "here): run on a GPU host; --dry-run checks the flow on the CPU"
  ((GPUS <= count)) || die "--gpus $GPUS but $source lists $count GPU(s): pass --gpus $count or fewer"
}

check_weights() {  # VBench runs offline (HF_HUB_OFFLINE=1): every weight must be in place before the hours of work
  local missing=() weight
  for weight in "${VBENCH_WEIGHTS[@]}"; do
    compgen -G "$VBENCH_CACHE_DIR/$weight" >/dev/null || missing+=("$weight")
  done
  ((${#missing[@]} == 0)) || die "VBench runs offline, and ${#missing[@]} of VBench's ${#VBENCH_WEIGHTS[@]} weights" \
    "are missing under VBENCH_CACHE_DIR=$VBENCH_CACHE_DIR: $(printf '%s, ' "${missing[@]}" | sed 's/, $//')" \
    "(the commands that fetch each are in eval_vbench.sh's header)"
}

check_venv_build() {  # only while VBench's venv is not built yet: what its build needs, cheapest first, network last
  if [[ -n ${DETECTRON2_SRC:-} ]]; then
    [[ -d $DETECTRON2_SRC && -f $DETECTRON2_SRC/setup.py ]] || [[ -f $DETECTRON2_SRC && $DETECTRON2_SRC == *.whl ]] \
      || die "DETECTRON2_SRC '$DETECTRON2_SRC' is neither a detectron2 checkout (a folder with setup.py) nor a wheel" \
             "(.whl): give one of them, or unset DETECTRON2_SRC to build from GitHub"
    DETECTRON2_SRC=$(readlink -f "$DETECTRON2_SRC")  # pip reads a bare relative name as a package's name
  fi
  [[ ${DETECTRON2_SRC:-} == *.whl ]] || check_nvcc  # a prebuilt wheel compiles nothing
  "$VBENCH_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 10), (3, 11)))' 2>/dev/null \
    || die "VBENCH_PYTHON=$VBENCH_PYTHON is not a Python 3.10 or 3.11, which VBench's venv needs (its pinned" \
           "tokenizers 0.13 has wheels for those only): install one and set VBENCH_PYTHON=/path/to/python3.11"
  [[ -z ${DETECTRON2_SRC:-} ]] || return 0
  command -v git >/dev/null && GIT_TERMINAL_PROMPT=0 timeout 20 git ls-remote --exit-code "$DETECTRON2_REPO" HEAD \
    >/dev/null 2>&1 || die "detectron2 (VBench's GRiT) is built from $DETECTRON2_REPO, which git cannot reach from" \
    "here (no network or no git): clone it where you can, check out ${DETECTRON2##*@}, copy it here and set" \
    "DETECTRON2_SRC=/path/to/detectron2 (or a wheel of it built for torch 2.6.0+cu124)"
}

ensure_vbench_venv() {  # created once; the marker says the install finished
  [[ -f $VBENCH_VENV/.installed ]] && return
  echo "creating VBench's venv in $VBENCH_VENV"
  "$VBENCH_PYTHON" -m venv --clear "$VBENCH_VENV"
  vbench_python -m pip install "${VBENCH_PACKAGES[@]}"
  FORCE_CUDA=1 vbench_python -m pip install --no-build-isolation "${DETECTRON2_SRC:-$DETECTRON2}"
  touch "$VBENCH_VENV/.installed"
}

generate() {  # missing or invalid videos -> one job file per GPU -> one sample.py per GPU
  python "$HERE/vbench_tools.py" jobs --prompt-list "$PROMPT_LIST" --videos "$OUT/videos" --jobs-dir "$OUT/jobs" \
    --shards "$GPUS" "${EXTENDED_ARGS[@]}" "${VIDEO_SPEC[@]}" "${LIMIT[@]}" "${FLICKER[@]}"
  local pids=() logs=() gpu failed=0
  for ((gpu = 0; gpu < GPUS; gpu++)); do
    [[ -s $OUT/jobs/shard_$gpu.tsv ]] || continue
    logs+=("$OUT/logs/generate_gpu$gpu.log")
    CUDA_VISIBLE_DEVICES=$gpu python "$HERE/sample.py" --jobs "$OUT/jobs/shard_$gpu.tsv" "${MODEL_ARGS[@]}" \
      "${VIDEO_SPEC[@]}" >"${logs[-1]}" 2>&1 &
    pids+=($!)
  done
  ((${#pids[@]})) || return 0
  trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
  local where="on ${#pids[@]} GPU(s)"
  ((DRY_RUN == 0)) || where="on the CPU"
  echo "generating with ${#pids[@]} sample.py process(es) $where; logs: $OUT/logs/generate_gpu*.log"
  for i in "${!pids[@]}"; do
    if ! wait "${pids[i]}"; then
      echo "sample.py failed, last lines of ${logs[i]}:" >&2
      tail -n 20 "${logs[i]}" >&2
      failed=1
    fi
  done
  trap - INT TERM
  ((failed == 0)) || die "generation failed; rerun the same command to resume"
}

score_with_vbench() {  # one `evaluate` per dimension, so a failure names its dimension and a rerun resumes
  local dim videos
  check_weights  # again: checked before generation, hours ago
  export VBENCH_CACHE_DIR TORCH_HOME=$VBENCH_CACHE_DIR/torch HF_HOME=$VBENCH_CACHE_DIR/huggingface
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1  # torch >= 2.6 refuses VBench's old pickled checkpoints otherwise
  for dim in "${DIMENSIONS[@]}"; do
    if compgen -G "$OUT/vbench/$dim/*_eval_results.json" >/dev/null; then
      echo "$dim: result already in $OUT/vbench/$dim"; continue
    fi
    videos=$OUT/videos
    if [[ $dim == temporal_flickering ]]; then
      # VBench scores flickering on static videos only: its static filter (RAFT) copies the first 5 static
      # candidates of each prompt aside (file-name order: the zero-padded names make it seed order)
      rm -rf "$OUT/static_filter"
      mkdir -p "$OUT/vbench"
      "$VBENCH_VENV/bin/vbench" static_filter --videos_path "$OUT/videos_flicker" --result_path "$OUT/static_filter" \
        2>&1 | tee "$OUT/logs/vbench_static_filter.log" || die "VBench's static filter failed; see its log"
      python "$HERE/vbench_tools.py" flicker-check --prompt-list "$PROMPT_LIST" --filter-results "$OUT/static_filter" \
        --flicker-seeds "$FLICKER_SEEDS" --summary "$OUT/vbench/temporal_flickering_static.json" || exit 2
      videos=$OUT/static_filter/filtered_videos
    fi
    rm -rf "${OUT:?}/vbench/$dim"
    # launch/evaluate.py under torchrun, not `vbench evaluate`, which exits 0 when a dimension fails.
    vbench_python -m torch.distributed.run --standalone --nproc_per_node "$GPUS" "$VBENCH_PKG/launch/evaluate.py" \
      --videos_path "$videos" --dimension "$dim" --output_path "$OUT/vbench/$dim" --load_ckpt_from_local True \
      2>&1 | tee "$OUT/logs/vbench_$dim.log" || die "VBench failed on $dim; see $OUT/logs/vbench_$dim.log"
    compgen -G "$OUT/vbench/$dim/*_eval_results.json" >/dev/null \
      || die "VBench wrote no result for $dim; see $OUT/logs/vbench_$dim.log"
  done
}

if ((DRY_RUN)); then
  echo "DRY RUN: sample.py --tiny on the first 3 prompts, 9 frames 64x64"
else
  check_gpus
  check_weights
  [[ -f $VBENCH_VENV/.installed ]] || check_venv_build
  ensure_vbench_venv
  VBENCH_PKG=$(vbench_python -c 'import importlib.util; print(importlib.util.find_spec("vbench").submodule_search_locations[0])')
  PROMPT_LIST=$VBENCH_PKG/VBench_full_info.json
fi

generate
python "$HERE/vbench_tools.py" verify --prompt-list "$PROMPT_LIST" --videos "$OUT/videos" "${VIDEO_SPEC[@]}" "${LIMIT[@]}" \
  "${FLICKER[@]}"

if ((DRY_RUN)); then
  echo "SKIPPED: VBench scoring (dry run). The table below aggregates stand-in result files holding the" \
       "paper's Table 3 numbers; it is not a measurement."
  python "$HERE/vbench_tools.py" dry-run-results --videos "$OUT/videos" --results-dir "$OUT/vbench_dry_run"
  python "$HERE/vbench_tools.py" score "$OUT/vbench_dry_run" --json "$OUT/vbench_scores_dry_run.json"
else
  score_with_vbench
  python "$HERE/vbench_tools.py" score "$OUT/vbench" --json "$OUT/vbench_scores.json"
fi
