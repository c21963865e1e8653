"""Checks shared by the model tests (test_models, test_zoo_models): two models holding the same weights must
compute the same function, forward and every parameter gradient."""

import torch


def randomize(model, std=0.05):
    """Non-zero weights everywhere: the zero-initialised projections (adaLN-Zero, temporal attention) would
    otherwise hide whole branches."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def grads(model):
    """Every trained parameter's gradient (constants such as STDiT2's rope.freqs have none)."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_function(reference, other, inputs, out_tol=1e-5, grad_tol=1e-4):
    """Load `reference`'s weights into `other`, run both on `inputs` and backpropagate the same random output
    gradient; outputs and every parameter gradient must agree to the relative tolerances. Returns the
    reference's output and gradients, for further checks."""
    other.load_state_dict(reference.state_dict())
    out_ref, out_other = reference(*inputs), other(*inputs)
    assert rel(out_other, out_ref) < out_tol
    dout = torch.randn_like(out_ref)
    out_ref.backward(dout)
    out_other.backward(dout)
    g_ref, g_other = grads(reference), grads(other)
    for name in g_ref:
        assert rel(g_other[name], g_ref[name]) < grad_tol, name
    return out_ref, g_ref


def assert_checkpointing_keeps_gradients(model, checkpointed, inputs):
    """`checkpointed` (grad_checkpoint=True) with `model`'s weights gives the same parameter gradients."""
    checkpointed.load_state_dict(model.state_dict())
    model(*inputs).square().mean().backward()
    checkpointed(*inputs).square().mean().backward()
    reference = grads(model)
    for name, g in grads(checkpointed).items():
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-7)


def spy_temporal_attention(monkeypatch):
    """Record (qkv shape, T, num_heads) of every K.temporal_attention call, which still computes as before."""
    import sora.kernels as K

    seen = []
    kernel = K.temporal_attention

    def spy(qkv, T, num_heads, scale=None):
        seen.append((tuple(qkv.shape), T, num_heads))
        return kernel(qkv, T, num_heads, scale)

    monkeypatch.setattr(K, "temporal_attention", spy)
    return seen


def spy_ops(monkeypatch, *names):
    """Record (name, args, kwargs) of every call of the sora.kernels ops `names`, which still compute as before."""
    import sora.kernels as K

    seen = []
    for name in names:
        op = getattr(K, name)

        def spy(*args, op=op, name=name, **kwargs):
            seen.append((name, args, kwargs))
            return op(*args, **kwargs)

        monkeypatch.setattr(K, name, spy)
    return seen
