"""
What every script shares and that is not the model (nanochat's common.py): checking what the user
typed before anything loads (argparse types, files, folders, devices) and the one-line UserError;
how a training script ends (run_script: one line for an error, a full disk or Ctrl-C / SIGTERM, said
once under torchrun); mp4 writing that checks what it wrote; torch.distributed start-up and gathering;
checkpoints that are saved atomically, only when finite, and resumed only by the script that wrote
them; one run per output folder (an flock); the training log; the EMA; the noise of a step.

Nothing here imports the project's other modules: causal_wan.py and the scripts build on it.
"""
import argparse
import contextlib
import fcntl
import glob
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time

import torch


class _DropMessages(logging.Filter):
    def __init__(self, *texts):
        super().__init__()
        self.texts = texts

    def filter(self, record):
        return not any(t in record.getMessage() for t in self.texts)


# torchao 0.18 (--fp8) on torch 2.14 and diffusers 0.42 print three lines whenever diffusers is
# imported: torch's deprecation note on torchao registering two Enums, and diffusers failing to
# import torchao classes it needs only to load torchao-serialized checkpoints (never done here).
# Dropped by their exact text, so every other warning still shows.
logging.getLogger("torch.utils._pytree").addFilter(
    _DropMessages("is an Enum subclass and is now natively supported"))
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
    _DropMessages("Unable to import `torchao` Tensor objects"))


class UserError(Exception):
    """A problem the user can fix (bad flag, missing weights). Scripts print it as one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, Slurm, torchrun stopping the other ranks), raised where the run is, as Ctrl-C raises
    KeyboardInterrupt: the run stops the same clean way (run_script installs it)."""


# -----------------------------------------------------------------------------
# checking what the user typed or pointed at, before anything loads


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors look like a UserError's: one line `error: ...` on stderr, exit 2, said once
    under torchrun (exit_error; argparse would print the whole usage first; --help still does)."""

    def error(self, message):
        exit_error(f"{message} (see --help)")


def print_error(error, prefix="error: "):
    """What a script prints for a UserError: one line `error: ...` of its own. Progress bars still
    running (a failure mid-run) are closed first, so the message never lands at the end of a bar."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    print(f"{prefix}{error}", file=sys.stderr)


# -----------------------------------------------------------------------------
# how a training script ends: one line for an error or a stop, said once under torchrun


# Under torchrun every rank meets the same bad flag or error: rank 0 says it, the others wait this long for torchrun
# to stop them (it does within 0.1 s of seeing rank 0 fail), so the line appears once and torchrun reports one failure
OTHER_RANKS_WAIT = 10


def exit_error(message, code=2):
    """Print `error: message` and exit with `code`, on rank 0 at once. Another rank (RANK set by torchrun) waits:
    stopped by torchrun (SIGTERM) in the meantime, it exits 143 without a word; still running after
    OTHER_RANKS_WAIT seconds (an error rank 0 did not meet), it says it with its rank and exits with `code`."""
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        try:
            time.sleep(OTHER_RANKS_WAIT)
        except KeyboardInterrupt as stop:  # torchrun's SIGTERM (Terminated), or Ctrl-C
            sys.exit(128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT))
        message = f"(rank {rank}) {message}"
    print_error(message)
    sys.exit(code)


