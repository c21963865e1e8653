"""STDiT2 (Open-Sora v1.1): names and shapes of their checkpoints, equality to their forward (a float64
reference written out from their code, tests/stdit2_reference.py), kernels on == off, sequence parallelism,
loading."""

import json

import pytest
import torch

from kernel_checks import record_launches
from model_checks import assert_checkpointing_keeps_gradients, assert_same_function, grads, rel, spy_ops
from sora.kernels import attention as attention_module
from sora.kernels import norm as norm_module
from sora.kernels import qknorm as qknorm_module
from sora.kernels import residual as residual_module
from sora.models import build_model
from stdit2_reference import stdit2_forward

ARCH = dict(hidden_size=48, num_heads=4, patch_size=(1, 2, 2), input_sq_size=64, qk_norm=True, qk_norm_legacy=True)
TINY = dict(depth=2, caption_channels=16, model_max_length=5, class_dropout_prob=0.0, **ARCH)


def tiny(**kwargs):
    return build_model(dict(type="STDiT2", **{**TINY, **kwargs}))


def randomized(model, std=0.2):
    """Every trained weight random and non-zero (the zero-initialised projections would hide whole branches);
    rope.freqs keeps its constants."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    return model


def inputs(B=2, T=3, H=5, W=7, dtype=torch.float32, x_mask=False, seed=0):
    """Odd latent sizes; sample 0's caption padded; x_mask: a condition frame in each sample (the last of sample
    0, the first of sample 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, T, H, W, generator=g, dtype=dtype)
    t = torch.tensor([3, 700][:B])
    y = torch.randn(B, 1, 5, 16, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]][:B])
    frames = None
    if x_mask:
        frames = torch.ones(B, T, dtype=torch.bool)
        frames[0, -1] = frames[-1, 0] = False
    sizes = dict(num_frames=torch.full((B,), float(T)), height=torch.full((B,), 8.0 * H),
                 width=torch.full((B,), 8.0 * W), ar=torch.full((B,), H / W), fps=torch.tensor([24.0, 120.0][:B]))
    return (x, t, y, mask, frames, *(sizes[k].to(dtype) for k in ("num_frames", "height", "width", "ar", "fps")))


