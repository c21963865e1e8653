"""bench/census.py, the byte census: what it counts for views, an elementwise op, a sora custom op and an attention
core, and what it finds in tiny models (kernels on move fewer bytes than off; Open-Sora's x_mask costs its
second modulation and gate, sora's almost nothing). Meta tensors: no arithmetic, a second or so per model."""

import functools

import pytest
import torch
import torch.nn.functional as F

import sora.kernels as K
from bench.census import census, counting, main

TINY = dict(hidden_size=48, num_heads=4, patch_size=(1, 2, 2), depth=2, caption_channels=16)
SHAPE = dict(frames=4, height=16, width=16, batch=2, caption=5)  # 4 frames of 64 patches


@functools.cache  # two tests count sora's STDiT2 with the kernels
def per_token(model, kernels=False, x_mask=False):
    counted, count = census(model, kernels, x_mask, arch=TINY, shape=SHAPE)
    return sum(counted.bytes.values()) / count, counted.bytes


def test_views_count_nothing():
    x = torch.empty(2, 6, 8, device="meta", dtype=torch.bfloat16)
    with counting() as counted:
        views = [x.view(12, 8), x.reshape(2, 48), x.permute(2, 0, 1), x.transpose(1, 2), x[:, None].expand(2, 3, 6, 8),
                 x[:, 1:4], x[0], x.unsqueeze(0), x[0].t(), x.detach(), *x.unbind(1), x.flatten(1),
                 x.unflatten(2, (2, 4))]
    assert len(views) == 18 and not counted.bytes


def test_elementwise_ops_count_their_inputs_and_outputs():
    x, shift = (torch.empty(*shape, device="meta", dtype=torch.bfloat16) for shape in ((2, 6, 8), (2, 1, 8)))
    with counting() as counted:
        x + shift  # broadcast: shift is read once
        x * shift.expand(2, 6, 8)  # stride 0: the same
        x.float()  # read bf16, write fp32
        x.transpose(1, 2).contiguous()  # a real copy
    assert counted.bytes == {"aten.add": 2 * (96 + 16 + 96), "aten.mul": 2 * (96 + 16 + 96),
                             "aten._to_copy": 96 * (2 + 4), "aten.clone": 96 * (2 + 2)}


@pytest.mark.parametrize("device", ["meta", "cpu"])  # the census's tensors; the kernel itself (interpreted)
def test_a_custom_op_counts_its_inputs_and_outputs_once(device):
    B, N, C = 2, 6, 16
    x = torch.randn(B, N, C, device=device, dtype=torch.bfloat16)
    shift, scale = (torch.randn(B, 1, C, device=device, dtype=torch.bfloat16) for _ in range(2))
    with counting() as counted:
        K.layernorm_modulate(x, shift, scale)
    # x, shift, scale in; y, and the fp32 mean and rstd of each row, out
    assert counted.bytes == {"sora.layernorm_modulate": 2 * (B * N * C + 2 * B * C + B * N * C) + 2 * 4 * B * N}


def test_attention_is_a_core_with_the_gpu_layout():
    q = torch.empty(2, 3, 10, 8, device="meta", dtype=torch.bfloat16)
    with counting() as counted:
        out = F.scaled_dot_product_attention(q, q, q)
    assert not counted.bytes and out.shape == q.shape and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("model", ["STDiT", "STDiT2"])
def test_kernels_move_fewer_bytes(model):
    eager, eager_ops = per_token(model)
    fused, fused_ops = per_token(model, kernels=True)
    assert fused < 0.75 * eager
    assert {"sora.layernorm_modulate", "sora.gated_residual", "sora.temporal_attention"} <= set(fused_ops)
    assert "aten.native_layer_norm" in eager_ops and "aten.native_layer_norm" not in fused_ops


def test_x_mask_costs_open_sora_a_second_modulation_and_sora_almost_nothing():
    row = TINY["hidden_size"] * 2  # one bf16 row of C
    theirs, theirs_masked = per_token("Open-Sora STDiT2"), per_token("Open-Sora STDiT2", x_mask=True)
    # Per branch a second LayerNorm and modulation (6 rows) and its select (3), a second gate (2) and its select (3):
    # 42 rows for three branches, plus the per-sample rows and statistics.
    assert 42 * row <= theirs_masked[0] - theirs[0] < 44 * row
    # sora selects each frame's (B, T, C) modulation rows instead: less than a row per token.
    ours, ours_masked = per_token("STDiT2", kernels=True)[0], per_token("STDiT2", kernels=True, x_mask=True)[0]
    assert ours <= ours_masked < ours + row and ours < theirs[0] / 3


@pytest.mark.parametrize("argv", [["--latent", "16x31x54"], ["--latent", "16x30"], ["--ops", "-1"]])
def test_the_command_line_refuses_a_bad_value_in_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1
