"""Sequence parallelism across gloo processes on CPU: all_to_all against its definition, and sequence-parallel
STDiT against one process running the whole model."""

import os

import pytest
import torch
import torch.distributed as dist

import sora.kernels as K
from sora.parallel import init_sequence_parallel
from spawn import run

# (shape, scatter_dim, gather_dim): odd sizes everywhere but the scattered dim.
EXCHANGES = [((3, 5, 3, 4, 7), 3, 1), ((3, 10, 7), 1, 2), ((4, 3, 5), 0, 2), ((3, 5, 4), 2, 0), ((5, 4, 3), 1, 0)]


def rank_input(shape, rank):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + rank))


def exchange_worker(rank, world, out):
    results = {}
    for shape, scatter_dim, gather_dim in EXCHANGES:
        shape = list(shape)
        shape[scatter_dim] *= world // 2  # keep the scattered dim divisible at any world size
        x = rank_input(shape, rank).requires_grad_()
        y = K.all_to_all(x, dist.group.WORLD, scatter_dim, gather_dim)
        dy = rank_input(y.shape, 100 + rank)
        (dx,) = torch.autograd.grad(y, x, dy)
        results[(tuple(shape), scatter_dim, gather_dim)] = (y.detach(), dx)
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_matches_definition(tmp_path, world):
    run(exchange_worker, world, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for key in results[0]:
        shape, scatter_dim, gather_dim = key
        inputs = [rank_input(shape, r) for r in range(world)]
        grads_out = [rank_input(results[r][key][0].shape, 100 + r) for r in range(world)]
        for r in range(world):
            # Forward: rank r gathers, along gather_dim, slice r (along scatter_dim) of every rank's input.
            expected = torch.cat([x.chunk(world, scatter_dim)[r] for x in inputs], dim=gather_dim)
            assert torch.equal(results[r][key][0], expected), key
            # Backward (the inverse exchange): slice w of rank r's input went to rank w, as its slice r.
            expected_dx = torch.cat([g.chunk(world, gather_dim)[r] for g in grads_out], dim=scatter_dim)
            assert torch.equal(results[r][key][1], expected_dx), key


def tiny_stdit(sp, kernel, **kwargs):
    from sora.models import build_model

    torch.manual_seed(0)
    model = build_model(dict(type="STDiT", input_size=(4, 4, 4), hidden_size=32, depth=2, num_heads=4,
                             caption_channels=16, model_max_length=5, class_dropout_prob=0.0,
                             enable_layernorm_kernel=kernel, enable_sequence_parallelism=sp, **kwargs))
    with torch.no_grad():  # every weight non-zero, so no branch is hidden by a zero-initialised projection
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def stdit_inputs(T=4):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, T, 4, 4, generator=g)
    t = torch.tensor([3, 700])
    y = torch.randn(2, 1, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x, t, y, mask


def stdit_worker(rank, world, out, kernel):
    group = init_sequence_parallel(world)
    model = tiny_stdit(True, kernel)
    x, t, y, mask = stdit_inputs()
    output = model(x, t, y, mask, sp_group=group)
    output.square().mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, group=group)  # what data-parallel reduction does
        grads[name] = p.grad
    torch.save({"output": output.detach(), "grads": grads}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("world, kernel", [(2, True), (4, False)])
def test_sequence_parallel_stdit_equals_one_process(tmp_path, world, kernel):
    run(stdit_worker, world, tmp_path, kernel)
    model = tiny_stdit(False, kernel)
    x, t, y, mask = stdit_inputs()
    output = model(x, t, y, mask)
    output.square().mean().backward()
    for r in range(world):
        result = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(result["output"], output.detach(), rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def bad_config_worker(rank, world, out):
    messages = {}
    try:
        init_sequence_parallel(3)
    except ValueError as error:
        messages["sp_size"] = str(error)
    group = init_sequence_parallel(world)
    model = tiny_stdit(True, False)
    try:
        model(*stdit_inputs(T=3), sp_group=group)
    except ValueError as error:
        messages["frames"] = str(error)
    try:
        tiny_stdit(False, False)(*stdit_inputs(), sp_group=group)
    except ValueError as error:
        messages["off"] = str(error)
    from sora.models import build_model

    heads = build_model(dict(type="STDiT", input_size=(4, 4, 4), hidden_size=24, depth=1, num_heads=3,
                             caption_channels=16, model_max_length=5, enable_sequence_parallelism=True))
    try:
        heads(*stdit_inputs(), sp_group=group)
    except ValueError as error:
        messages["heads"] = str(error)
    try:
        K.all_to_all(torch.randn(3, 4), dist.group.WORLD, 0, 1)
    except ValueError as error:
        messages["all_to_all"] = str(error)
    torch.save(messages, f"{out}/rank{rank}.pt")


def test_bad_sequence_parallel_configs(tmp_path):
    run(bad_config_worker, 2, tmp_path)
    messages = torch.load(tmp_path / "rank0.pt")
    assert "sp_size=3 must be a positive int dividing the world size 2" in messages["sp_size"]
    assert "3 latent frames are not divisible by sp_size=2" in messages["frames"]
    assert "num_heads=3 is not divisible by sp_size=2" in messages["heads"]
    assert "sp_group was given but this STDiT was built with enable_sequence_parallelism=False" in messages["off"]
    assert "dim 0 (size 3) is not divisible by the group size 2" in messages["all_to_all"]


def test_sequence_parallel_needs_its_group():
    """The group comes with each call: the model holds none (its EMA copy could not be deep-copied with one)."""
    with pytest.raises(ValueError, match=r"needs sp_group: call it as model\(x, t, y, mask, sp_group=group\)"):
        tiny_stdit(True, False)(*stdit_inputs())


def seeded_worker(rank, world, out):
    from sora.models import build_model

    torch.manual_seed(rank)  # differently seeded ranks, as a user's own script may leave them
    model = build_model(dict(type="STDiT", input_size=(2, 4, 4), hidden_size=32, depth=1, num_heads=2,
                             caption_channels=16, model_max_length=5, enable_sequence_parallelism=True))
    torch.save(model.state_dict(), os.path.join(out, f"weights{rank}.pt"))


@pytest.mark.slow
def test_sequence_parallel_ranks_build_the_same_weights(tmp_path):
    run(seeded_worker, 2, tmp_path)
    first, second = (torch.load(tmp_path / f"weights{r}.pt") for r in range(2))
    assert all(torch.equal(first[name], second[name]) for name in first)
