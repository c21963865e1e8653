"""`sora.kernels.patch(model)`: a diffusers video or image DiT's LayerNorm + adaLN modulation and gated
residuals on sora's kernels, in place.

Each supported block (and model, for its final norm + modulation) gets a subclass of its own class whose
forward is diffusers' forward, line for line, with `(norm(x) * (1 + scale) + shift)` computed by
K.layernorm_modulate and `x + gate * y` by K.gated_residual: one pass each over the (B, N, C) tokens instead
of a chain of elementwise passes. Attention, feed-forward, embeddings and every other module are untouched.
The subclass keeps the class name, so configs and checkpoints save and load as before.

The reproduced forwards are those of diffusers 0.42.1. A class whose forward source differs (another diffusers
version that changed it) is refused with a ValueError rather than patched into a different model. Dtypes follow
the eager code: Wan modulates in fp32 with fp32 shift/scale/gate on bf16 tokens, which the kernels take as they
are; where the eager code would promote the tokens to a wider modulation dtype (PixArt, Latte, DiT with
modulation tensors wider than the tokens), the block runs diffusers' own forward.

diffusers is imported only when patch() is called: `import sora.kernels` does not need it.
"""

import hashlib
import inspect
import textwrap

import torch

from sora.kernels.norm import layernorm_modulate
from sora.kernels.residual import gated_residual

SUPPORTED = ("WanTransformer3DModel (Wan 2.1, 2.2, 2.2 TI2V), PixArtTransformer2DModel, LatteTransformer3DModel "
             "(BasicTransformerBlock, norm_type='ada_norm_single') and DiTTransformer2DModel "
             "(BasicTransformerBlock, norm_type='ada_norm_zero')")
TESTED_DIFFUSERS = "0.42.1"

# sha256 of the dedented source of each forward this file reproduces, as diffusers 0.42.1 ships it.
FORWARD_SOURCES = {
    "WanTransformerBlock": "e3f915b69532cdf6c4f7fe80fd633c50f32c19ab64cc6ed34be86d682d94cbf8",
    "WanTransformer3DModel": "63d2ad3896ba5f5bd78c94b6884ee5b11c7943dc4ebd5ec147320069259cd901",
    "BasicTransformerBlock": "9cfc6111a7fd5580b486d4eb15efad26221828493813ba9d7b8d338e0a621fd9",
    "DiTTransformer2DModel": "96d6d8b7d2a01bd8b813bf72445ae4a9afc3bda38f5c8db3c64dc7cdee1538ac",
    "PixArtTransformer2DModel": "6cb3582b3bc60811783222bdd51648147e3eb12106ff8cdc000ac8716b38c6f8",
    "LatteTransformer3DModel": "7d3f262aee1682f586dc0e31ca8ebc370551a1ce8606e07aa538351e557dfc81",
}


def forward_fingerprint(cls) -> str:
    """sha256 of the dedented source of cls.forward (the undecorated function's, decorator lines included)."""
    return hashlib.sha256(textwrap.dedent(inspect.getsource(cls.forward)).encode()).hexdigest()


def _wan_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """diffusers' WanTransformerBlock.forward on the kernels. TI2V's per-token temb (B, N, 6, C) gives (B, N, C)
    modulation rows, read per token by the kernels."""
    if temb.ndim == 4:
        modulation = (self.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)
    else:
        modulation = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = modulation

    # 1. Self-attention
    norm_hidden_states = layernorm_modulate(hidden_states, shift_msa, scale_msa, eps=self.norm1.eps)
    attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
    hidden_states = gated_residual(hidden_states, attn_output, gate_msa)

    # 2. Cross-attention
    if isinstance(self.norm2, torch.nn.LayerNorm):
        norm_hidden_states = layernorm_modulate(hidden_states, weight=self.norm2.weight, bias=self.norm2.bias,
                                                eps=self.norm2.eps)
    else:  # nn.Identity: `identity(x.float()).type_as(x)` is x
        norm_hidden_states = hidden_states
    attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
    hidden_states = hidden_states + attn_output

    # 3. Feed-forward
    norm_hidden_states = layernorm_modulate(hidden_states, c_shift_msa, c_scale_msa, eps=self.norm3.eps)
    ff_output = self.ffn(norm_hidden_states)
    return gated_residual(hidden_states, ff_output, c_gate_msa)


