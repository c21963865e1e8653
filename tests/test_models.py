"""STDiT and PixArt: Open-Sora-compatible names and checkpoints, kernels on == off, masking, checkpointing."""

import numpy as np
import pytest
import torch

from model_checks import (
    assert_checkpointing_keeps_gradients,
    assert_same_function,
    randomize,
    rel,
    spy_temporal_attention,
)
from sora.models import build_model
from sora.models.checkpoint import load_checkpoint
from sora.models.layers import get_1d_sincos_pos_embed, get_2d_sincos_pos_embed

TINY = dict(input_size=(4, 8, 8), hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=6,
            class_dropout_prob=0.0)


def tiny(model_type="STDiT", **kwargs):
    return build_model(dict(type=model_type, **TINY), **kwargs)


def inputs(B=2, T=4, H=8, W=8, L=6, caption=32, dtype=torch.float32):
    x = torch.randn(B, 4, T, H, W, dtype=dtype)
    t = torch.randint(0, 1000, (B,))
    y = torch.randn(B, 1, L, caption, dtype=dtype)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, L // 2:] = 0  # sample 0's caption is padded
    return x, t, y, mask


# ---- names and shapes: Open-Sora v1's STDiT-XL/2 at 16x256x256 (latent 16x32x32), written out from its
# stdit.py/blocks.py (timm Mlp: fc1/fc2; LayerNorms without affine have no parameters).
def open_sora_names(depth=28, C=1152, T=16, S=256, temporal=True):
    expected = {
        "pos_embed": (1, S, C),
        "pos_embed_temporal": (1, T, C),
        "x_embedder.proj.weight": (C, 4, 1, 2, 2),
        "x_embedder.proj.bias": (C,),
        "t_embedder.mlp.0.weight": (C, 256),
        "t_embedder.mlp.0.bias": (C,),
        "t_embedder.mlp.2.weight": (C, C),
        "t_embedder.mlp.2.bias": (C,),
        "t_block.1.weight": (6 * C, C),
        "t_block.1.bias": (6 * C,),
        "y_embedder.y_embedding": (120, 4096),
        "y_embedder.y_proj.fc1.weight": (C, 4096),
        "y_embedder.y_proj.fc1.bias": (C,),
        "y_embedder.y_proj.fc2.weight": (C, C),
        "y_embedder.y_proj.fc2.bias": (C,),
        "final_layer.scale_shift_table": (2, C),
        "final_layer.linear.weight": (2 * 2 * 8, C),
        "final_layer.linear.bias": (2 * 2 * 8,),
    }
    attentions = {"attn.qkv": (3 * C, C), "attn.proj": (C, C), "cross_attn.q_linear": (C, C),
                  "cross_attn.kv_linear": (2 * C, C), "cross_attn.proj": (C, C), "mlp.fc1": (4 * C, C),
                  "mlp.fc2": (C, 4 * C)}
    if temporal:
        attentions.update({"attn_temp.qkv": (3 * C, C), "attn_temp.proj": (C, C)})
    for i in range(depth):
        expected[f"blocks.{i}.scale_shift_table"] = (6, C)
        for name, shape in attentions.items():
            expected[f"blocks.{i}.{name}.weight"] = shape
            expected[f"blocks.{i}.{name}.bias"] = (shape[0],)
    return expected


@pytest.mark.parametrize("model_type, temporal", [("STDiT-XL/2", True), ("PixArt-XL/2", False)])
def test_xl2_state_dict_matches_open_sora(model_type, temporal):
    with torch.device("meta"):
        model = build_model(dict(type=model_type, input_size=(16, 32, 32)))
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert got == open_sora_names(temporal=temporal)
    # The zero-initialised layers of Open-Sora: output projection, cross-attention (and temporal) projections.
    model = build_model(dict(type=model_type.split("-")[0], input_size=(1, 4, 4), depth=2, hidden_size=64, num_heads=4))
    zero = ["final_layer.linear", "blocks.1.cross_attn.proj"] + (["blocks.0.attn_temp.proj"] if temporal else [])
    for name in zero:
        assert model.get_submodule(name).weight.abs().sum() == 0