# ---- names and shapes: Open-Sora v1.1's STDiT2-XL/2 with 200 caption tokens, the table of their d599fd7 code
# (timm Mlp: fc1/fc2; LayerNorms without affine have no parameters; rope.freqs is a parameter).
def open_sora_v11_names(depth=28, C=1152):
    expected = {
        "x_embedder.proj.weight": (C, 4, 1, 2, 2), "x_embedder.proj.bias": (C,),
        "y_embedder.y_embedding": (200, 4096), "rope.freqs": (C // 16 // 2,),
        "final_layer.scale_shift_table": (2, C),
    }
    linears = {"t_embedder.mlp.0": (C, 256), "t_embedder.mlp.2": (C, C), "t_block.1": (6 * C, C),
               "t_block_temp.1": (3 * C, C), "y_embedder.y_proj.fc1": (C, 4096), "y_embedder.y_proj.fc2": (C, C),
               "final_layer.linear": (32, C), "csize_embedder.mlp.0": (C // 3, 256),
               "csize_embedder.mlp.2": (C // 3, C // 3), "ar_embedder.mlp.0": (C // 3, 256),
               "ar_embedder.mlp.2": (C // 3, C // 3), "fl_embedder.mlp.0": (C, 256), "fl_embedder.mlp.2": (C, C),
               "fps_embedder.mlp.0": (C, 256), "fps_embedder.mlp.2": (C, C)}
    for i in range(depth):
        expected[f"blocks.{i}.scale_shift_table"] = (6, C)
        expected[f"blocks.{i}.scale_shift_table_temporal"] = (3, C)
        for attn in ("attn", "attn_temp"):
            expected[f"blocks.{i}.{attn}.q_norm.weight"] = (C // 16,)
            expected[f"blocks.{i}.{attn}.k_norm.weight"] = (C // 16,)
            linears.update({f"blocks.{i}.{attn}.qkv": (3 * C, C), f"blocks.{i}.{attn}.proj": (C, C)})
        linears.update({f"blocks.{i}.cross_attn.q_linear": (C, C), f"blocks.{i}.cross_attn.kv_linear": (2 * C, C),
                        f"blocks.{i}.cross_attn.proj": (C, C), f"blocks.{i}.mlp.fc1": (4 * C, C),
                        f"blocks.{i}.mlp.fc2": (C, 4 * C)})
    for name, shape in linears.items():
        expected[f"{name}.weight"] = shape
        expected[f"{name}.bias"] = (shape[0],)
    return expected


def test_xl2_state_dict_matches_open_sora_v11():
    with torch.device("meta"):
        model = build_model(dict(type="STDiT2-XL/2"))
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert got == open_sora_v11_names()
    assert len(got) == 707
    with torch.device("meta"):  # their state dict loads strictly
        model.load_state_dict({name: torch.empty(shape) for name, shape in open_sora_v11_names().items()}, assign=True)
    assert sum(p.numel() for p in model.parameters()) == 767_452_100
    assert not model.rope.freqs.requires_grad
    # The zero-initialised layers of Open-Sora v1.1: output, cross-attention and temporal projections.
    small = tiny()
    for name in ("final_layer.linear", "blocks.1.cross_attn.proj", "blocks.0.attn_temp.proj"):
        assert small.get_submodule(name).weight.abs().sum() == 0
    torch.testing.assert_close(small.rope.freqs, 1.0 / 10000 ** (torch.arange(0, 12, 2).float() / 12))


def run_reference(model, args, fp32_casts=False, flash=False, **arch):
    """Open-Sora's forward with the model's weights; arch: the ARCH keys the model was built with otherwise."""
    return stdit2_forward(model.state_dict(), {**ARCH, **arch}, *args, fp32_casts=fp32_casts, flash=flash)


@pytest.mark.parametrize("size", [(3, 5, 7), (1, 6, 9), (4, 3, 4)])
@pytest.mark.parametrize("x_mask", [False, True])
@pytest.mark.parametrize("order", [dict(), dict(qk_norm_legacy=False), dict(qk_norm=False)])
def test_equals_open_sora_v11_in_float64(size, x_mask, order):
    """Odd sizes (padded to the patch and cropped back), one frame, with and without x_mask, both qk-norm orders
    and no qk-norm, a padded caption: the float32 output equals their forward's to float64 rounding (1e-7), and
    to 1e-6 against their forward with its fp32 roundings (softmax, RMSNorm). The reference's fused-attention form
    (flash=True, which the bench times as Open-Sora's) equals its own math form."""
    model = randomized(tiny(**order)).double()
    args = inputs(*(2, *size), dtype=torch.float64, x_mask=x_mask)
    with torch.no_grad():
        out = model(*args)
        assert out.dtype == torch.float32 and out.shape == (2, 8, *size)
        expected = run_reference(model, args, **order)
        assert rel(out, expected) < 1e-7
        assert rel(out, run_reference(model, args, fp32_casts=True, **order)) < 1e-6
        assert rel(run_reference(model, args, flash=True, **order), expected) < 1e-12


def test_gradients_equal_open_sora_v11_in_float64():
    """Backward through sora's STDiT2 and through their forward (autograd of the reference), with x_mask."""
    model = randomized(tiny()).double()
    args = inputs(T=2, H=3, W=5, dtype=torch.float64, x_mask=True)
    weights = {name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in model.named_parameters()}
    state = {**model.state_dict(), **weights}
    out, expected = model(*args), stdit2_forward(state, ARCH, *args)
    dout = torch.randn_like(out)
    out.backward(dout)
    expected.backward(dout)
    for name, g in grads(model).items():
        assert rel(g, weights[name].grad) < 1e-7, name


@pytest.mark.parametrize("x_mask, order", [(False, dict()), (True, dict()), (True, dict(qk_norm_legacy=False)),
                                           (False, dict(qk_norm=False))])
def test_kernels_on_equals_off(x_mask, order):
    """enable_layernorm_kernel=True (sora.kernels under the Triton interpreter: LayerNorm + modulation and gated
    residuals, per frame with x_mask; temporal attention with RoPE and qk-norm in its prologue; spatial qk-norm)
    against the plain path, fp32, forward and every gradient, in both qk-norm orders and without qk-norm."""
    depth = dict(depth=1) if order else {}
    assert_same_function(randomized(tiny(**order, **depth), std=0.05),
                         tiny(enable_layernorm_kernel=True, **order, **depth), inputs(T=2, H=3, W=4, x_mask=x_mask))


def test_fused_path_is_the_same_function_in_float64():
    """float64 runs the kernels' exact references: the per-frame views of the fused path must then equal the
    plain path to rounding."""
    plain = randomized(tiny()).double()
    fused = tiny(enable_layernorm_kernel=True).double()
    fused.load_state_dict(plain.state_dict())
    args = inputs(dtype=torch.float64, x_mask=True)
    with torch.no_grad():
        torch.testing.assert_close(fused(*args), plain(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_mask", [False, True])
def test_kernels_run_the_fused_ops(monkeypatch, x_mask):
    """With the kernels on, each block's three modulations and three gated residuals are sora.kernels calls on
    the (B, N, C) residual stream with one modulation row per sample, or per frame (frames=T) under x_mask;
    spatial attention's q/k RMSNorm is K.qk_norm on the qkv Linear's output; temporal attention is one
    K.temporal_attention on the frame-major qkv with the block's norm weights and rope.freqs. The final layer
    modulates per sample (twice under x_mask). The Triton kernels (interpreted) run, not the eager references."""
    seen = spy_ops(monkeypatch, "layernorm_modulate", "gated_residual", "qk_norm", "temporal_attention")
    forward_kernels = [(norm_module, "_layernorm_modulate_fwd_kernel"), (residual_module, "_gated_residual_fwd_kernel"),
                       (qknorm_module, "_qk_norm_fwd_kernel"), (attention_module, "_temporal_attention_fwd_kernel")]
    launched = record_launches(monkeypatch, forward_kernels)
    model = tiny(enable_layernorm_kernel=True)
    model(*inputs(T=2, H=3, W=4, x_mask=x_mask))
    F = 2 if x_mask else 1
    tokens, per_frame_qkv, qkv = (2, 2 * 4, 48), (2 * 2, 4, 3 * 48), (2, 2 * 4, 3 * 48)  # 3x4 latent: 2x2 patches
    block = [("layernorm_modulate", tokens, F), ("qk_norm", per_frame_qkv, None), ("gated_residual", tokens, F),
             ("layernorm_modulate", tokens, F), ("temporal_attention", qkv, None), ("gated_residual", tokens, F),
             ("layernorm_modulate", tokens, F), ("gated_residual", tokens, F)]
    final = [("layernorm_modulate", tokens, None)] * (2 if x_mask else 1)
    assert [(name, tuple(args[0].shape), kwargs.get("frames")) for name, args, kwargs in seen] == block * 2 + final
    spatial = [args for name, args, _ in seen if name == "qk_norm"]
    temporal = [(args, kwargs) for name, args, kwargs in seen if name == "temporal_attention"]
    for b, args, (targs, tkwargs) in zip(model.blocks, spatial, temporal):
        assert args[1:4] == (4, b.attn.q_norm.weight, b.attn.k_norm.weight)
        assert targs[1:] == (2, 4) and tkwargs["rope_freqs"] is model.rope.freqs and tkwargs["rope_first"] is True
        assert tkwargs["q_norm"] is b.attn_temp.q_norm.weight and tkwargs["k_norm"] is b.attn_temp.k_norm.weight
    assert set(launched) == {name for _, name in forward_kernels}


def test_compiled_model_with_kernels_is_one_graph():
    """The fused STDiT2 under torch.compile(fullgraph=True) is one graph without a host sync (no .item(): the
    position-embedding scale stays a tensor), with the same output and gradients as eager. aot_eager: inductor
    compiles the same graph, but its first forward and backward of this one-block model take about 45 s on CPU."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = randomized(tiny(enable_layernorm_kernel=True, depth=1), std=0.05)
    args = inputs(T=2, H=3, W=4, x_mask=True)
    eager = model(*args)
    eager.square().mean().backward()
    expected = grads(model)
    model.zero_grad()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)(*args)
    compiled.square().mean().backward()
    assert counter.frame_count == 1
    syncs = [node for graph in counter.graphs for node in graph.graph.nodes if node.target in ("item", "tolist")]
    assert not syncs, syncs
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_all_true_x_mask_is_no_mask():
    """Open-Sora's invariant: marking every frame as generated is the same as passing no x_mask."""
    model = randomized(tiny()).double()
    x, t, y, mask, _, *sizes = inputs(dtype=torch.float64)
    with torch.no_grad():
        none = model(x, t, y, mask, None, *sizes)
        torch.testing.assert_close(model(x, t, y, mask, torch.ones(2, 3, dtype=torch.bool), *sizes), none,
                                   rtol=0, atol=0)
        # The mask is not ignored: a condition frame changes the output.
        assert rel(model(*inputs(dtype=torch.float64, x_mask=True)), none) > 1e-3


def sequence_parallel_worker(rank, world, out, kernels):
    import torch.distributed as dist

    from sora.parallel import init_sequence_parallel

    group = init_sequence_parallel(world)
    torch.manual_seed(0)
    model = randomized(tiny(enable_sequence_parallelism=True, enable_layernorm_kernel=kernels), std=0.05)
    output = model(*inputs(T=4, H=3, W=5, x_mask=True), sp_group=group)
    output.square().mean().backward()
    result = {}
    for name, g in grads(model).items():
        dist.all_reduce(g, op=dist.ReduceOp.AVG, group=group)  # what data-parallel reduction does
        result[name] = g
    torch.save({"output": output.detach(), "grads": result}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("kernels", [False, True])
def test_sequence_parallel_equals_one_process(tmp_path, kernels):
    """Frames split over 2 gloo ranks (each holding 2 of 4 frames, one of them a condition frame): temporal
    attention exchanges heads for frames, so RoPE and the x_mask rows follow the global frame index. With the
    kernels on too (K.temporal_attention's RoPE on each rank's heads of all frames), against one plain process."""
    from spawn import run

    run(sequence_parallel_worker, 2, tmp_path, kernels)
    torch.manual_seed(0)
    model = randomized(tiny(), std=0.05)
    output = model(*inputs(T=4, H=3, W=5, x_mask=True))
    output.square().mean().backward()
    expected = grads(model)
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(result["output"], output.detach(), rtol=1e-5, atol=1e-6)
        for name, g in expected.items():
            torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("kernels", [False, True])
def test_grad_checkpoint_gives_the_same_gradients(kernels):
    assert_checkpointing_keeps_gradients(randomized(tiny(enable_layernorm_kernel=kernels), std=0.05),
                                         tiny(grad_checkpoint=True, enable_layernorm_kernel=kernels),
                                         inputs(T=2, H=3, W=4, x_mask=True))


# ---- loading


def open_sora_hf_folder(path, model):
    """What Open-Sora v1.1 released on the hub (hpcai-tech/OpenSora-STDiT-v2-stage3): config.json with their
    STDiT2Config fields (as the stage3 file, with this model's sizes) and model.safetensors."""
    from safetensors.torch import save_file

    path.mkdir()
    config = dict(
        architectures=["STDiT2"], auto_map={"AutoConfig": "configuration_stdit2.STDiT2Config",
                                            "AutoModel": "modeling_stdit2.STDiT2"},
        model_type="stdit2", torch_dtype="float32", transformers_version="4.40.1", input_size=[32, 60, 106],
        in_channels=4, caption_channels=16, model_max_length=5, class_dropout_prob=0.1, pred_sigma=True,
        drop_path=0.0, no_temporal_pos_emb=False, freeze=None, enable_flash_attn=False,
        enable_layernorm_kernel=False, enable_sequence_parallelism=False,
        **{key: list(value) if isinstance(value, tuple) else value for key, value in ARCH.items()
           if key != "qk_norm_legacy"},
        depth=2,
    )
    (path / "config.json").write_text(json.dumps(config))
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


def test_hugging_face_folder_builds_from_its_config(tmp_path, caplog):
    """The folder's config.json builds the model (depth, width, input_sq_size, ...: nothing else given), the
    arguments given are kept (here the kernels, which Open-Sora's hub path drops: their #409), and every
    weight loads (strictly: nothing missing, nothing unused)."""
    source = randomized(tiny())
    folder = open_sora_hf_folder(tmp_path / "OpenSora-STDiT-v2-stage3", source)
    with caplog.at_level("INFO"):
        model = build_model(dict(type="STDiT2", from_pretrained=str(folder), enable_layernorm_kernel=True))
    assert (len(model.blocks), model.hidden_size, model.input_sq_size) == (2, 48, 64)
    assert model.enable_layernorm_kernel and model.blocks[0].enable_layernorm_kernel
    assert "left as initialised" not in caplog.text and "not used" not in caplog.text
    expected = source.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match=r"contradict the config.json of .*: depth=3 \(config.json: 2\)"):
        build_model(dict(type="STDiT2", from_pretrained=str(folder), depth=3))


def test_unreadable_config_json_is_one_line(tmp_path):
    folder = open_sora_hf_folder(tmp_path / "broken", randomized(tiny()))
    (folder / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"cannot read .*config.json: Expecting"):
        build_model(dict(type="STDiT2", from_pretrained=str(folder)))


def test_hugging_face_repo_is_fetched_as_a_folder(tmp_path, monkeypatch):
    """hf://ORG/REPO: config.json and model.safetensors through huggingface_hub (here a stand-in)."""
    import huggingface_hub

    source = randomized(tiny())
    folder = open_sora_hf_folder(tmp_path / "snapshot", source)
    fetched = []

    def download(repo, filename, revision=None, **options):
        fetched.append((repo, filename, revision))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = build_model(dict(type="STDiT2", from_pretrained="hf://hpcai-tech/OpenSora-STDiT-v2-stage3"))
    assert ("hpcai-tech/OpenSora-STDiT-v2-stage3", "model.safetensors", None) in fetched
    torch.testing.assert_close(model.blocks[1].attn_temp.q_norm.weight, source.blocks[1].attn_temp.q_norm.weight)


@pytest.mark.parametrize("layout", ["open_sora_pth", "sora_training_folder"])
def test_checkpoint_files_round_trip(tmp_path, layout):
    """Open-Sora's .pth (a plain state dict) and a sora training checkpoint folder (its ema.pt)."""
    source = randomized(tiny()).eval()
    if layout == "open_sora_pth":
        path = tmp_path / "model.pth"
    else:
        (tmp_path / "epoch0-global_step10").mkdir()
        path = tmp_path / "epoch0-global_step10" / "ema.pt"
    torch.save(source.state_dict(), path)
    loaded = tiny(from_pretrained=str(path if layout == "open_sora_pth" else path.parent)).eval()
    args = inputs(x_mask=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), source(*args), rtol=0, atol=0)


NEW_IN_V11 = ("t_block_temp", "rope.freqs", "csize_embedder", "ar_embedder", "fl_embedder", "fps_embedder",
              "scale_shift_table_temporal", "q_norm", "k_norm")


@pytest.mark.parametrize("model_type", ["PixArt", "STDiT"])
def test_starts_from_pixart_alpha_or_stdit_weights(tmp_path, caplog, model_type):
    """Open-Sora v1.1 trained from PixArt-alpha (2-D patch embed, under "state_dict") and STDiT v1 weights:
    what they have loads, their 3-token null caption is extended by repeating its last row to 5 tokens, the
    new modules keep their initialisation, and one line says which were not in the file."""
    from sora.models.checkpoint import load_checkpoint

    old = randomized(build_model(dict(type=model_type, input_size=(1, 8, 8), hidden_size=48, num_heads=4, depth=2,
                                      caption_channels=16, model_max_length=3)))
    state = old.state_dict()
    if model_type == "PixArt":
        state = {"state_dict": {**state, "x_embedder.proj.weight": state["x_embedder.proj.weight"][:, :, 0]}}
    torch.save(state, tmp_path / "old.pth")
    model = tiny()
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    with caplog.at_level("WARNING"):
        missing, unexpected = load_checkpoint(model, str(tmp_path / "old.pth"))
    new = NEW_IN_V11 + (("attn_temp",) if model_type == "PixArt" else ())
    assert sorted(missing) == sorted(name for name in initial if any(part in name for part in new))
    assert unexpected == []
    assert len([r for r in caplog.records if "left as initialised" in r.getMessage()]) == 1
    for name in missing:
        torch.testing.assert_close(model.state_dict()[name], initial[name], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, old.blocks[1].mlp.fc2.weight)
    null = old.y_embedder.y_embedding
    torch.testing.assert_close(model.y_embedder.y_embedding, torch.cat([null, null[-1:], null[-1:]]))


# ---- errors


@pytest.mark.parametrize("change, message", [
    (dict(height=None, fps=None), "STDiT2 needs height, fps: pass num_frames"),
    (dict(x_mask=torch.ones(2, 2, dtype=torch.bool)), r"x_mask must be a \(B, T\) = \(2, 3\) tensor"),
    (dict(ar=torch.ones(3)), "ar must be a number or hold B=2 values"),
    (dict(mask=torch.ones(2, 4)), r"mask must have shape \(2, 5\)"),
    (dict(y=torch.randn(2, 1, 5, 15)), "caption_channels=16"),
    (dict(x=torch.randn(2, 3, 3, 5, 7)), r"x must be \(B, 4, T, H, W\)"),
])
def test_bad_inputs(change, message):
    x, t, y, mask, x_mask, num_frames, height, width, ar, fps = inputs()
    args = dict(x=x, timestep=t, y=y, mask=mask, x_mask=x_mask, num_frames=num_frames, height=height, width=width,
                ar=ar, fps=fps)
    with pytest.raises(ValueError, match=message):
        tiny()(**{**args, **change})


@pytest.mark.parametrize("cfg, message", [
    (dict(type="STDiT2", hidden_size=40, num_heads=4), "must be divisible by num_heads=4 and by 12"),
    (dict(type="STDiT2", freeze="all"), "freeze must be None, 'not_temporal' or 'text', got 'all'"),
    (dict(type="STDiT2", no_temporal_pos_emb=True), "no_temporal_pos_emb=True is not supported"),
    (dict(type="STDiT2-XL/2", depth=3), r"unknown argument\(s\) depth for model 'STDiT2-XL/2'"),
    (dict(type="STDiT2", enable_flash=True), "valid: input_size, input_sq_size"),
])
def test_build_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_freeze():
    trained = {name for name, p in tiny(freeze="not_temporal").named_parameters() if p.requires_grad}
    assert trained and all(".attn_temp." in name for name in trained)
    frozen = {name for name, p in tiny(freeze="text").named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in tiny().named_parameters() if "cross_attn" in name} | {"rope.freqs"}
