"""Write a bench run's summary.json as markdown tables and plots.

    python bench/report.py bench/results/<gpu-slug>/summary.json   # regenerate README.md and the plots beside it

write_report(summary, out_dir) writes out_dir/README.md (render_markdown: a header about the run, bench/gpu_check.py's
sections and correctness checks when the run was one, then one table per kernel bench and direction and one per
model bench) and the plots (kernel GB/s per provider, model samples/s per provider). Open-Sora's published figures
shown beside ours are data, in reference_figures.json next to this file; this module only renders. Standard
library and matplotlib only, so it runs without torch.
"""

import argparse
import json
import sys
from pathlib import Path

PROVIDER_ORDER = ["sora", "torch", "torch.compile", "apex", "liger", "sora+compile", "eager", "eager+compile"]

REFERENCE = json.loads((Path(__file__).resolve().parent / "reference_figures.json").read_text())
OPEN_SORA_COLUMN = REFERENCE["column"]
# (bench, shape) -> (samples/s, thousands of tokens/s, gradient checkpointing), as published.
OPEN_SORA_FIGURES = {
    (row["bench"], row["shape"]): (row["samples_per_s"], row["ktokens_per_s"], row["grad_checkpoint"])
    for row in REFERENCE["training"]
}
OPEN_SORA = {
    key: f"{samples:.2f} samples/s{' (GC)' if gc else ''}, {tokens}k tokens/s"
    for key, (samples, tokens, gc) in OPEN_SORA_FIGURES.items()
}
# The encoder table (STDiT with T5 and the VAE on the fly).
OPEN_SORA_ENCODERS = {
    row["shape"]: f"encoders: baseline {row['baseline']:.2f} / {row['faster_label']} {row['faster']:.2f} samples/s"
    + (f" ({row['note']})" if row["note"] else "")
    for row in REFERENCE["encoders"]
}
# The image table: DiT-XL/2 on 256x256 images, batch 128.
_IMAGES = REFERENCE["images"]["rows"]
OPEN_SORA_IMAGES = (" / ".join(f"{row['name']} {row['img_per_s']}" for row in _IMAGES)
                    + " img/s (" + " / ".join(f"{row['ktokens_per_s']}k" for row in _IMAGES) + " tokens/s)")
OPEN_SORA_IMAGES_BEST = float(max(row["img_per_s"] for row in _IMAGES))
# train_step_full rows name the model; Open-Sora's table names it by our bench of the same model.
MODEL_BENCH = {"STDiT-XL/2": "stdit_train", "PixArt-XL/2": "pixart_train"}

MODEL_TITLES = {
    "stdit_train": "STDiT-XL/2, training step",
    "pixart_train": "DiT (T5, full attention) = PixArt-XL/2, training step",
    "stdit_infer": "STDiT-XL/2, inference forward (torch.no_grad)",
    "temporal_branch": "STDiT-XL/2 temporal branch, fwd+bwd (sora: qkv Linear -> K.temporal_attention -> proj -> "
                       "K.gated_residual; eager: rearrange + contiguous -> qkv -> SDPA -> proj -> rearrange -> "
                       "x + gate * y)",
}
TRAIN_NOTE = (
    "One step = zero_grad + forward + MSE loss + backward on one GPU, bf16 weights and inputs, random weights, "
    "caption (B, 1, 120, 4096) with a padding mask. **The AdamW step is EXCLUDED**, and so are T5 and the VAE "
    "(random latents and captions). Open-Sora's figures are whole training steps on 8x H800 (their encoder table "
    "suggests on-the-fly T5/VAE encoding), so compare trends, not absolute values."
)
SPEEDUP_BASE = {"sora": "eager", "sora+compile": "eager+compile", "eager+compile": "eager"}