def run_script(main, parse_args):
    """The `__main__` block of the scripts: main(parse_args()), where a UserError ends as one line
    `error: ...` with exit code 2, and Ctrl-C or SIGTERM as a clean stop: the checkpoint is never left half
    written, the lock goes with the process, and one line (from `interruptible`, around the training loop) says
    where the run stopped and what stays; exit code 128 + the signal (130, 143). Rank 0 alone speaks (exit_error)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(parse_args())
    except UserError as e:
        exit_error(str(e))
    except KeyboardInterrupt as e:
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        if int(os.environ.get("RANK", 0)) == 0:
            print_error(str(e) or f"interrupted ({_signal_name(e)}) while starting, before the first step: "
                                  f"nothing written by this run", prefix="")
        sys.exit(128 + signum)
    finally:  # on the way out a late SIGTERM (torchrun stopping the other ranks) must not raise in exit handlers
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _raise_terminated(signum, frame):
    raise Terminated


def _signal_name(stop):
    return "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"


@contextlib.contextmanager
def interruptible(stopped):
    """Around a training loop: Ctrl-C or SIGTERM leaves it as the same exception carrying one line, the
    signal and stopped() (e.g. the step reached and the checkpoint that stays), which run_script prints."""
    try:
        yield
    except KeyboardInterrupt as e:
        raise type(e)(f"interrupted ({_signal_name(e)}) {stopped()}") from None


def positive_int(text):
    """argparse type for counts and sizes (batch, block, shard, steps, intervals): an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def nonnegative_int(text):
    """argparse type for intervals where 0 means never (--sample-every): an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 0 (0: never)")
    return value


def positive_float(text):
    """argparse type for learning rates and the clipping norm: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return value


def learning_rate(text):
    """argparse type for AdamW learning rates: in (0, 1). AdamW moves every weight by about lr per
    step, so 1 or more diverges at once (and past 1e38 the update itself overflows fp32)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a learning rate in (0, 1)")
    return value


def nonnegative_float(text):
    """argparse type for guidance scales and loss weights: a finite number >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def decay(text):
    """argparse type for an EMA decay: a number in [0, 1) (1 would never move, NaN poisons the EMA)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1) (e.g. 0.99)")
    return value


def seed(text):
    """argparse type for seeds: an integer in [0, 2^32), so that seed + offsets stays a valid torch seed."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text} is not in 0..{2**32 - 1}")
    return value


def check_file(path, what):
    """A file the user pointed at (a checkpoint) exists and can be opened; its content is read later."""
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' " + ("is a folder, not a file" if os.path.isdir(path) else "does not exist"))
    try:
        open(path, "rb").close()
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror})") from None


def read_text(path, what):
    """The text of a file the user pointed at, or a one-line error naming `what` (its flag):
    missing, a folder, unreadable, or not UTF-8."""
    check_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror})") from None


def read_json(path, what, fix="restore or regenerate it"):
    """json.load of a file the user pointed at (a model's config.json, a store's index.json)."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} '{path}' is not valid JSON (line {e.lineno}: {e.msg}): {fix}") from None


def check_output_folder(folder, what):
    """Create `folder` if needed and make sure a file can be written in it, so that a file in the
    way, a missing permission or a read-only disk stop the run before anything loads."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{what} '{folder}' is a file, not a folder: remove it or choose another location")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{what} '{folder}' cannot be written ({e.strerror}): choose another location") from None


def check_device(name):
    """--device names a device this machine has: cpu, cuda, cuda:N."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")


def check_video_size(args, frames=True):
    """--frames is 4k+1 (the Wan VAE maps 1 + 4k frames to 1 + k latent frames) and --height / --width are
    positive multiples of 16 (the VAE's 8x and the patch's 2x); frames=False: the size only."""
    if frames and (args.frames < 1 or (args.frames - 1) % 4):
        raise UserError(f"--frames {args.frames} is not 4k+1: the VAE maps 1 + 4k frames to 1 + k latent frames "
                        f"(try {4 * round((args.frames - 1) / 4) + 1})")
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 16:
            raise UserError(f"--{name} {getattr(args, name)} is not a positive multiple of 16 (VAE 8x and patch 2x)")


def read_prompts(path, flag="--prompts"):
    """The prompts of a text file, one a line (blank lines skipped), or a one-line error."""
    prompts = [line.strip() for line in read_text(path, flag).splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file '{path}' has no prompts (one per line)")
    return prompts


# -----------------------------------------------------------------------------
# videos: mp4 files that are checked before they are reported written


def to_uint8_frames(pixels):
    """Decoded pixels [3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3] for imageio."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def save_video(path, pixels, fps=16):
    """Write pixels [3, T, H, W] in [-1, 1] as an H.264 mp4 (imageio + ffmpeg), checked before it
    is renamed into place (see finished_mp4)."""
    import imageio
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part.mp4"
    with finished_mp4(tmp, path, pixels.shape[1]):
        imageio.mimwrite(tmp, to_uint8_frames(pixels), fps=fps, codec="libx264", macro_block_size=1)


