"""Open-Sora v1.1's STDiT2 forward (their d599fd7 stdit2.py, blocks.py, rotary-embedding-torch 0.5.3), written
out op for op as a function of a state dict, independent of sora.models: the reference the STDiT2 tests
compare against in float64.

Where their code casts to fp32 inside a float64 run (the attention softmax, RMSNorm), that cast is a rounding,
not an operation: `fp32_casts=False` keeps float64 there, `True` rounds as their code does. `flash=True` runs the
spatial and cross-attention as one fused call (F.scaled_dot_product_attention), where their flash-attn and xformers
run theirs; temporal attention keeps the math path, which their code takes for it (flash-attn only when N > B).
bench/measure.py times this forward, in bf16, as Open-Sora v1.1's eager baseline.
"""

import math

import torch
import torch.nn.functional as F


def _linear(P, name, x):
    return x @ P[f"{name}.weight"].T + P[f"{name}.bias"]


def _timestep_embedder(P, name, t, dtype):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
    return _linear(P, f"{name}.mlp.2", F.silu(_linear(P, f"{name}.mlp.0", t_freq)))


def _size_embedder(P, name, s, bs):
    if s.ndim == 1:
        s = s[:, None]
    if s.shape[0] != bs:
        s = s.repeat(bs // s.shape[0], 1)
    b, dims = s.shape
    emb = _timestep_embedder(P, name, s.reshape(-1), P[f"{name}.mlp.0.weight"].dtype)
    return emb.reshape(b, -1)


def rms_norm(weight, x, fp32_casts):
    dtype = x.dtype
    h = x.to(torch.float32) if fp32_casts else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * h.to(dtype)


def _rope(freqs, t):
    """rotary_embedding_torch.RotaryEmbedding(dim).rotate_queries_or_keys(t), seq_dim=-2."""
    seq = torch.arange(t.shape[-2], dtype=t.dtype, device=t.device)
    angles = torch.einsum("..., f -> ... f", seq.type(freqs.dtype), freqs)
    angles = angles.repeat_interleave(2, dim=-1)  # repeat(freqs, "... n -> ... (n r)", r=2)
    pairs = t.reshape(*t.shape[:-1], -1, 2)
    x1, x2 = pairs.unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).reshape(t.shape)
    return t * angles.cos() + rotated * angles.sin()


def _attend(q, k, v, fp32_casts, flash):
    """softmax(q kᵀ / sqrt(D)) v over the last two dims."""
    if flash:
        return F.scaled_dot_product_attention(q, k, v)
    dtype = q.dtype
    attn = (q * q.shape[-1]**-0.5) @ k.transpose(-2, -1)
    attn = attn.to(torch.float32).softmax(dim=-1).to(dtype) if fp32_casts else attn.softmax(dim=-1)
    return attn @ v


def _attention(P, name, x, heads, qk_norm, rope_freqs, legacy, fp32_casts, flash=False):
    B, N, C = x.shape
    D = C // heads
    q, k, v = _linear(P, f"{name}.qkv", x).view(B, N, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    norm = (lambda w, t: rms_norm(P[w], t, fp32_casts)) if qk_norm else (lambda w, t: t)
    if rope_freqs is not None and legacy:
        q, k = _rope(rope_freqs, q), _rope(rope_freqs, k)
    q, k = norm(f"{name}.q_norm.weight", q), norm(f"{name}.k_norm.weight", k)
    if rope_freqs is not None and not legacy:
        q, k = _rope(rope_freqs, q), _rope(rope_freqs, k)
    out = _attend(q, k, v, fp32_casts, flash).transpose(1, 2).reshape(B, N, C)
    return _linear(P, f"{name}.proj", out)


def _cross_attention(P, name, x, y, y_lens, heads, flash):
    """xformers' memory_efficient_attention with BlockDiagonalMask.from_seqlens([N] * B, y_lens): sample b's
    tokens attend to its own caption tokens only."""
    B, N, C = x.shape
    D = C // heads
    q = _linear(P, f"{name}.q_linear", x).view(B, N, heads, D).transpose(1, 2)
    k, v = _linear(P, f"{name}.kv_linear", y).view(1, -1, 2, heads, D).unbind(2)
    if flash:  # one call for the batch, as theirs: each caption right-padded to the longest, the padding masked out
        k, v = (torch.nn.utils.rnn.pad_sequence(t[0].split(y_lens), batch_first=True).transpose(1, 2) for t in (k, v))
        keep = torch.arange(k.shape[2], device=x.device) < torch.tensor(y_lens, device=x.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None])
        return _linear(P, f"{name}.proj", out.transpose(1, 2).reshape(B, N, C))
    outs, start = [], 0
    for b, length in enumerate(y_lens):
        kb, vb = (t[0, start:start + length].transpose(0, 1) for t in (k, v))  # (heads, L_b, D)
        outs.append(_attend(q[b], kb, vb, False, False).transpose(0, 1).reshape(N, C))
        start += length
    return _linear(P, f"{name}.proj", torch.stack(outs))