PIPELINE_TITLES = {
    "sampling_step": "STDiT-XL/2 sampling step (IDDPM, classifier-free guidance)",
    "t5_encode": "T5-v1.1-XXL encoder (random weights from its config)",
    "vae_decode": "SD VAE decode per frame (random weights from sd-vae-ft-ema's config)",
    "sample_e2e": "End-to-end sampling of one video: T5 encode + IDDPM steps + VAE decode",
}
PIPELINE_NOTES = {
    "sampling_step": "One IDDPM step timed through `IDDPM.sample` (several steps per call, divided): the model call "
                     "on the CFG-doubled batch, guidance and the posterior step. Random weights, model and captions "
                     "in the row's dtype (fp16: Open-Sora v1's inference dtype). sora: enable_layernorm_kernel=True; "
                     "eager: False; flash attention on in both.",
    "t5_encode": "`T5Encoder.encode`: tokenize (ByT5, file-less: the ids' values do not change the speed) + encoder "
                 "forward, padded to the row's token count.",
    "vae_decode": "`VideoAutoencoderKL.decode` of one call's frames, `micro_batch_size` frames per AutoencoderKL call.",
    "sample_e2e": "sora.sample.sample_videos, one prompt: T5 encode (bf16), IDDPM sampling with CFG (batch 1, the "
                  "model sees 2), VAE decode, video copied to the host (not written to a file). sora+compile: the model call under "
                  "torch.compile, as `python -m sora.sample --compile true`. Targets: sora faster than eager; "
                  "100 IDDPM steps at 16x256 under Open-Sora's published 5 s per sample (H800).",
}
TRAIN_TITLES = {
    "train_step": "STDiT-XL/2 training step: forward, backward, AdamW (bench/gpu_check.py)",
    "train_step_full": "Open-Sora's acceleration table on one GPU: full training step",
    "dit_image_train": "Open-Sora's image table on one GPU: DiT-XL/2 (class-conditioned) on 256x256 images",
    "latte_train": "Latte-XL/2 (class-conditioned), training step",
}
TRAIN_STEP_NOTE = (
    "One step = sora/train.py's single-process step, built from the same pieces: "
    "**IDDPM `training_losses` under bf16 autocast with fp32 master weights, backward, `clip_grad_norm_(1.0)`, "
    "the AdamW step (lr 2e-5, weight decay 0) and the fp32 EMA update are all INCLUDED**. Random weights, synthetic "
    "batches. `encoders` T5+VAE: raw videos (B, 3, T, H, W) already on the GPU and 120-token prompts are encoded on "
    "the fly by T5-v1.1-XXL (bf16) and the SD VAE (bf16, 32 frames per call); none: pre-encoded fp32 latents and "
    "bf16 captions (class ids for DiT/Latte). sora: enable_layernorm_kernel=True; eager: False; flash attention on in "
    "both. Open-Sora's figures are per GPU of 8x H800 (ZeRO-2, on-the-fly encoders), labelled as theirs."
)


# bench/gpu_check.py's step: sora.train.train_step, as `python -m sora.train` runs it on pre-encoded data.
GPU_CHECK_STEP_NOTE = (
    "One step = `sora.train.train_step`, the step `python -m sora.train` runs on pre-encoded data: the latent "
    "drawn from the posterior's (mean, std), IDDPM `training_losses` under bf16 autocast with fp32 master weights "
    "(fp32 on a CPU), backward, gradient clipping to 1.0, AdamW (lr 2e-5, weight decay 0; fused on CUDA), the "
    "fp32 EMA update (decay 0.9999), zero_grad; no encoders. Random weights, random latents and captions. "
    "sora: enable_layernorm_kernel=True; eager: False; flash attention on in both."
)


def providers_of(rows):
    names = {row["provider"] for row in rows}
    return [p for p in PROVIDER_ORDER if p in names] + sorted(names - set(PROVIDER_ORDER))


def unique(values):
    return list(dict.fromkeys(values))


def fmt(value, digits=3):
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def cell_skip(row):
    return f"skipped: {row['skipped']}"


def shape_text(shape):
    return " x ".join(str(n) for n in shape) if isinstance(shape, (list, tuple)) else str(shape)