def _wan_model_forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                       return_dict=True, attention_kwargs=None):
    """diffusers' WanTransformer3DModel.forward with the final norm + modulation on the kernel."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    batch_size, num_channels, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = self.config.patch_size
    post_patch_num_frames = num_frames // p_t
    post_patch_height = height // p_h
    post_patch_width = width // p_w

    rotary_emb = self.rope(hidden_states)

    hidden_states = self.patch_embedding(hidden_states)
    hidden_states = hidden_states.flatten(2).transpose(1, 2).contiguous()

    if timestep.ndim == 2:
        ts_seq_len = timestep.shape[1]
        timestep = timestep.flatten()
    else:
        ts_seq_len = None

    temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
        timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len
    )
    if ts_seq_len is not None:
        timestep_proj = timestep_proj.unflatten(2, (6, -1))
    else:
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

    if encoder_hidden_states_image is not None:
        encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

    if torch.is_grad_enabled() and self.gradient_checkpointing:
        for block in self.blocks:
            hidden_states = self._gradient_checkpointing_func(
                block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb
            )
    else:
        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)

    if temb.ndim == 3:  # per token (TI2V): (B, N, C)
        shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).unbind(2)
    else:
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    shift = shift.to(hidden_states.device)
    scale = scale.to(hidden_states.device)

    hidden_states = layernorm_modulate(hidden_states, shift, scale, eps=self.norm_out.eps)
    hidden_states = self.proj_out(hidden_states)

    hidden_states = hidden_states.reshape(
        batch_size, post_patch_num_frames, post_patch_height, post_patch_width, p_t, p_h, p_w, -1
    )
    hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
    output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def _final_layer(norm, hidden_states, shift, scale):
    """`norm(hidden_states) * (1 + scale) + shift` of PixArt, Latte and DiT; eager where it would promote the
    tokens to a wider modulation dtype."""
    if shift.dtype != hidden_states.dtype or scale.dtype != hidden_states.dtype:
        return norm(hidden_states) * (1 + scale) + shift
    return layernorm_modulate(hidden_states, shift, scale, *_affine(norm), eps=norm.eps)


def _unpatchify(self, hidden_states, height, width, patch_size):
    hidden_states = hidden_states.reshape(shape=(-1, height, width, patch_size, patch_size, self.out_channels))
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    return hidden_states.reshape(shape=(-1, self.out_channels, height * patch_size, width * patch_size))


def _dit_model_forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None,
                       return_dict=True):
    """diffusers' DiTTransformer2DModel.forward with the final norm + modulation on the kernel."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
    hidden_states = self.pos_embed(hidden_states)
    for block in self.transformer_blocks:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states = self._gradient_checkpointing_func(
                block, hidden_states, None, None, None, timestep, cross_attention_kwargs, class_labels
            )
        else:
            hidden_states = block(hidden_states, attention_mask=None, encoder_hidden_states=None,
                                  encoder_attention_mask=None, timestep=timestep,
                                  cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)

    conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
    shift, scale = self.proj_out_1(torch.nn.functional.silu(conditioning)).chunk(2, dim=1)
    hidden_states = _final_layer(self.norm_out, hidden_states, shift[:, None], scale[:, None])
    hidden_states = self.proj_out_2(hidden_states)

    height = width = int(hidden_states.shape[1] ** 0.5)
    output = _unpatchify(self, hidden_states, height, width, self.patch_size)
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def _pixart_model_forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                          cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None,
                          return_dict=True):
    """diffusers' PixArtTransformer2DModel.forward with the final norm + modulation on the kernel."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    if self.use_additional_conditions and added_cond_kwargs is None:
        raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
    if attention_mask is not None and attention_mask.ndim == 2:
        attention_mask = (1 - attention_mask.to(hidden_states.dtype)) * -10000.0
        attention_mask = attention_mask.unsqueeze(1)
    if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
        encoder_attention_mask = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
        encoder_attention_mask = encoder_attention_mask.unsqueeze(1)

    batch_size = hidden_states.shape[0]
    height, width = (
        hidden_states.shape[-2] // self.config.patch_size,
        hidden_states.shape[-1] // self.config.patch_size,
    )
    hidden_states = self.pos_embed(hidden_states)
    timestep, embedded_timestep = self.adaln_single(
        timestep, added_cond_kwargs, batch_size=batch_size, hidden_dtype=hidden_states.dtype
    )
    if self.caption_projection is not None:
        encoder_hidden_states = self.caption_projection(encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states.view(batch_size, -1, hidden_states.shape[-1])

    for block in self.transformer_blocks:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states = self._gradient_checkpointing_func(
                block, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
                cross_attention_kwargs, None,
            )
        else:
            hidden_states = block(hidden_states, attention_mask=attention_mask,
                                  encoder_hidden_states=encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                                  cross_attention_kwargs=cross_attention_kwargs, class_labels=None)

    shift, scale = (
        self.scale_shift_table[None] + embedded_timestep[:, None].to(self.scale_shift_table.device)
    ).chunk(2, dim=1)
    hidden_states = _final_layer(self.norm_out, hidden_states, shift.to(hidden_states.device),
                                 scale.to(hidden_states.device))
    hidden_states = self.proj_out(hidden_states)
    hidden_states = hidden_states.squeeze(1)

    output = _unpatchify(self, hidden_states, height, width, self.config.patch_size)
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def _latte_model_forward(self, hidden_states, timestep=None, encoder_hidden_states=None,
                         encoder_attention_mask=None, enable_temporal_attentions=True, return_dict=True):
    """diffusers' LatteTransformer3DModel.forward with the final norm + modulation on the kernel."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    batch_size, channels, num_frame, height, width = hidden_states.shape
    hidden_states = hidden_states.permute(0, 2, 1, 3, 4).reshape(-1, channels, height, width)
    height, width = (
        hidden_states.shape[-2] // self.config.patch_size,
        hidden_states.shape[-1] // self.config.patch_size,
    )
    num_patches = height * width
    hidden_states = self.pos_embed(hidden_states)

    added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
    timestep, embedded_timestep = self.adaln_single(
        timestep, added_cond_kwargs=added_cond_kwargs, batch_size=batch_size, hidden_dtype=hidden_states.dtype
    )
    encoder_hidden_states = self.caption_projection(encoder_hidden_states)
    encoder_hidden_states_spatial = encoder_hidden_states.repeat_interleave(
        num_frame, dim=0, output_size=encoder_hidden_states.shape[0] * num_frame
    ).view(-1, encoder_hidden_states.shape[-2], encoder_hidden_states.shape[-1])
    timestep_spatial = timestep.repeat_interleave(
        num_frame, dim=0, output_size=timestep.shape[0] * num_frame
    ).view(-1, timestep.shape[-1])
    timestep_temp = timestep.repeat_interleave(
        num_patches, dim=0, output_size=timestep.shape[0] * num_patches
    ).view(-1, timestep.shape[-1])

    for i, (spatial_block, temp_block) in enumerate(zip(self.transformer_blocks, self.temporal_transformer_blocks)):
        spatial_args = (hidden_states, None, encoder_hidden_states_spatial, encoder_attention_mask,
                        timestep_spatial, None, None)
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states = self._gradient_checkpointing_func(spatial_block, *spatial_args)
        else:
            hidden_states = spatial_block(*spatial_args)

        if enable_temporal_attentions:
            hidden_states = hidden_states.reshape(
                batch_size, -1, hidden_states.shape[-2], hidden_states.shape[-1]
            ).permute(0, 2, 1, 3)
            hidden_states = hidden_states.reshape(-1, hidden_states.shape[-2], hidden_states.shape[-1])
            if i == 0 and num_frame > 1:
                hidden_states = hidden_states + self.temp_pos_embed.to(hidden_states.dtype)
            temporal_args = (hidden_states, None, None, None, timestep_temp, None, None)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(temp_block, *temporal_args)
            else:
                hidden_states = temp_block(*temporal_args)
            hidden_states = hidden_states.reshape(
                batch_size, -1, hidden_states.shape[-2], hidden_states.shape[-1]
            ).permute(0, 2, 1, 3)
            hidden_states = hidden_states.reshape(-1, hidden_states.shape[-2], hidden_states.shape[-1])

    embedded_timestep = embedded_timestep.repeat_interleave(
        num_frame, dim=0, output_size=embedded_timestep.shape[0] * num_frame
    ).view(-1, embedded_timestep.shape[-1])
    shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
    hidden_states = _final_layer(self.norm_out, hidden_states, shift, scale)
    hidden_states = self.proj_out(hidden_states)

    if self.adaln_single is None:
        height = width = int(hidden_states.shape[1] ** 0.5)
    output = _unpatchify(self, hidden_states, height, width, self.config.patch_size)
    output = output.reshape(batch_size, -1, output.shape[-3], output.shape[-2], output.shape[-1]).permute(
        0, 2, 1, 3, 4
    )
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def _affine(norm):
    """(weight, bias) of an nn.LayerNorm, None where it has none."""
    return getattr(norm, "weight", None), getattr(norm, "bias", None)


