"""What the kernels cost on a Hopper GPU, read on a CPU: every launch of CASES, captured while Triton's driver is an
sm_90 stand-in, compiled ahead of time (never run) with Triton's own ptxas, and its SASS read (bench/NOTES.md,
"Kernel report", says what each column means).

    python bench/kernel_report.py [-k SUBSTRING ...] [--json FILE]
"""

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels: must be set before triton decorates anything
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default today, without its warning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import sora.kernels as K  # noqa: E402
from bench.bench_utils import DTYPES  # noqa: E402
from bench.report import OneLineParser, table as markdown_table  # noqa: E402
from sora.kernels import _common, comm  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)  # (backend, compute capability, warp size), as the CUDA driver reports it
# Hopper SXM: 132 SMs issuing 4 warp-instructions per clock each, at a clock between base and boost (NVIDIA's specs).
SMS, ISSUE_PER_CLOCK, CLOCKS_GHZ = 132, 4, (1.755, 1.98)
REGISTERS_PER_SM, WARPS_PER_SM, SHARED_PER_SM, H100_SHARED_PER_BLOCK = 65536, 64, 228 * 1024, 227 * 1024
COPY_TBS = {"H100": 3.0, "H200": 4.3}  # copy rates the targets are set against (datasheet-level, not measured here)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def resources(cubin: bytes) -> dict:
    """REG, STACK, LOCAL, SHARED of the one kernel in a cubin, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([BIN / "cuobjdump", "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", usage)}


def _load_binary(name, cubin, shared, device):
    usage = resources(cubin)
    return None, None, usage["REG"], usage["STACK"] + usage["LOCAL"], 1024


# Enough of a Triton driver to compile for sm_90 without a GPU and read a kernel's registers (one_wave).
SM90_DRIVER = SimpleNamespace(
    launcher_cls=lambda src, metadata: None, get_current_device=lambda: 0, get_current_stream=lambda device: 0,
    get_current_target=lambda: SM90, utils=SimpleNamespace(load_binary=_load_binary, get_device_properties=lambda d: {
        "max_shared_mem": H100_SHARED_PER_BLOCK, "max_num_regs": REGISTERS_PER_SM, "multiprocessor_count": SMS,
        "warpSize": 32}))


# A launch: case, kernel, grid, num_warps, constexprs, ints (the int arguments as the JIT saw them), useful_bytes,
# loop_trips (loop iterations summed over all programs, 0 without a loop), error; analyse adds what the cubin and
# SASS say: registers, spill_bytes, shared_bytes, loads, stores, instructions (per program outside the loop, fast
# paths only), loop_instructions (per iteration), blocks_per_sm, per_byte (warp instructions issued per useful byte),
# loop_per_byte (the loop's alone: a long loop's steady state), waves.
def _loop_trips(kernel: JITFunction, bound: dict, grid: tuple) -> int:
    """Loop iterations of a kernel that walks `rows_per_program` of each sample's N rows (each frame's SF rows,
    for per-frame modulation), BLOCK_M at a time (grid (B or B*F, programs per sample or frame, ...)); 0 for
    any other kernel."""
    if "rows_per_program" not in bound:
        return 0
    per_program, N, block_m = bound["rows_per_program"], bound.get("SF", bound["N"]), bound["BLOCK_M"]
    per_sample = sum(triton.cdiv(min(per_program, N - p * per_program), block_m) for p in range(grid[1]))
    return per_sample * grid[0] * math.prod(grid[2:])


@contextlib.contextmanager
def sm90_capture(case: str, launches: list):
    """Public ops on CPU tensors launch their kernels into `launches`, compiled for sm_90, not run."""
    original_run = JITFunction.run

    def capture(kernel, *args, grid, warmup, **kwargs):
        if warmup:  # a launcher asking for the compiled kernel (one_wave), not a launch
            return original_run(kernel, *args, grid=grid, warmup=True, **kwargs)
        bound = dict(zip([p.name for p in kernel.params], args), **kwargs)
        grid = tuple(grid(bound) if callable(grid) else grid)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        launch = dict(
            case=case, kernel=kernel.fn.__name__, grid=grid, num_warps=kwargs.get("num_warps", 4),
            constexprs={p.name: bound[p.name] for p in kernel.params if p.is_constexpr and p.name in bound},
            ints={k: v for k, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)},
            useful_bytes=sum(t.numel() * t.element_size() for t in tensors),
            loop_trips=_loop_trips(kernel, bound, grid), error="")
        try:
            launch["compiled"] = original_run(kernel, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # reported per launch; the test fails on it
            launch["error"] = f"{type(e).__name__}: {e}"
        launches.append(launch)

    active = driver._active
    driver.set_active(SM90_DRIVER)
    try:
        with mock.patch.object(JITFunction, "run", capture), mock.patch.object(_common, "INTERPRETED", True), \
                mock.patch.object(torch.Tensor, "is_cuda", property(lambda x: True)):  # one_wave compiles for sm_90
            yield
    finally:
        driver._active = active


# ----------------------------------------------------------------------------------------------- SASS
def _blocks(lines: list[str]) -> list[list[str]]:
    """Basic blocks, each a list of its lines (labels open a block, branches and exits end one)."""
    blocks, current = [], []
    for line in lines:
        if line.endswith(":") and current:
            blocks.append(current)
            current = []
        current.append(line)
        if re.search(r"\b(BRA|EXIT|RET\S*)\b", line):
            blocks.append(current)
            current = []
    return blocks + ([current] if current else [])


def _subroutine_length(lines: list[str], address: int) -> int:
    """Instructions from a CALL's target to its first RET (the straight-line length of e.g. a 64-bit division)."""
    code = [line for line in lines if not line.endswith(":")]
    start = address // 16
    return next(i - start + 1 for i in range(start, len(code)) if code[i].startswith("RET"))