# ---- markdown ------------------------------------------------------------------------------------------
def header(summary):
    device = summary.get("device") or {}
    details = ", ".join(
        text
        for text in (
            f"{device['sm_count']} SMs" if device.get("sm_count") else None,
            f"{device['memory_gb']} GB" if device.get("memory_gb") else None,
            f"L2 {device['l2_mb']} MB" if device.get("l2_mb") else None,
            f"driver {device['driver']}" if device.get("driver") else None,
        )
        if text
    )
    clocks = summary.get("clocks")
    clock_text = (
        f"SM {clocks['sm_mhz']} MHz (max {clocks['sm_max_mhz']}), memory {clocks['mem_mhz']} MHz (max {clocks['mem_max_mhz']}), "
        "read after the copy-bandwidth run"
        if clocks
        else "not read"
    )
    lines = [
        f"# Benchmark results: {device.get('name', 'unknown device')}",
        "",
        "Generated by `bench/report.py` from `summary.json` (written by `pytest bench/ --benchmark` or `bench/gpu_check.py`); "
        "do not edit by hand.",
        "",
    ]
    if summary.get("smoke"):
        lines += [
            "**CPU smoke run: GPU rows skipped (no CUDA device). These tiny-shape wall-clock numbers exercise the "
            "harness; they are not results.**",
            "",
        ]
    lines += [
        "| run | |",
        "| --- | --- |",
        f"| device | {device.get('name', '?')}{' (' + details + ')' if details else ''} |",
        f"| clocks | {clock_text} |",
        f"| torch / triton / CUDA | {summary.get('torch')} / {summary.get('triton')} / {summary.get('cuda')} |",
        f"| commit | `{summary.get('commit')}` |",
        f"| date (UTC) | {summary.get('date')} |",
        f"| copy bandwidth | {fmt(summary.get('copy_bandwidth_gbps'))} GB/s (device-to-device copy, bytes read + written, median) |",
        f"| timing | {summary.get('timing')} |",
    ]
    runs = summary.get("runs") or []
    if len(runs) > 1:
        merged = "; ".join(f"`{run.get('commit')}` {run.get('date')} ({run.get('rows')} rows)" for run in runs)
        lines.append(f"| merged runs | {merged} |")
    return lines


def kernel_cell(row):
    if row.get("ms") is None:
        return cell_skip(row)
    return f"{row['ms']:.3f} ms<br>{fmt(row['gbps'])} GB/s ({100 * row['frac_copy_bw']:.0f}%)"


def ratio(rows_by_provider, numerator, denominator):
    """How many times faster `numerator` ran than `denominator` (time ratio), or "-"."""
    a, b = rows_by_provider.get(numerator), rows_by_provider.get(denominator)
    if not a or not b or a.get("ms") is None or b.get("ms") is None:
        return "-"
    return f"{b['ms'] / a['ms']:.2f}x"


def kernel_tables(rows):
    lines = [
        "## Kernels",
        "",
        "Each cell: median time, achieved bandwidth from the *minimum* bytes the op must move (formulas in "
        "`bench/NOTES.md`), and that as a share of the measured copy bandwidth. `torch` is eager PyTorch "
        "(Open-Sora v1 with the kernels off); `torch.compile` is the same function under default inductor; apex and "
        "liger are their LayerNorm + eager modulate. Speedups are time ratios. The sora forward output's relative "
        "error ||out - ref|| / ||ref|| is against the fp32 eager reference.",
        "",
    ]
    for bench in unique(row["bench"] for row in rows):
        for direction in unique(row["direction"] for row in rows if row["bench"] == bench):
            group = [row for row in rows if row["bench"] == bench and row["direction"] == direction]
            providers = providers_of(group)
            columns = ["shape (B, N, C)", "video", "T", "dtype", *providers, "sora vs torch", "sora vs torch.compile",
                       "sora rel. error"]
            lines += [f"### {bench}, {direction}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            for key in unique((json.dumps(row["shape"]), row["dtype"]) for row in group):
                cases = {row["provider"]: row for row in group if (json.dumps(row["shape"]), row["dtype"]) == key}
                first = next(iter(cases.values()))
                cells = [shape_text(first["shape"]), str(first.get("video", "")), str(first.get("T", "")), first["dtype"]]
                cells += [kernel_cell(cases[p]) if p in cases else "-" for p in providers]
                cells += [ratio(cases, "sora", "torch"), ratio(cases, "sora", "torch.compile")]
                cells.append(f"{cases['sora']['rel_err']:.1e}" if cases.get("sora", {}).get("rel_err") is not None else "-")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def model_tables(rows):
    lines = ["## Models", ""]
    for bench in unique(row["bench"] for row in rows):
        group = [row for row in rows if row["bench"] == bench]
        lines += [f"### {MODEL_TITLES.get(bench, bench)} (`{bench}`)", ""]
        if bench in ("stdit_train", "pixart_train"):
            lines += [TRAIN_NOTE, ""]
        compile_modes = unique(row["compile_mode"] for row in group if row.get("compile_mode"))
        if compile_modes:
            lines += [f"torch.compile applied to: {', '.join(compile_modes)} (SORA_BENCH_COMPILE).", ""]
        reference = bench in ("stdit_train", "pixart_train")
        columns = ["shape", "provider", "batch", "ms / step", "samples/s", "tokens/s", "peak GB", "speedup"]
        if bench == "temporal_branch":
            columns = ["shape", "provider", "batch", "ms", "tokens/s", "speedup"]
        if reference:
            columns.append(OPEN_SORA_COLUMN)
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for shape in unique(row["shape"] for row in group):
            at_shape = [row for row in group if row["shape"] == shape]
            measured = {row["provider"]: row for row in at_shape if row.get("ms") is not None}
            for row in sorted(at_shape, key=lambda r: (providers_of(at_shape).index(r["provider"]), -r["batch_size"])):
                provider = row["provider"]
                base = "eager" if bench == "temporal_branch" and provider == "sora" else SPEEDUP_BASE.get(provider)
                speedup = "-"
                if row.get("ms") is not None and base in measured:
                    speedup = f"{row['samples_per_s'] / measured[base]['samples_per_s']:.2f}x vs {base}"
                if row.get("ms") is None:
                    numbers = [cell_skip(row)] + ["-"] * (len(columns) - 5 - reference)
                elif bench == "temporal_branch":
                    numbers = [f"{row['ms']:.2f}", fmt(row["tokens_per_s"])]
                else:
                    numbers = [f"{row['ms']:.1f}", fmt(row["samples_per_s"]), fmt(row["tokens_per_s"]), fmt(row.get("peak_mem_gb"))]
                cells = [shape, provider, str(row["batch_size"]), *numbers, speedup]
                if reference:
                    cells.append(OPEN_SORA.get((bench, shape), "-"))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# ---- communication, pipeline and training tables ------------------------------------------------------
def table(columns, body):
    """A markdown table: a header row and one row per list of cells."""
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)] + [
        "| " + " | ".join(cells) + " |" for cells in body
    ]