@contextlib.contextmanager
def finished_mp4(tmp, path, expected_frames):
    """Around the writing of one mp4 into tmp: once the writer has closed, the file must decode to
    expected_frames frames before it is renamed to path (tmp may be path itself). imageio never
    looks at ffmpeg's exit status, so a full disk or a killed ffmpeg leaves a truncated file that
    only a decode shows. On any failure the partial file is removed: nothing is reported written
    that is not."""
    try:
        yield
        problem = mp4_problem(tmp, expected_frames)
    except OSError as e:  # imageio raises when ffmpeg's pipe breaks, e.g. ffmpeg died on a full disk
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    except BaseException:
        _remove(tmp)
        raise
    if problem is None and tmp != path:
        try:
            os.replace(tmp, path)
        except OSError as e:
            problem = f"renaming it into place failed: {e.strerror}"
    if problem is not None:
        _remove(tmp)
        raise UserError(f"could not write '{path}': {problem} (a full disk? the partial file was removed)")


def mp4_problem(path, expected_frames):
    """None if the mp4 at path decodes (every frame) to expected_frames frames, else what is wrong."""
    import imageio
    if not os.path.isfile(path):
        return "ffmpeg wrote no file"
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            frames = sum(1 for _ in reader)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0][:150] if str(e).strip() else ''
        return f"the written file does not decode ({type(e).__name__}: {first_line})"
    if frames != expected_frames:
        return f"the written file decodes to {frames} frames, not {expected_frames}"
    return None


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# -----------------------------------------------------------------------------
# training plumbing shared by distill_dmd.py, train_ode.py and train_reward.py


