"""The speed levers as library pieces: the tiny streaming decoder (TAEW2.1's layout), FP8 linear
layers (torchao) and offloading a model's weights while it is not used."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import causal_wan as cw


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
    cw.make_tiny_decoder(path)
    return path, cw.load_tiny_decoder(path)


def test_tiny_decoder_has_the_published_checkpoint_layout():
    """Planted: a bias on the stage convs (decoder.8 ...), or TGrow's 1x1 conv with a bias -> fails."""
    got = {k: tuple(v.shape) for k, v in cw.TinyDecoder().state_dict().items()}
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
        whole = cw.tae_decode(tae, z)
        assert whole.shape == (2, 3, 1 + 4 * 6, 32, 48)
        ref = reference_decode(torch.load(path, weights_only=True), z)
        assert (whole - ref).abs().max() < 1e-5
        for chunk, counts in ((3, [9, 12, 4]), (1, [1, 4, 4, 4, 4, 4, 4])):
            blocks = [cw.tae_decode(tae, z[:, :, s:s + chunk], first=s == 0) for s in range(0, 7, chunk)]
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
        saved("incomplete.pth", {k: v for k, v in good.items() if k != "decoder.4.conv.2.weight"}): "decoder.4.conv.2.weight",
        saved("stray.pth", {**good, "decoder.23.weight": torch.zeros(3)}): "decoder.23.weight",
        saved("shape.pth", {**good, "decoder.7.conv.weight": torch.zeros(64, 32, 1, 1)}): "decoder.7.conv.weight",
        saved("taew2_2.pth", {**good, "decoder.1.weight": torch.zeros(32, 48, 3, 3)}): "48 latent channels",
    }
    for path, why in bad.items():
        with pytest.raises(cw.UserError) as e:
            cw.load_tiny_decoder(path)
        msg = str(e.value)
        assert why in msg and path in msg and "madebyollin/taehv" in msg and "taew2_1.pth" in msg and "\n" not in msg, msg
    ours = cw.tae_decode(tiny_tae[1], torch.ones(1, 16, 2, 2, 2))
    with_encoder = saved("full.pth", {**good, "encoder.0.weight": torch.zeros(64, 3, 3, 3)})
    save_file(good, str(tmp_path / "taew2_1.safetensors"))
    for path in (with_encoder, str(tmp_path / "taew2_1.safetensors")):
        assert torch.equal(cw.tae_decode(cw.load_tiny_decoder(path), torch.ones(1, 16, 2, 2, 2)), ours)


def test_tiny_decoder_file_has_its_own_cache_folder(tmp_path, monkeypatch):
    """--tiny's decoder is built once beside the tiny Wan, not inside its folder (whose cache would go
    stale), and loads through load_tiny_decoder. Planted: the file inside tiny_wan/ -> fails."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = cw.tiny_decoder_path()
    assert path == str(tmp_path / "reward_forcing" / "tiny_taew2_1" / "taew2_1.pth")
    assert not path.startswith(cw.tiny_model_dir())
    mtime = (tmp_path / path).stat().st_mtime_ns
    assert cw.tiny_decoder_path() == path and (tmp_path / path).stat().st_mtime_ns == mtime  # reused
    assert cw.load_tiny_decoder(path).decoder[1].weight.shape == (32, 16, 3, 3)


# -----------------------------------------------------------------------------
# FP8


def test_check_fp8_refuses_devices_without_float8_in_one_line(monkeypatch):
    """CPU, no CUDA, compute capability 8.6, or an fp32 model: one-line UserError; 8.9 with bf16
    passes. Planted: the capability compared as > (8, 9) (refuses Ada) -> fails."""
    def refused(device, dtype=torch.bfloat16):
        with pytest.raises(cw.UserError) as e:
            cw.check_fp8(device, dtype)
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
    cw.check_fp8("cuda:0", torch.bfloat16)


def block_linears(num_layers):
    """The names --fp8 must convert: each block's 10 linear layers, nothing outside the blocks."""
    names = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
             "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    return sorted(f"blocks.{b}.{n}" for b in range(num_layers) for n in names)


def test_fp8_filter_selects_exactly_the_block_linears():
    """Planted: a filter on isinstance(nn.Linear) alone (takes the embedders and proj_out) -> fails."""
    model = cw.CausalWan(cw.WanConfig.tiny())
    chosen = sorted(name for name, m in model.named_modules() if cw.fp8_layer(m, name))
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
        fp8 = cw.quantize_fp8(copy.deepcopy(model))
        out = fp8(x, t, fp8.prompt_kv(context)).float()  # the cross-attention keys/values are fp8 layers too
    converted = sorted(n for n, m in fp8.named_modules() if isinstance(getattr(m, "weight", None), Float8Tensor))
    assert converted == block_linears(2)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"fp8 vs bf16 relative difference {rel:.3e}")
    assert 1e-3 < rel < 0.1
    odd = cw.CausalWan(cw.WanConfig(dim=24, ffn_dim=40, num_heads=2, num_layers=1, text_dim=32, freq_dim=32)).to(torch.bfloat16)
    with pytest.raises(cw.UserError, match="multiples of 16"):
        cw.quantize_fp8(odd)


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
        with cw.on_device(encoder, "meta"):
            assert devices(encoder) == {"meta"}
        assert devices(encoder) == {"cpu"}
        assert all(p.data_ptr() == ptr and torch.equal(p, value) for p, (ptr, value) in zip(encoder.parameters(), before))
    with cw.on_device(encoder, "cpu"):
        assert torch.equal(cw.encode_prompts(tokenizer, encoder, ["a red fox"]), context)


@pytest.mark.parametrize("kind", ["vae", "tae"])
def test_offloaded_decoder_is_on_the_device_only_while_decoding(tiny_wan, tiny_tae, kind):
    """Streaming decode through cw.offloaded: on the (meta) device during each block, back on the CPU
    between blocks, the causal state carried over; on the CPU the frames equal plain decoding.
    Planted: offloaded() returning decode unwrapped -> fails."""
    decoder = cw.load_vae(tiny_wan) if kind == "vae" else copy.deepcopy(tiny_tae[1])
    decode = functools.partial(cw.vae_decode if kind == "vae" else cw.tae_decode, decoder)
    z = torch.randn(1, 16, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def spy(z, first):
        seen.append(devices(decoder))
        return decode(z, first)

    on_meta = cw.offloaded(spy, decoder, "meta")
    with torch.no_grad():
        for s in range(0, 5, 3):
            assert on_meta(z[:, :, s:s + 3].to("meta"), first=s == 0).device.type == "meta"
            assert devices(decoder) == {"cpu"}
        assert seen == [{"meta"}, {"meta"}]
        plain = torch.cat([decode(z[:, :, s:s + 3], first=s == 0) for s in range(0, 5, 3)], 2)
        offloaded = cw.offloaded(decode, decoder, "cpu")
        assert torch.equal(torch.cat([offloaded(z[:, :, s:s + 3], first=s == 0) for s in range(0, 5, 3)], 2), plain)