def numbers_or_skip(row, width, numbers):
    """The row's `width` number cells (numbers(), called only for a measured row), or its skip reason and dashes."""
    if row.get("ms") is None:
        return [cell_skip(row)] + ["-"] * (width - 1)
    return numbers()


def gb(value):
    return fmt(value / 1e9 if value is not None else None)


def mb(value):
    return fmt(value / 1e6 if value is not None else None)


def rate_ratio(row, base, key):
    """How many times `row`'s rate (key: samples_per_s, ...) is `base`'s, or "-"."""
    if not base or row.get(key) is None or base.get(key) is None:
        return "-"
    return f"{row[key] / base[key]:.2f}x"


def measured_by(rows, *fields):
    """{(fields..., provider): the measured row}: the batch that ran, where a larger one ran out of memory."""
    return {tuple(row.get(f) for f in fields) + (row["provider"],): row for row in rows if row.get("ms") is not None}


def comm_tables(rows):
    lines = ["## Sequence-parallel communication", ""]
    packs = [row for row in rows if row["bench"] == "all_to_all_pack"]
    if packs:
        lines += [
            "### The permutes around `all_to_all_single` in STDiT-XL/2's temporal attention (`all_to_all_pack`)",
            "",
            "On one GPU: the pack before and the unpack after the exchange of each rank's qkv (B*S, T/sp, 3, H, D) "
            "(scatter heads, gather frames) and attention output (B*S, T, H/sp, D) (scatter frames, gather heads), "
            "H=16, D=72 on a GPU; the backward runs the same permutes transposed. "
            "view: the swap (A, B, M) -> (B, A, M). "
            "batch = sp x the single-GPU training batch (each rank holds T/sp frames). Cell: median time, GB/s "
            "counting the tensor read and written once, and that as a share of the measured copy bandwidth. "
            "sora: the Triton kernel as `_exchange` calls it; torch: `view(A, B, M).transpose(0, 1).contiguous()`. "
            "exact: sora's output equals torch's bit for bit. **Target: sora >= 80% of copy bandwidth.**",
            "",
        ]
        body = []
        keys = unique((r["video"], r["sp"], r["exchange"], r["direction"]) for r in packs)
        for key in keys:
            cases = {r["provider"]: r for r in packs if (r["video"], r["sp"], r["exchange"], r["direction"]) == key}
            first = next(iter(cases.values()))
            sora = cases.get("sora", {})
            exact = "-" if sora.get("exact") is None else ("yes" if sora["exact"] else "**NO**")
            tensor_bytes = next((r["bytes"] / 2 for r in cases.values() if r.get("bytes")), None)  # bytes: read + write
            body.append([first["video"], str(first["sp"]), first["exchange"], first["direction"],
                         shape_text(first["shape"]), str(first["batch_size"]), mb(tensor_bytes),
                         *(kernel_cell(cases[p]) if p in cases else "-" for p in ("sora", "torch")),
                         ratio(cases, "sora", "torch"), exact])
        lines += table(["video", "sp", "exchange", "direction", "view (A, B, M)", "batch", "tensor MB", "sora", "torch",
                        "sora vs torch", "exact"], body) + [""]
    volumes = [row for row in rows if row["bench"] == "all_to_all_volume"]
    if volumes:
        link = volumes[0].get("link_gbps_assumed")
        lines += [
            "### All-to-all volume per rank (`all_to_all_volume`): computed, not timed",
            "",
            "Bytes one rank sends to the others for one sample of bf16 STDiT-XL/2 split over sp ranks by frames "
            "(the (sp-1)/sp of each tensor that leaves the rank): per layer, the forward's two exchanges (qkv and "
            "output); backward sends the same again; gradient checkpointing recomputes the forward's. Per step: x "
            f"{volumes[0].get('depth')} layers. The last columns divide by an **assumed** {fmt(link)} GB/s per "
            "direction per GPU (H100 NVLink 4 datasheet, not a measurement; achieved all-to-all bandwidth is lower). "
            "Formulas: bench/NOTES.md.",
            "",
        ]
        body = [[r["video"], str(r["sp"]), fmt(r["tokens_per_rank"]), mb(r["qkv_send_bytes"]), mb(r["out_send_bytes"]),
                 mb(r["layer_fwd_bytes"]), gb(r["step_bytes"]), gb(r["step_bytes_gc"]), fmt(r["step_comm_ms"]),
                 fmt(r["step_comm_ms_gc"])] for r in volumes]
        lines += table(["video", "sp", "tokens per rank", "qkv MB", "output MB", "per layer fwd MB (= bwd)",
                        "per step GB (fwd+bwd)", "per step GB with GC", f"ms per step at {fmt(link)} GB/s (assumed)",
                        "with GC"], body) + [""]
    return lines