def _issued(block: list[str], lines: list[str]) -> int:
    """A block's instructions but labels and NOPs, a CALL with its subroutine's straight-line length."""
    calls = (re.match(r"CALL\.REL\.NOINC (0x[0-9a-f]+)", line) for line in block)
    return sum(1 + (_subroutine_length(lines, int(call.group(1), 16)) if call else 0)
               for line, call in zip(block, calls) if not (line.endswith(":") or line.startswith("NOP")))


def _slow_path(block: list[str]) -> bool:
    """A block that calls a subroutine and then jumps over the inline code: the rare branch of a 64-bit
    division whose operands have a high word, or of a reciprocal of a denormal."""
    return any(line.startswith("CALL") for line in block) and re.match(r"BRA\b", block[-1]) is not None


def count_instructions(sass: str) -> tuple[int, int]:
    """(per program outside the loop, per loop iteration), counting the common path only: up to the last EXIT,
    slow-path blocks left out, a called subroutine at its straight-line length; the loop runs from a label to the
    last branch back to it."""
    # The function's lines: instructions (each 16 bytes, so a CALL's target is its index * 16) and labels.
    lines = [line for line in (raw.split("\t")[-1].strip() for raw in sass.splitlines())
             if line and not line.startswith("Function:")]
    blocks = _blocks(lines)
    last_exit = max(i for i, b in enumerate(blocks) if any(re.search(r"\bEXIT\b", line) for line in b))
    blocks = blocks[:last_exit + 1]
    labels = {b[0][:-1]: i for i, b in enumerate(blocks) if b[0].endswith(":")}
    first, last = 0, -1  # the loop's first and last block; without a loop, an empty range
    for i, b in enumerate(blocks):
        target = re.search(r"BRA (\w+)", b[-1])
        if target and target.group(1) in labels and labels[target.group(1)] <= i:
            first, last = labels[target.group(1)], i
    issued = [0 if _slow_path(b) else _issued(b, lines) for b in blocks]
    body = sum(issued[first:last + 1])
    return sum(issued) - body, body


