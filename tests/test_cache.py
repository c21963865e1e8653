"""The sampling loop's residual cache (sora.schedulers.cache): exact where it must be (no cache and threshold 0
are bit-identical to sampling without it), skipping where asked, a skipped step being embedders + cached residual
+ final layer, one decision per guided batch and per sequence-parallel group, and its settings checked."""

import contextlib
import glob
import io

import pytest
import torch

import sora.sample
from sora.config import parse_args
from sora.launch import main
from sora.models import build_model
from sora.models.base import ForwardParts
from sora.schedulers import IDDPM, DPMSolver
from sora.schedulers.cache import CountedModel, agreed, check_cache

CAPTION = dict(caption_channels=16, class_dropout_prob=0.0)
MODELS = {
    "STDiT": dict(input_size=(2, 4, 4), hidden_size=32, depth=3, num_heads=2, model_max_length=5, **CAPTION),
    "PixArt": dict(input_size=(2, 4, 4), hidden_size=32, depth=3, num_heads=2, model_max_length=5, **CAPTION),
    "DiT": dict(input_size=(2, 4, 4), hidden_size=32, depth=3, num_heads=2, **CAPTION),
    "Latte": dict(input_size=(2, 4, 4), hidden_size=32, depth=3, num_heads=2, **CAPTION),
    "STDiT2": dict(hidden_size=48, depth=3, num_heads=4, input_sq_size=64, model_max_length=5, **CAPTION),
}
B, T, H, W = 1, 2, 4, 4


