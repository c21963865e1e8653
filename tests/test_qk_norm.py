"""K.qk_norm under the Triton interpreter: q and k, d(qkv), d(q_weight), d(k_weight) against a float64 reference.

Token counts are odd (7, 67, 5: never a multiple of the kernel's block of rows), head dims 8 (one piece), 40
and 72 (a power-of-two piece and a masked tail). Every buffer the kernels write is poisoned with NaN first.
"""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from kernel_checks import record_launches

import sora.kernels as K
from sora.kernels import _common
from sora.kernels import qknorm as qknorm_module
from sora.kernels.qknorm import qk_norm_reference

# Relative to max(1, |reference|): fp32 arithmetic, the normalized value rounded to the dtype, then the product.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (B, N, H, D, dtype)
CASES = [
    (2, 7, 3, 72, torch.float32),
    (1, 67, 2, 40, torch.bfloat16),
    (2, 5, 1, 8, torch.float16),
    (1, 7, 16, 72, torch.bfloat16),
    (2, 5, 2, 40, torch.float32),
]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def weights(D, dtype):
    """Away from 1, so a swapped or missing weight shows."""
    return [(1 + 0.5 * torch.randn(D)).to(dtype).requires_grad_() for _ in range(2)]


def check(qkv, H, dtype):
    D = qkv.shape[-1] // (3 * H)
    q_weight, k_weight = weights(D, dtype)
    outputs = K.qk_norm(qkv, H, q_weight, k_weight)
    douts = [torch.randn_like(t) for t in outputs]
    grads = torch.autograd.grad(outputs, [qkv, q_weight, k_weight], douts)
    inputs64 = [t.detach().double().requires_grad_() for t in (qkv, q_weight, k_weight)]
    refs = qk_norm_reference(inputs64[0], H, inputs64[1], inputs64[2])
    grads64 = torch.autograd.grad(refs, inputs64, [d.double() for d in douts])
    names = ("q", "k", "v", "dqkv", "dq_weight", "dk_weight")
    for what, got, want in zip(names, (*outputs, *grads), (*refs, *grads64)):
        assert got.dtype == dtype, f"{what}: dtype {got.dtype}"
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert not got.isnan().any(), f"{what}: NaN (an element was not written)"
        err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err <= TOLERANCE[dtype], f"{what}: error {err:.3g} > {TOLERANCE[dtype]:.3g}"
    return outputs


@pytest.mark.parametrize("B, N, H, D, dtype", CASES, ids=str)
def test_matches_reference(B, N, H, D, dtype):
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype, requires_grad=True)
    check(qkv, H, dtype)


def test_layout_is_what_sdpa_reads():
    """q and k are (B, H, N, D) transposes of (B, N, H, D) buffers; v is a view of qkv's last C channels."""
    qkv = torch.randn(2, 7, 3 * 3 * 8, requires_grad=True)
    q, k, v = check(qkv, 3, torch.float32)
    for t in (q, k):
        assert t.shape == (2, 3, 7, 8) and t.transpose(1, 2).is_contiguous()
    assert v.shape == (2, 3, 7, 8) and v.data_ptr() == qkv.data_ptr() + 2 * 24 * qkv.element_size()


def test_strided_qkv():
    """qkv as a slice of a wider projection (token stride > 3C) is read in place."""
    wide = torch.randn(2, 5, 3 * 2 * 40 + 8, requires_grad=True)
    qkv = wide[:, :, :240]
    assert qkv.stride(1) == 248
    check(qkv, 2, torch.float32)


def test_reference_is_open_sora_v1_1():
    """The reference is Open-Sora v1.1's Attention with qk_norm (their blocks.py:41-46 and 154-163): qkv viewed
    (B, N, 3, H, D) and permuted to (B, H, N, D), LlamaRMSNorm on q and k (fp32, x * rsqrt(mean(x^2) + eps),
    back to the dtype, times the weight)."""
    B, N, H, D = 2, 5, 3, 8
    qkv = torch.randn(B, N, 3 * H * D, dtype=torch.bfloat16)
    q_weight, k_weight = (1 + torch.rand(D)).to(torch.bfloat16), (1 + torch.rand(D)).to(torch.bfloat16)

    def llama_rms_norm(x, weight):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    q, k, v = rearrange(qkv, "B N (three H D) -> three B H N D", three=3, H=H).unbind(0)
    got = qk_norm_reference(qkv, H, q_weight, k_weight)
    torch.testing.assert_close(got[0], llama_rms_norm(q, q_weight), rtol=0, atol=0)
    torch.testing.assert_close(got[1], llama_rms_norm(k, k_weight), rtol=0, atol=0)
    assert torch.equal(got[2], v)


