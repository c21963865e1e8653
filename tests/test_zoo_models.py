"""DiT and Latte: Open-Sora-compatible names and forward, the authors' checkpoints, kernels on == off, the null
class, bad inputs."""

import argparse

import pytest
import torch
from einops import rearrange, repeat

from model_checks import assert_checkpointing_keeps_gradients, assert_same_function, randomize, spy_temporal_attention
from sora.models import build_model
from sora.models.checkpoint import load_checkpoint
from sora.models.layers import LabelEmbedder

TINY = dict(input_size=(4, 8, 8), hidden_size=64, num_heads=4, class_dropout_prob=0.0)
LABEL = dict(condition="label_10")
TEXT = dict(condition="text", caption_channels=32)
DEPTH = {"DiT": 2, "Latte": 4}


def tiny(model_type, condition=LABEL, **kwargs):
    return build_model(dict(type=model_type, depth=DEPTH[model_type], **TINY, **condition), **kwargs)


def inputs(condition=LABEL, B=2, T=4, H=8, W=8, dtype=torch.float32):
    x = torch.randn(B, 4, T, H, W, dtype=dtype)
    t = torch.randint(0, 1000, (B,))
    if condition is LABEL:
        y = torch.tensor([3, 7])[:B]
    else:
        y = torch.randn(B, 1, 1, 32, dtype=dtype)
    return x, t, y


# ---- names and shapes, written out from Open-Sora v1's dit.py and blocks.py (timm Mlp: fc1/fc2; LayerNorms
# without affine have no parameters; FinalLayer and DiTBlock's adaLN_modulation = Sequential(SiLU, Linear)).
def open_sora_names(condition, T, patch=(1, 2, 2), depth=28, C=1152, S=256):
    expected = {
        "pos_embed_spatial": (1, S, C),
        "pos_embed_temporal": (1, T, C),
        "x_embedder.proj.weight": (C, 4, *patch),
        "x_embedder.proj.bias": (C,),
        "t_embedder.mlp.0.weight": (C, 256),
        "t_embedder.mlp.0.bias": (C,),
        "t_embedder.mlp.2.weight": (C, C),
        "t_embedder.mlp.2.bias": (C,),
        "final_layer.linear.weight": (patch[0] * patch[1] * patch[2] * 8, C),
        "final_layer.linear.bias": (patch[0] * patch[1] * patch[2] * 8,),
        "final_layer.adaLN_modulation.1.weight": (2 * C, C),
        "final_layer.adaLN_modulation.1.bias": (2 * C,),
    }
    if condition == "text":  # CLIP's pooled embedding: one 512-wide token
        expected.update({
            "y_embedder.y_embedding": (1, 512),
            "y_embedder.y_proj.fc1.weight": (C, 512),
            "y_embedder.y_proj.fc1.bias": (C,),
            "y_embedder.y_proj.fc2.weight": (C, C),
            "y_embedder.y_proj.fc2.bias": (C,),
        })
    else:  # N classes + the null class (class_dropout_prob > 0)
        expected["y_embedder.embedding_table.weight"] = (int(condition.split("_")[1]) + 1, C)
    linears = {"attn.qkv": (3 * C, C), "attn.proj": (C, C), "mlp.fc1": (4 * C, C), "mlp.fc2": (C, 4 * C),
               "adaLN_modulation.1": (6 * C, C)}
    for i in range(depth):
        for name, shape in linears.items():
            expected[f"blocks.{i}.{name}.weight"] = shape
            expected[f"blocks.{i}.{name}.bias"] = (shape[0],)
    return expected