def test_pos_embed_matches_mae_formula():
    """Independent float64 computation of MAE/Open-Sora's sin-cos embeddings (w coordinate in the first half)."""
    C, h, w, scale = 16, 3, 5, 0.5

    def sincos(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    expected = np.concatenate([sincos(C // 2, cols.reshape(-1) / scale), sincos(C // 2, rows.reshape(-1) / scale)], 1)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(C, (h, w), scale=scale).numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(get_1d_sincos_pos_embed(C, 7, scale=2 / 3).numpy(), sincos(C, np.arange(7) * 1.5),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ["STDiT", "PixArt"])
def test_kernels_on_equals_off(model_type):
    """The fused path (Triton kernels under the interpreter) against the plain PyTorch path, fp32."""
    assert_same_function(randomize(tiny(model_type)), tiny(model_type, enable_layernorm_kernel=True), inputs())


@pytest.mark.parametrize("model_type, calls", [("STDiT", 2), ("PixArt", 0)])
def test_temporal_branch_runs_the_temporal_attention_kernel(monkeypatch, model_type, calls):
    """With the kernels on, each STDiT block's temporal branch is one K.temporal_attention on frame-major qkv."""
    seen = spy_temporal_attention(monkeypatch)
    tiny(model_type, enable_layernorm_kernel=True)(*inputs())
    assert seen == [((2, 4 * 16, 3 * 64), 4, 4)] * calls


@pytest.mark.parametrize("model_type", ["STDiT", "PixArt"])
@pytest.mark.parametrize("kernel", [False, True])
def test_residual_stream_is_contiguous(model_type, kernel):
    """From the patch embedder on, every block reads a channels-last (B, N, C) residual stream: no hidden
    transposes in its LayerNorms and Linears, in the plain path as in the fused one."""
    model = tiny(model_type, enable_layernorm_kernel=kernel)
    layouts = []
    for block in list(model.blocks) + [model.final_layer]:
        block.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    model(*inputs())
    assert layouts == [True] * 3


def test_stochastic_depth_is_per_sample_on_both_paths():
    """drop_path drops whole samples' branches; with the same random draws the fused path equals the plain one."""
    plain = randomize(tiny(drop_path=0.5)).train()
    fused = tiny(drop_path=0.5, enable_layernorm_kernel=True).train()
    fused.load_state_dict(plain.state_dict())
    x, t, y, mask = inputs(B=4)
    torch.manual_seed(3)
    out_plain = plain(x, t, y, mask)
    torch.manual_seed(3)
    out_fused = fused(x, t, y, mask)
    assert rel(out_fused, out_plain) < 1e-5
    torch.manual_seed(4)
    assert rel(fused(x, t, y, mask), out_plain) > 1e-3  # other draws drop other samples: the test is not vacuous


def test_fused_path_is_the_same_function_in_float64():
    """float64 runs the kernels' exact references: the fused path's wiring must then equal the plain path."""
    plain = randomize(tiny("STDiT", pred_sigma=False)).double()
    fused = tiny("STDiT", pred_sigma=False, enable_layernorm_kernel=True).double()
    fused.load_state_dict(plain.state_dict())
    x, t, y, mask = inputs(dtype=torch.float64)
    torch.testing.assert_close(fused(x, t, y, mask), plain(x, t, y, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_type", ["STDiT", "PixArt"])
@pytest.mark.parametrize("kernel", [False, True])
def test_padding_tokens_do_not_change_the_output(model_type, kernel):
    model = randomize(tiny(model_type, enable_layernorm_kernel=kernel)).eval()
    x, t, y, mask = inputs()
    changed = y.clone()
    changed[0, 0, 3:] = torch.randn(3, 32)  # only sample 0's padding tokens
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, changed, mask), model(x, t, y, mask), rtol=0, atol=0)
        # Without the mask the same change is seen, so the test above is not vacuous.
        assert (model(x, t, changed, None) - model(x, t, y, None)).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", [False, True])
def test_grad_checkpoint_gives_the_same_gradients(kernel):
    assert_checkpointing_keeps_gradients(randomize(tiny(enable_layernorm_kernel=kernel)),
                                         tiny(enable_layernorm_kernel=kernel, grad_checkpoint=True), inputs())


def test_other_sizes_use_recomputed_pos_embeds():
    """A model configured for one latent size runs another (e.g. a bucket) like a model configured for it."""
    small = randomize(tiny())
    other = build_model(dict(type="STDiT", **{**TINY, "input_size": (2, 8, 12)}))
    other.load_state_dict({k: v for k, v in small.state_dict().items() if "pos_embed" not in k}, strict=False)
    x, t, y, mask = inputs(T=2, W=12)
    with torch.no_grad():
        torch.testing.assert_close(small(x, t, y, mask), other(x, t, y, mask))
    assert small.pos_embed.shape == (1, 16, 64)  # the buffers keep the configured size
    grid = small.token_grid(x.shape[2:])
    assert small.pos_embeds(grid, x.device)[0] is small.pos_embeds(grid, x.device)[0]  # computed once per size
    with torch.no_grad():
        torch.testing.assert_close(small(x, t, y, mask), other(x, t, y, mask))


def open_sora_checkpoint(model):
    """What Open-Sora's training saves: EMA weights (with the pos-embed buffers) under "ema"."""
    return {"ema": model.state_dict(), "model": {k: v + 1 for k, v in model.state_dict().items()}}


def pixart_alpha_checkpoint(model):
    """PixArt-alpha's release: weights under "state_dict", a 2-D image patch embed."""
    state = dict(model.state_dict())
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"][:, :, 0]
    state.pop("pos_embed_temporal")
    return {"state_dict": state}


@pytest.mark.parametrize("model_type, make, suffix", [
    ("STDiT", open_sora_checkpoint, ".pth"),
    ("STDiT", lambda m: m.state_dict(), ".pt"),
    ("PixArt", pixart_alpha_checkpoint, ".pth"),
    ("STDiT", lambda m: {k: v.contiguous() for k, v in m.state_dict().items()}, ".safetensors"),
])
def test_checkpoint_round_trip(tmp_path, model_type, make, suffix):
    source = randomize(tiny(model_type, input_size=(1, 8, 8))).eval()
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(make(source), str(path))
    else:
        torch.save(make(source), path)
    loaded = tiny(model_type, input_size=(1, 8, 8), from_pretrained=str(path)).eval()
    x, t, y, mask = inputs(T=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y, mask), source(x, t, y, mask), rtol=0, atol=0)


def test_flashattn_asked_for_but_missing_is_said_once(caplog, monkeypatch):
    import sora.models

    monkeypatch.setattr(sora.models, "_flash_attn_func", lambda: None)  # flash-attn not installed
    sora.models._say_once.cache_clear()
    with caplog.at_level("WARNING"):
        for _ in range(2):
            tiny(enable_flashattn=True)
        tiny(enable_flashattn=False)
    said = [r.message for r in caplog.records if "flash-attn" in r.message]
    assert said == ["enable_flashattn=True, but flash-attn is not installed: attention runs on torch's "
                    "scaled_dot_product_attention (its flash and memory-efficient kernels on a GPU)"]


def test_stdit_starts_from_pixart_alpha_weights(tmp_path, caplog):
    """Open-Sora initialised STDiT from PixArt-alpha: everything but temporal attention loads, and it says so."""
    pixart = randomize(tiny("PixArt", input_size=(1, 8, 8)))
    torch.save(pixart_alpha_checkpoint(pixart), tmp_path / "PixArt-XL-2-256x256.pth")
    model = tiny("STDiT")
    with caplog.at_level("WARNING"):
        missing, unexpected = load_checkpoint(model, str(tmp_path / "PixArt-XL-2-256x256.pth"))
    assert sorted(missing) == sorted(n for n in model.state_dict() if "attn_temp" in n)
    assert unexpected == []
    assert "left as initialised" in caplog.text
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, pixart.blocks[1].attn.qkv.weight)


def test_checkpoint_errors(tmp_path):
    model = tiny()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, str(tmp_path / "missing.pth"))
    other = build_model(dict(type="STDiT", **{**TINY, "hidden_size": 32}))
    torch.save(other.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"does not match the model: \d+ weight\(s\) differ in shape, e\.g\. x_embedder\.proj\.weight \(32, 4, 1, 2, 2\) \(model: \(64, 4, 1, 2, 2\)\)"):
        load_checkpoint(model, str(tmp_path / "wide.pth"))
    torch.save({"unrelated.weight": torch.ones(3)}, tmp_path / "unrelated.pth")
    with pytest.raises(ValueError, match="none of its 1 weights"):
        load_checkpoint(model, str(tmp_path / "unrelated.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(model, str(tmp_path / "garbage.pth"))


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.randn(1, 4, 4, 7, 8), torch.zeros(1), torch.randn(1, 1, 6, 32)), "H=7 is not divisible by patch size 2"),
    (lambda m: m(torch.randn(1, 3, 4, 8, 8), torch.zeros(1), torch.randn(1, 1, 6, 32)), r"x must be \(B, 4, T, H, W\)"),
    (lambda m: m(torch.randn(1, 4, 4, 8, 8), torch.zeros(1), torch.randn(1, 1, 6, 31)), "caption_channels=32"),
    (lambda m: m(torch.randn(1, 4, 4, 8, 8), torch.zeros(1), torch.randn(1, 1, 6, 32), torch.ones(1, 5)), r"mask must have shape \(1, 6\)"),
    (lambda m: m(torch.randn(1, 4, 4, 8, 8), torch.zeros(1), torch.randn(1, 1, 6, 32), torch.zeros(1, 6)), "no caption token"),
    (lambda m: m(torch.randn(2, 4, 4, 8, 8), torch.zeros(1), torch.randn(2, 1, 6, 32)), r"timestep must have shape \(2,\)"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny())


@pytest.mark.parametrize("cfg, message", [
    (dict(type="STDiT-XXL"), "unknown model type 'STDiT-XXL'; valid types: STDiT, STDiT-XL/2"),
    (dict(type="STDiT-XL/2", depth=3), r"unknown argument\(s\) depth for model 'STDiT-XL/2'"),
    (dict(type="STDiT", enable_flash=True), "valid: input_size"),
    (dict(type="STDiT", input_size=(4, 7, 8)), "not divisible by patch_size"),
    (dict(type="STDiT", hidden_size=64, num_heads=5), "must be divisible by num_heads=5"),
    (dict(type="STDiT", hidden_size=66, num_heads=3), "and by 4"),
    (dict(type="PixArt", enable_sequence_parallelism=True), "no temporal attention"),
])
def test_build_model_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_compiled_model_with_kernels_is_one_graph():
    """Users compile their models: with the kernels as custom ops, the whole STDiT is one graph."""
    torch._dynamo.reset()
    model = randomize(tiny(enable_layernorm_kernel=True))
    x, t, y, mask = inputs()
    eager = model(x, t, y, mask)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y, mask)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
