"""The speed levers: the tiny streaming decoder (TAEW2.1's layout), FP8 linear layers (torchao) and
offloading a model's weights while it is not used, as library pieces and as sample.py's --decoder
tae and --offload."""
import copy
import functools
import gc
import weakref

import imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import causal_wan as cw
import common
import convert
import sample
import speedkit


def published_decoder_shapes():
    """taew2_1.pth's decoder tensors, from taehv.py's TAEHV decoder for Wan 2.1 (16 latent channels,
    widths 256/128/64/64, temporal grows 1, 2, 2): 64 tensors."""
    shapes = {"decoder.1.weight": (256, 16, 3, 3), "decoder.1.bias": (256,)}
    for first, ch in ((3, 256), (9, 128), (15, 64)):  # three memory blocks per stage: convs 0, 2, 4
        for i in range(first, first + 3):
            for j, c_in in ((0, 2 * ch), (2, ch), (4, ch)):
                shapes[f"decoder.{i}.conv.{j}.weight"] = (ch, c_in, 3, 3)
                shapes[f"decoder.{i}.conv.{j}.bias"] = (ch,)
    shapes.update({"decoder.7.conv.weight": (256, 256, 1, 1), "decoder.8.weight": (128, 256, 3, 3),
                   "decoder.13.conv.weight": (256, 128, 1, 1), "decoder.14.weight": (64, 128, 3, 3),
                   "decoder.19.conv.weight": (128, 64, 1, 1), "decoder.20.weight": (64, 64, 3, 3),
                   "decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,)})
    return shapes


def reference_decode(sd, z):
    """TAEHV's decoder over all frames at once (like taehv.py's parallel mode), written from the
    architecture with F.conv2d on the state dict: [B, 16, n, h, w] -> [B, 3, 4n - 3, 8h, 8w] in [-1, 1]."""
    def conv(x, key):
        return F.conv2d(x, sd[f"{key}.weight"], sd.get(f"{key}.bias"), padding=sd[f"{key}.weight"].shape[-1] // 2)

    B = z.shape[0]
    x = F.relu(conv(torch.tanh(z.transpose(1, 2).flatten(0, 1) / 3) * 3, "decoder.1"))  # [B * n, C, h, w]
    for first in (3, 9, 15):
        for i in range(first, first + 3):
            frames = x.view(B, -1, *x.shape[1:])
            past = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, :-1]], 1).flatten(0, 1)
            h = F.relu(conv(torch.cat([x, past], 1), f"decoder.{i}.conv.0"))
            x = F.relu(conv(F.relu(conv(h, f"decoder.{i}.conv.2")), f"decoder.{i}.conv.4") + x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        grow = sd[f"decoder.{first + 4}.conv.weight"]  # [C * stride, C, 1, 1]: channel group s = s-th new frame
        x = F.conv2d(x, grow).view(x.shape[0], -1, *x.shape[1:]).flatten(0, 1)
        x = conv(x, f"decoder.{first + 5}")
    x = conv(F.relu(x), "decoder.22").view(B, -1, 3, *x.shape[2:])[:, 3:]  # drop the 3 warm-up frames
    return (x.transpose(1, 2) * 2 - 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def tiny_tae(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tae") / "taew2_1.pth")
    speedkit.make_tiny_decoder(path)
    return path, speedkit.load_tiny_decoder(path)


def test_tiny_decoder_has_the_published_checkpoint_layout():
    """Planted: a bias on the stage convs (decoder.8 ...), or TGrow's 1x1 conv with a bias -> fails."""
    got = {k: tuple(v.shape) for k, v in speedkit.TinyDecoder().state_dict().items()}
    assert got == published_decoder_shapes()


def test_tiny_decoder_streams_exactly_and_matches_the_reference(tiny_tae):
    """Block by block (chunks of 3 with a short last block, and of 1) equals one decode of the whole
    latent video, which equals an independent all-frames-at-once reference. Frame counts are the
    Wan VAE's. Planted and caught: the memory reset on every call (streaming differs); each memory
    block fed the current frame instead of the previous one, or TGrow's channel groups read in
    the wrong order (the reference differs); no warm-up trim (the counts differ)."""
    path, tae = tiny_tae
    z = torch.randn(2, 16, 7, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = speedkit.tae_decode(tae, z)
        assert whole.shape == (2, 3, 1 + 4 * 6, 32, 48)
        ref = reference_decode(torch.load(path, weights_only=True), z)
        assert (whole - ref).abs().max() < 1e-5
        for chunk, counts in ((3, [9, 12, 4]), (1, [1, 4, 4, 4, 4, 4, 4])):
            blocks = [speedkit.tae_decode(tae, z[:, :, s:s + chunk], first=s == 0) for s in range(0, 7, chunk)]
            assert [b.shape[2] for b in blocks] == counts
            assert (torch.cat(blocks, 2) - whole).abs().max() < 1e-5
    assert whole.std() > 0.05 and (whole.abs() < 1).float().mean() > 0.99  # not a flat or clamped video


def test_load_tiny_decoder_refuses_wrong_files_in_one_line(tiny_tae, tmp_path):
    """Missing, unreadable, incomplete, a stray tensor, a wrong shape, another latent space: each is a
    one-line UserError naming the file and what to download. The published file's encoder half and
    the .safetensors form load. Planted: strict=False (the stray and missing keys pass) -> fails."""
    from safetensors.torch import save_file
    good = torch.load(tiny_tae[0], weights_only=True)

    def saved(name, sd):
        torch.save(sd, tmp_path / name)
        return str(tmp_path / name)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    bad = {
        str(tmp_path / "missing.pth"): "does not exist",
        str(tmp_path / "junk.pth"): "not a readable checkpoint",
        saved("list.pth", [1, 2]): "no state dict",
        saved("incomplete.pth", {k: v for k, v in good.items() if k != "decoder.4.conv.2.weight"}):
            "decoder.4.conv.2.weight",
        saved("stray.pth", {**good, "decoder.23.weight": torch.zeros(3)}): "decoder.23.weight",
        saved("shape.pth", {**good, "decoder.7.conv.weight": torch.zeros(64, 32, 1, 1)}): "decoder.7.conv.weight",
        saved("taew2_2.pth", {**good, "decoder.1.weight": torch.zeros(32, 48, 3, 3)}): "48 latent channels",
    }
    for path, why in bad.items():
        with pytest.raises(common.UserError) as e:
            speedkit.load_tiny_decoder(path)
        msg = str(e.value)
        assert (why in msg and path in msg and "madebyollin/taehv" in msg and "taew2_1.pth" in msg
                and "\n" not in msg), msg
    ours = speedkit.tae_decode(tiny_tae[1], torch.ones(1, 16, 2, 2, 2))
    with_encoder = saved("full.pth", {**good, "encoder.0.weight": torch.zeros(64, 3, 3, 3)})
    save_file(good, str(tmp_path / "taew2_1.safetensors"))
    for path in (with_encoder, str(tmp_path / "taew2_1.safetensors")):
        assert torch.equal(speedkit.tae_decode(speedkit.load_tiny_decoder(path), torch.ones(1, 16, 2, 2, 2)), ours)


def test_tiny_decoder_file_has_its_own_cache_folder(tmp_path, monkeypatch):
    """--tiny's decoder is built once beside the tiny Wan, not inside its folder (whose cache would go
    stale), and loads through load_tiny_decoder. Planted: the file inside tiny_wan/ -> fails."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = speedkit.tiny_decoder_path()
    assert path == str(tmp_path / "reward_forcing" / "tiny_taew2_1" / "taew2_1.pth")
    assert not path.startswith(convert.tiny_model_dir())
    mtime = (tmp_path / path).stat().st_mtime_ns
    assert speedkit.tiny_decoder_path() == path and (tmp_path / path).stat().st_mtime_ns == mtime  # reused
    assert speedkit.load_tiny_decoder(path).decoder[1].weight.shape == (32, 16, 3, 3)


# -----------------------------------------------------------------------------
# FP8


def test_check_fp8_refuses_devices_without_float8_in_one_line(monkeypatch):
    """CPU, no CUDA, compute capability 8.6, or an fp32 model: one-line UserError; 8.9 with bf16
    passes. Planted: the capability compared as > (8, 9) (refuses Ada) -> fails."""
    def refused(device, dtype=torch.bfloat16):
        with pytest.raises(common.UserError) as e:
            speedkit.check_fp8(device, dtype)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "8.9" in refused("cpu") and "'cpu'" in refused("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "8.9" in refused("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "RTX 3090 has 8.6" in refused("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "--dtype bf16" in refused("cuda:0", torch.float32)
    speedkit.check_fp8("cuda:0", torch.bfloat16)


def block_linears(num_layers):
    """The names --fp8 must convert: each block's 10 linear layers, nothing outside the blocks."""
    names = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
             "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    return sorted(f"blocks.{b}.{n}" for b in range(num_layers) for n in names)


def test_fp8_filter_selects_exactly_the_block_linears():
    """Planted: a filter on isinstance(nn.Linear) alone (takes the embedders and proj_out) -> fails."""
    model = cw.CausalWan(cw.WanConfig.tiny())
    chosen = sorted(name for name, m in model.named_modules() if speedkit.fp8_layer(m, name))
    assert chosen == block_linears(2) and len(chosen) == 20


def test_fp8_model_stays_close_to_bf16_on_the_cpu(monkeypatch):
    """torchao's float8 path refuses a CPU by a hardware assert, but its kernels run there: with the
    assert lifted, the quantized tiny model converts exactly the 20 block linears and its output
    stays close to bf16's on the same input (float8 e4m3 keeps 3 mantissa bits). A layer torchao
    cannot convert (a size not a multiple of 16) is an error, not a silent bf16 layer. Planted: a
    filter that selects nothing (the output equals bf16's) -> fails."""
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8Tensor
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    torch.manual_seed(0)
    model = cw.CausalWan(cw.WanConfig.tiny()).to(torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(1, 16, 3, 8, 8, dtype=torch.bfloat16)
    t = torch.full((1,), 700.0)
    context = torch.randn(1, 16, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x, t, model.prompt_kv(context)).float()
        fp8 = speedkit.quantize_fp8(copy.deepcopy(model))
        out = fp8(x, t, fp8.prompt_kv(context)).float()  # the cross-attention keys/values are fp8 layers too
    converted = sorted(n for n, m in fp8.named_modules() if isinstance(getattr(m, "weight", None), Float8Tensor))
    assert converted == block_linears(2)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"fp8 vs bf16 relative difference {rel:.3e}")
    assert 1e-3 < rel < 0.1
    odd = cw.CausalWan(cw.WanConfig(dim=24, ffn_dim=40, num_heads=2, num_layers=1, text_dim=32,
                                    freq_dim=32)).to(torch.bfloat16)
    with pytest.raises(common.UserError, match="multiples of 16"):
        speedkit.quantize_fp8(odd)


# -----------------------------------------------------------------------------
# offloading


def devices(module):
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


def test_text_encoder_leaves_the_device_after_encoding(tiny_wan):
    """The meta device stands in for the GPU: inside on_device every encoder tensor is there, after it
    none is, and the CPU weights are the same tensors as before (dropped device copies, nothing copied
    back), for each new prompt. Planted: no restore at the end -> fails."""
    tokenizer, encoder = cw.load_text_encoder(tiny_wan)
    before = [(p.data_ptr(), p.clone()) for p in encoder.parameters()]
    context = cw.encode_prompts(tokenizer, encoder, ["a red fox"])
    for _ in range(2):  # a first prompt, then a switch to a new one
        with speedkit.on_device(encoder, "meta"):
            assert devices(encoder) == {"meta"}
        assert devices(encoder) == {"cpu"}
        assert all(p.data_ptr() == ptr and torch.equal(p, value)
                   for p, (ptr, value) in zip(encoder.parameters(), before))
    with speedkit.on_device(encoder, "cpu"):
        assert torch.equal(cw.encode_prompts(tokenizer, encoder, ["a red fox"]), context)


@pytest.mark.parametrize("kind", ["vae", "tae"])
def test_offloaded_decoder_is_on_the_device_only_while_decoding(tiny_wan, tiny_tae, kind):
    """Streaming decode through speedkit.offloaded: on the (meta) device during each block, back on the CPU
    between blocks, the causal state carried over; on the CPU the frames equal plain decoding.
    Planted: offloaded() returning decode unwrapped -> fails."""
    decoder = cw.load_vae(tiny_wan) if kind == "vae" else copy.deepcopy(tiny_tae[1])
    decode = functools.partial(cw.vae_decode if kind == "vae" else speedkit.tae_decode, decoder)
    z = torch.randn(1, 16, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def spy(z, first):
        seen.append(devices(decoder))
        return decode(z, first)

    on_meta = speedkit.offloaded(spy, decoder, "meta")
    with torch.no_grad():
        for s in range(0, 5, 3):
            assert on_meta(z[:, :, s:s + 3].to("meta"), first=s == 0).device.type == "meta"
            assert devices(decoder) == {"cpu"}
        assert seen == [{"meta"}, {"meta"}]
        plain = torch.cat([decode(z[:, :, s:s + 3], first=s == 0) for s in range(0, 5, 3)], 2)
        offloaded = speedkit.offloaded(decode, decoder, "cpu")
        assert torch.equal(torch.cat([offloaded(z[:, :, s:s + 3], first=s == 0) for s in range(0, 5, 3)], 2), plain)


# -----------------------------------------------------------------------------
# the levers in sample.py: --decoder tae, --offload (--fp8's refusal: tests/test_bad_input.py)


def sample_frames(argv, monkeypatch):
    """sample.main(argv) in this process: the uint8 frames [T, H, W, 3] it wrote, taken on their way
    to the mp4 writer (the mp4 is written and checked as usual)."""
    written, real = [], sample.write_video
    monkeypatch.setattr(sample, "write_video", lambda path, blocks, *rest, **kw: real(
        path, (written.append(b) or b for b in blocks), *rest, **kw))
    sample.main(sample.parse_args([str(a) for a in argv]))
    monkeypatch.setattr(sample, "write_video", real)
    return np.concatenate(written)


def spy_decoders(monkeypatch, on_call=lambda: None):
    """Replace cw.vae_decode and speedkit.tae_decode (before sample.py binds them) with recorders of
    ('vae' or 'tae', latents, first) for each call; on_call runs at each call."""
    calls = []
    for module, name in ((cw, "vae_decode"), (speedkit, "tae_decode")):
        def recording(decoder, z, first=True, real=getattr(module, name), kind=name[:3]):
            calls.append((kind, z.detach().clone(), first))
            on_call()
            return real(decoder, z, first)
        monkeypatch.setattr(module, name, recording)
    return calls


def as_uint8(pixels):
    """pixels [3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3], written out here (not common.to_uint8_frames)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy().astype(int)


SMALL = ["--tiny", "--height", "32", "--width", "32", "--prompt", "a red fox"]


def test_sample_decodes_with_the_tiny_decoder(tiny_wan, tmp_path, monkeypatch, capsys):
    """`sample.py --tiny --decoder tae --switch 9 ...`: --tiny's random tiny decoder built on first use
    in its cache folder, every block decoded by it and none by the Wan VAE, the switch applied, and
    the 21 frames written (a playable mp4) are the independent all-at-once reference decode of the
    whole latent video. Planted: main keeping partial(cw.vae_decode, vae) whatever --decoder says ->
    fails (the spy sees 'vae')."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = spy_decoders(monkeypatch)
    out = tmp_path / "fox.mp4"
    frames = sample_frames(SMALL + ["--model", tiny_wan, "--decoder", "tae", "--frames", "21",
                                    "--switch", "9", "a blue bird", "--out", out], monkeypatch)
    path = tmp_path / "cache" / "reward_forcing" / "tiny_taew2_1" / "taew2_1.pth"
    assert [(kind, first) for kind, _, first in calls] == [("tae", True), ("tae", False)]
    z = torch.cat([z for _, z, _ in calls], 2)  # [1, 16, 6, 4, 4]: the whole latent video
    want = as_uint8(reference_decode(torch.load(path, weights_only=True), z)[0])
    assert frames.shape == (21, 32, 32, 3) and np.abs(frames.astype(int) - want).max() <= 1  # fp32 rounding at a .5
    assert "switch at frame 9: a blue bird" in "".join(capsys.readouterr())
    with imageio.get_reader(out) as reader:
        assert reader.count_frames() == 21


def test_sample_extends_a_clip_with_the_tiny_decoder(tiny_wan, tmp_path, monkeypatch):
    """--extend with --decoder tae: the Wan VAE loads only to encode the clip (its latents are the
    first block), decodes nothing and is freed before the first block is decoded; the 21 frames
    written are the tiny decoder's decode of the clip's latents and the new ones, all at once.
    Planted: load_decoder keeping the VAE alive (stored on args) -> fails."""
    tae_path = speedkit.make_tiny_decoder(str(tmp_path / "taew2_1.pth"))
    clip = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    imageio.mimwrite(tmp_path / "clip.mp4", clip, fps=16, codec="libx264", macro_block_size=1)
    vaes, vae_alive, real_load_vae = [], [], cw.load_vae
    monkeypatch.setattr(cw, "load_vae",
                        lambda *a, **kw: vaes.append(weakref.ref(vae := real_load_vae(*a, **kw))) or vae)

    def is_the_vae_alive():
        gc.collect()
        vae_alive.append(vaes[0]() is not None)

    calls = spy_decoders(monkeypatch, on_call=is_the_vae_alive)
    frames = sample_frames(SMALL + ["--model", tiny_wan, "--decoder", "tae", "--decoder-path", tae_path,
                                    "--frames", "21", "--extend", tmp_path / "clip.mp4",
                                    "--out", tmp_path / "more.mp4"], monkeypatch)
    assert len(vaes) == 1 and vae_alive == [False, False]
    assert [(kind, first) for kind, _, first in calls] == [("tae", True), ("tae", False)]
    with imageio.get_reader(tmp_path / "clip.mp4") as reader:
        clip_read = np.stack([frame for frame in reader])  # the clip as sample.py reads it (after H.264)
    encoded = sample.vae_encode(real_load_vae(tiny_wan), clip_read, torch.device("cpu"))
    assert torch.equal(calls[0][1], encoded)  # the clip's 3 latent frames, then the 3 generated ones
    want = as_uint8(reference_decode(torch.load(tae_path, weights_only=True),
                                     torch.cat([z for _, z, _ in calls], 2))[0])
    assert frames.shape == (21, 32, 32, 3) and np.abs(frames.astype(int) - want).max() <= 1


@pytest.mark.parametrize("decoder", ["vae", "tae"])
def test_offload_leaves_the_video_unchanged(tiny_wan, tmp_path, monkeypatch, decoder):
    """--offload (on the CPU: the same device, the same computation in a different order) writes
    the frames the run without it writes, with an --image prefix and a switch. Planted:
    speedkit.offloaded passing first=True on every call (the decoder's causal state reset) -> fails."""
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "first.png")
    argv = SMALL + ["--model", tiny_wan, "--decoder", decoder, "--frames", "21", "--image", tmp_path / "first.png",
                    "--switch", "9", "a blue bird"]
    if decoder == "tae":
        argv += ["--decoder-path", speedkit.make_tiny_decoder(str(tmp_path / "taew2_1.pth"))]
    plain = sample_frames(argv + ["--out", tmp_path / "plain.mp4"], monkeypatch)
    offloaded = sample_frames(argv + ["--offload", "--out", tmp_path / "offload.mp4"], monkeypatch)
    assert plain.shape == (21, 32, 32, 3) and np.array_equal(plain, offloaded)


def test_offload_keeps_the_text_encoder_and_the_generator_apart_on_the_device(tiny_wan, tmp_path, monkeypatch):
    """sample.load_models with --offload, the meta device standing in for the GPU: while the prompts
    are encoded the text encoder's weights are all on the device and the generator's all in CPU
    memory; afterwards no encoder tensor is on the device and the generator is; the --image is
    encoded by the VAE on the device; the tiny decoder is on the device only while it decodes.
    (The encoder's output is a stand-in: UMT5 does not run on meta tensors.) Planted: the
    generator moved to the device before the encoding, or the text encoder loaded on the device,
    or the decoder not offloaded -> each fails."""
    held, during, vae_during = {}, [], []
    real_load_generator, real_vae_encode, real_tae_decode = (sample.load_generator, sample.vae_encode,
                                                             speedkit.tae_decode)
    monkeypatch.setattr(sample, "load_generator", lambda *a: held.setdefault("generator", real_load_generator(*a)))

    def encode_prompts(tokenizer, encoder, prompts):
        held["encoder"] = encoder
        during.append((devices(encoder), devices(held["generator"])))
        return torch.zeros(1, 512, encoder.config.d_model, device=encoder.device)

    def vae_encode(vae, frames, device):
        vae_during.append(devices(vae))
        return real_vae_encode(vae, frames, device)

    def tae_decode(tae, z, first=True):
        held["tae"] = tae
        during.append(devices(tae))
        return real_tae_decode(tae, z, first)

    monkeypatch.setattr(cw, "encode_prompts", encode_prompts)
    monkeypatch.setattr(sample, "vae_encode", vae_encode)
    monkeypatch.setattr(speedkit, "tae_decode", tae_decode)
    args = sample.parse_args(SMALL + ["--model", tiny_wan, "--offload", "--decoder", "tae", "--decoder-path",
                                      speedkit.make_tiny_decoder(str(tmp_path / "taew2_1.pth"))])
    meta = torch.device("meta")
    model, contexts, decode, prefix = sample.load_models(args, meta, torch.float32, "causal",
                                                         ["a red fox", "a blue bird"],
                                                         np.zeros((1, 32, 32, 3), np.uint8))
    assert during == [({"meta"}, {"cpu"}), ({"meta"}, {"cpu"})]
    assert devices(held["encoder"]) == {"cpu"} and devices(model) == {"meta"}
    assert [c.device.type for c in contexts.values()] == ["meta", "meta"]
    assert vae_during == [{"meta"}] and prefix.device.type == "meta"
    with torch.no_grad():
        assert decode(torch.zeros(1, 16, 3, 4, 4, device=meta), True).device.type == "meta"
    assert during[-1] == {"meta"} and devices(held["tae"]) == {"cpu"}