def pipeline_tables(rows):
    lines = ["## Sampling pipeline", ""]
    for bench in unique(row["bench"] for row in rows):
        group = [row for row in rows if row["bench"] == bench]
        lines += [f"### {PIPELINE_TITLES.get(bench, bench)} (`{bench}`)", "", PIPELINE_NOTES.get(bench, ""), ""]
        eager = measured_by(group, "shape", "batch_size")
        body = []
        for row in group:
            base = eager.get((row["shape"], row["batch_size"], "eager")) if row["provider"].startswith("sora") else None
            versus = "-" if base is None or row.get("ms") is None else f"{base['ms'] / row['ms']:.2f}x vs eager"
            if bench == "sampling_step":
                columns = ["shape", "provider", "prompts (model batch)", "dtype", "ms / step", "steps per timed call",
                           "speedup"]
                cells = numbers_or_skip(row, 2, lambda: [f"{row['ms']:.1f}", str(row["steps_per_call"])])
                body.append([row["shape"], row["provider"], f"{row['batch_size']} ({row['model_batch']})", row["dtype"],
                             *cells, versus])
            elif bench == "t5_encode":
                columns = ["model", "tokens", "batch", "dtype", "ms", "prompts/s", "tokens/s", "peak GB"]
                cells = numbers_or_skip(row, 4, lambda: [f"{row['ms']:.1f}", fmt(row["prompts_per_s"]),
                                                         fmt(row["tokens_per_s"]), fmt(row.get("peak_mem_gb"))])
                body.append([row["model"], row["shape"], str(row["batch_size"]), row["dtype"], *cells])
            elif bench == "vae_decode":
                columns = ["resolution", "micro-batch (frames)", "frames per call", "dtype", "ms", "frames/s",
                           "peak GB"]
                cells = numbers_or_skip(row, 3, lambda: [f"{row['ms']:.1f}", fmt(row["frames_per_s"]),
                                                         fmt(row.get("peak_mem_gb"))])
                body.append([row["shape"], str(row["micro_batch_size"]), str(row["batch_size"]), row["dtype"], *cells])
            else:
                columns = ["shape", "provider", "steps", "dtype", "s / video", "peak GB", "speedup"]
                cells = numbers_or_skip(row, 2, lambda: [f"{row['s_per_video']:.2f}", fmt(row.get("peak_mem_gb"))])
                body.append([row["shape"], row["provider"], str(row["steps"]), row["dtype"], *cells, versus])
        lines += table(columns, body) + [""]
    return lines