def tiny(model_type, **kwargs):
    """A tiny model of `model_type` with random non-zero weights (the zero-initialised output layers would
    make every step's output the same); STDiT2's rope constants kept."""
    torch.manual_seed(0)
    model = build_model(dict(type=model_type, **MODELS[model_type], **kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


def conditions(model_type):
    """y, y_null, mask and model_kwargs for a batch of B."""
    g = torch.Generator().manual_seed(1)
    tokens = 1 if model_type in ("DiT", "Latte") else 5
    y, y_null = torch.randn(2, B, 1, tokens, 16, generator=g)
    mask = None if tokens == 1 else torch.tensor([[1, 1, 1, 0, 0]] * B)
    kwargs = None
    if model_type == "STDiT2":
        kwargs = dict(num_frames=torch.full((B,), float(T)), height=torch.full((B,), 8.0 * H),
                      width=torch.full((B,), 8.0 * W), ar=torch.ones(B), fps=torch.full((B,), 24.0))
    return y, y_null, mask, kwargs


def sample(model, model_type, scheduler, cache=None, frame_mask=None):
    y, y_null, mask, kwargs = conditions(model_type)
    z = torch.randn(B, 4, T, H, W, generator=torch.Generator().manual_seed(2))
    return scheduler.sample(model, z, y, y_null, mask, progress=False, generator=torch.Generator().manual_seed(3),
                            frame_mask=frame_mask, model_kwargs=kwargs, cache=cache)


def count_calls(module):
    """Batch sizes of `module`'s calls, appended as they happen."""
    sizes = []
    module.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    return sizes


EXACT = [dict(type="residual", trigger="delta", threshold=0),
         dict(type="residual", trigger="first_block", threshold=0),
         dict(type="residual", trigger="interval", every=1)]


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_threshold_zero_is_bit_identical_to_no_cache(model_type):
    model = tiny(model_type)
    scheduler = IDDPM(num_sampling_steps=5)
    expected = sample(model, model_type, scheduler)
    assert scheduler.model_calls == (5, 5)
    for cache in EXACT:
        assert torch.equal(sample(model, model_type, scheduler, cache), expected), cache
        assert scheduler.model_calls == (5, 5)


def test_threshold_zero_is_bit_identical_with_dpm_solver_and_frame_masks():
    model = tiny("STDiT")
    solver = DPMSolver(num_sampling_steps=5)
    expected = sample(model, "STDiT", solver)
    for cache in EXACT:
        assert torch.equal(sample(model, "STDiT", solver, cache), expected), cache
    model = tiny("STDiT2")
    iddpm = IDDPM(num_sampling_steps=6)
    frame_mask = torch.tensor([[0.0, 0.5]] * B)  # frame 0 a reference, frame 1 released half way
    expected = sample(model, "STDiT2", iddpm, frame_mask=frame_mask)
    for cache in EXACT:
        assert torch.equal(sample(model, "STDiT2", iddpm, cache, frame_mask), expected), cache


def test_no_cache_calls_the_model_as_before():
    """Without a cache the loop calls the model itself, once per step (the default sampling path); with one,
    only its parts."""
    model = tiny("STDiT")
    scheduler = IDDPM(num_sampling_steps=4)
    calls = count_calls(model)
    sample(model, "STDiT", scheduler)
    assert calls == [2 * B] * 4 and scheduler.model_calls == (4, 4)
    sample(model, "STDiT", scheduler, EXACT[0])
    assert len(calls) == 4 and scheduler.model_calls == (4, 4)


@pytest.mark.parametrize("cache, computed_steps", [
    (dict(type="residual", trigger="interval", every=3), 4),  # steps 0, 3, 6 and the last, 7
    (dict(type="residual", trigger="delta", threshold=1e9, max_skips=2), 4),  # the cap: 0, 3, 6, 7
    (dict(type="residual", trigger="first_block", threshold=1e9, max_skips=1), 5),  # 0, 2, 4, 6, 7
])
@pytest.mark.parametrize("model_type", ["STDiT", "STDiT2", "Latte"])
def test_skipped_steps_do_not_run_the_block_stack(model_type, cache, computed_steps):
    """With guidance: the block stack only ever sees the whole doubled batch (both halves computed or skipped
    together), on the computed steps only; the sampler's count says so."""
    model = tiny(model_type)
    scheduler = IDDPM(num_sampling_steps=8)
    last, first = count_calls(model.blocks[-1]), count_calls(model.blocks[0])
    out = sample(model, model_type, scheduler, cache)
    assert scheduler.model_calls == (computed_steps, 8)
    assert last == [2 * B] * computed_steps
    assert len(first) == (8 if cache["trigger"] == "first_block" else computed_steps)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, sample(model, model_type, scheduler))


def test_dpm_solver_and_frame_masks_skip_too():
    model = tiny("STDiT")
    solver = DPMSolver(num_sampling_steps=7)
    sample(model, "STDiT", solver, dict(type="residual", trigger="interval", every=2))
    assert solver.model_calls == (4, 7)  # 0, 2, 4, 6
    model = tiny("STDiT2")
    iddpm = IDDPM(num_sampling_steps=6)
    calls = count_calls(model.blocks[-1])
    every_2nd = dict(type="residual", trigger="interval", every=2)
    out = sample(model, "STDiT2", iddpm, every_2nd, torch.tensor([[0.0, 0.5]]))
    assert iddpm.model_calls == (4, 6) and len(calls) == 4  # 0, 2, 4, 5
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_a_skipped_step_is_embedders_plus_cached_residual_plus_final(model_type):
    model = tiny(model_type)
    y, _, mask, kwargs = conditions(model_type)
    kwargs = {"y": y, **({} if mask is None else {"mask": mask}), **(kwargs or {})}
    x0, x1 = torch.randn(2, B, 4, T, H, W, generator=torch.Generator().manual_seed(4))
    t0, t1 = torch.tensor([900] * B), torch.tensor([700] * B)
    cached = CountedModel(model, dict(type="residual", trigger="interval", every=2), num_steps=3)
    assert torch.equal(cached(x0, t0, **kwargs), model(x0, t0, **kwargs))  # a computed step is the forward
    skipped = cached(x1, t1, **kwargs)

    before, now = model.parts(x0, t0, **kwargs), model.parts(x1, t1, **kwargs)
    residual = before.run_blocks(before.tokens, 0, before.depth) - before.tokens
    assert torch.equal(skipped, now.final(now.tokens + residual))
    assert not torch.allclose(skipped, model(x1, t1, **kwargs), atol=1e-3)
    assert cached.computed == 1


class ToyModel:
    """parts() of a toy two-block model on tokens = x: block 0 doubles them (its residual is the tokens), block 1
    adds 1; the probe is the tokens; the final layer is the identity. Records the batch of every block call."""

    def __init__(self):
        self.blocks = []

    def parts(self, x, timestep):
        def run_blocks(h, start, stop):
            for i in range(start, stop):
                self.blocks.append((i, h.shape[0]))
                h = 2 * h if i == 0 else h + 1
            return h

        return ForwardParts(x, run_blocks, lambda h: h, lambda h: h, 2)


def run_toy(cache, values):
    """The toy's outputs for tokens of the given values, one step each, and the steps where block 1 ran."""
    toy = ToyModel()
    cached = CountedModel(toy, cache, len(values))
    outputs, computed = [], []
    for i, v in enumerate(values):
        ran = len(toy.blocks)
        outputs.append(cached(torch.full((1, 3), v), None))
        if (1, 1) in toy.blocks[ran:]:
            computed.append(i)
    assert cached.computed == len(computed)
    return computed, outputs


@pytest.mark.parametrize("trigger, computed", [("delta", [0, 2, 4, 6, 7]), ("first_block", [0, 5, 7])])
def test_triggers_on_known_changes(trigger, computed):
    """Relative changes 0.1, 0.091, 0.1, ...: delta accumulates them step to step (0.19 >= 0.15 computes);
    first_block compares with the last computed step (1.0 vs 1.1: 0.1, then 0), until the cap of 4 skips."""
    values = [1.0, 1.1, 1.0, 1.1, 1.0, 1.1, 1.0, 1.0]
    steps, outputs = run_toy(dict(type="residual", trigger=trigger, threshold=0.15), values)
    assert steps == computed
    # a skipped step: its tokens plus the residual of the last computed step (2 v + 1 - v = v + 1)
    last = {i: max(c for c in computed if c <= i) for i in range(len(values))}
    for i, out in enumerate(outputs):
        assert torch.allclose(out, torch.full((1, 3), values[i] + values[last[i]] + 1))


def test_guidance_halves_are_decided_together():
    """Only one half of the doubled batch changes (by 50%, 25% over the batch): both halves are computed."""
    cache = dict(type="residual", trigger="delta", threshold=0.2)
    toy = ToyModel()
    cached = CountedModel(toy, cache, 3)
    cached(torch.ones(2, 3), None)
    x = torch.tensor([[1.0] * 3, [1.5] * 3])
    assert torch.equal(cached(x, None), 2 * x + 1)
    assert cached.computed == 2 and toy.blocks[-1] == (1, 2)


# first_block's indicators in this run are 4.1, 2.3, 8.7, 2.2 and 270 (measured): 3.0 is far from each, so the
# one-process run and the sequence-parallel one decide alike despite their rounding differences.
SP_CACHE = dict(type="residual", trigger="first_block", threshold=3.0)


def sequence_parallel_worker(rank, world, out):
    from sora.parallel import init_sequence_parallel

    group = init_sequence_parallel(world)
    indicator = agreed(torch.tensor(float(rank + 1)), group)
    model = tiny("STDiT", enable_sequence_parallelism=True)
    scheduler = IDDPM(num_sampling_steps=6)
    y, y_null, mask, _ = conditions("STDiT")
    z = torch.randn(B, 4, T, H, W, generator=torch.Generator().manual_seed(2))
    latents = scheduler.sample(model, z, y, y_null, mask, progress=False, generator=torch.Generator().manual_seed(3),
                               model_kwargs={"sp_group": group},
                               cache=SP_CACHE)
    torch.save(dict(indicator=indicator, latents=latents, calls=scheduler.model_calls), f"{out}/rank{rank}.pt")


def test_sequence_parallel_ranks_decide_alike(tmp_path):
    """2 gloo ranks: the indicator is the group's maximum on every rank; cached sampling gives every rank the
    same latents and calls, those of one process."""
    from spawn import run

    run(sequence_parallel_worker, 2, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["indicator"] for r in results] == [2.0, 2.0]
    assert torch.equal(results[0]["latents"], results[1]["latents"])
    scheduler = IDDPM(num_sampling_steps=6)
    latents = sample(tiny("STDiT"), "STDiT", scheduler, SP_CACHE)
    assert results[0]["calls"] == results[1]["calls"] == scheduler.model_calls
    assert 1 < scheduler.model_calls[0] < 6
    torch.testing.assert_close(results[0]["latents"], latents, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache, message", [
    (dict(type="teacache"), "cache type must be 'residual', got 'teacache'"),
    (dict(type="residual", trigger="often"), "cache trigger must be one of delta, first_block, interval, got 'often'"),
    (dict(type="residual", threshold=-0.1), "cache threshold must be a finite number >= 0, got -0.1"),
    (dict(type="residual", threshold="0.1"), "cache threshold must be a finite number >= 0, got '0.1'"),
    (dict(type="residual", trigger="interval", every=0), "cache every must be an int >= 1 with trigger 'interval'"),
    (dict(type="residual", trigger="interval"), "cache every must be an int >= 1 with trigger 'interval', got None"),
    (dict(type="residual", every=3), "cache key 'every' is not one for trigger 'delta'"),
    (dict(type="residual", max_skips=-1), "cache max_skips must be an int >= 0, got -1"),
    ("residual", "cache must be None or a dict"),
])
def test_bad_settings_are_one_value_error(cache, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_cache(cache)
    with pytest.raises(ValueError, match="cache"):
        IDDPM(num_sampling_steps=2).sample(tiny("DiT"), torch.zeros(1, 4, 2, 4, 4), *conditions("DiT")[:2],
                                           progress=False, cache=cache)


SAMPLE_CONFIGS = sorted(glob.glob("configs/*/inference/*.py")) + ["configs/tiny/sample.py"]


@pytest.mark.parametrize("path", SAMPLE_CONFIGS)
def test_every_sampling_config_takes_the_cache_flags(path):
    assert parse_args([path], "sample").cache is None  # off unless asked
    cfg = parse_args([path, "--cache.type", "residual", "--cache.threshold", "0.1"], "sample")
    assert check_cache(cfg.cache) == dict(type="residual", trigger="delta", threshold=0.1, max_skips=4)
    cfg = parse_args([path, "--cache.type", "residual", "--cache.trigger", "interval", "--cache.every", "3"], "sample")
    assert check_cache(cfg.cache) == dict(type="residual", trigger="interval", every=3, max_skips=4)


@pytest.mark.parametrize("flags, message", [
    (["--cache.trigger", "often"], "error: cache trigger must be one of delta, first_block, interval, got 'often'."),
    (["--cache.threshold", "-1"], "error: cache threshold must be a finite number >= 0, got -1."),
    (["--cache.trigger", "interval", "--cache.every", "0"],
     "error: cache every must be an int >= 1 with trigger 'interval', got 0."),
    (["--compile", "true"], "error: cache and compile=True cannot be combined"),
])
def test_bad_cache_flags_exit_2_with_one_line(flags, message, tmp_path, monkeypatch):
    """Checked before any model is built."""

    def build_components(*args, **kwargs):
        raise AssertionError("a model was built before the cache settings were checked")

    monkeypatch.setattr(sora.sample, "build_components", build_components)
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        with pytest.raises(SystemExit) as exit_info:
            main(sora.sample.run, "sample", ["configs/tiny/sample.py", "--save-dir", str(tmp_path),
                                             "--cache.type", "residual", *flags])
    assert exit_info.value.code == 2
    assert stderr.getvalue().count("\n") == 1 and stderr.getvalue().startswith(message)


def test_a_trigger_without_threshold_gets_the_measured_one():
    """The thresholds that halved the model calls of the trained tiny STDiT (README.md's cache table)."""
    assert check_cache(dict(type="residual"))["threshold"] == 0.4
    assert check_cache(dict(type="residual", trigger="first_block"))["threshold"] == 0.16
