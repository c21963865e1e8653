"""K.temporal_attention under the Triton interpreter, forward and d(qkv) (and, with STDiT2's prologue, d(q_norm) and
d(k_norm)), against a float64 reference.

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
from sora.kernels.attention import rope_reference, temporal_attention_reference

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


# With the prologue, q and k are rounded to the dtype after RoPE and RMSNorm (as Open-Sora's eager code does) and
# the normalized scores reach |s| ~ sqrt(D): bf16's rounding of q and k moves the softmax by up to ~3%.
PROLOGUE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 5e-2}

# (B, T, S, H, D, dtype, rope_first, frame_offset, parts): T in {1, 3, 16, 64}, D in {8, 40, 72}, every dtype,
# both orders, RoPE and the norm alone and together.
PROLOGUE_CASES = [
    (2, 3, 5, 2, 8, torch.float32, True, 0, "rope+norm"),
    (1, 3, 7, 2, 40, torch.bfloat16, True, 5, "rope+norm"),
    (1, 1, 7, 3, 40, torch.float16, False, 0, "rope+norm"),
    (1, 16, 5, 1, 72, torch.bfloat16, True, 0, "rope+norm"),
    (1, 16, 3, 2, 40, torch.float16, False, 2, "rope+norm"),
    (1, 64, 2, 1, 72, torch.float32, True, 3, "rope+norm"),
    (1, 64, 3, 2, 8, torch.bfloat16, False, 0, "rope+norm"),
    (2, 16, 3, 2, 8, torch.float32, True, 7, "rope"),
    (1, 3, 5, 2, 72, torch.float16, True, 0, "norm"),
]


def freqs(D):
    """rotary-embedding-torch's default frequencies (theta 10000), Open-Sora's `rope.freqs`."""
    return 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def assert_matches(out, ref, dtype, what, tolerance=TOLERANCE):
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = out.double()
    assert not out.isnan().any(), f"{what}: NaN (an element was not written)"
    err = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= tolerance[dtype], f"{what}: error {err:.3g} > {tolerance[dtype]:.3g}"


def check(qkv, T, H, scale, dtype, q_norm=None, k_norm=None, rope_freqs=None, rope_first=True, frame_offset=0):
    """Forward and every gradient against the float64 reference; the norm weights are differentiable."""
    weights = [w for w in (q_norm, k_norm) if w is not None]
    out = K.temporal_attention(qkv, T, H, scale, q_norm, k_norm, rope_freqs, rope_first, 1e-6, frame_offset)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [qkv, *weights], dout)
    inputs64 = [t.detach().double().requires_grad_() for t in (qkv, *weights)]
    norms64 = inputs64[1:] if weights else [None, None]
    ref = temporal_attention_reference(inputs64[0], T, H, scale, *norms64, rope_freqs, rope_first, 1e-6, frame_offset)
    grads64 = torch.autograd.grad(ref, inputs64, dout.double())
    tolerance = PROLOGUE_TOLERANCE if weights or rope_freqs is not None else TOLERANCE
    for what, got, want in zip(("out", "dqkv", "dq_norm", "dk_norm"), (out, *grads), (ref, *grads64)):
        assert_matches(got, want, got.dtype, what, tolerance)


@pytest.mark.parametrize("B, T, S, H, D, dtype, scale", CASES, ids=str)
def test_matches_reference(B, T, S, H, D, dtype, scale):
    qkv = torch.randn(B, T * S, 3 * H * D, dtype=dtype, requires_grad=True)
    check(qkv, T, H, scale, dtype)


@pytest.mark.parametrize("B, T, S, H, D, dtype, rope_first, frame_offset, parts", PROLOGUE_CASES, ids=str)
def test_prologue_matches_reference(B, T, S, H, D, dtype, rope_first, frame_offset, parts):
    """STDiT2: RoPE and the q/k RMSNorm in the kernels' prologue; weights away from 1 so a swapped or missing
    weight shows."""
    qkv = torch.randn(B, T * S, 3 * H * D, dtype=dtype, requires_grad=True)
    norms = [(1 + 0.5 * torch.randn(D)).to(dtype).requires_grad_() for _ in range(2)] if "norm" in parts else [None] * 2
    rope_freqs = freqs(D).float() * 3 if "rope" in parts else None  # x3: angles of several radians at T=3
    check(qkv, T, H, None, dtype, *norms, rope_freqs, rope_first, frame_offset)


def test_reference_rope_is_rotary_embedding_torch():
    """rope_reference is rotary-embedding-torch 0.5.3's rotate_queries_or_keys (Open-Sora v1.1's temporal RoPE):
    frequencies repeated per channel pair, x * cos + rotate_half(x) * sin with rotate_half (x0, x1) -> (-x1, x0)."""
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    f = freqs(8)
    angles = (torch.arange(5, dtype=torch.float64)[:, None] + 2) * f.repeat_interleave(2)[None, :]
    pairs = x.unflatten(-1, (4, 2))
    rotate_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    torch.testing.assert_close(rope_reference(x, f, frame_offset=2), x * angles.cos() + rotate_half * angles.sin())


def test_reference_prologue_is_open_sora_v1_1():
    """With rope_first, the reference is Open-Sora v1.1's temporal attention (their blocks.py:174-178 and 41-46):
    (B*S, H, T, D) q and k, RoPE, then LlamaRMSNorm (x * rsqrt(mean(x^2) + eps), times the weight), then SDPA;
    the other order differs."""
    B, T, S, H, D = 2, 4, 3, 2, 8
    qkv = torch.randn(B, T * S, 3 * H * D, dtype=torch.float64)
    q_norm, k_norm = 1 + torch.rand(D, dtype=torch.float64), 1 + torch.rand(D, dtype=torch.float64)
    q, k, v = rearrange(qkv, "B (T S) (three H D) -> three (B S) H T D", T=T, three=3, H=H).unbind(0)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    q, k = rms(rope_reference(q, freqs(D)), q_norm), rms(rope_reference(k, freqs(D)), k_norm)
    expected = rearrange(F.scaled_dot_product_attention(q, k, v), "(B S) H T D -> B (T S) (H D)", B=B)
    got = temporal_attention_reference(qkv, T, H, None, q_norm, k_norm, freqs(D), True)
    torch.testing.assert_close(got, expected)
    swapped = temporal_attention_reference(qkv, T, H, None, q_norm, k_norm, freqs(D), False)
    assert (swapped - expected).abs().max() > 1e-3


def test_weight_gradients_are_deterministic():
    """Per-program partial sums, reduced after the kernel: the same bits on every run."""
    qkv = torch.randn(1, 3 * 7, 3 * 2 * 8, requires_grad=True)
    norms = [(1 + torch.rand(8)).requires_grad_() for _ in range(2)]

    def grads():
        out = K.temporal_attention(qkv, 3, 2, None, *norms, freqs(8).float())
        return torch.autograd.grad(out.square().sum(), [qkv, *norms])

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


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


@pytest.mark.parametrize("prologue", [False, True])
def test_triton_kernels_ran(monkeypatch, prologue):
    """Under the interpreter the op must launch both Triton kernels, never the eager fallback."""
    assert _common.INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported"

    def fallback(*args, **kwargs):
        raise AssertionError("the eager reference ran instead of the Triton kernel")

    launched = record_launches(monkeypatch, [(attention_module, "_temporal_attention_fwd_kernel"),
                                             (attention_module, "_temporal_attention_bwd_kernel")])
    monkeypatch.setattr(attention_module, "temporal_attention_reference", fallback)
    qkv = torch.randn(1, 6, 24, requires_grad=True)
    norms = [torch.ones(4, requires_grad=True) for _ in range(2)] if prologue else [None, None]
    K.temporal_attention(qkv, 3, 2, None, *norms, freqs(4).float() if prologue else None).sum().backward()
    assert launched == ["_temporal_attention_fwd_kernel", "_temporal_attention_bwd_kernel"]


def test_float64_uses_exact_reference():
    qkv = torch.randn(2, 6, 24, dtype=torch.float64)
    out = K.temporal_attention(qkv, 3, 2, 0.5)
    assert out.dtype == torch.float64
    assert torch.equal(out, temporal_attention_reference(qkv, 3, 2, 0.5))


def attend(qkv, proj, q_norm=None, k_norm=None, rope_freqs=None):
    return proj(K.temporal_attention(qkv, 4, 2, None, q_norm, k_norm, rope_freqs, False)).tanh()


@pytest.mark.parametrize("backend, prologue", [("aot_eager", False), ("inductor", False), ("inductor", True)])
def test_compile_fullgraph(backend, prologue):
    torch._dynamo.reset()
    qkv = torch.randn(2, 12, 48, requires_grad=True)
    proj = torch.nn.Linear(16, 16)
    extra = [(1 + torch.rand(8)).requires_grad_() for _ in range(2)] + [freqs(8).float()] if prologue else []
    inputs = [qkv, *extra[:2]]
    eager = attend(qkv, proj, *extra)
    eager_grad = torch.autograd.grad(eager.square().sum(), inputs)
    compiled = torch.compile(attend, fullgraph=True, backend=backend)(qkv, proj, *extra)
    compiled_grad = torch.autograd.grad(compiled.square().sum(), inputs)
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
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 2, q_norm=torch.ones(4)),
         "q_norm and k_norm must be given together"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 2, q_norm=torch.ones(4), k_norm=torch.ones(5)),
         r"k_norm must have shape \(4,\) \(the head dim\), got \(5,\)"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 2, rope_freqs=torch.ones(4)),
         r"rope_freqs must have shape \(2,\) \(one frequency per channel pair of a head\), got \(4,\)"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 18), 3, 2, rope_freqs=torch.ones(1)),
         "head dim must be even, got D=3"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 2, rope_freqs=torch.ones(2), rope_first=1),
         "rope_first must be True or False"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 2, eps=0.0), "eps must be a positive number, got 0.0"),
        (lambda: K.temporal_attention(torch.randn(1, 6, 24), 3, 2, frame_offset=-1),
         "frame_offset must be an int >= 0"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
