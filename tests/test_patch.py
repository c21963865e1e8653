"""sora.kernels.patch on tiny diffusers models with random weights: patched == unpatched, outputs and every
parameter gradient, fp32 to rounding and bf16 within bf16 rounding, and the Triton kernels really ran.

Every parameter is redrawn (diffusers zero-initialises some modulation and output layers, which would hide a
wrong shift, scale or gate). Kernels run under the Triton interpreter (tests/conftest.py).
"""

import copy
import statistics

import pytest
import torch
from kernel_checks import record_launches

import sora.kernels as K
from sora.kernels import _common
from sora.kernels import norm as norm_module
from sora.kernels import diffusers_patch as patch_module
from sora.kernels import residual as residual_module

diffusers = pytest.importorskip("diffusers")

KERNELS = [(norm_module, "_layernorm_modulate_fwd_kernel"), (norm_module, "_layernorm_modulate_bwd_kernel"),
           (residual_module, "_gated_residual_fwd_kernel"), (residual_module, "_gated_residual_bwd_kernel")]
# Largest fp32 difference between patched and unpatched, relative to max(1, |unpatched|): a few roundings
# of the tiny models' outputs and gradients (which reach |40|).
FP32_TOLERANCE = 1e-4
BF16_STEP = 2.0**-8


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer a kernel writes starts as NaN, so an element it forgets shows up in the comparison."""
    monkeypatch.setattr(_common, "POISON", True)


def randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


def wan(**config):
    return randomized(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32, **config))


def wan_inputs(per_token=False):
    # 3 frames of 2x2 latent patches: 12 tokens. TI2V gives each token its own timestep (B, N).
    timestep = torch.randint(0, 1000, (2, 12) if per_token else (2,))
    return dict(hidden_states=torch.randn(2, 4, 3, 4, 4), timestep=timestep,
                encoder_hidden_states=torch.randn(2, 5, 16))


def pixart():
    return randomized(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=2, use_additional_conditions=False))


def pixart_inputs():
    return dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(2, 5, 16), added_cond_kwargs={"resolution": None,
                                                                                "aspect_ratio": None})


def latte():
    return randomized(diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, caption_channels=16, sample_size=4, patch_size=2, video_length=3,
        norm_type="ada_norm_single"))


def latte_inputs():
    return dict(hidden_states=torch.randn(2, 4, 3, 4, 4), timestep=torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(2, 5, 16))


def dit():
    return randomized(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=4,
        patch_size=2, num_embeds_ada_norm=10))


def dit_inputs():
    return dict(hidden_states=torch.randn(2, 4, 4, 4), timestep=torch.tensor([3, 7]), class_labels=torch.tensor([1, 4]))


# (model, inputs, blocks changed, launches of the forward kernels per call)
FAMILIES = {
    "wan2.1": (wan, wan_inputs, 2, {"_layernorm_modulate_fwd_kernel": 4, "_gated_residual_fwd_kernel": 2}),
    "wan2.2-ti2v": (wan, lambda: wan_inputs(per_token=True), 2,
                    {"_layernorm_modulate_fwd_kernel": 4, "_gated_residual_fwd_kernel": 2}),
    "pixart": (pixart, pixart_inputs, 3, {"_layernorm_modulate_fwd_kernel": 5, "_gated_residual_fwd_kernel": 4}),
    "latte": (latte, latte_inputs, 3, {"_layernorm_modulate_fwd_kernel": 5, "_gated_residual_fwd_kernel": 4}),
    "dit": (dit, dit_inputs, 3, {"_layernorm_modulate_fwd_kernel": 5, "_gated_residual_fwd_kernel": 4}),
}


def cast(inputs, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def run(model, inputs, dout=None):
    out = model(**inputs).sample
    if dout is None:
        dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), dout, allow_unused=True)
    return out, grads, dout


def in_dtype(model, dtype):
    """The model in dtype, but its _keep_in_fp32_modules in fp32 as from_pretrained(torch_dtype=dtype) loads it:
    Wan's scale_shift_table (so fp32 shift/scale/gate on bf16 tokens) and norm weights."""
    model.to(dtype)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        if keep & set(name.split(".")):
            parameter.data = parameter.data.float()
    return model


def relative_error(got, want):
    return (got.double() - want.double()).abs().max().item() / max(1.0, want.double().abs().max().item())


