"""Triton, or where it has no wheel (macOS, Windows) a stand-in that lets the kernel files import: their kernels
are then never launched, and every op runs its eager reference."""

import types

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False
    triton = types.SimpleNamespace(
        jit=lambda fn=None, **options: fn if fn is not None else (lambda fn: fn),
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length(),
    )
    tl = types.SimpleNamespace(constexpr=int)  # only read by the kernels' annotations