def _t_mask_select(x_mask, x, masked_x, T, S):
    B, _, C = x.shape
    x = torch.where(x_mask[:, :, None, None], x.view(B, T, S, C), masked_x.view(B, T, S, C))
    return x.reshape(B, T * S, C)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _rows(table, t, t0, x_mask):
    """The modulation rows table (k, C) + t (B, k*C), k of them, (B, 1, C) each; with x_mask, also those of t0."""
    B, k = t.shape[0], table.shape[0]
    rows = (table[None] + t.reshape(B, k, -1)).chunk(k, 1)
    return rows, (None,) * k if x_mask is None else (table[None] + t0.reshape(B, k, -1)).chunk(k, 1)


def _modulated(x, x_mask, T, S, shift, scale, shift_z, scale_z):
    x_m = _modulate(_layer_norm(x), shift, scale)
    if x_mask is not None:
        x_m = _t_mask_select(x_mask, x_m, _modulate(_layer_norm(x), shift_z, scale_z), T, S)
    return x_m


def _gated(h, x_mask, T, S, gate, gate_z):
    if x_mask is not None:
        return _t_mask_select(x_mask, gate * h, gate_z * h, T, S)
    return gate * h


def temporal_branch(P, name, x, t_tmp, x_mask, t0_tmp, T, S, cfg, fp32_casts):
    """x + the block's temporal branch: norm_temp, modulate, "B (T S) C -> (B S) T C", qkv, RoPE, qk-norm,
    attention, proj, back, gated residual."""
    B, N, C = x.shape
    (shift, scale, gate), (shift_z, scale_z, gate_z) = _rows(P[f"{name}.scale_shift_table_temporal"], t_tmp, t0_tmp,
                                                              x_mask)
    x_m = _modulated(x, x_mask, T, S, shift, scale, shift_z, scale_z)
    x_t = x_m.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
    x_t = _attention(P, f"{name}.attn_temp", x_t, cfg["num_heads"], cfg["qk_norm"], P["rope.freqs"],
                     cfg["qk_norm_legacy"], fp32_casts)
    x_t = x_t.view(B, S, T, C).transpose(1, 2).reshape(B, T * S, C)
    return x + _gated(x_t, x_mask, T, S, gate, gate_z)


def _block(P, name, x, y, t, t_tmp, y_lens, x_mask, t0, t0_tmp, T, S, cfg, fp32_casts, flash):
    B, N, C = x.shape
    heads = cfg["num_heads"]
    rows, rows_z = _rows(P[f"{name}.scale_shift_table"], t, t0, x_mask)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = rows
    shift_msa_z, scale_msa_z, gate_msa_z, shift_mlp_z, scale_mlp_z, gate_mlp_z = rows_z
    # spatial branch
    x_m = _modulated(x, x_mask, T, S, shift_msa, scale_msa, shift_msa_z, scale_msa_z)
    x_s = _attention(P, f"{name}.attn", x_m.reshape(B * T, S, C), heads, cfg["qk_norm"], None, cfg["qk_norm_legacy"],
                     fp32_casts, flash)
    x = x + _gated(x_s.reshape(B, T * S, C), x_mask, T, S, gate_msa, gate_msa_z)
    x = temporal_branch(P, name, x, t_tmp, x_mask, t0_tmp, T, S, cfg, fp32_casts)
    # cross attention
    x = x + _cross_attention(P, f"{name}.cross_attn", x, y, y_lens, heads, flash)
    # mlp
    x_m = _modulated(x, x_mask, T, S, shift_mlp, scale_mlp, shift_mlp_z, scale_mlp_z)
    h = _linear(P, f"{name}.mlp.fc2", F.gelu(_linear(P, f"{name}.mlp.fc1", x_m), approximate="tanh"))
    return x + _gated(h, x_mask, T, S, gate_mlp, gate_mlp_z)


def _pos_embed_2d(inv_freq, h, w, scale, base_size, dtype):
    """PositionEmbedding2D._get_cached_emb."""
    grid_h = torch.arange(h, device=inv_freq.device) / scale
    grid_w = torch.arange(w, device=inv_freq.device) / scale
    grid_h *= base_size / h
    grid_w *= base_size / w
    grid_h, grid_w = torch.meshgrid(grid_w, grid_h, indexing="ij")  # their names: w goes first
    grid_h, grid_w = grid_h.t().reshape(-1), grid_w.t().reshape(-1)

    def sin_cos(t):
        out = torch.einsum("i,d->id", t, inv_freq)
        return torch.cat((torch.sin(out), torch.cos(out)), dim=-1)

    return torch.cat([sin_cos(grid_h), sin_cos(grid_w)], dim=-1).unsqueeze(0).to(dtype)