@pytest.mark.parametrize("model_type, condition, input_size, patch", [
    ("DiT-XL/2", "label_1000", (1, 32, 32), (1, 2, 2)),  # DiT-XL-2-256x256.pt, Open-Sora's 1x256x256-class config
    ("DiT-XL/2", "text", (16, 32, 32), (1, 2, 2)),
    ("DiT-XL/2x2", "text", (16, 32, 32), (2, 2, 2)),
    ("Latte-XL/2", "label_101", (16, 32, 32), (1, 2, 2)),  # Latte-XL-2-256x256-ucf101.pt
])
def test_xl2_state_dict_matches_open_sora(model_type, condition, input_size, patch):
    with torch.device("meta"):
        model = build_model(dict(type=model_type, condition=condition, input_size=input_size))
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert got == open_sora_names(condition, T=input_size[0] // patch[0], patch=patch)


@pytest.mark.parametrize("model_type", ["DiT", "Latte"])
def test_adaln_zero_initialisation(model_type):
    """Every block's modulation and the output start at zero: the model starts as "predict zero"."""
    model = tiny(model_type, class_dropout_prob=0.1)
    zero = ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    zero += [f"blocks.{i}.adaLN_modulation.1" for i in range(DEPTH[model_type])]
    for name in zero:
        assert model.get_submodule(name).weight.abs().sum() == 0 and model.get_submodule(name).bias.abs().sum() == 0
    x, t, y = inputs()
    with torch.no_grad():
        assert model(x, t, y).abs().max() == 0
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0


# ---- Open-Sora v1's forward, transcribed from its dit.py / latte.py / blocks.py onto our modules: the oracle
# for where the position embeddings go, how the condition is repeated, the block layouts and unpatchify.
def open_sora_modulate(norm, x, shift, scale):
    return norm(x) * (scale.unsqueeze(1) + 1) + shift.unsqueeze(1)


def open_sora_block(block, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * block.attn(open_sora_modulate(block.norm1, x, shift_msa, scale_msa))
    return x + gate_mlp.unsqueeze(1) * block.mlp(open_sora_modulate(block.norm2, x, shift_mlp, scale_mlp))


def open_sora_forward(model, x, t, y, latte):
    (nt, nh, nw), (pt, ph, pw), c_out = model.token_grid(x.shape[2:]), model.patch_size, model.out_channels
    x = model.x_embedder(x)
    x = rearrange(x, "b (t s) d -> b t s d", t=nt) + model.pos_embed_spatial
    if not latte:
        x = rearrange(x, "b t s d -> b s t d") + model.pos_embed_temporal
        x = rearrange(x, "b s t d -> b t s d")
    x = rearrange(x, "b t s d -> b (t s) d")
    y = model.y_embedder(y, False)
    condition = model.t_embedder(t, dtype=x.dtype) + (y.squeeze(1).squeeze(1) if y.dim() == 4 else y)
    for i, block in enumerate(model.blocks):
        if not latte:
            x = open_sora_block(block, x, condition)
        elif i % 2 == 0:
            x = rearrange(x, "b (t s) d -> (b t) s d", t=nt)
            x = open_sora_block(block, x, repeat(condition, "b d -> (b t) d", t=nt))
            x = rearrange(x, "(b t) s d -> b (t s) d", t=nt)
        else:
            x = rearrange(x, "b (t s) d -> (b s) t d", t=nt)
            if i == 1:
                x = x + model.pos_embed_temporal
            x = open_sora_block(block, x, repeat(condition, "b d -> (b s) d", s=nh * nw))
            x = rearrange(x, "(b s) t d -> b (t s) d", s=nh * nw)
    shift, scale = model.final_layer.adaLN_modulation(condition).chunk(2, dim=1)
    x = model.final_layer.linear(open_sora_modulate(model.final_layer.norm_final, x, shift, scale))
    x = x.reshape(x.shape[0], nt, nh, nw, pt, ph, pw, c_out)
    x = rearrange(x, "n t h w r p q c -> n c t r h p w q")
    return x.reshape(x.shape[0], c_out, nt * pt, nh * ph, nw * pw)


@pytest.mark.parametrize("model_type, condition, patch", [
    ("DiT", LABEL, (1, 2, 2)), ("DiT", TEXT, (2, 2, 2)), ("Latte", LABEL, (1, 2, 2)), ("Latte", TEXT, (2, 2, 2)),
], ids=["DiT-label", "DiT-text-2x2", "Latte-label", "Latte-text-2x2"])
def test_matches_open_sora_forward(model_type, condition, patch):
    model = randomize(tiny(model_type, condition, patch_size=patch)).eval()
    x, t, y = inputs(condition)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), open_sora_forward(model, x, t, y, latte=model_type == "Latte"))


