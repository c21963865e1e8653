"""The kernels under the Triton interpreter, forward and every gradient, against float64 references.

Inputs are fresh random draws in the tested dtype; the reference runs on the same (rounded) values upcast to
float64, so the only allowed difference is the kernel's fp32 arithmetic plus one rounding to the output dtype.
Every buffer a kernel writes is poisoned with NaN first (SORA_KERNEL_POISON), so an unwritten element fails.
"""

import pytest
import torch
from kernel_checks import record_launches

import sora.kernels as K
from sora.kernels import _common, layout
from sora.kernels import norm as lnm_module
from sora.kernels import residual as gr_module
from sora.kernels.layout import from_temporal_reference, to_temporal_reference
from sora.kernels.norm import layernorm_modulate_reference
from sora.kernels.residual import gated_residual_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Largest error allowed, relative to max(1, |reference|): fp32 arithmetic, then one rounding to the dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (B, N, C): C not a power of two; 75 rows per sample span two programs of the backward reduction with a
# partial last block; 16 is the smallest supported hidden size.
SHAPES = [(2, 75, 70), (3, 10, 16), (1, 6, 1152)]
FORMS = ["B1C", "11C", "BC", "1C", "C", "chunk"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def assert_matches(out, ref, dtype, what):
    assert out.dtype == dtype or dtype is None, f"{what}: dtype {out.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = out.double()
    assert not out.isnan().any(), f"{what}: NaN (an element was not written)"
    err = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= TOLERANCE[dtype], f"{what}: error {err:.3g} > {TOLERANCE[dtype]:.3g}"


def modulation(form, B, C, dtype):
    """A shift/scale/gate tensor in one of the accepted broadcast forms, random and requiring grad."""
    if form == "chunk":  # a non-contiguous (B, 1, C) slice of an adaLN (B, 6, C) table, as STDiT makes them
        table = torch.randn(B, 6, C, dtype=dtype, requires_grad=True)
        return table, table.chunk(6, dim=1)[2]
    shape = {"B1C": (B, 1, C), "11C": (1, 1, C), "BC": (B, C), "1C": (1, C), "C": (C,)}[form]
    leaf = torch.randn(shape, dtype=dtype, requires_grad=True)
    return leaf, leaf


def leaves64(tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def grads(out, inputs, dout):
    present = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad(out, present, dout))
    return [None if t is None else next(found) for t in inputs]


def check_layernorm_modulate(shape, dtype, form, affine, temporal, shift_on=True, scale_on=True):
    B, N, C = shape
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    shift_leaf, shift = modulation(form, B, C, dtype) if shift_on else (None, None)
    scale_leaf, scale = modulation(form, B, C, dtype) if scale_on else (None, None)
    weight = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None
    bias = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None

    out = K.layernorm_modulate(x, shift, scale, weight, bias, temporal=temporal)
    dout = torch.randn_like(out)
    leaves = [x, shift_leaf, scale_leaf, weight, bias]
    got = grads(out, leaves, dout)

    x64, shift64, scale64, weight64, bias64 = leaves64(leaves)
    view = (lambda t: t.chunk(6, dim=1)[2]) if form == "chunk" else (lambda t: t)
    ref = layernorm_modulate_reference(
        x64, view(shift64) if shift_on else None, view(scale64) if scale_on else None, weight64, bias64,
        temporal=temporal,
    )
    want = grads(ref, [x64, shift64, scale64, weight64, bias64], dout.double())

    assert_matches(out, ref, dtype, "y")
    for name, g, w in zip(["dx", "dshift", "dscale", "dweight", "dbias"], got, want):
        if w is not None:
            assert_matches(g, w, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("temporal", [None, 5], ids=["frame-major", "temporal"])
def test_layernorm_modulate_matches_reference(dtype, form, affine, temporal):
    check_layernorm_modulate((2, 75, 70), dtype, form, affine, temporal)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_modulate_shapes(shape, dtype):
    check_layernorm_modulate(shape, dtype, "B1C", affine=True, temporal=2 if shape[1] % 2 == 0 else None)


@pytest.mark.parametrize("shift_on, scale_on", [(True, False), (False, True), (False, False)])
def test_layernorm_modulate_optional_terms(shift_on, scale_on):
    check_layernorm_modulate((2, 9, 48), torch.float32, "B1C", True, 3, shift_on, scale_on)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layernorm_modulate_large_hidden(dtype):
    check_layernorm_modulate((1, 3, 8192), dtype, "BC", affine=True, temporal=None)


@pytest.mark.parametrize("temporal", [1, 4])
def test_one_frame_keeps_the_temporal_layout(temporal):
    """temporal=1 still means the (B*S, 1, C) layout (a one-frame video), not "no layout"."""
    x = torch.randn(2, 4, 24, requires_grad=True)
    shift, gate = torch.randn(2, 1, 24), torch.randn(2, 1, 24)
    y = K.layernorm_modulate(x, shift, temporal=temporal)
    assert y.shape == (2 * 4 // temporal, temporal, 24)
    assert_matches(y, layernorm_modulate_reference(x.double(), shift.double(), temporal=temporal), torch.float32, "y")
    out = K.gated_residual(x, y, gate, temporal=temporal)
    assert_matches(out, gated_residual_reference(x.double(), y.double(), gate.double(), temporal=temporal),
                   torch.float32, "out")
    out.sum().backward()
    assert x.grad is not None and not x.grad.isnan().any()


def test_non_contiguous_x():
    base = torch.randn(12, 2, 40)
    x = base.transpose(0, 1).requires_grad_()  # (2, 12, 40), not contiguous
    assert not x.is_contiguous()
    shift, scale = torch.randn(2, 1, 40), torch.randn(2, 1, 40)
    out = K.layernorm_modulate(x, shift, scale, temporal=4)
    ref = layernorm_modulate_reference(x.double(), shift.double(), scale.double(), temporal=4)
    assert_matches(out, ref, torch.float32, "y")


def check_gated_residual(shape, dtype, form, temporal, y_dtype=None):
    B, N, C = shape
    T = temporal or 1
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = torch.randn((B * N // T, T, C) if temporal else shape, dtype=y_dtype or dtype, requires_grad=True)
    gate_leaf, gate = modulation(form, B, C, dtype)

    out = K.gated_residual(x, y, gate, temporal=temporal)
    dout = torch.randn_like(out)
    got = grads(out, [x, y, gate_leaf], dout)

    x64, y64, gate64 = leaves64([x, y, gate_leaf])
    view = (lambda t: t.chunk(6, dim=1)[2]) if form == "chunk" else (lambda t: t)
    ref = gated_residual_reference(x64, y64, view(gate64), temporal=temporal)
    want = grads(ref, [x64, y64, gate64], dout.double())

    assert_matches(out, ref, dtype, "out")
    for name, g, w, d in zip(["dx", "dy", "dgate"], got, want, [dtype, y_dtype or dtype, dtype]):
        assert_matches(g, w, d, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("temporal", [None, 5], ids=["frame-major", "temporal"])
def test_gated_residual_matches_reference(dtype, form, temporal):
    check_gated_residual((2, 75, 70), dtype, form, temporal)


@pytest.mark.parametrize("shape", SHAPES + [(1, 4, 8192)], ids=str)
def test_gated_residual_shapes(shape):
    check_gated_residual(shape, torch.bfloat16, "B1C", temporal=2 if shape[1] % 2 == 0 else None)


def test_gated_residual_mixed_dtypes():
    """An fp32 residual stream with a bf16 branch output: the add happens in fp32, dy comes back in bf16."""
    check_gated_residual((2, 12, 40), torch.float32, "B1C", temporal=3, y_dtype=torch.bfloat16)


def frame_modulation(form, B, F, C, dtype):
    """Per-frame shift/scale/gate (B or 1, F, C), random and requiring grad; "table" is a chunk of a
    (B, F, 6, C) table, as Wan 2.2 TI2V's per-token temb makes them (frame stride 6C, not C)."""
    if form == "table":
        table = torch.randn(B, F, 6, C, dtype=dtype, requires_grad=True)
        return table, table.chunk(6, dim=2)[1].squeeze(2)
    leaf = torch.randn((B if form == "B" else 1, F, C), dtype=dtype, requires_grad=True)
    return leaf, leaf


def check_per_frame(op, shape, frames, form, dtype, mod_dtype, temporal=None, pass_frames=True):
    """layernorm_modulate (op="ln", with affine) or gated_residual (op="gr") with per-frame modulation of
    mod_dtype, forward and every gradient against float64; each gradient in its input's dtype and shape."""
    B, N, C = shape
    T = temporal or 1
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    mods = [frame_modulation(form, B, frames, C, mod_dtype) for _ in range(2 if op == "ln" else 1)]
    leaves = [x] + [leaf for leaf, _ in mods]
    views = [view for _, view in mods]
    chunk = (lambda t: t.chunk(6, dim=2)[1].squeeze(2)) if form == "table" else (lambda t: t)
    kwargs = dict(frames=frames) if pass_frames else {}
    if op == "ln":
        weight, bias = torch.randn(C, dtype=dtype, requires_grad=True), torch.randn(C, dtype=dtype, requires_grad=True)
        leaves += [weight, bias]
        out = K.layernorm_modulate(x, *views, weight, bias, temporal=temporal, **kwargs)
        x64, shift64, scale64, weight64, bias64 = leaves64(leaves)
        ref = layernorm_modulate_reference(x64, chunk(shift64), chunk(scale64), weight64, bias64,
                                           temporal=temporal, frames=frames)
        refs = [x64, shift64, scale64, weight64, bias64]
    else:
        y = torch.randn((B * N // T, T, C) if temporal else shape, dtype=dtype, requires_grad=True)
        leaves.insert(1, y)
        out = K.gated_residual(x, y, *views, temporal=temporal, **kwargs)
        refs = leaves64(leaves)
        ref = gated_residual_reference(refs[0], refs[1], chunk(refs[2]), temporal=temporal, frames=frames)
    dout = torch.randn_like(out)
    assert_matches(out, ref, dtype, "out")
    for i, (g, w, leaf) in enumerate(zip(grads(out, leaves, dout), grads(ref, refs, dout.double()), leaves)):
        assert g.shape == leaf.shape, f"grad {i}: shape {tuple(g.shape)} != {tuple(leaf.shape)}"
        assert_matches(g, w, leaf.dtype, f"grad {i}")


@pytest.mark.parametrize("op", ["ln", "gr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("frames, form, temporal", [(3, "B", None), (3, "1", 5), (15, "table", None)],
                         ids=["per-frame", "shared-temporal", "per-token-table"])
def test_per_frame_modulation(op, dtype, frames, form, temporal):
    """T=3 frames of S=5 tokens (forward blocks of 8 rows cross frames: rows gather their frame's row; a
    backward program's rows stay in one frame), and per token (S=1)."""
    check_per_frame(op, (2, 15, 70), frames, form, dtype, dtype, temporal)


@pytest.mark.parametrize("op", ["ln", "gr"])
def test_per_frame_blocks_within_frames(op):
    """2 frames of 32 tokens: every forward block (16 rows for LayerNorm, 32 for the residual) lies in one
    frame, which reads one modulation row per block instead of one per row."""
    check_per_frame(op, (2, 64, 70), 2, "B", torch.float32, torch.float32)


@pytest.mark.parametrize("op", ["ln", "gr"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("frames, pass_frames", [(1, False), (3, True), (9, False)], ids=["sample", "frame", "token"])
def test_fp32_modulation_on_half_activations(op, dtype, frames, pass_frames):
    """Wan's rule: fp32 shift/scale/gate on bf16 x, computed in fp32, rounded once to x.dtype; the modulation
    gradients come back in fp32. Per token (9 of 9) needs no frames= (the shape says it)."""
    check_per_frame(op, (2, 9, 40), frames, "B", dtype, torch.float32, pass_frames=pass_frames)


def test_per_frame_backward_is_deterministic():
    x = torch.randn(2, 24, 48, requires_grad=True)
    mod = torch.randn(2, 4, 3, 48, requires_grad=True)
    results = []
    for _ in range(2):
        shift, scale, gate = mod.unbind(2)
        out = K.gated_residual(x, K.layernorm_modulate(x, shift, scale, frames=4), gate, frames=4)
        results.append(torch.autograd.grad(out.square().sum(), [x, mod]))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, T", [((2, 75, 70), 5), ((3, 12, 16), 4), ((1, 6, 1152), 6), ((2, 7, 33), 1)])
def test_layout_round_trip(dtype, shape, T):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    t = K.to_temporal(x, T)
    assert torch.equal(t, to_temporal_reference(x.detach(), T))
    back = K.from_temporal(t, shape[0])
    assert torch.equal(back, x.detach())
    dt = torch.randn_like(t)
    (dx,) = torch.autograd.grad(t, x, dt)
    assert torch.equal(dx, from_temporal_reference(dt, shape[0]))


def test_from_temporal_backward_is_to_temporal():
    t = torch.randn(6, 4, 24, requires_grad=True)  # (B*S, T, C) with B=2, S=3
    out = K.from_temporal(t, 2)
    assert torch.equal(out, from_temporal_reference(t.detach(), 2))
    dout = torch.randn_like(out)
    (dt,) = torch.autograd.grad(out, t, dout)
    assert torch.equal(dt, to_temporal_reference(dout, 4))


@pytest.mark.parametrize("A, B, M", [(3, 4, 24), (2, 5, 70), (1, 3, 8), (6, 1, 16)])
def test_swap_leading_matches_transpose(A, B, M):
    """all_to_all's pack and unpack: "(A B) M -> (B A) M", any leading shape of A*B*M elements."""
    x = torch.randn(A, B * M // 2, 2)
    out = layout.swap_leading(x, A, B)
    assert out.shape == (B, A, M)
    assert torch.equal(out, x.reshape(A, B, M).transpose(0, 1))


def test_temporal_layout_matches_einops():
    einops = pytest.importorskip("einops")
    x = torch.randn(2, 3 * 5, 8)
    expected = einops.rearrange(x, "B (T S) C -> (B S) T C", T=3)
    assert torch.equal(K.to_temporal(x, 3), expected)
    assert torch.equal(K.from_temporal(expected, 2), einops.rearrange(expected, "(B S) T C -> B (T S) C", B=2))


@pytest.mark.parametrize("affine", [False, True])
def test_layernorm_module_matches_torch(affine):
    norm = K.LayerNorm(70, eps=1e-5, elementwise_affine=affine)
    reference = torch.nn.LayerNorm(70, eps=1e-5, elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        reference.load_state_dict({k: v.double() for k, v in norm.state_dict().items()})
    x = torch.randn(3, 4, 5, 70, requires_grad=True)
    out = norm(x)
    x64 = x.detach().double().requires_grad_()
    ref = reference(x64)
    assert_matches(out, ref, torch.float32, "y")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    assert_matches(x.grad, x64.grad, torch.float32, "dx")
    if affine:
        assert_matches(norm.weight.grad, reference.weight.grad, torch.float32, "dweight")
        assert_matches(norm.bias.grad, reference.bias.grad, torch.float32, "dbias")


def test_triton_kernels_ran(monkeypatch):
    """Under the interpreter the public ops must launch the Triton kernels, never the eager fallback."""
    assert _common.INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported"

    def fallback(*args, **kwargs):
        raise AssertionError("the eager reference ran instead of the Triton kernel")

    launched = record_launches(monkeypatch, [
        (lnm_module, "_layernorm_modulate_fwd_kernel"), (lnm_module, "_layernorm_modulate_bwd_kernel"),
        (gr_module, "_gated_residual_fwd_kernel"), (gr_module, "_gated_residual_bwd_kernel"),
        (layout, "_temporal_copy_kernel"),
    ])
    monkeypatch.setattr(lnm_module, "layernorm_modulate_reference", fallback)
    monkeypatch.setattr(gr_module, "gated_residual_reference", fallback)
    monkeypatch.setattr(layout, "to_temporal_reference", fallback)
    monkeypatch.setattr(layout, "from_temporal_reference", fallback)

    x = torch.randn(2, 6, 32, requires_grad=True)
    mod = torch.randn(2, 3, 32, requires_grad=True)
    h = K.layernorm_modulate(x, mod[:, :1], mod[:, 1:2])
    t = K.from_temporal(K.to_temporal(h, 3), 2)
    out = K.gated_residual(x, K.to_temporal(t, 3), mod[:, 2:], temporal=3)
    per_frame = torch.randn(2, 3, 32, requires_grad=True)  # 3 frames of 2 tokens
    out = K.gated_residual(out, K.layernorm_modulate(out, per_frame, per_frame, frames=3), per_frame, frames=3)
    out.sum().backward()
    assert per_frame.grad is not None
    assert set(launched) == {
        "_layernorm_modulate_fwd_kernel", "_layernorm_modulate_bwd_kernel", "_gated_residual_fwd_kernel",
        "_gated_residual_bwd_kernel", "_temporal_copy_kernel",
    }


def test_float64_uses_exact_reference():
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    shift = torch.randn(2, 1, 16, dtype=torch.float64)
    out = K.layernorm_modulate(x, shift, shift)
    assert out.dtype == torch.float64
    assert torch.equal(out, layernorm_modulate_reference(x, shift, shift))


def every_op(x, table, weight, bias):
    """A small adaLN block that uses every op, for the compile test."""
    shift, scale, gate = table.chunk(3, dim=1)
    h = K.layernorm_modulate(x, shift, scale, weight, bias)
    t = torch.tanh(K.to_temporal(h, 3))
    h = K.layernorm_modulate(K.from_temporal(t, x.shape[0]), shift, scale, temporal=3)
    out = K.gated_residual(x, h, gate, temporal=3)
    per_frame = table.repeat(1, 2, 1)  # (B, 6, C): 6 frames of 2 tokens
    out = K.gated_residual(out, K.layernorm_modulate(out, per_frame, per_frame, frames=6), per_frame, frames=6)
    return K.LayerNorm(x.shape[-1], elementwise_affine=False)(out)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    x = torch.randn(2, 12, 40, requires_grad=True)
    table = torch.randn(2, 3, 40, requires_grad=True)
    weight = torch.randn(40, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    inputs = (x, table, weight, bias)
    eager = every_op(*inputs)
    eager_grads = torch.autograd.grad(eager.square().sum(), inputs)
    compiled = torch.compile(every_op, fullgraph=True, backend=backend)(*inputs)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: K.layernorm_modulate(torch.ones(2, 3, 4, dtype=torch.int32)), "x must be float32"),
        (lambda: K.layernorm_modulate(torch.randn(3, 4)), "rank 3"),
        (lambda: K.layernorm_modulate(torch.randn(2, 3, 4), shift=torch.randn(2, 2, 4)), "shift of shape"),
        (lambda: K.layernorm_modulate(torch.randn(2, 3, 4), scale=torch.randn(3, 4)), "scale of shape"),
        (lambda: K.layernorm_modulate(torch.randn(2, 3, 4), weight=torch.randn(5)), "weight must have shape"),
        (lambda: K.layernorm_modulate(torch.randn(2, 6, 4), temporal=4), "temporal=4 does not divide"),
        (lambda: K.layernorm_modulate(torch.randn(2, 6, 4), temporal=0), "temporal must be a positive int"),
        (lambda: K.to_temporal(torch.randn(2, 6, 4), None), "T must be a positive int"),
        (lambda: K.layernorm_modulate(torch.randn(2, 6, 4), torch.randn(2, 4, 4), frames=4),
         "frames=4 does not divide"),
        (lambda: K.layernorm_modulate(torch.randn(2, 6, 4), torch.randn(2, 2, 4), frames=3), "expected \\(2, 3, 4\\)"),
        (lambda: K.gated_residual(torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(2, 3, 4)), "per token"),
        (lambda: K.layernorm_modulate(torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(2, 4)),
         "share one layout"),
        (lambda: K.layernorm_modulate(torch.randn(2, 3, 4), shift=torch.randn(2, 1, 4, device="meta")), "is on meta"),
        (lambda: K.layernorm_modulate(torch.randn(1, 1, 20000)), "C <= 8192"),
        (lambda: K.gated_residual(torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(3, 4)), "gate of shape"),
        (lambda: K.gated_residual(torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(4), temporal=3),
         "y must have temporal layout"),
        (lambda: K.gated_residual(torch.randn(2, 6, 4), torch.randn(2, 6, 4), None), "gate is required"),
        (lambda: K.gated_residual(torch.randn(2, 6, 4, dtype=torch.bfloat16), torch.randn(2, 6, 4), torch.randn(4)),
         r"y is torch.float32, wider than x \(torch.bfloat16\), and the output is x's dtype"),
        (lambda: K.to_temporal(torch.randn(2, 6, 4), 4), "T=4 does not divide the token count N=6"),
        (lambda: K.from_temporal(torch.randn(6, 2, 4), 4), "B must be a positive int dividing"),
        (lambda: K.LayerNorm(8)(torch.randn(2, 3, 4)), "last dim must be 8"),
        (lambda: layout.swap_leading(torch.randn(2, 3, 4), 5, 1), "A\\*B=5 does not divide the 24 elements"),
        (lambda: layout.swap_leading(torch.randn(2, 3, 4), 2, 0), "B must be a positive int"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_import_and_run_without_triton():
    """Where Triton has no wheel (macOS, Windows), sora imports and every op runs its eager reference."""
    import subprocess
    import sys

    code = """
import sys, torch
sys.modules["triton"] = None  # as if not installed
import sora.kernels as K
from sora.kernels.norm import layernorm_modulate_reference
from sora.models import build_model
x, shift = torch.randn(2, 6, 16), torch.randn(2, 1, 16)
assert torch.equal(K.layernorm_modulate(x, shift, shift), layernorm_modulate_reference(x, shift, shift))
assert torch.equal(K.from_temporal(K.to_temporal(x, 3), 2), x)
model = build_model(dict(type="STDiT", input_size=(2, 4, 4), hidden_size=32, depth=1, num_heads=4,
                         caption_channels=8, model_max_length=3, enable_layernorm_kernel=True))
out = model(torch.randn(1, 4, 2, 4, 4), torch.tensor([5]), torch.randn(1, 1, 3, 8))
print(tuple(out.shape))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip() == "(1, 8, 2, 4, 4)", result.stderr


def test_kernel_modules_are_not_shadowed_by_their_functions(monkeypatch):
    """Each op lives in a module with another name, so `import sora.kernels.<module> as m` (which reads the
    package's attribute, unlike importlib.import_module) gives the module, for every module of the package."""
    import importlib
    import pkgutil

    def shadowed():
        names = []
        for info in pkgutil.iter_modules(K.__path__):
            module = importlib.import_module(f"sora.kernels.{info.name}")
            namespace = {}
            exec(f"import sora.kernels.{info.name} as imported", namespace)
            if namespace["imported"] is not module:
                names.append(info.name)
        return names

    assert shadowed() == []
    monkeypatch.setattr(K, "norm", K.layernorm_modulate)  # what `from .norm import norm` in __init__ would do
    assert shadowed() == ["norm"]


@pytest.mark.skipif(torch.get_default_device().type != "cuda", reason="2**31 elements: the GPU run (--device cuda)")
def test_offsets_past_two_to_the_31():
    """Index arithmetic past 2**31 elements, where int32 offsets would wrap: x of B*T*S*C = 2.15e9 bf16 values,
    each op checked against float64 on the last sample's last 256 tokens of every frame (the largest offsets)."""
    B, T, S, C, keep = 2, 16, 58368, 1152, 256
    assert B * T * S * C > 2**31
    x = torch.randn(B, T * S, C, dtype=torch.bfloat16)
    shift, scale, gate = (0.5 * torch.randn(3, B, 1, C)).to(torch.bfloat16).unbind(0)
    tail = x[-1:].view(1, T, S, C)[:, :, -keep:].reshape(1, T * keep, C)
    last = slice(B - 1, B)
    ln = layernorm_modulate_reference(tail.double(), shift[last].double(), scale[last].double(), None, None, 1e-6)
    with torch.no_grad():
        out = K.layernorm_modulate(x, shift, scale)[-1:].view(1, T, S, C)[:, :, -keep:].reshape(1, T * keep, C)
        assert_matches(out, ln, torch.bfloat16, "layernorm_modulate")
        out = K.layernorm_modulate(x, shift, scale, temporal=T)[-keep:]
        assert_matches(out, to_temporal_reference(ln, T), torch.bfloat16, "layernorm_modulate temporal")
        del out
        assert_matches(K.to_temporal(x, T)[-keep:], to_temporal_reference(tail, T), torch.bfloat16, "to_temporal")
        y = torch.randn(B * S, T, C, dtype=torch.bfloat16)
        y_tail = from_temporal_reference(y[-keep:].double(), 1)
        out = K.gated_residual(x, y, gate, temporal=T)[-1:].view(1, T, S, C)[:, :, -keep:].reshape(1, T * keep, C)
        assert_matches(out, tail.double() + gate[last].double() * y_tail, torch.bfloat16, "gated_residual temporal")
