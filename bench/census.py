"""Byte census: KiB per token per block that the non-matmul ops of one forward move, counted at the dispatcher.

    python bench/census.py [--latent 16x30x54] [--ops N]

Every aten op's tensor inputs and outputs but matmuls, attention cores, views and allocations; a sora custom op's
once, on meta tensors, the blocks only. bench/NOTES.md, "Byte census", says what is counted and why.
"""

import collections
import contextlib
import re
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's sora; Open-Sora v1.1's block, the reference

import stdit2_reference  # noqa: E402
from bench.report import OneLineParser, table as markdown_table  # noqa: E402
from sora.kernels import _common  # noqa: E402
from sora.models import build_model  # noqa: E402
from sora.models.stdit2 import XL_2  # noqa: E402

aten = torch.ops.aten
UNCOUNTED = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
             aten._unsafe_view.default, aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
             aten.new_empty.default}
XL = dict(XL_2, caption_channels=4096)
SHAPE = dict(frames=16, height=30, width=54, batch=2, caption=200)  # 16x240x426 video: 15x27 patches; CFG batch
# (model, kernels, x_mask, target in KiB per token per block)
ROWS = [("STDiT", False, False, None), ("STDiT", True, False, None), ("STDiT2", False, False, None),
        ("STDiT2", True, False, 90), ("STDiT2", False, True, None), ("STDiT2", True, True, 100),
        ("Open-Sora STDiT2", False, False, None), ("Open-Sora STDiT2", False, True, None)]


def tensor_bytes(t, read):
    return t.element_size() * torch.Size(1 if read and not st else n for n, st in zip(t.shape, t.stride())).numel()


class Census(TorchDispatchMode):
    """Bytes moved by op name (aten.add, sora.qk_norm, ...)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.paused = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if outputs and not self.paused and not func.is_view and func not in UNCOUNTED:
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            moved = sum(tensor_bytes(t, True) for t in inputs) + sum(tensor_bytes(t, False) for t in outputs)
            self.bytes[str(func.overloadpacket)] += moved
        return out

    @contextlib.contextmanager
    def pause(self):  # also a decorator
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


class AttentionCores(TorchFunctionMode):
    def __init__(self, census):
        super().__init__()
        self.census = census

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        with self.census.pause():
            return func(*args, **(kwargs or {})).transpose(1, 2).contiguous().transpose(1, 2)


@contextlib.contextmanager
def counting():
    """A Census of what runs inside, where the sora kernels take their custom ops on meta tensors (fake impls)."""
    census, gpu_path = Census(), _common.use_triton
    with contextlib.ExitStack() as stack, census, AttentionCores(census):
        for name, module in list(sys.modules.items()):
            if name.startswith("sora.kernels") and getattr(module, "use_triton", None) is gpu_path:
                stack.enter_context(mock.patch.object(module, "use_triton", lambda x: x.is_meta or gpu_path(x)))
        yield census


def census(model, kernels=False, x_mask=False, arch=XL, shape=SHAPE):
    """The blocks of one forward of model ("STDiT", "STDiT2" or "Open-Sora STDiT2"): (Census, tokens x depth)."""
    frames, height, width, batch, length = (shape[k] for k in ("frames", "height", "width", "batch", "caption"))
    depth, v11, bf16 = arch["depth"], model.endswith("STDiT2"), torch.bfloat16
    with torch.device("meta"), torch.no_grad():
        net = build_model(dict(type=model.removeprefix("Open-Sora "), enable_layernorm_kernel=kernels, **arch,
                               **({} if v11 else dict(input_size=(frames, height, width))))).to("meta", bf16).eval()
        inputs = (torch.empty(batch, 4, frames, height, width, dtype=bf16), torch.full((batch,), 500.0),
                  torch.empty(batch, 1, length, arch["caption_channels"], dtype=bf16))
        if v11:
            mask = torch.ones(batch, frames, dtype=torch.bool) if x_mask else None
            inputs += (None, mask, frames, 8 * height, 8 * width, height / width, 24)
        with counting() as counted:
            if model != "Open-Sora STDiT2":
                parts = counted.pause()(net.parts)(*inputs)  # the embedders count nothing
                return counted, parts.run_blocks(parts.tokens, 0, depth).shape[:2].numel() * depth
            x, y, _, cond = counted.pause()(net.embed)(*inputs)
            ref, weights, (T, H, W) = stdit2_reference, net.state_dict(), cond.grid
            cfg = dict(num_heads=arch["num_heads"], qk_norm=True, qk_norm_legacy=True)
            rows = (cond.spatial, cond.temporal, [length] * batch, cond.x_mask, cond.spatial_zero, cond.temporal_zero)
            with mock.patch.object(ref, "_linear", lambda P, n, h: F.linear(h, P[n + ".weight"], P[n + ".bias"])), \
                    mock.patch.object(ref, "_cross_attention", counted.pause()(ref._cross_attention)):
                for i in range(depth):
                    x = ref._block(weights, f"blocks.{i}", x, y.view(1, -1, y.shape[-1]), *rows, T, H * W, cfg,
                                   fp32_casts=True, flash=True)  # spatial attention a core: their flash-attn
            return counted, x.shape[:2].numel() * depth


def table(shape=SHAPE, ops=0):
    """The census of ROWS as markdown lines; ops > 0 adds the ops of each row that move the most."""
    body = []
    for model, kernels, x_mask, target in ROWS:
        counted, count = census(model, kernels, x_mask, shape=shape)
        kib = {name: moved / count / 1024 for name, moved in counted.bytes.most_common()}
        top = ", ".join(f"{name} {value:.1f}" for name, value in list(kib.items())[:ops])
        body.append([model, "on" if kernels else "off", "yes" if x_mask else "no", f"{sum(kib.values()):.1f}",
                     str(target or "")] + [top] * bool(ops))
    columns = ["model", "kernels", "x_mask", "KiB", "target"] + ["ops that move the most, KiB"] * bool(ops)
    return ["bf16, XL (C=1152, 16 heads, 28 blocks), latent {frames}x{height}x{width}, batch {batch}, {caption} "
            "caption tokens; KiB per token per block".format(**shape), "", *markdown_table(columns, body)]


def main(argv=None):
    parser = OneLineParser(prog="python bench/census.py", description=__doc__.splitlines()[0])
    parser.add_argument("--latent", default="16x30x54", help="latent frames x height x width, height and width even")
    parser.add_argument("--ops", type=int, default=0, help="also list the N ops of each row that move the most")
    args = parser.parse_args(argv)
    size = re.fullmatch(r"([1-9]\d*)x([1-9]\d*)x([1-9]\d*)", args.latent)
    if size is None or int(size[2]) % 2 or int(size[3]) % 2 or args.ops < 0:
        parser.error(f"--latent must be FxHxW (H and W even), --ops 0 or more; got {args.latent!r}, {args.ops}")
    print("\n".join(table({**SHAPE, **dict(zip(("frames", "height", "width"), map(int, size.groups())))}, args.ops)))


if __name__ == "__main__":
    main()