@pytest.mark.parametrize("model_type, condition", [("DiT", LABEL), ("DiT", TEXT), ("Latte", LABEL), ("Latte", TEXT)],
                         ids=["DiT-label", "DiT-text", "Latte-label", "Latte-text"])
def test_kernels_on_equals_off(model_type, condition):
    """The fused path (Triton kernels under the interpreter) against Open-Sora's block op for op, fp32."""
    out_plain, g_plain = assert_same_function(randomize(tiny(model_type, condition)),
                                              tiny(model_type, condition, enable_layernorm_kernel=True),
                                              inputs(condition))
    assert out_plain.shape == (2, 8, 4, 8, 8) and out_plain.dtype == torch.float32
    for name, g in g_plain.items():
        assert g.abs().max() > 0, name


def test_latte_temporal_blocks_run_the_temporal_attention_kernel(monkeypatch):
    """With the kernels on, Latte's odd blocks attend over frames with K.temporal_attention on frame-major qkv."""
    seen = spy_temporal_attention(monkeypatch)
    tiny("Latte", enable_layernorm_kernel=True)(*inputs())
    assert seen == [((2, 4 * 16, 3 * 64), 4, 4)] * (DEPTH["Latte"] // 2)


@pytest.mark.parametrize("model_type", ["DiT", "Latte"])
@pytest.mark.parametrize("kernel", [False, True])
def test_residual_stream_is_contiguous(model_type, kernel):
    """From the patch embedder on, every block reads a channels-last (B, N, C) residual stream in both paths."""
    model = tiny(model_type, enable_layernorm_kernel=kernel)
    layouts = []
    for block in list(model.blocks) + [model.final_layer]:
        block.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    model(*inputs())
    assert layouts == [True] * (DEPTH[model_type] + 1)


@pytest.mark.parametrize("model_type", ["DiT", "Latte"])
def test_fused_path_is_the_same_function_in_float64(model_type):
    """float64 runs the kernels' exact references: the fused wiring (per-sample modulation, temporal attention
    on frame-major tokens) must then equal the plain path to rounding."""
    plain = randomize(tiny(model_type, learn_sigma=False)).double()
    fused = tiny(model_type, learn_sigma=False, enable_layernorm_kernel=True).double()
    fused.load_state_dict(plain.state_dict())
    x, t, y = inputs(dtype=torch.float64)
    torch.testing.assert_close(fused(x, t, y), plain(x, t, y), rtol=1e-12, atol=1e-12)


def test_latte_attends_across_frames_only_in_odd_blocks():
    """Block 0 (spatial) keeps frames apart; block 1 (temporal) mixes them: changing frame 0 of the input
    changes frame 3's output only when a temporal block runs."""
    x, t, y = inputs()
    changed = x.clone()
    changed[:, :, 0] += 1.0
    for depth, mixes in ((1, False), (2, True)):
        model = randomize(build_model(dict(type="Latte", depth=depth, **TINY, **LABEL))).eval()
        with torch.no_grad():
            delta = (model(changed, t, y) - model(x, t, y))[:, :, 3].abs().max()
        assert (delta > 1e-4) == mixes, depth


# ---- the authors' checkpoint formats --------------------------------------------------------------------
def image_model_state(model):
    """Our state dict as an image model saves it: 2-D patch embed, MAE's fixed `pos_embed`, no temporal buffer."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("pos_embed_")}
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"][:, :, 0]
    state["pos_embed"] = model.pos_embed_spatial.clone()
    return state


def facebook_dit_checkpoint(model):
    """facebookresearch/DiT's DiT-XL-2-256x256.pt: a plain state dict."""
    state = image_model_state(model)
    assert state["x_embedder.proj.weight"].shape == (64, 4, 2, 2) and state["pos_embed"].shape == (1, 16, 64)
    return state


def latte_checkpoint(model):
    """Vchitect/Latte's training checkpoint: EMA and raw weights, optimizer state and the run's arguments,
    with Latte's fixed `temp_embed` (1, frames, C)."""
    ema = image_model_state(model)
    ema["temp_embed"] = model.pos_embed_temporal.clone()
    assert ema["temp_embed"].shape == (1, 4, 64)
    return {
        "model": {k: v + 1 for k, v in ema.items()},
        "ema": ema,
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0, "params": [0]}]},
        "args": argparse.Namespace(model="Latte-XL/2", num_frames=4, image_size=64, extras=2, num_classes=10,
                                   learn_sigma=True, ckpt=None),
    }