OPTIMIZER_TARGET = 0.7  # issue 12: optimizer_step moves its bytes at >= 70% of the copy bandwidth
OPTIMIZER_NOTE = (
    "`sora.train.optimizer_step`, what follows a training step's backward: gradient clipping (foreach), AdamW "
    "(fused on CUDA, foreach elsewhere), the fp32 EMA's foreach lerp, over every parameter with fp32 master "
    "weights, gradients and EMA. GB/s counts the bytes it must move (bytes / param, from its docstring) over "
    f"the measured time; target: at least {OPTIMIZER_TARGET:.0%} of the copy bandwidth."
)


def optimizer_tables(rows):
    lines = ["## Optimizer step (`optimizer_step`)", "", OPTIMIZER_NOTE, ""]
    body = []
    for row in rows:
        cells = numbers_or_skip(row, 4, lambda: [f"{row['ms']:.2f}", fmt(row["gbps"]), f"{row['frac_copy_bw']:.0%}",
                                                 "met" if row["frac_copy_bw"] >= OPTIMIZER_TARGET else "not met"])
        body.append([row.get("model", "-"), row.get("optimizer", "-"), row.get("dtype", "-"), mb(row.get("params")),
                     str(row.get("bytes_per_param", "-")), *cells])
    columns = ["model", "optimizer", "dtype", "params (M)", "bytes / param", "ms", "GB/s", "share of copy",
               f"target >= {OPTIMIZER_TARGET:.0%}"]
    return lines + table(columns, body) + [""]


def train_targets(rows):
    """The issue's target: STDiT-XL/2 16x256 full step (T5+VAE on the fly), sora >= 1.3x Open-Sora's 7.00
    samples/s and >= 1.2x eager in the same run. Shown, not asserted."""
    theirs = OPEN_SORA_FIGURES[("stdit_train", "16x256x256")][0]
    measured = measured_by(rows, "model", "shape", "encoders")
    body = []
    for encoders in ("T5+VAE", "none"):
        sora = measured.get(("STDiT-XL/2", "16x256x256", encoders, "sora"))
        eager = measured.get(("STDiT-XL/2", "16x256x256", encoders, "eager"))
        ours = fmt(sora["samples_per_s"]) if sora else "-"
        vs_theirs = f"{sora['samples_per_s'] / theirs:.2f}x" if sora else "-"
        body.append([f"STDiT-XL/2 16x256x256, encoders {encoders}", ours, f"{vs_theirs} (goal >= 1.3x)",
                     f"{rate_ratio(sora or {}, eager, 'samples_per_s')} (goal >= 1.2x)"])
    return [
        f"Target (the issue): the full step with encoders, sora, >= 1.3x Open-Sora's {theirs:.2f} samples/s/GPU and "
        ">= 1.2x eager in the same run. Read off, not asserted; the pre-encoded row is shown for comparison.",
        "",
        *table(["STDiT-XL/2 step", "sora samples/s", "sora / Open-Sora's 7.00", "sora / eager"], body),
        "",
    ]