def _widths(sass: str, op: str) -> str:
    """e.g. "128x6 32x2": how many LDG/STG of each width in bits (a 2-byte access shows as U16/16)."""
    counts = {}
    for m in re.finditer(rf"\b{op}\.E(?:\.(\w+))?(?:\.(\w+))?", sass):
        suffix = [s for s in m.groups() if s and s not in ("EL", "STRONG", "GPU", "SYS", "CONSTANT", "LTC128B")]
        width = next((int(re.sub(r"\D", "", s)) for s in suffix if re.search(r"\d", s)), 32)
        counts[width] = counts.get(width, 0) + 1
    return " ".join(f"{w}x{n}" for w, n in sorted(counts.items(), reverse=True))


def blocks_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Resident programs per SM from registers (allocated per warp in units of 256), warps and shared memory."""
    per_warp = triton.cdiv(max(registers, 1) * 32, 256) * 256
    by_registers = REGISTERS_PER_SM // (per_warp * num_warps)
    by_shared = SHARED_PER_SM // (shared + 1024) if shared else 32
    return min(by_registers, WARPS_PER_SM // num_warps, by_shared, 32)


def analyse(launch: dict) -> dict:
    """Add what the cubin and its SASS say about a compiled launch (None for one that failed to compile)."""
    compiled = launch.pop("compiled", None)
    if launch["error"]:
        return {**launch, **dict.fromkeys(ANALYSED)}
    sass, usage = compiled.asm["sass"], resources(compiled.asm["cubin"])
    # Stack and local memory per thread: these kernels declare no local arrays, so all of it is spilled registers.
    launch.update(registers=usage["REG"], spill_bytes=usage["STACK"] + usage["LOCAL"],
                  shared_bytes=compiled.metadata.shared, loads=_widths(sass, "LDG"), stores=_widths(sass, "STG"))
    launch["instructions"], launch["loop_instructions"] = count_instructions(sass)
    launch["blocks_per_sm"] = blocks_per_sm(launch["registers"], launch["num_warps"], launch["shared_bytes"])
    programs, slots = math.prod(launch["grid"]), launch["blocks_per_sm"] * SMS  # waves: above 1, a part-empty last
    loop_issued = launch["loop_instructions"] * launch["loop_trips"]
    issued = {"per_byte": loop_issued + launch["instructions"] * programs, "loop_per_byte": loop_issued}
    launch.update({key: n * launch["num_warps"] / launch["useful_bytes"] for key, n in issued.items()},
                  waves=programs / slots if slots else math.inf)
    # The TB/s the SMs issuing flat out move at that many warp-instructions per byte, at either clock.
    return dict(launch, ceiling_tbs=[SMS * ISSUE_PER_CLOCK * ghz / launch["per_byte"] / 1e3 for ghz in CLOCKS_GHZ])


# ---------------------------------------------------------------------------------------------- cases
# STDiT-XL/2 at 16x256: T=16 frames of S=256 tokens, C=1152, per sample; 4 samples (1 above C=1152) keep the CPU
# buffers small while the reduction grids still split each sample over many programs, as on the GPU.
T, S = 16, 256


def tokens(C, dtype, temporal=False):
    """x (B, T*S, C), or the "(B S) T C" layout, random and requiring grad; B = 4, 1 above C=1152."""
    B = 4 if C <= 1152 else 1
    return torch.randn((B * S, T, C) if temporal else (B, T * S, C), dtype=DTYPES[dtype], requires_grad=True)


def modulated(op, C, dtype, temporal=False, modulation_dtype=None, frames=None):
    """layernorm_modulate or gated_residual (its y in the "(B S) T C" layout when temporal) with shift, scale, gate
    as chunks of STDiT's (B, 6, C) adaLN table, or of a (B, frames, 6, C) one of modulation_dtype: a row per frame
    (frames=T: STDiT2's x_mask select) or per token (frames=T*S: Wan 2.2 TI2V's fp32 table on bf16 tokens; B = 1)."""
    x = tokens(C, dtype)[:1] if frames == T * S else tokens(C, dtype)
    shape = (len(x), frames, 6, C) if frames else (len(x), 6, C)
    table = torch.randn(shape, dtype=DTYPES[modulation_dtype or dtype], requires_grad=True)
    shift, scale, gate = (t.squeeze(2) if frames else t for t in table.chunk(6, dim=-2)[:3])
    where = dict(temporal=T if temporal else None, frames=frames)
    if op == "layernorm_modulate":
        out = K.layernorm_modulate(x, shift, scale, **where)
    else:
        y = torch.randn_like(x, requires_grad=True) if frames else tokens(C, dtype, temporal)
        out = K.gated_residual(x, y, gate, **where)
    out.sum().backward()


def to_temporal(C, dtype):
    K.to_temporal(tokens(C, dtype), T).sum().backward()  # the backward is from_temporal


def all_to_all(world, heads=16, head_dim=72):
    """STDiT's Ulysses exchanges on a `world`-rank group (faked: the kernels need only its size): qkv
    (B, N, 3, H, D) scatters heads and gathers tokens, the attention output goes back."""
    fake = mock.Mock(get_world_size=lambda group: world, all_to_all_single=lambda recv, send, group: recv.copy_(send))
    with mock.patch.object(comm, "dist", fake):
        qkv = torch.randn(2, T * S // world, 3, heads, head_dim, dtype=torch.bfloat16)
        out = K.all_to_all(qkv, None, scatter_dim=3, gather_dim=1)[:, :, 0]
        K.all_to_all(out.contiguous(), None, scatter_dim=1, gather_dim=2)


def temporal_attention(frames, positions, dtype, heads=16, head_dim=72, prologue=False):
    """STDiT-XL/2's temporal attention: qkv (1, T*S, 3*C) as its qkv Linear writes it, C = 16 heads of 72.
    prologue: STDiT2's, RoPE then the q/k RMSNorm (the v1.1 checkpoints' order)."""
    qkv = torch.randn(1, frames * positions, 3 * heads * head_dim, dtype=DTYPES[dtype], requires_grad=True)
    norms = [torch.ones(head_dim, dtype=qkv.dtype, requires_grad=True) for _ in range(2)] if prologue else [None, None]
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim) if prologue else None
    K.temporal_attention(qkv, frames, heads, None, *norms, freqs).sum().backward()


def qk_norm(dtype, heads=16, head_dim=72):
    """STDiT2's spatial attention: q and k of the qkv Linear's (B, N, 3C) output RMS-normalized per head."""
    qkv = torch.randn(4, T * S, 3 * heads * head_dim, dtype=DTYPES[dtype], requires_grad=True)
    weights = [torch.ones(head_dim, dtype=DTYPES[dtype], requires_grad=True) for _ in range(2)]
    q, k, v = K.qk_norm(qkv, heads, *weights)
    (q.sum() + k.sum() + v.sum()).backward()


# One entry per case: its name, the function that calls the public op(s), and the arguments.
WIDTHS = [(1152, "bf16"), (1152, "fp16"), (1152, "fp32"), (4096, "bf16"), (72, "bf16"), (1000, "bf16"), (8192, "bf16")]
CASES = [
    *[(f"{op} C={C} {dtype} {'temporal' if temporal else 'plain'}", modulated, (op, C, dtype, temporal))
      for C, dtype in WIDTHS for temporal in (False, True) for op in ("layernorm_modulate", "gated_residual")],
    *[(f"to_temporal C={C} {dtype}", to_temporal, (C, dtype)) for C, dtype in WIDTHS if dtype == "bf16"],
    # Per-frame (T rows per sample) and per-token (Wan 2.2 TI2V: fp32 rows on bf16 tokens) modulation.
    *[(f"{op} C=1152 bf16 {name}", modulated, (op, 1152, "bf16", False, modulation_dtype, frames))
      for name, modulation_dtype, frames in (("per-frame", "bf16", T), ("fp32-per-token", "fp32", T * S))
      for op in ("layernorm_modulate", "gated_residual")],
    *[(f"all_to_all world={world} bf16", all_to_all, (world,)) for world in (2, 4)],
    # T=16 (16x256) and T=64 (64x512) frames; fp32 at T=64 holds more than the register file (it spills).
    *[(f"temporal_attention T={t} D=72 {dtype}", temporal_attention, (t, positions, dtype))
      for t, positions, dtype in ((16, S, "bf16"), (16, S, "fp16"), (64, 64, "bf16"), (16, S, "fp32"))],
    # STDiT2: the same with RoPE and qk-norm in the prologue, and the spatial attention's qk-norm.
    *[(f"temporal_attention+rope+qk_norm T={t} D=72 {dtype}", temporal_attention, (t, positions, dtype, 16, 72, True))
      for t, positions, dtype in ((16, S, "bf16"), (64, 64, "bf16"), (16, S, "fp32"))],
    *[(f"qk_norm C=1152 D=72 {dtype}", qk_norm, (dtype,)) for dtype in ("bf16", "fp32")],
]


def _constexprs(launch: dict) -> str:
    shown = {k: v for k, v in launch["constexprs"].items()
             if k.startswith("BLOCK") or k in ("HEAD", "TAIL") or v is True}
    return " ".join(f"{k}={v}" for k, v in shown.items() if v is not True) + "".join(
        f" {k}" for k, v in shown.items() if v is True and k in ("TEMPORAL", "TO_TEMPORAL"))


ANALYSED = ("registers", "spill_bytes", "shared_bytes", "blocks_per_sm", "loads", "stores", "instructions",
            "loop_instructions", "per_byte", "loop_per_byte", "waves", "ceiling_tbs")
COLUMNS = ["case", "kernel", "tile", "warps", "grid", "regs", "spill B", "smem B", "blocks/SM", "waves", "LDG bits",
           "STG bits", "instr/program", "loop instr", "warp-instr/B", "loop warp-instr/B", "issue ceiling TB/s"]


def table(launches: list[dict]) -> str:
    """A markdown table, one row per launch."""
    body = []
    for launch in launches:
        cells = [launch["case"], launch["kernel"].strip("_").replace("_kernel", ""), _constexprs(launch),
                 launch["num_warps"]]
        if launch["error"]:
            body.append(cells + [launch["grid"], f"FAILED: {launch['error'].splitlines()[0]}"] + [""] * 11)
            continue
        low, high = launch["ceiling_tbs"]
        body.append(cells + ["x".join(map(str, launch["grid"])), *(launch[key] for key in ANALYSED[:4]),
                             f"{launch['waves']:.2f}", launch["loads"], launch["stores"], launch["instructions"],
                             launch["loop_instructions"] or "-", f"{launch['per_byte']:.3f}",
                             f"{launch['loop_per_byte']:.3f}" if launch["loop_trips"] else "-",
                             f"{low:.1f}-{high:.1f}"])
    return "\n".join(markdown_table(COLUMNS, [list(map(str, cells)) for cells in body]))


def main(argv=None):
    parser = OneLineParser(prog="python bench/kernel_report.py", description=__doc__.splitlines()[0])
    parser.add_argument("-k", action="append", default=[], help="only the cases whose name contains this (repeatable)")
    parser.add_argument("--json", default=None, help="also write the launches to this JSON file")
    args = parser.parse_args(argv)
    cases = [case for case in CASES if not args.k or any(k in case[0] for k in args.k)]
    if not cases:
        parser.error(f"no case matches -k {args.k!r}")
    launches = []
    for name, run, case_args in cases:  # each (name, function, arguments): its launches, compiled and analysed
        with sm90_capture(name, launches):
            run(*case_args)
    launches = [analyse(launch) for launch in launches]
    print(f"Triton {triton.__version__}, sm_90; issue ceiling at {SMS} SMs x {ISSUE_PER_CLOCK} warp-instr/clk x "
          f"{CLOCKS_GHZ[0]}-{CLOCKS_GHZ[1]} GHz; copy rate H100 ~{COPY_TBS['H100']} TB/s, "
          f"H200 ~{COPY_TBS['H200']} TB/s\n")
    print(table(launches))
    if args.json:
        Path(args.json).write_text(json.dumps(launches, indent=1))
    return 1 if any(launch["error"] for launch in launches) else 0


if __name__ == "__main__":
    sys.exit(main())
