"""A residual cache for the sampling loop: skip the block stack on steps where its input has hardly changed.

On a computed step the model runs whole and the cache keeps the block stack's residual, its output minus its
input (one tensor for the doubled guidance batch). On a skipped step the model runs only its embedders and its
final layer, on its tokens plus that residual (the model's ForwardParts, sora.models.base). A trigger decides
which steps are computed:

- "delta": the relative L1 change of block 0's modulated input from one step to the next, accumulated since the
  last computed step; the step is skipped while the sum stays below `threshold`. This is TeaCache's indicator
  (Liu et al., 2024) without its fitted polynomial rescaling.
- "first_block": block 0 runs on every step; the step is skipped when block 0's residual differs from that of
  the last computed step by less than `threshold` (relative L1), as First-Block Cache does.
- "interval": every `every`-th step is computed (a fixed control).

The first and last steps are always computed, and at most `max_skips` steps in a row are skipped. The decision
is one per model call: both halves of the guidance batch are computed or skipped together. Under sequence
parallelism the indicator is reduced (max) over the group, so every rank decides alike. `threshold=0` computes
every step, and its samples are bit-identical to sampling without a cache.
"""

import math
import numbers

import torch
import torch.distributed as dist

from sora.registry import is_int

TRIGGERS = ("delta", "first_block", "interval")
# The defaults of a cache given only its type. The threshold of a trigger given none: the one that halved the
# model calls of the tiny STDiT trained as README.md does (IDDPM, 50 steps; README.md's cache table, measured with
# scripts/cache_quality.py). A threshold of 0.1 skipped no step of it.
DEFAULTS = {"type": "residual", "trigger": "delta", "max_skips": 4}
THRESHOLDS = {"delta": 0.4, "first_block": 0.16}
TRIGGER_KEYS = {"delta": "threshold", "first_block": "threshold", "interval": "every"}


def check_cache(cache):
    """A cache config (None, or a dict such as dict(type="residual", trigger="delta", threshold=0.4)) -> the
    settings with defaults filled in, or None for no cache; ValueError naming a bad value."""
    if cache is None:
        return None
    if not isinstance(cache, dict):
        raise ValueError(f"cache must be None or a dict such as dict(type='residual', threshold=0.4), got {cache!r}.")
    if cache.get("type") != "residual":
        raise ValueError(f"cache type must be 'residual', got {cache.get('type')!r}.")
    trigger = cache.get("trigger", DEFAULTS["trigger"])
    if trigger not in TRIGGERS:
        raise ValueError(f"cache trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}.")
    allowed = {"type", "trigger", "max_skips", TRIGGER_KEYS[trigger]}
    for key in cache:
        if key not in allowed:
            raise ValueError(f"cache key {key!r} is not one for trigger {trigger!r}; its keys are "
                             f"{', '.join(sorted(allowed))}.")
    settings = {"type": "residual", "trigger": trigger, "max_skips": cache.get("max_skips", DEFAULTS["max_skips"])}
    if trigger == "interval":
        every = cache.get("every")
        if not (is_int(every) and every >= 1):
            raise ValueError(f"cache every must be an int >= 1 with trigger 'interval', got {every!r}.")
        settings["every"] = every
    else:
        threshold = cache.get("threshold", THRESHOLDS[trigger])
        if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
                or threshold < 0):
            raise ValueError(f"cache threshold must be a finite number >= 0, got {threshold!r}.")
        settings["threshold"] = threshold
    if not (is_int(settings["max_skips"]) and settings["max_skips"] >= 0):
        raise ValueError(f"cache max_skips must be an int >= 0, got {settings['max_skips']!r}.")
    return settings


def relative_l1(new, old):
    """mean |new - old| / mean |old|, a float32 scalar tensor (0 where both are 0)."""
    new, old = new.float(), old.float()
    return (new - old).abs().mean() / old.abs().mean().clamp_min(torch.finfo(torch.float32).tiny)


def agreed(value, group):
    """The indicator every rank of `group` decides on: its maximum over the group (value itself without one),
    as a Python float."""
    if group is not None:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value.item()


class CountedModel:
    """The model call of a sampling loop of `num_steps` steps, counting full model calls (`computed`); with a
    cache config, the residual cache above. Called as the model is, once per step."""

    def __init__(self, model, cache, num_steps):
        self.model = model
        self.settings = check_cache(cache)
        self.num_steps = num_steps
        self.step = 0
        self.computed = 0
        if self.settings is not None and not callable(getattr(model, "parts", None)):
            raise ValueError(f"the sampling cache needs a model with parts() (STDiT, STDiT2, PixArt, Latte, DiT); "
                             f"{type(model).__name__} has none.")
        self.residual = None  # the block stack's output minus input at the last computed step
        self.skips = 0  # steps skipped since then
        self.previous = None  # delta: the last step's probe; first_block: block 0's residual at the last computed
        self.change = 0.0  # delta: the accumulated change since the last computed step

    def __call__(self, x, timestep, **kwargs):
        step, self.step = self.step, self.step + 1
        if self.settings is None:
            self.computed += 1
            return self.model(x, timestep, **kwargs)
        parts = self.model.parts(x, timestep, **kwargs)
        settings, group = self.settings, kwargs.get("sp_group")
        forced = step in (0, self.num_steps - 1) or self.residual is None or self.skips >= settings["max_skips"]
        h = None  # block 0's output, when the trigger computed it
        if settings["trigger"] == "interval":
            skip = self.skips + 1 < settings["every"]
        elif settings["trigger"] == "delta":
            probe = parts.probe(parts.tokens)
            if self.previous is not None:
                self.change += agreed(relative_l1(probe, self.previous), group)
            self.previous = probe
            skip = self.change < settings["threshold"]
        else:
            h = parts.run_blocks(parts.tokens, 0, 1)
            first = h - parts.tokens
            skip = self.previous is not None and agreed(relative_l1(first, self.previous), group) < settings[
                "threshold"]
        if skip and not forced:
            self.skips += 1
            return parts.final(parts.tokens + self.residual)
        if h is None:
            out = parts.run_blocks(parts.tokens, 0, parts.depth)
        else:
            self.previous = first
            out = parts.run_blocks(h, 1, parts.depth)
        self.residual = out - parts.tokens
        self.skips, self.change = 0, 0.0
        self.computed += 1
        return parts.final(out)