def _basic_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                         encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                         added_cond_kwargs=None):
    """diffusers' BasicTransformerBlock.forward for norm_type "ada_norm_single" (PixArt, Latte) and
    "ada_norm_zero" (DiT) on the kernels."""
    from diffusers.models.attention import _chunked_feed_forward

    batch_size = hidden_states.shape[0]
    if self.norm_type == "ada_norm_zero":
        emb = self.norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
        emb = self.norm1.linear(self.norm1.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        first_norm, second_norm = self.norm1.norm, self.norm3
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
        ).chunk(6, dim=1)
        first_norm, second_norm = self.norm1, self.norm2
    if hidden_states.dim() != 3 or shift_msa.dtype != hidden_states.dtype:
        # The eager code would promote the tokens to the modulation's dtype (or they are not (B, N, C)).
        return type(self).__mro__[1].forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                             encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                             added_cond_kwargs)

    norm_hidden_states = layernorm_modulate(hidden_states, shift_msa, scale_msa, *_affine(first_norm),
                                            eps=first_norm.eps)
    if self.pos_embed is not None:
        norm_hidden_states = self.pos_embed(norm_hidden_states)

    cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
    gligen_kwargs = cross_attention_kwargs.pop("gligen", None)

    attn_output = self.attn1(
        norm_hidden_states,
        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=attention_mask,
        **cross_attention_kwargs,
    )
    hidden_states = gated_residual(hidden_states, attn_output, gate_msa)

    if gligen_kwargs is not None:
        hidden_states = self.fuser(hidden_states, gligen_kwargs["objs"])

    if self.attn2 is not None:
        if self.norm_type == "ada_norm_zero":
            norm_hidden_states = self.norm2(hidden_states)
            if self.pos_embed is not None:
                norm_hidden_states = self.pos_embed(norm_hidden_states)
        else:  # PixArt applies no norm before cross-attention
            norm_hidden_states = hidden_states
        attn_output = self.attn2(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        hidden_states = attn_output + hidden_states

    norm_hidden_states = layernorm_modulate(hidden_states, shift_mlp, scale_mlp, *_affine(second_norm),
                                            eps=second_norm.eps)
    if self._chunk_size is not None:
        ff_output = _chunked_feed_forward(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
    else:
        ff_output = self.ff(norm_hidden_states)
    return gated_residual(hidden_states, ff_output, gate_mlp)


_PATCHED = {}  # diffusers class -> its patched subclass


def _patched_class(cls, forward):
    if cls not in _PATCHED:
        _PATCHED[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__})
    return _PATCHED[cls]


def _check_forward(module, name: str) -> None:
    """The module's class forward is diffusers 0.42.1's, and no hook replaced it on the instance."""
    if "forward" in vars(module):
        raise ValueError(f"{name} ({type(module).__name__}) has its forward replaced on the instance (a hook: "
                         f"offloading, caching or compilation); call sora.kernels.patch(model) before adding it")
    cls = type(module)
    found = forward_fingerprint(cls)
    if found != FORWARD_SOURCES[cls.__name__]:
        import diffusers

        raise ValueError(f"{cls.__name__}.forward of diffusers {diffusers.__version__} differs from the one "
                         f"sora.kernels.patch reproduces (diffusers {TESTED_DIFFUSERS}); patching it could change "
                         f"the model, so it is refused")


def _swap_all(modules) -> int:
    """modules: (module, patched forward, name). Check them all, then give each unpatched one its patched class;
    returns how many changed. A refused one leaves the whole model as it was."""
    todo = [(module, forward) for module, forward, name in modules if type(module) not in _PATCHED.values()]
    for module, _, name in modules:
        if type(module) not in _PATCHED.values():
            _check_forward(module, name)
    for module, forward in todo:
        module.__class__ = _patched_class(type(module), forward)
    return len(todo)


def _check_basic_block(block, name: str, norm_type: str) -> None:
    from diffusers.models.attention import BasicTransformerBlock

    if type(block) not in (BasicTransformerBlock, _PATCHED.get(BasicTransformerBlock)):
        raise ValueError(f"{name} is a {type(block).__name__}; sora.kernels.patch supports {SUPPORTED}")
    if block.norm_type != norm_type:
        raise ValueError(f"{name} has norm_type={block.norm_type!r}; sora.kernels.patch supports {SUPPORTED}")


def patch(model) -> int:
    """Patch a diffusers transformer in place onto sora's kernels; returns how many blocks changed, the final
    norm + modulation counting as one (0 when the model was already patched).

    Supported: WanTransformer3DModel (Wan 2.1, 2.2, 2.2 TI2V), PixArtTransformer2DModel, LatteTransformer3DModel
    and DiTTransformer2DModel, with diffusers 0.42.1's forwards. Outputs and gradients equal the unpatched
    model's up to rounding (one rounding per fused op instead of one per eager op).
    """
    try:
        from diffusers import (
            DiTTransformer2DModel,
            LatteTransformer3DModel,
            PixArtTransformer2DModel,
            WanTransformer3DModel,
        )
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock
        from diffusers.utils import apply_lora_scale
    except ImportError as error:
        raise ImportError(f"sora.kernels.patch needs diffusers (pip install 'sora-kernels[sample]'): {error}") \
            from error

    cls = type(model).__mro__[1] if type(model) in _PATCHED.values() else type(model)
    if cls is WanTransformer3DModel:
        for i, block in enumerate(model.blocks):
            if type(block) not in (WanTransformerBlock, _PATCHED.get(WanTransformerBlock)):
                raise ValueError(f"blocks.{i} is a {type(block).__name__}; sora.kernels.patch supports {SUPPORTED}")
        modules = [(block, _wan_block_forward, f"blocks.{i}") for i, block in enumerate(model.blocks)]
        return _swap_all(modules + [(model, apply_lora_scale("attention_kwargs")(_wan_model_forward), "the model")])
    if cls in (PixArtTransformer2DModel, LatteTransformer3DModel, DiTTransformer2DModel):
        norm_type = "ada_norm_zero" if cls is DiTTransformer2DModel else "ada_norm_single"
        named = [(f"transformer_blocks.{i}", block) for i, block in enumerate(model.transformer_blocks)]
        named += [(f"temporal_transformer_blocks.{i}", block)
                  for i, block in enumerate(getattr(model, "temporal_transformer_blocks", []))]
        for name, block in named:
            _check_basic_block(block, name, norm_type)
        model_forward = {DiTTransformer2DModel: _dit_model_forward, PixArtTransformer2DModel: _pixart_model_forward,
                         LatteTransformer3DModel: _latte_model_forward}[cls]
        modules = [(block, _basic_block_forward, name) for name, block in named]
        return _swap_all(modules + [(model, model_forward, "the model")])
    raise ValueError(f"sora.kernels.patch got a {type(model).__name__}; it supports {SUPPORTED}")