def check_equal(family, dtype, monkeypatch, compiled=False):
    """fp32: patched == unpatched to rounding. bf16: measured against the fp32 model on the same bf16-rounded
    weights and inputs, the patched model's error is within 4x the unpatched bf16 model's plus four bf16 steps
    for every tensor, and no larger than 2x in the median over the output and all gradients. The slack is the
    Triton interpreter's: it rounds fp32 to bf16 by truncation (twice the error of round-to-nearest-even, which
    compiled kernels and torch use; Triton 3.9, also with fp_downcast_rounding="rtne")."""
    build, make_inputs, blocks, launches_per_call = FAMILIES[family]
    eager = in_dtype(build(), dtype)
    patched = copy.deepcopy(eager)
    assert K.patch(patched) == blocks
    assert K.patch(patched) == 0  # already patched
    torch.manual_seed(1)
    inputs = cast(make_inputs(), dtype)
    want, want_grads, dout = run(eager, inputs)
    if dtype != torch.float32:
        exact, exact_grads, _ = run(copy.deepcopy(eager).float(), cast(inputs, torch.float32), dout.float())
    launched = record_launches(monkeypatch, KERNELS)
    if compiled:
        torch._dynamo.reset()
        patched = torch.compile(patched, fullgraph=True, backend="aot_eager")
    got, got_grads, _ = run(patched, inputs, dout)
    names = ["output"] + [name for name, _ in eager.named_parameters()]
    errors, eager_errors = [], []
    for i, (name, g, w) in enumerate(zip(names, (got, *got_grads), (want, *want_grads))):
        assert (g is None) == (w is None), name
        if w is None:
            continue
        if dtype == torch.float32:
            err = relative_error(g, w)
            assert err <= FP32_TOLERANCE, f"{name}: error {err:.3g} > {FP32_TOLERANCE:.3g}"
        else:
            reference = (exact, *exact_grads)[i]
            errors.append(relative_error(g, reference))
            eager_errors.append(relative_error(w, reference))
            assert errors[-1] <= 4 * eager_errors[-1] + 4 * BF16_STEP, f"{name}: error {errors[-1]:.3g}, " \
                                                                      f"unpatched {eager_errors[-1]:.3g}"
    if errors:
        assert statistics.median(errors) <= 2 * statistics.median(eager_errors)
    for kernel, count in launches_per_call.items():
        assert launched.count(kernel) == count, f"{kernel}: {launched.count(kernel)} launches, expected {count}"
    assert "_layernorm_modulate_bwd_kernel" in launched and "_gated_residual_bwd_kernel" in launched


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_equals_unpatched_fp32(family, monkeypatch):
    check_equal(family, torch.float32, monkeypatch)


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2-ti2v", "pixart"])
def test_patched_equals_unpatched_bf16(family, monkeypatch):
    check_equal(family, torch.bfloat16, monkeypatch)


def test_patched_wan_compiles_fullgraph(monkeypatch):
    check_equal("wan2.2-ti2v", torch.float32, monkeypatch, compiled=True)


def test_wider_modulation_runs_the_eager_block():
    """PixArt's eager block promotes bf16 tokens to an fp32 modulation's dtype (an fp32 model fed bf16 tokens);
    the patched block then runs diffusers' own forward, so it returns what the eager block returns."""
    model = pixart()
    block = model.transformer_blocks[0]
    eager = copy.deepcopy(block)
    K.patch(model)
    hidden, context = torch.randn(2, 16, 16, dtype=torch.bfloat16), torch.randn(2, 5, 16)
    timestep = torch.randn(2, 6 * 16)  # fp32
    got = block(hidden, encoder_hidden_states=context, timestep=timestep)
    want = eager(hidden, encoder_hidden_states=context, timestep=timestep)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)


def test_patched_model_keeps_its_class_name_and_config(tmp_path):
    model = dit()
    K.patch(model)
    assert type(model).__name__ == "DiTTransformer2DModel"
    assert isinstance(model, diffusers.DiTTransformer2DModel)
    model.save_pretrained(tmp_path)
    assert '"_class_name": "DiTTransformer2DModel"' in (tmp_path / "config.json").read_text()


def test_unsupported_models_and_blocks_are_refused():
    with pytest.raises(ValueError, match="got a Linear; it supports WanTransformer3DModel"):
        K.patch(torch.nn.Linear(2, 2))
    model = pixart()
    model.transformer_blocks[1] = torch.nn.Identity()
    with pytest.raises(ValueError, match="transformer_blocks.1 is a Identity; sora.kernels.patch supports"):
        K.patch(model)
    model = pixart()
    model.transformer_blocks[0].norm_type = "ada_norm"
    with pytest.raises(ValueError, match="norm_type='ada_norm'"):
        K.patch(model)
    assert not any(type(block) in patch_module._PATCHED.values() for block in model.transformer_blocks[1:])


@pytest.mark.parametrize("changed", ["WanTransformerBlock", "WanTransformer3DModel"])
def test_a_changed_diffusers_forward_is_refused(monkeypatch, changed):
    """A forward that differs from diffusers 0.42.1's is refused, and nothing of the model is patched."""
    monkeypatch.setitem(patch_module.FORWARD_SOURCES, changed, "0" * 64)
    model = wan()
    with pytest.raises(ValueError, match=f"{changed}.forward of diffusers .* differs from the one sora.kernels.patch"):
        K.patch(model)
    assert not any(type(m) in patch_module._PATCHED.values() for m in model.modules())


def test_a_hooked_forward_is_refused():
    model = dit()
    block = model.transformer_blocks[0]
    block.forward = block.forward  # what offloading and caching hooks do
    with pytest.raises(ValueError, match="call sora.kernels.patch\\(model\\) before adding it"):
        K.patch(model)
