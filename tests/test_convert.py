"""convert.py: a trained generator exported as a diffusers transformer folder of safetensors round-trips exactly,
loads in diffusers' WanTransformer3DModel with the same outputs, and is what sample.py renders from the checkpoint
it came from (as a folder or as the one file); its kind (bidirectional) travels in the file's metadata; a folder
without weights is one line. (The original Wan key map: tests/test_causal_wan.py.)"""
import os
import subprocess
import sys

import imageio
import numpy as np
import pytest
import torch

import causal_wan as cw
import common
import convert
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tiny_wan, tmp_path_factory):
    """A checkpoint of this repo's form whose EMA and raw weights differ from each other and from the tiny Wan's."""
    folder = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(0)
    sd = cw.from_pretrained(tiny_wan).state_dict()
    ema = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    model = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    common.save_checkpoint(str(folder / "ckpt.pt"), {"model": model, "ema": ema, "step": 7, "args": {}})
    return str(folder / "ckpt.pt"), ema


def export(*argv):
    res = subprocess.run([sys.executable, "convert.py", "export", *map(str, argv)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_export_round_trips_and_loads_in_diffusers(tiny_wan, trained, tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file
    out = tmp_path / "transformer"
    assert "wrote" in export("--checkpoint", trained[0], "--model", tiny_wan, "--out", out)
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == trained[1].keys() and all(torch.equal(saved[k], trained[1][k]) for k in saved)  # the EMA
    theirs = WanTransformer3DModel.from_pretrained(str(out)).eval()
    ours = cw.from_pretrained(tiny_wan)
    convert.load_generator_weights(ours, str(out))
    x, t = torch.randn(1, 16, 3, 8, 8), torch.full((1,), 700.0)
    context = torch.randn(1, 12, ours.cfg.text_dim)
    with torch.no_grad():
        diff = (ours(x, t, ours.prompt_kv(context)) - theirs(x, t, context, return_dict=False)[0]).abs().max()
    assert diff < 1e-5, diff


def test_sample_renders_the_export_as_the_checkpoint(tiny_wan, trained, tmp_path):
    out = tmp_path / "transformer"
    export("--checkpoint", trained[0], "--model", tiny_wan, "--out", out)
    videos = {}
    for name, ckpt in [("ckpt", trained[0]), ("folder", out), ("file", out / "diffusion_pytorch_model.safetensors")]:
        path = tmp_path / f"{name}.mp4"
        sample.main(sample.parse_args(["--tiny", "--model", tiny_wan, "--checkpoint", str(ckpt), "--prompt", "a fox",
                                       "--frames", "9", "--out", str(path)]))
        with imageio.get_reader(path) as reader:
            videos[name] = np.stack([frame for frame in reader])
    assert np.array_equal(videos["ckpt"], videos["folder"]) and np.array_equal(videos["ckpt"], videos["file"])


def test_a_bidirectional_export_stays_bidirectional(tiny_wan, tmp_path):
    sd = cw.from_pretrained(tiny_wan).state_dict()
    common.save_checkpoint(str(tmp_path / "bidi.pt"), {"ema": sd, "step": 1, "args": {"generator": "bidirectional"}})
    export("--checkpoint", tmp_path / "bidi.pt", "--model", tiny_wan, "--out", tmp_path / "bidi", "--dtype", "bf16")
    ckpt = convert.load_checkpoint(str(tmp_path / "bidi"))
    assert ckpt["args"]["generator"] == "bidirectional"
    assert all(v.dtype == torch.bfloat16 for v in ckpt["exported"].values())
    with pytest.raises(common.UserError, match="holds a bidirectional generator, but a causal one"):
        convert.load_generator_weights(cw.from_pretrained(tiny_wan), str(tmp_path / "bidi"))


def test_a_folder_without_weights_is_one_line(tiny_wan, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="is a folder without .safetensors weights") as e:
        sample.main(sample.parse_args(["--tiny", "--model", tiny_wan, "--checkpoint", str(tmp_path / "empty"),
                                       "--prompt", "a fox", "--frames", "9", "--out", str(tmp_path / "x.mp4")]))
    assert "\n" not in str(e.value)
