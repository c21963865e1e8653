"""K.temporal_attention under the Triton interpreter, forward and d(qkv), against a float64 reference.

Shapes are odd on purpose: S is never a multiple of the kernel's block of positions, D=40 and 72 are padded
in registers only, T=1 and T=3 leave most of the frame block masked. Every buffer the kernels write is
poisoned with NaN first (SORA_KERNEL_POISON), so an unwritten element fails.
"""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from kernel_checks import record_launches

import sora.kernels as K
from sora.kernels import _common
from sora.kernels import attention as attention_module
from sora.kernels.attention import temporal_attention_reference

# Largest error allowed, relative to max(1, |reference|): fp32 arithmetic, then one rounding to the dtype
# (the output, and in the backward the inputs of dk/dv, which are q and the softmax of rounded scores).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (B, T, S, H, D, dtype, scale): T in {1, 3, 16, 64}, D in {8, 40, 72}, 1-16 heads, every dtype, with and without
# scale. The kernel's block of positions is 1-64 depending on T and D, so S = 3, 5, 7, 67 leave a partial block.
CASES = [
    (2, 3, 5, 2, 8, torch.float32, None),
    (2, 3, 67, 1, 8, torch.bfloat16, 0.3),
    (1, 1, 7, 3, 40, torch.float16, None),
    (1, 1, 5, 16, 8, torch.float32, 1.0),
    (2, 16, 3, 2, 72, torch.float32, None),
    (1, 16, 5, 1, 72, torch.bfloat16, None),
    (1, 16, 3, 3, 40, torch.float16, 0.05),
    (1, 16, 7, 16, 8, torch.bfloat16, None),
    (1, 64, 3, 1, 72, torch.float32, 0.1),
    (1, 64, 2, 2, 40, torch.bfloat16, None),
    (1, 64, 3, 1, 8, torch.float16, None),
]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def assert_matches(out, ref, dtype, what):
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = out.double()
    assert not out.isnan().any(), f"{what}: NaN (an element was not written)"
    err = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= TOLERANCE[dtype], f"{what}: error {err:.3g} > {TOLERANCE[dtype]:.3g}"


def check(qkv, T, H, scale, dtype):
    out = K.temporal_attention(qkv, T, H, scale)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    qkv64 = qkv.detach().double().requires_grad_()
    ref = temporal_attention_reference(qkv64, T, H, scale)
    (dqkv64,) = torch.autograd.grad(ref, qkv64, dout.double())
    assert_matches(out, ref, dtype, "out")
    assert_matches(dqkv, dqkv64, dtype, "dqkv")


@pytest.mark.parametrize("B, T, S, H, D, dtype, scale", CASES, ids=str)
def test_matches_reference(B, T, S, H, D, dtype, scale):
    qkv = torch.randn(B, T * S, 3 * H * D, dtype=dtype, requires_grad=True)
    check(qkv, T, H, scale, dtype)


def test_strided_qkv():
    """qkv as a slice of a wider projection (token stride > 3C) is read in place."""
    wide = torch.randn(2, 12, 3 * 2 * 8 + 5, requires_grad=True)
    qkv = wide[:, :, :48]
    assert qkv.stride(1) == 53
    check(qkv, 4, 2, None, torch.float32)


def test_reference_is_sdpa_over_frames():
    """The reference is what STDiT's eager block does: rearrange to "(B S) T C", SDPA, rearrange back."""
    B, T, S, H, D = 2, 3, 5, 2, 8
    qkv = torch.randn(B, T * S, 3 * H * D, dtype=torch.float64)
    q, k, v = rearrange(qkv, "B (T S) (three H D) -> three (B S) H T D", T=T, three=3, H=H).unbind(0)
    expected = rearrange(F.scaled_dot_product_attention(q, k, v), "(B S) H T D -> B (T S) (H D)", B=B)
    torch.testing.assert_close(temporal_attention_reference(qkv, T, H), expected)


def test_triton_kernels_ran(monkeypatch):
    """Under the interpreter the op must launch both Triton kernels, never the eager fallback."""
    assert _common.INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported"

    def fallback(*args, **kwargs):
        raise AssertionError("the eager reference ran instead of the Triton kernel")

    launched = record_launches(monkeypatch, [(attention_module, "_temporal_attention_fwd_kernel"),
                                             (attention_module, "_temporal_attention_bwd_kernel")])
    monkeypatch.setattr(attention_module, "temporal_attention_reference", fallback)
    qkv = torch.randn(1, 6, 24, requires_grad=True)
    K.temporal_attention(qkv, 3, 2).sum().backward()
    assert launched == ["_temporal_attention_fwd_kernel", "_temporal_attention_bwd_kernel"]


def test_float64_uses_exact_reference():
    qkv = torch.randn(2, 6, 24, dtype=torch.float64)
    out = K.temporal_attention(qkv, 3, 2, 0.5)
    assert out.dtype == torch.float64
    assert torch.equal(out, temporal_attention_reference(qkv, 3, 2, 0.5))


def attend(qkv, proj):
    return proj(K.temporal_attention(qkv, 4, 2)).tanh()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    qkv = torch.randn(2, 12, 48, requires_grad=True)
    proj = torch.nn.Linear(16, 16)
    eager = attend(qkv, proj)
    eager_grad = torch.autograd.grad(eager.square().sum(), qkv)
    compiled = torch.compile(attend, fullgraph=True, backend=backend)(qkv, proj)
    compiled_grad = torch.autograd.grad(compiled.square().sum(), qkv)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: K.temporal_attention(torch.ones(1, 6, 24, dtype=torch.int32), 3, 2), "qkv must be float32"),
        (lambda: K.temporal_attention(torch.randn(6, 24), 3, 2), r"qkv must have rank 3 \(B, N, C\), got shape \(6, 24\)"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 4, 2), r"T=4 does not divide the token count N=6 of qkv \(1, 6, 24\)"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 0, 2), "T must be a positive int"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 5), r"qkv of shape \(1, 6, 24\).*divisible by 3 \* num_heads = 15"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 25), 3, 1), "divisible by 3 \\* num_heads = 3"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 0), "num_heads must be a positive int"),
        (lambda: K.temporal_attention(torch.randn(1, 129, 24), 129, 2), r"T <= 128 frames, got T=129 for qkv of shape \(1, 129, 24\)"),
        (lambda: K.temporal_attention(torch.randn(1, 2, 3 * 136), 2, 1), "head dim D <= 128, got D=136"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 2, scale="x"), "scale must be a number"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