def test_weight_gradients_are_deterministic():
    qkv = torch.randn(2, 67, 3 * 2 * 40, requires_grad=True)
    q_weight, k_weight = weights(40, torch.float32)

    def grads():
        q, k, v = K.qk_norm(qkv, 2, q_weight, k_weight)
        return torch.autograd.grad(q.square().sum() + (k * v).sum(), [qkv, q_weight, k_weight])

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


def test_triton_kernels_ran(monkeypatch):
    """Under the interpreter the op must launch its Triton kernels (q and k each), never the eager fallback."""
    assert _common.INTERPRETED, "tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported"

    def fallback(*args, **kwargs):
        raise AssertionError("the eager reference ran instead of the Triton kernel")

    launched = record_launches(monkeypatch, [(qknorm_module, "_qk_norm_fwd_kernel"),
                                             (qknorm_module, "_qk_norm_bwd_kernel")])
    monkeypatch.setattr(qknorm_module, "qk_norm_reference", fallback)
    qkv = torch.randn(1, 6, 24, requires_grad=True)
    q, k, v = K.qk_norm(qkv, 2, torch.ones(4), torch.ones(4))
    (q.sum() + k.sum()).backward()
    assert launched == ["_qk_norm_fwd_kernel"] * 2 + ["_qk_norm_bwd_kernel"] * 2


def test_float64_uses_exact_reference():
    qkv = torch.randn(2, 6, 24, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64)
    for got, want in zip(K.qk_norm(qkv, 2, w, w), qk_norm_reference(qkv, 2, w, w)):
        assert got.dtype == torch.float64 and torch.equal(got, want)


def attend(qkv, q_weight, k_weight):
    return F.scaled_dot_product_attention(*K.qk_norm(qkv, 2, q_weight, k_weight)).tanh()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    qkv = torch.randn(2, 12, 48, requires_grad=True)
    inputs = [qkv, *weights(8, torch.float32)]
    eager = attend(*inputs)
    eager_grads = torch.autograd.grad(eager.square().sum(), inputs)
    compiled = torch.compile(attend, fullgraph=True, backend=backend)(*inputs)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: K.qk_norm(torch.ones(1, 6, 24, dtype=torch.int32), 2, torch.ones(4), torch.ones(4)),
         "qkv must be float32"),
        (lambda: K.qk_norm(torch.randn(6, 24), 2, torch.ones(4), torch.ones(4)), r"qkv must have rank 3 \(B, N, C\)"),
        (lambda: K.qk_norm(torch.randn(1, 6, 24), 0, torch.ones(4), torch.ones(4)), "num_heads must be a positive int"),
        (lambda: K.qk_norm(torch.randn(1, 6, 24), 5, torch.ones(4), torch.ones(4)),
         r"qkv of shape \(1, 6, 24\).*divisible by 3 \* num_heads = 15"),
        (lambda: K.qk_norm(torch.randn(1, 6, 3 * 512), 1, torch.ones(512), torch.ones(512)),
         "head dim D <= 256, got D=512"),
        (lambda: K.qk_norm(torch.randn(1, 6, 24), 2, torch.ones(5), torch.ones(4)),
         r"q_weight must have shape \(4,\) \(the head dim\), got \(5,\)"),
        (lambda: K.qk_norm(torch.randn(1, 6, 24), 2, torch.ones(4), None),
         "k_weight must be a floating-point torch.Tensor"),
        (lambda: K.qk_norm(torch.randn(1, 6, 24), 2, torch.ones(4), torch.ones(4), eps=-1),
         "eps must be a positive number"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