def train_tables(rows):
    benches = unique(row["bench"] for row in rows)
    lines = ["## Training", ""]
    if set(benches) - {"train_step"}:
        lines += [TRAIN_STEP_NOTE, ""]
    for bench in benches:
        group = [row for row in rows if row["bench"] == bench]
        lines += [f"### {TRAIN_TITLES.get(bench, bench)} (`{bench}`)", ""]
        if bench == "train_step":
            lines += [GPU_CHECK_STEP_NOTE, ""]
        compile_modes = unique(row["compile_mode"] for row in group if row.get("compile_mode"))
        if compile_modes:
            lines += [f"torch.compile applied to: {', '.join(compile_modes)} (SORA_BENCH_COMPILE).", ""]
        measured = measured_by(group, "model", "shape", "encoders")
        body = []
        for row in group:
            base = measured.get((row.get("model"), row["shape"], row.get("encoders"), "eager"))
            versus = "-" if row["provider"] == "eager" else rate_ratio(row, base, "samples_per_s")
            cells = numbers_or_skip(row, 5, lambda: [f"{row['ms']:.1f}", fmt(row["samples_per_s"]),
                                                     fmt(row["tokens_per_s"]), fmt(row.get("peak_mem_gb")), versus])
            if bench == "train_step_full":
                figures = OPEN_SORA_FIGURES.get((MODEL_BENCH.get(row.get("model")), row["shape"]))
                theirs = OPEN_SORA.get((MODEL_BENCH.get(row.get("model")), row["shape"]), "-")
                stdit_encoders = row.get("encoders") == "T5+VAE" and row.get("model") == "STDiT-XL/2"
                if stdit_encoders and row["shape"] in OPEN_SORA_ENCODERS:
                    theirs += "; " + OPEN_SORA_ENCODERS[row["shape"]]
                vs_theirs = rate_ratio(row, {"samples_per_s": figures[0]} if figures else None, "samples_per_s")
                columns = ["model", "shape", "encoders", "provider", "batch", "ms / step", "samples/s", "tokens/s",
                           "peak GB", "vs eager", "ours / theirs", OPEN_SORA_COLUMN]
                shape = row["shape"] + (" (GC)" if row.get("grad_checkpoint") else "")
                body.append([row["model"], shape, row["encoders"], row["provider"], str(row["batch_size"]),
                             *cells, vs_theirs, theirs])
            elif bench == "dit_image_train":
                theirs = row.get("model") == "DiT-XL/2" and row["shape"] == "1x256x256"
                best = {"samples_per_s": OPEN_SORA_IMAGES_BEST} if theirs else None
                vs_theirs = rate_ratio(row, best, "samples_per_s")
                columns = ["model", "images", "provider", "batch", "ms / step", "img/s", "tokens/s", "peak GB",
                           "vs eager", "ours / Open-Sora's 175", OPEN_SORA_COLUMN]
                body.append([row["model"], row["shape"], row["provider"], str(row["batch_size"]), *cells, vs_theirs,
                             OPEN_SORA_IMAGES if theirs else "-"])
            else:
                columns = ["model", "shape", "provider", "batch", "ms / step", "samples/s", "tokens/s", "peak GB",
                           "vs eager"]
                body.append([row["model"], row["shape"], row["provider"], str(row["batch_size"]), *cells])
        lines += table(columns, body) + [""]
        if bench == "train_step_full":
            lines += train_targets(group)
    return lines


# ---- bench/gpu_check.py: its sections and correctness checks ---------------------------------------------
def share_of_tolerance(entry):
    """A check's error over its tolerance (the error itself for exact checks); infinite for NaN or infinity."""
    if entry["err"] is None:
        return float("inf")
    return entry["err"] / entry["tol"] if entry["tol"] else entry["err"]


def gpu_check_tables(check):
    """What the one-call GPU check did: each section's outcome, the correctness checks per op (worst error as a
    share of its tolerance), and every failure by name."""
    lines = [
        "## GPU check (`bench/gpu_check.py`)",
        "",
        f"Deadline {fmt(check.get('deadline_s'))} s, took {fmt(check.get('elapsed_s'))} s; exit code "
        f"{check.get('exit_code')}.",
        "",
        *table(["section", "outcome", "s"], [[name, outcome["status"], fmt(outcome.get("seconds"))]
                                            for name, outcome in check.get("sections", {}).items()]),
        "",
    ]
    checks = check.get("checks", [])
    if checks:
        body = []
        for op in unique(entry["op"] for entry in checks):
            group = [entry for entry in checks if entry["op"] == op]
            worst = max(group, key=share_of_tolerance)
            failed = sum(1 for entry in group if not entry["ok"])
            error = "not finite" if worst["err"] is None else f"{worst['err']:.1e}"
            body.append([op, str(len(group)), str(failed) if not failed else f"**{failed}**",
                         f"{error} / {worst['tol']:.0e} ({worst['name']})"])
        lines += [
            "Correctness on this device: forward and every gradient of each public op against a float64 reference "
            "(relative error ||out - ref|| / ||ref||, per-dtype tolerance); permutations and kernels on/off exact or "
            "to the tolerance shown.",
            "",
            *table(["op", "checks", "failed", "worst error / tolerance (check)"], body),
            "",
        ]
    failures = check.get("failures", [])
    if failures:
        lines += ["**Failures:**", "", *(f"- {failure}" for failure in failures), ""]
    return lines