def init_distributed():
    """(rank, world_size, device). Under torchrun (RANK set) one process per GPU (NCCL) or per CPU
    process (gloo); a plain `python script.py` is a world of one. Both take the same FSDP path."""
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def shard_model(model, bf16, keeps_fp32):
    """FSDP2: shard a CausalWan's every transformer block and the rest of it across ranks. With bf16, compute runs
    in bf16 while the sharded master weights, gradients and optimizer stay fp32, except for the parameters the
    model's fp32 policy keeps (keeps_fp32(name): causal_wan.keeps_fp32), which the forward also sees in fp32 (as
    Wan computes them).

    FSDP casts per unit (one fully_shard call), so the bf16 layers are units of their own: the patch and text
    embeddings and each block's attention and FFN layers. Each block's own unit then holds only its modulation
    table and affine norm, and the root's only the timestep path and the output head: those units cast nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    # cast_forward_inputs=False: FSDP would otherwise round every float input to bf16, including
    # the timesteps (937.5 -> 936), the fp32 modulation and the RoPE tables; each module casts its
    # inputs where it needs to (forward() the latents, MLP its input, the head its input).
    compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                   reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
    keep = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32 if bf16 else None,
                                cast_forward_inputs=False)
    # FSDP2 warns when a module returns a view (our blocks return k/v as transposed views), because an
    # in-place op on it would skip a hook. Nothing here modifies a module output in place.
    import warnings
    warnings.filterwarnings("ignore", message=r".*returned a view tensor", category=UserWarning)
    for blk in model.blocks:
        for layer in (blk.attn1, blk.attn2, blk.ffn):
            fully_shard(layer, mp_policy=compute)
        # keys_values is called outside forward (prompt_kv): gather its weights for it too
        register_fsdp_forward_method(blk.attn2, "keys_values")
        fully_shard(blk, mp_policy=keep)
    fully_shard(model.patch_embedding, mp_policy=compute)
    fully_shard(model.condition_embedder.text_embedder, mp_policy=compute)
    bf16_units = {id(p) for m in [model.patch_embedding, model.condition_embedder.text_embedder]
                  + [layer for blk in model.blocks for layer in (blk.attn1, blk.attn2, blk.ffn)]
                  for p in m.parameters()}
    stray = [n for n, p in model.named_parameters() if id(p) not in bf16_units and not keeps_fp32(n)]
    if stray:  # a new parameter outside the bf16 units would silently train in fp32: say where it belongs
        raise ValueError(f"shard_model: {stray[:3]} are neither in a bf16 unit nor kept in fp32")
    # FSDP keeps the root's weights (embeddings, head) gathered after a forward, as plain tensors, until the
    # backward that follows. A network that never trains (teacher, EMA) has no backward: its root must reshard
    # after each forward, or after the EMA's sample rollout the next ema_update would mix those plain tensors
    # with the model's sharded DTensors
    frozen = not any(p.requires_grad for p in model.parameters())
    fully_shard(model, mp_policy=keep, reshard_after_forward=True if frozen else None)
    register_fsdp_forward_method(model, "prompt_kv")
    return model


def full_state_dict(model, optimizer=None):
    """Full (unsharded) CPU state dict of a sharded model (and optimizer) on rank 0; {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is not None:
        return get_optimizer_state_dict(model, optimizer, options=opts)
    return get_model_state_dict(model, options=opts)


def load_full_state_dict(model, state_dict, optimizer=None):
    """Inverse of full_state_dict: every rank passes the same full dict (read from disk)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state_dict, options=opts)
    else:
        set_model_state_dict(model, state_dict, options=opts)


def nonfinite_tensors(tree, prefix=""):
    """Names of the floating-point tensors holding a NaN or inf in nested dicts/lists of a checkpoint."""
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in nonfinite_tensors(v, f"{prefix}{k}/")]
    if isinstance(tree, (list, tuple)):
        return [n for i, v in enumerate(tree) for n in nonfinite_tensors(v, f"{prefix}{i}/")]
    if torch.is_tensor(tree) and tree.is_floating_point() and not torch.isfinite(tree).all():
        return [prefix.rstrip("/")]
    return []


def save_checkpoint(path, ckpt):
    """Write to a temp file, then rename: a crash mid-save never replaces a good checkpoint, and a failed or
    interrupted write (a full disk, Ctrl-C) removes its temp file. A checkpoint with any NaN or inf tensor is
    not written at all (the good one stays)."""
    bad = nonfinite_tensors(ckpt)
    if bad:
        raise UserError(f"not saving {path}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:3])}); "
                        f"{kept_checkpoint(path)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
        return
    except (OSError, RuntimeError) as e:  # a full disk, `ulimit -f` (torch's zip writer raises RuntimeError)
        # said below, once the failed writer has closed the temp file: its room counts as free again
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short"
    finally:
        _remove(tmp)  # also on Ctrl-C / SIGTERM: never a half checkpoint
    raise UserError(f"could not write {path} ({reason}): {no_room(path, tensor_bytes(ckpt))}; "
                    f"{kept_checkpoint(path, resume=True)}")


def tensor_bytes(tree):
    """Bytes of the tensors in nested dicts/lists (a checkpoint's size on disk, near enough)."""
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return tree.numel() * tree.element_size() if torch.is_tensor(tree) else 0


def no_room(path, needed=None):
    """Why writing `path` can fail for want of room, for the error message: what it needs, the free space in
    its folder and the file-size limit (`ulimit -f`; Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    folder = os.path.dirname(os.path.abspath(path))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return ((f"it needs {_size(needed)} in '{folder}', which has " if needed else f"'{folder}' has ")
            + f"{_size(shutil.disk_usage(folder).free)} free"
            + (f" and a file-size limit (ulimit -f) of {_size(limit)}" if limit != resource.RLIM_INFINITY else "")
            + ": free space (or raise the limit)")


def _size(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def kept_checkpoint(path, resume=False):
    """What a stopped run leaves at path, said truthfully (for its error message); resume=True adds that
    --resume continues it."""
    if not os.path.isfile(path):
        return "no checkpoint has been written yet"
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        return f"{path} was left as it was"
    return f"the last good checkpoint, step {step}, stays in {path}" + (": --resume continues it" if resume else "")


@contextlib.contextmanager
def own_folder(folder, stale_patterns, what="--out"):
    """Hold `folder` for one run: rank 0 creates it, takes an exclusive lock on folder/.lock and
    removes what a crashed run left there (stale_patterns, e.g. 'ckpt.pt.tmp*'); every rank gets
    the same one-line error when it cannot (a file in the way, read-only, another run holds it).
    A run that fails or is stopped takes back what it created and left empty (remove_leftovers).

    The lock is an flock held while the block runs: the OS drops it when the process ends in any
    way (kill -9 included), so a crashed run never leaves the folder locked. Only rank 0 takes it:
    the ranks of one run share the folder, and a second flock from another rank would block on
    rank 0's. Needs the process group (init_distributed)."""
    import torch.distributed as dist
    lock, error = None, None
    if dist.get_rank() == 0:
        before = set(os.listdir(folder)) if os.path.isdir(folder) else None  # None: this run makes the folder
        try:
            lock = _lock_folder(folder, what)
            for stale in sorted(p for pattern in stale_patterns
                                for p in glob.glob(os.path.join(glob.escape(folder), pattern))):
                os.remove(stale)
                print(f"removed {stale}, left by a run that crashed", file=sys.stderr)
        except UserError as e:
            error = str(e)
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UserError(message[0])
    try:
        yield
    except BaseException:
        if lock is not None:
            with contextlib.suppress(OSError):  # never hides why the run stopped
                remove_leftovers(folder, before)
        raise
    finally:
        if lock is not None:
            lock.close()  # releases the flock


def remove_leftovers(folder, before):
    """After a failed or stopped run, what it created and left empty: empty files (a log.jsonl with no step), then
    its .lock when nothing else of the run remains, then the folder if the run made it and it is empty. Nothing in
    `before` (the folder's names when the run began; None: it had no folder) is touched."""
    made, before = before is None, before or set()
    for name in set(os.listdir(folder)) - before - {".lock"}:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            os.remove(path)
    if ".lock" not in before and set(os.listdir(folder)) - before == {".lock"}:
        os.remove(os.path.join(folder, ".lock"))  # _lock_folder's inode check covers a run that opened it meanwhile
    if made and not os.listdir(folder):
        os.rmdir(folder)


def _lock_folder(folder, what):
    check_output_folder(folder, what)
    path = os.path.join(folder, ".lock")
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise UserError(f"{what} '{folder}' is in use by another run (pid {holder}, lock {path}): "
                        f"wait for it to end, or choose another {what}") from None
    with contextlib.suppress(FileNotFoundError):
        if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            return lock
    lock.close()  # a failed run removed this .lock (remove_leftovers) as we took it: lock the file now there
    return _lock_folder(folder, what)


def all_mean(x):
    """Average of a scalar tensor over ranks (the loss every rank logs)."""
    x = x.detach().clone()
    torch.distributed.all_reduce(x)
    return x.item() / torch.distributed.get_world_size()


def grad_norm(model, clip):
    """Clip the gradients to norm `clip` and return their global norm before clipping (all ranks)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor under FSDP


def load_resume(path, args, script, stage=None):
    """Our checkpoint for --resume (mmap: the ranks of one machine share the file's pages instead of
    each holding a copy; the full-size checkpoint is ~40 GB). Without --resume: None, and a
    checkpoint already at path is an error rather than something to overwrite. The checkpoint must
    come from the same script (its 'script') and stage (its 'stage', e.g. 'with --dmd-weight'), and
    be short of --max-steps."""
    if not args.resume:
        if os.path.isfile(path):
            raise UserError(f"'{path}' exists: pass --resume to continue it, or choose another --out")
        return None
    if not os.path.isfile(path):
        raise UserError(f"nothing to resume: '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' is not readable ({type(e).__name__}: {str(e)[:100]})") from None
    saved = ckpt.get("script") if isinstance(ckpt, dict) else None
    if saved != script:
        raise UserError(f"'{path}' was written by {saved or 'something else (it names no script)'}, not {script}: "
                        f"resume it with {saved or 'the script that wrote it'}, "
                        f"or start a new --out from it with --init")
    if ckpt.get("stage") != stage:
        raise UserError(f"'{path}' was trained {ckpt.get('stage')}: resume it with the same flags (this run: {stage})")
    if ckpt["step"] >= args.max_steps:
        raise UserError(f"'{path}' is at step {ckpt['step']} already: pass a --max-steps above {ckpt['step']} to go on")
    return ckpt


def open_log(log_path, step, resume, wandb_name=None, config=None):
    """Rank 0's training log: one JSON line per logged step in log_path. A resumed run keeps the
    lines up to its checkpoint's step (those a crashed run wrote after it go). With a wandb run
    name (--wandb), also starts wandb and returns it; else None."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    lines = []
    if resume and os.path.isfile(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            records = f.read().splitlines()
        for n, line in enumerate(records, 1):
            try:
                keep = json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                if n < len(records):
                    raise UserError(f"line {n} of {log_path} is not a log record: delete that line, "
                                    f"then --resume") from None
                # what a crash or a full disk leaves: a last line cut short. It is lost, the rest is kept
                print(f"warning: dropped the torn last line of {log_path}: {line[:80]!r}", file=sys.stderr)
                break
            if keep:
                lines.append(line + "\n")
    try:
        with open(log_path, "w") as f:
            f.writelines(lines)
    except OSError as e:
        raise UserError(f"could not write {log_path} ({e.strerror}): {no_room(log_path)}") from None
    if wandb_name is None:
        return None
    import wandb
    wandb.init(project="reward-forcing", name=wandb_name, config=config, resume="allow")
    return wandb


def log_step(log_path, record, wandb=None):
    """Append a step's record (it has a 'step') to the log, and to wandb when it runs."""
    try:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk or the file-size limit: the checkpoint is what --resume continues from
        raise UserError(f"could not append step {record['step']} to {log_path} ({e.strerror}): {no_room(log_path)}, "
                        f"then --resume") from None
    if wandb is not None:
        wandb.log(record, step=record["step"])


def print_done(ckpt_path, step, **last):
    """The line a training run ends with (rank 0): its checkpoint, its step and the last logged values."""
    print(f"saved {ckpt_path} at step {step} (last {', '.join(f'{k} {v:.4g}' for k, v in last.items())})", flush=True)


def stop_if_diverged(step, ckpt_path, values=None, hint="lower --lr and --resume", nets=None):
    """Stop, without saving, when any logged value is NaN or inf (before the optimizer step), or
    any weight of nets {name: model} (after the optimizer step and the EMA update: a finite loss
    can still make infinite weights). Every rank takes part in the weight check and stops together."""
    bad = [f"{k} = {v}" for k, v in (values or {}).items() if not math.isfinite(v)]
    if nets:
        from torch.distributed.tensor import DTensor
        counts = torch.stack([sum((~torch.isfinite(p.to_local() if isinstance(p, DTensor) else p)).sum()
                                  for p in net.parameters())
                              for net in nets.values()])
        torch.distributed.all_reduce(counts)  # each rank holds a shard
        bad += [f"{n} NaN/inf weights in the {name}" for name, n in zip(nets, counts.tolist()) if n]
    if bad:
        raise UserError(f"training diverged at step {step} ({', '.join(bad)}): stopped without saving; "
                        f"{kept_checkpoint(ckpt_path)} ({hint})")


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, on the local shards (same sharding for both)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)


def step_generator(seed, step, rank, device):
    """A generator for this step and rank: resuming at step N draws exactly the noise a run from
    scratch drew at step N, with no RNG state to save."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step * 8191 + rank)
