"""Text encoders: prompts -> the condition `y` a diffusion model cross-attends to or embeds.

The interface (Open-Sora v1's; sora.sample and sora.train rely on exactly this):

- `output_dim`: the width of `y`, which the model's `caption_channels` must equal (None for class ids).
- `model_max_length`: tokens per caption, which the model's `model_max_length` must equal (None for class ids).
- `encode(prompts: list[str]) -> dict(y=Tensor, mask=Tensor | None)`:
    t5       y (B, 1, L, C) float, L = model_max_length; mask (B, L) int64, 1 for real tokens
    clip     y (B, 1, 1, C) float, the pooled (end-token) embedding; mask None
    classes  y (B,) int64 class ids, one per prompt line ("3"); mask None

The unconditional `y` for classifier-free guidance is the diffusion model's, not the encoder's:
`model.y_embedder.null(n)` (the null caption for t5/clip, the null class for classes).

`build_text_encoder(dict(type="t5" | "clip" | "classes", **options), device, dtype)` builds one.
T5-v1.1 overflows in fp16: run it in fp32 (as Open-Sora v1 does for sampling) or bf16.

File-less T5 for tests and CPU smoke configs: `dict(type="t5", config=TINY_T5_CONFIG)` builds a
`T5EncoderModel` from those `T5Config` keyword arguments with seeded random weights (the same
weights in every process and run) and the ByT5 byte tokenizer, which needs no vocabulary file.
"""

import os

import torch
from transformers import AutoTokenizer, ByT5Tokenizer, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from sora.registry import build, load_pretrained

# Two layers of T5-v1.1's block (gated-GELU MLP, no biases) at width 32: captions of width 32.
TINY_T5_CONFIG = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")


class _CaptionEncoder:
    """What T5 and CLIP share: a frozen transformers model and its tokenizer."""

    def __init__(self, model, tokenizer, model_max_length, device, dtype):
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.output_dim = model.config.hidden_size
        self.device = torch.device(device)

    def _tokenize(self, prompts):
        return self.tokenizer(
            list(prompts),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).to(self.device)


class T5Encoder(_CaptionEncoder):
    """T5 encoder states as captions (`type="t5"`; Open-Sora: DeepFloyd/t5-v1_1-xxl, 120 tokens).

    from_pretrained: a folder (config.json + weights + tokenizer files) or a hub id. Open-Sora v1
        configs name the folder that holds `t5-v1_1-xxl/` (`./pretrained_models/t5_ckpts`); that
        layout is accepted too.
    tokenizer: a folder or hub id to take the tokenizer from instead (default: from_pretrained's;
        with `config`, the file-less ByT5 tokenizer).
    config: `T5Config` keyword arguments for a model with seeded random weights, instead of
        from_pretrained (e.g. TINY_T5_CONFIG); `vocab_size` defaults to the tokenizer's.
    shardformer: accepted so Open-Sora v1 training configs load, and ignored: colossalai's
        shardformer only swapped in fused kernels (and cast T5 to fp16); it is not used here.
    """

    def __init__(
        self,
        from_pretrained=None,
        model_max_length=120,
        tokenizer=None,
        config=None,
        shardformer=False,
        device="cpu",
        dtype=torch.float32,
    ):
        if (from_pretrained is None) == (config is None):
            raise ValueError("t5 text encoder: set exactly one of from_pretrained (a folder or hub id) and config")
        if tokenizer is not None:
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "T5 tokenizer", weights=False)
        if config is not None:
            tokenizer = tokenizer or ByT5Tokenizer()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = T5EncoderModel(T5Config(**{"vocab_size": len(tokenizer), **config}))
        else:
            folder = os.path.expanduser(from_pretrained)
            if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(f"{folder}/t5-v1_1-xxl"):
                from_pretrained = f"{folder}/t5-v1_1-xxl"
            model = load_pretrained(T5EncoderModel.from_pretrained, from_pretrained, "T5 encoder", dtype=dtype)
            tokenizer = tokenizer or load_pretrained(
                AutoTokenizer.from_pretrained, from_pretrained, "T5 tokenizer", weights=False
            )
        super().__init__(model, tokenizer, model_max_length, device, dtype)

    @torch.no_grad()
    def encode(self, prompts):
        tokens = self._tokenize(prompts)
        y = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return dict(y=y[:, None], mask=tokens.attention_mask)  # (B, L, C) -> (B, 1, L, C)


class ClipEncoder(_CaptionEncoder):
    """CLIP's pooled text embedding as a one-token caption (`type="clip"`; DiT and Latte with
    `condition="text"`, which add it to the timestep embedding).

    from_pretrained: a folder (config.json + weights + tokenizer files) or a hub id.
    """

    def __init__(
        self, from_pretrained="openai/clip-vit-base-patch32", model_max_length=77, device="cpu", dtype=torch.float32
    ):
        model = load_pretrained(CLIPTextModel.from_pretrained, from_pretrained, "CLIP text model", dtype=dtype)
        if model_max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"clip text encoder: model_max_length {model_max_length} exceeds the model's "
                f"{model.config.max_position_embeddings} positions"
            )
        tokenizer = load_pretrained(CLIPTokenizer.from_pretrained, from_pretrained, "CLIP tokenizer", weights=False)
        super().__init__(model, tokenizer, model_max_length, device, dtype)

    @torch.no_grad()
    def encode(self, prompts):
        # No attention mask, as Open-Sora: CLIP's text attention is causal, so the padding after
        # the end token cannot change the pooled (end-token) output.
        pooled = self.model(input_ids=self._tokenize(prompts).input_ids).pooler_output
        return dict(y=pooled[:, None, None], mask=None)  # (B, C) -> (B, 1, 1, C)


class ClassEncoder:
    """Class labels (`type="classes"`): each prompt is a class id in [0, num_classes), for models
    with `condition="label_N"`, whose embedder keeps the extra class `num_classes` for classifier-free
    guidance.

    dtype: unused (class ids are integers); taken so every encoder is built the same way.
    """

    def __init__(self, num_classes, device="cpu", dtype=None):
        self.num_classes = num_classes
        self.output_dim = None
        self.model_max_length = None
        self.device = torch.device(device)

    def encode(self, prompts):
        ids = []
        for prompt in prompts:
            try:
                class_id = int(prompt)
            except ValueError:
                class_id = None
            if class_id is None or not 0 <= class_id < self.num_classes:
                raise ValueError(f"prompt {prompt!r} is not a class id: expected an integer in [0, {self.num_classes})")
            ids.append(class_id)
        return dict(y=torch.tensor(ids, dtype=torch.long, device=self.device), mask=None)


TEXT_ENCODERS = {"t5": T5Encoder, "clip": ClipEncoder, "classes": ClassEncoder}


def build_text_encoder(cfg, device="cpu", dtype=torch.float32):
    """A text encoder from a config dict: `type` (t5, clip, classes) and that class's options."""
    return build(TEXT_ENCODERS, cfg, "text_encoder", device=device, dtype=dtype)