def stdit2_forward(P, cfg, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None,
                   ar=None, fps=None, fp32_casts=False, flash=False):
    """Open-Sora v1.1's STDiT2.forward with the weights P (a state dict) and the config keys cfg: hidden_size,
    num_heads, patch_size, input_sq_size, qk_norm, qk_norm_legacy, pred_sigma."""
    C, patch = cfg["hidden_size"], cfg["patch_size"]
    B = x.shape[0]
    dtype = P["x_embedder.proj.weight"].dtype
    x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

    hw = torch.cat([height[:, None], width[:, None]], dim=1)
    rs = (height[0].item() * width[0].item()) ** 0.5
    csize = _size_embedder(P, "csize_embedder", hw, B)
    data_info = torch.cat([csize, _size_embedder(P, "ar_embedder", ar.unsqueeze(1), B)], dim=1)
    fl = _size_embedder(P, "fl_embedder", num_frames.unsqueeze(1), B)
    fl = fl + _size_embedder(P, "fps_embedder", fps.unsqueeze(1), B)

    _, _, Tx, Hx, Wx = x.shape
    T, H, W = (-(-n // p) for n, p in zip((Tx, Hx, Wx), patch))
    S = H * W
    half = torch.arange(0, C // 2, 2, device=x.device).float() / (C // 2)
    inv_freq = (1.0 / (10000**half)).to(dtype)  # a buffer: the model dtype
    pos_emb = _pos_embed_2d(inv_freq, H, W, rs / cfg["input_sq_size"], round(S**0.5), dtype)

    # PatchEmbed3D: right-pad W, H, T to the patch size, Conv3d, "B C T H W -> B (T H W) C"
    x = F.pad(x, (0, -Wx % patch[2], 0, -Hx % patch[1], 0, -Tx % patch[0]))
    x = F.conv3d(x, P["x_embedder.proj.weight"], P["x_embedder.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = (x.view(B, T, S, C) + pos_emb).reshape(B, T * S, C)

    t = _timestep_embedder(P, "t_embedder", timestep, x.dtype)
    t_block = lambda v: _linear(P, "t_block.1", F.silu(v))  # noqa: E731
    t_block_temp = lambda v: _linear(P, "t_block_temp.1", F.silu(v))  # noqa: E731
    t_spc_mlp, t_tmp_mlp = t_block(t + data_info), t_block_temp(t + fl)
    t0_spc = t0_spc_mlp = t0_tmp_mlp = None
    if x_mask is not None:
        t0 = _timestep_embedder(P, "t_embedder", torch.zeros_like(timestep), x.dtype)
        t0_spc = t0 + data_info
        t0_spc_mlp, t0_tmp_mlp = t_block(t0_spc), t_block_temp(t0 + fl)

    # CaptionEmbedder (no dropout at inference), then the packed caption of the real tokens
    y = _linear(P, "y_embedder.y_proj.fc2", F.gelu(_linear(P, "y_embedder.y_proj.fc1", y), approximate="tanh"))
    if mask is not None:
        y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, C)
        y_lens = mask.sum(dim=1).tolist()
    else:
        y_lens = [y.shape[2]] * y.shape[0]
        y = y.squeeze(1).view(1, -1, C)

    depth = len({k.split(".")[1] for k in P if k.startswith("blocks.")})
    for i in range(depth):
        x = _block(P, f"blocks.{i}", x, y, t_spc_mlp, t_tmp_mlp, y_lens, x_mask, t0_spc_mlp, t0_tmp_mlp, T, S, cfg,
                   fp32_casts, flash)

    # T2IFinalLayer with x_mask: noisy frames with t, the others with t0 + data_info on the modulated x
    table = P["final_layer.scale_shift_table"]
    shift, scale = (table[None] + t[:, None]).chunk(2, dim=1)
    x = _modulate(_layer_norm(x), shift, scale)
    if x_mask is not None:
        shift_z, scale_z = (table[None] + t0_spc[:, None]).chunk(2, dim=1)
        x = _t_mask_select(x_mask, x, _modulate(_layer_norm(x), shift_z, scale_z), T, S)
    x = _linear(P, "final_layer.linear", x)

    # unpatchify "B (N_t N_h N_w) (T_p H_p W_p C_out) -> B C_out (N_t T_p) (N_h H_p) (N_w W_p)", crop
    out_channels = x.shape[-1] // (patch[0] * patch[1] * patch[2])
    x = x.view(B, T, H, W, *patch, out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    x = x.reshape(B, out_channels, T * patch[0], H * patch[1], W * patch[2])
    return x[:, :, :Tx, :Hx, :Wx].to(torch.float32)