@pytest.mark.parametrize("model_type, input_size, make, kwargs", [
    ("DiT", (1, 8, 8), facebook_dit_checkpoint, dict(no_temporal_pos_emb=True)),
    ("Latte", (4, 8, 8), latte_checkpoint, {}),
    ("Latte", (4, 8, 8), lambda m: {"ema": m.state_dict()}, dict(patch_size=(2, 2, 2))),  # Open-Sora's own format
])
def test_checkpoint_round_trip(tmp_path, model_type, input_size, make, kwargs):
    # class_dropout_prob > 0: the released tables carry the null class (1001 and 102 rows).
    source = randomize(tiny(model_type, input_size=input_size, class_dropout_prob=0.1, **kwargs)).eval()
    torch.save(make(source), tmp_path / "ckpt.pt")
    missing, unexpected = load_checkpoint(tiny(model_type, input_size=input_size, class_dropout_prob=0.1, **kwargs),
                                          str(tmp_path / "ckpt.pt"))
    assert set(missing) <= {"pos_embed_spatial"} and unexpected == []
    loaded = tiny(model_type, input_size=input_size, class_dropout_prob=0.1, from_pretrained=str(tmp_path / "ckpt.pt"),
                  **kwargs).eval()
    x, t, y = inputs(T=input_size[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), source(x, t, y), rtol=0, atol=0)


# ---- classifier-free guidance: the null class -----------------------------------------------------------
def test_label_embedder_null_class():
    embedder = LabelEmbedder(10, 8, dropout_prob=0.5)
    table = embedder.embedding_table.weight
    assert table.shape == (11, 8)
    labels = torch.tensor([3, 10, 7])
    torch.testing.assert_close(embedder(labels, train=False), table[[3, 10, 7]], rtol=0, atol=0)
    forced = embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 0]))
    torch.testing.assert_close(forced, table[[10, 10, 7]], rtol=0, atol=0)
    torch.manual_seed(0)
    labels = torch.arange(256) % 10
    out = embedder(labels, train=True)
    dropped = (out == table[10]).all(1)
    kept = (out == table[labels]).all(1)
    assert (dropped | kept).all()  # every row is its label's or the null class's
    assert 64 < dropped.sum() < 192  # about half with dropout_prob=0.5
    without = LabelEmbedder(10, 8, dropout_prob=0.0)
    assert without.embedding_table.weight.shape == (10, 8)
    with pytest.raises(ValueError, match="null class"):
        without(labels, train=False, force_drop_ids=torch.ones(256))


@pytest.mark.parametrize("condition", [LABEL, TEXT], ids=["label", "text"])
def test_training_dropout_uses_the_null_condition(condition):
    """Training with class_dropout_prob=1 drops every condition: the same output as asking for the null
    class id N (labels) or the null caption y_embedding (text) at inference."""
    model = randomize(tiny("DiT", condition, class_dropout_prob=1.0))
    x, t, y = inputs(condition)
    if condition is LABEL:
        y_null = torch.full((2,), 10)
    else:
        y_null = model.y_embedder.y_embedding[None].repeat(2, 1, 1)[:, None]
    with torch.no_grad():
        dropped = model.train()(x, t, y)
        null = model.eval()(x, t, y_null)
        conditioned = model(x, t, y)
    torch.testing.assert_close(dropped, null, rtol=0, atol=0)
    assert (conditioned - null).abs().max() > 1e-3