def render_markdown(summary) -> str:
    """README.md's text: the run header, then the kernel, model, communication, pipeline, training and optimizer tables
    (a document others can quote)."""
    rows = summary.get("rows", [])
    suites = {name: [row for row in rows if row.get("suite") == name]
              for name in ("kernels", "models", "comm", "pipeline", "train", "optimizer")}
    lines = header(summary) + [""]
    if summary.get("gpu_check"):
        lines += gpu_check_tables(summary["gpu_check"])
    if suites["kernels"]:
        lines += kernel_tables(suites["kernels"]) + ["![GB/s per provider](kernels_gbps.png)", ""]
    if suites["models"]:
        lines += model_tables(suites["models"]) + ["![samples/s per provider, relative to eager](models_samples.png)", ""]
    if suites["comm"]:
        lines += comm_tables(suites["comm"])
    if suites["pipeline"]:
        lines += pipeline_tables(suites["pipeline"])
    if suites["train"]:
        lines += train_tables(suites["train"])
    if suites["optimizer"]:
        lines += optimizer_tables(suites["optimizer"])
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------------
def bar_groups(ax, labels, providers, value_of):
    width = 0.8 / max(len(providers), 1)
    for i, provider in enumerate(providers):
        values = [value_of(label, provider) for label in labels]
        positions = [x + (i - (len(providers) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(positions, [v or 0 for v in values], width, label=provider)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)


def plot_kernels(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in summary["rows"] if row.get("suite") == "kernels"]
    benches = unique(row["bench"] for row in rows)
    fig, axes = plt.subplots(len(benches), 1, figsize=(14, 3.6 * len(benches)), squeeze=False)
    for ax, bench in zip(axes[:, 0], benches):
        group = [row for row in rows if row["bench"] == bench]
        label = lambda row: f"{row['direction']} {shape_text(row['shape'])} {row['dtype']}"  # noqa: E731
        labels = unique(label(row) for row in group)
        gbps = {(label(row), row["provider"]): row.get("gbps") for row in group if row.get("ms") is not None}
        bar_groups(ax, labels, providers_of(group), lambda case, provider: gbps.get((case, provider)))
        if summary.get("copy_bandwidth_gbps"):
            ax.axhline(summary["copy_bandwidth_gbps"], color="black", linestyle="--", linewidth=1, label="copy bandwidth")
        ax.set_title(bench)
        ax.set_ylabel("GB/s (minimum bytes)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{summary.get('device', {}).get('name', '')}: achieved bandwidth per provider (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_models(summary, path):
    """Each provider's samples/s relative to eager at the same shape (shapes differ by 100x in absolute terms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in summary["rows"] if row.get("suite") == "models"]
    benches = unique(row["bench"] for row in rows)
    fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 4), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        group = [row for row in rows if row["bench"] == bench]
        rate = {}
        for row in group:  # the first measured batch size per (shape, provider), the largest that ran
            if row.get("ms") is not None:
                rate.setdefault((row["shape"], row["provider"]), row["samples_per_s"])

        def relative(shape, provider):
            eager = rate.get((shape, "eager"))
            value = rate.get((shape, provider))
            return value / eager if value and eager else None

        bar_groups(ax, unique(row["shape"] for row in group), providers_of(group), relative)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_title(bench, fontsize=9)
        ax.set_ylabel("samples/s relative to eager")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(summary: dict, out_dir) -> list[Path]:
    """README.md and the plots for summary in out_dir; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    readme = out_dir / "README.md"
    readme.write_text(render_markdown(summary))
    written = [readme]
    rows = summary.get("rows", [])
    if any(row.get("suite") == "kernels" for row in rows):
        plot_kernels(summary, out_dir / "kernels_gbps.png")
        written.append(out_dir / "kernels_gbps.png")
    if any(row.get("suite") == "models" for row in rows):
        plot_models(summary, out_dir / "models_samples.png")
        written.append(out_dir / "models_samples.png")
    return written


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit code 2, as every sora command line fails."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def main(argv=None):
    parser = OneLineParser(prog="python bench/report.py",
                     description="Regenerate README.md and the plots beside a bench run's summary.json.")
    parser.add_argument("summary", type=Path, help="a summary.json written by the bench, e.g. "
                        "bench/results/<gpu-slug>/summary.json")
    path = parser.parse_args(argv).summary
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"python bench/report.py: cannot read {path} as a bench summary.json ({error})", file=sys.stderr)
        return 2
    for written in write_report(summary, path.parent):
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
