"""Triton kernels for the two thin layers of a fused sampling step on CUDA (see graphs.FusedSteps).

The first layer of a TimeMLP reads a D = 2 point and the last writes one; as cuBLAS GEMMs (K = 2,
N = 2) each costs as much GPU time as a square 96 x 96 layer. Here the first layer and its SiLU are
one elementwise kernel, and the last SiLU, the last layer and the step's update ``a x + ...`` (and
a Heun corrector's ``+ g x0``) are one row-reduction kernel, all in fp32 FMA (no tensor cores, so
no TF32 rounding): a step drops from 10 kernels to 7. ``python benchmarks/thin_kernels.py`` times
both loops replayed from CUDA graphs in one process.

Imported only where Triton is (torch's CUDA wheels bring it, the CPU wheels do not).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows per program: of 16, 32 and 64, 16 was the fastest on the H100 (more programs keep more SMs
# busy on these small layers; baselines/README.md has the figures).
BLOCK_ROWS = 16


@triton.jit
def _first_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n, D: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                  BM: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, HP)
    rmask, cmask = rows < n, cols < H
    h = tl.zeros((BM, HP), dtype=tl.float32) + tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    for d in tl.static_range(D):
        xd = tl.load(x_ptr + rows * D + d, mask=rmask, other=0.0)
        wd = tl.load(w_ptr + d * H + cols, mask=cmask, other=0.0)
        h += xd[:, None] * wd[None, :]
    h = h / (1.0 + tl.exp(-h))
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], h, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _last_kernel(h_ptr, w_ptr, b_ptr, x_ptr, a, x2_ptr, g, out_ptr, n, D: tl.constexpr, H: tl.constexpr,
                 HP: tl.constexpr, BM: tl.constexpr, ACT: tl.constexpr, HAS_X2: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, HP)
    rmask, cmask = rows < n, cols < H
    h = tl.load(h_ptr + rows[:, None] * H + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    if ACT:
        h = h / (1.0 + tl.exp(-h))
    for d in tl.static_range(D):
        wd = tl.load(w_ptr + cols * D + d, mask=cmask, other=0.0)
        xd = tl.load(x_ptr + rows * D + d, mask=rmask, other=0.0)
        y = tl.sum(h * wd[None, :], axis=1) + tl.load(b_ptr + d) + a * xd
        if HAS_X2:
            y += g * tl.load(x2_ptr + rows * D + d, mask=rmask, other=0.0)
        tl.store(out_ptr + rows * D + d, y, mask=rmask)


def first_layer(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(x @ w + b) for x [n, D], w [D, H], b [H] (all contiguous fp32)."""
    (n, d), h = x.shape, w.shape[1]
    out = torch.empty(n, h, device=x.device, dtype=x.dtype)
    _first_kernel[(triton.cdiv(n, BLOCK_ROWS),)](x, w, b, out, n, d, h, triton.next_power_of_2(h), BLOCK_ROWS)
    return out


def last_layer(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, a: float, act: bool,
               x2: torch.Tensor | None = None, g: float = 0.0) -> torch.Tensor:
    """(silu(h) if act else h) @ w + b + a x (+ g x2) for h [n, H], w [H, D], b [D], x and x2 [n, D]."""
    (n, hidden), d = h.shape, w.shape[1]
    out = torch.empty(n, d, device=x.device, dtype=x.dtype)
    _last_kernel[(triton.cdiv(n, BLOCK_ROWS),)](h, w, b, x, float(a), x if x2 is None else x2, float(g), out, n, d,
                                               hidden, triton.next_power_of_2(hidden), BLOCK_ROWS, act, x2 is not None)
    return out