# ---- other sizes, gradient checkpointing --------------------------------------------------------------
def test_other_sizes_use_recomputed_pos_embeds():
    """A Latte configured for one latent size runs another like a Latte configured for it."""
    small = randomize(tiny("Latte"))
    other = tiny("Latte", input_size=(2, 8, 12))
    other.load_state_dict({k: v for k, v in small.state_dict().items() if "pos_embed" not in k}, strict=False)
    x, t, y = inputs(T=2, W=12)
    with torch.no_grad():
        torch.testing.assert_close(small(x, t, y), other(x, t, y))
    assert small.pos_embed_temporal.shape == (1, 4, 64)


@pytest.mark.parametrize("kernel", [False, True])
def test_grad_checkpoint_gives_the_same_gradients(kernel):
    assert_checkpointing_keeps_gradients(randomize(tiny("Latte", enable_layernorm_kernel=kernel)),
                                         tiny("Latte", enable_layernorm_kernel=kernel, grad_checkpoint=True), inputs())


# ---- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("condition, x_shape, y, message", [
    (LABEL, (1, 3, 4, 8, 8), torch.tensor([1]), r"x must be \(B, 4, T, H, W\), got \(1, 3, 4, 8, 8\)"),
    (LABEL, (1, 4, 4, 8, 7), torch.tensor([1]), "W=7 is not divisible by patch size 2"),
    (LABEL, (2, 4, 4, 8, 8), torch.tensor([1, 2]), r"timestep must have shape \(2,\)"),
    (LABEL, (1, 4, 4, 8, 8), torch.tensor([1.0]), r"y must be \(B=1,\) integer class ids .* torch.float32"),
    (LABEL, (1, 4, 4, 8, 8), torch.tensor([[1]]), r"y must be \(B=1,\) integer class ids .* got \(1, 1\)"),
    (LABEL, (1, 4, 4, 8, 8), torch.tensor([10]), r"class ids must be in \[0, 10\) \(no null class"),
    (LABEL, (1, 4, 4, 8, 8), torch.tensor([-1]), r"class ids must be in \[0, 10\).*got \[-1\]"),
    (TEXT, (1, 4, 4, 8, 8), torch.randn(1, 1, 2, 32), r"pooled caption embedding \(B=1, 1, 1, caption_channels=32\)"),
    (TEXT, (1, 4, 4, 8, 8), torch.randn(1, 1, 1, 31), r"got \(1, 1, 1, 31\)"),
], ids=["channels", "patch", "timestep", "float-ids", "ids-shape", "no-null", "negative", "caption-tokens", "caption-width"])
@pytest.mark.parametrize("model_type", ["DiT", "Latte"])
def test_bad_inputs(model_type, condition, x_shape, y, message):
    model = tiny(model_type, condition)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(x_shape), torch.zeros(1), y)


def test_null_class_id_is_accepted_only_with_a_null_class():
    model = tiny("DiT", class_dropout_prob=0.1)
    x, t, _ = inputs(B=1)
    model(x, t, torch.tensor([10]))
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 10\), or 10 for the null class; got \[11\]"):
        model(x, t, torch.tensor([11]))


@pytest.mark.parametrize("cfg, message", [
    (dict(type="DiT", condition="image"), "condition must be 'text' or 'label_N'"),
    (dict(type="Latte", condition="label_0"), "condition must be 'text' or 'label_N'"),
    (dict(type="DiT", condition="text", caption_channels=None), "needs caption_channels"),
    (dict(type="DiT-XL/2", depth=3), r"unknown argument\(s\) depth for model 'DiT-XL/2'"),
    (dict(type="Latte-XL/2x2", pred_sigma=False), r"unknown argument\(s\) pred_sigma .* learn_sigma"),
    (dict(type="DiT", input_size=(4, 8, 7)), "not divisible by patch_size"),
    (dict(type="Latte", hidden_size=64, num_heads=5), "must be divisible by num_heads=5"),
])
def test_build_model_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_compiled_latte_with_kernels_is_one_graph():
    """DiT blocks on the kernels (custom ops), spatial and temporal, compile to one graph."""
    torch._dynamo.reset()
    model = randomize(tiny("Latte", enable_layernorm_kernel=True)).eval()
    x, t, y = inputs()
    eager = model(x, t, y)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
