"""Triton 3×3 stride-1 convolutions of up to five pyramid levels in one launch (a RetinaNet head's shared towers).

The levels are one ragged batch, packed image-major: x is (N, S, C) contiguous with S = Σ_l H_l·W_l, level l's pixel
(n, h, w) at row n·S + OFF_l + h·W_l + w — so level l is the NHWC view of strides (S·C, 1, W_l·C, C) at offset
OFF_l·C, and a predictor's packed (N, S, A·V) output is torchvision's (N, Σ_l H_l·W_l·A, V) anchor order. Each level
is its own conv (zero padding at its borders) with the weight and bias shared; BN statistics, prologue affine maps,
their gradients and the BN affine maps are per level, packed (L, 2, C) / (L, C).

The forward's programs are the levels' (BLOCK_M pixels × BLOCK_N channels) tiles in level order
(``conv3x3.conv3x3_tile``); with a BN each level's last program finalizes that level's BN (``finalize_when_last_of``,
the running statistics of its own module updated). The backward's programs are every level's dgrad tiles, then every
level's wgrad programs (``conv3x3_backward``'s tiles), all adding into the one dW (and d_bias).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .activation import ACTIVATION_CODES
from .bn_finalize import finalize_when_last_of
from .conv3x3 import conv3x3_tile
from .conv3x3_backward import _dgrad_tile, _wgrad_tile
from .gemm_backward import wgrad_split
from .gemm_config import gemm_launch_config

MAX_LEVELS = 5


@triton.jit
def level_of(pid, T1, T2, T3, T4):
    """The level of program ``pid`` from the levels' first programs T1..T4 (level 0 starts at 0)."""
    return (pid >= T1).to(tl.int32) + (pid >= T2).to(tl.int32) + (pid >= T3).to(tl.int32) + (pid >= T4).to(tl.int32)


@triton.jit
def pick(level, v0, v1, v2, v3, v4):
    """The argument of ``level`` (a scalar or a pointer)."""
    return tl.where(level == 0, v0, tl.where(level == 1, v1, tl.where(level == 2, v2, tl.where(level == 3, v3, v4))))


@triton.jit
def _conv3x3_levels_fwd_kernel(
    y_ptr, stats_ptr, counter_ptr, bn_scale_ptr, bn_shift_ptr, bn_mean_ptr, bn_var_ptr,
    g0, g1, g2, g3, g4, b0, b1, b2, b3, b4, rm0, rm1, rm2, rm3, rm4, rv0, rv1, rv2, rv3, rv4,
    nb0, nb1, nb2, nb3, nb4, eps, momentum, x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr,
    N, S, C_IN, N_OUT, H0, H1, H2, H3, H4, W0, W1, W2, W3, W4, OFF0, OFF1, OFF2, OFF3, OFF4, T1, T2, T3, T4, T_END,
    sw_o, sw_c, sw_h, sw_w,
    HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    FINALIZE: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_COUNTER: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One tile of one level's y; with ``FINALIZE`` its channel sums go to that level's statistics, whose BN the
    level's last program finalizes."""
    pid = tl.program_id(0)
    level = level_of(pid, T1, T2, T3, T4)
    h, w = pick(level, H0, H1, H2, H3, H4), pick(level, W0, W1, W2, W3, W4)
    off = pick(level, OFF0, OFF1, OFF2, OFF3, OFF4)
    first, end = pick(level, 0, T1, T2, T3, T4), pick(level, T1, T2, T3, T4, T_END)
    stats = stats_ptr + level * 2 * N_OUT
    conv3x3_tile(pid - first, tl.program_id(1), y_ptr + off * N_OUT, stats, x_ptr + off * C_IN, w_ptr, bias_ptr,
                 scale_ptr + level * C_IN, shift_ptr + level * C_IN, N * h * w, C_IN, N_OUT, h, w, h * w, w,
                 S * C_IN, 1, w * C_IN, C_IN, S * N_OUT, 1, w * N_OUT, N_OUT, sw_o, sw_c, sw_h, sw_w, 3, 1, 1,
                 HAS_PROLOGUE, ACT, HAS_BIAS, FP32_DOT, FINALIZE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    if FINALIZE:
        count = (N * h * w).to(tl.float32)
        channels = level * N_OUT
        finalize_when_last_of(
            (end - first) * tl.num_programs(1), stats, counter_ptr + level, pick(level, g0, g1, g2, g3, g4),
            pick(level, b0, b1, b2, b3, b4), bn_scale_ptr + channels, bn_shift_ptr + channels, bn_mean_ptr + channels,
            bn_var_ptr + channels, pick(level, rm0, rm1, rm2, rm3, rm4), pick(level, rv0, rv1, rv2, rv3, rv4),
            pick(level, nb0, nb1, nb2, nb3, nb4), N_OUT, count, eps, momentum, count / (count - 1.0), HAS_RUNNING,
            HAS_COUNTER, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _conv3x3_levels_backward_kernel(
    dx_ptr, dscale_ptr, dshift_ptr, dw_ptr, dbias_ptr, dbn_ptr, dy_ptr, dsum_ptr, dsumsq_ptr, g0, g1, g2, g3, g4,
    mean_ptr, var_ptr, eps, y_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, N, S, C_IN, C_OUT,
    H0, H1, H2, H3, H4, W0, W1, W2, W3, W4, OFF0, OFF1, OFF2, OFF3, OFF4, D1, D2, D3, D4, D_END, G1, G2, G3, G4,
    G_END, DGRAD_COLUMNS, WGRAD_COLUMNS, PIXELS_PER_PROGRAM, sdw_o, sdw_c, sdw_h, sdw_w, sw_o, sw_c, sw_h, sw_w,
    HAS_PROLOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    FROM_AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Programs [0, D_END): the levels' dgrad tiles (level l's from D_l, DGRAD_COLUMNS input-channel blocks per row);
    then the levels' wgrad programs (level l's from D_END + G_l: per weight tile its 9 taps × that level's pixel
    chunks of PIXELS_PER_PROGRAM)."""
    pid = tl.program_id(0)
    if pid < D_END:
        level = level_of(pid, D1, D2, D3, D4)
        local = pid - pick(level, 0, D1, D2, D3, D4)
    else:
        level = level_of(pid - D_END, G1, G2, G3, G4)
        local = pid - D_END - pick(level, 0, G1, G2, G3, G4)
    h, w = pick(level, H0, H1, H2, H3, H4), pick(level, W0, W1, W2, W3, W4)
    off = pick(level, OFF0, OFF1, OFF2, OFF3, OFF4)
    pixels = N * h * w
    count = pixels.to(tl.float32)
    gamma = pick(level, g0, g1, g2, g3, g4)
    out_channels, in_channels = level * C_OUT, level * C_IN
    dy, y, x = dy_ptr + off * C_OUT, y_ptr + off * C_OUT, x_ptr + off * C_IN
    if pid < D_END:
        _dgrad_tile(0, local // DGRAD_COLUMNS, local % DGRAD_COLUMNS, dx_ptr + off * C_IN, dscale_ptr + in_channels,
                    dshift_ptr + in_channels, dbn_ptr + 2 * out_channels, dbn_ptr + 2 * out_channels + C_OUT,
                    dy, dsum_ptr + out_channels, dsumsq_ptr + out_channels, gamma, mean_ptr + out_channels,
                    var_ptr + out_channels, count, eps, y, x, w_ptr, scale_ptr + in_channels, shift_ptr + in_channels,
                    pixels, C_IN, C_OUT, h * w, w, h, S * C_IN, 1, w * C_IN, C_IN, S * C_OUT, 1, w * C_OUT, C_OUT,
                    S * C_OUT, 1, w * C_OUT, C_OUT, S * C_IN, 1, w * C_IN, C_IN, sw_o, sw_c, sw_h, sw_w, 3, 1, 1,
                    HAS_PROLOGUE, ACT, FP32_DOT, FROM_AFFINE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    else:
        steps = 9 * tl.cdiv(pixels, PIXELS_PER_PROGRAM)
        tile, step = local // steps, local % steps
        _wgrad_tile(tile // WGRAD_COLUMNS, tile % WGRAD_COLUMNS, step % 9, step // 9, dw_ptr, dbias_ptr, dy,
                    dsum_ptr + out_channels, dsumsq_ptr + out_channels, gamma, mean_ptr + out_channels,
                    var_ptr + out_channels, count, eps, y, x, scale_ptr + in_channels, shift_ptr + in_channels, pixels,
                    C_IN, C_OUT, h, w, h * w, w, PIXELS_PER_PROGRAM, sdw_o, sdw_c, sdw_h, sdw_w, S * C_OUT, 1,
                    w * C_OUT, C_OUT, S * C_OUT, 1, w * C_OUT, C_OUT, S * C_IN, 1, w * C_IN, C_IN, 3, 1, 1,
                    HAS_PROLOGUE, ACT, HAS_BIAS, FP32_DOT, FROM_AFFINE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


def level_geometry(sizes: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """Heights, widths and pixel offsets within an image of the levels, padded to ``MAX_LEVELS`` (the padding is
    never selected)."""
    heights = [h for h, _ in sizes] + [1] * (MAX_LEVELS - len(sizes))
    widths = [w for _, w in sizes] + [1] * (MAX_LEVELS - len(sizes))
    offsets, total = [], 0
    for h, w in sizes:
        offsets.append(total)
        total += h * w
    return heights, widths, offsets + [0] * (MAX_LEVELS - len(sizes))


def segment_starts(counts: list[int]) -> tuple[list[int], int]:
    """The first index of each level after level 0 (``MAX_LEVELS - 1`` of them, absent levels at the end) and the
    end, from each level's count."""
    starts, total = [], 0
    for count in counts:
        starts.append(total)
        total += count
    starts = starts[1:] + [total] * (MAX_LEVELS - len(counts))
    return starts, total


def padded(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` padded to ``MAX_LEVELS`` with the first (a stand-in, never selected)."""
    return list(tensors) + [tensors[0]] * (MAX_LEVELS - len(tensors))


@dataclass
class LevelsFinalize:
    """Each level's BN finalized in its last program: a zeroed int32 (L,) ``counters``, the levels' γ, β (lists), the
    fp32 (L, C) scale, shift, mean and var it writes, the levels' running statistics (fp32, contiguous; or None) and
    one-element batch counters (or None) it updates."""

    counters: torch.Tensor
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    running_means: list[torch.Tensor] | None
    running_vars: list[torch.Tensor] | None
    batches: list[torch.Tensor] | None
    eps: float
    momentum: float


def conv3x3_levels_forward(x, sizes, weight, scale, shift, activation, bias, stats, finalize: LevelsFinalize | None
                           ) -> torch.Tensor:  # fmt: skip
    """y (N, S, C_out) packed in x's dtype: each level's 3×3 stride-1 conv (zero padding 1) of act(scale_l·x_l +
    shift_l) plus ``bias``; with ``finalize``, each level's Σy, Σy² added into ``stats`` (a zeroed float64
    (L, 2, C_out)) and its BN finalized. ``x``: (N, S, C_in) contiguous; ``scale``/``shift``: (L, C_in) contiguous
    fp32, or None."""
    n, s, c_in = x.shape
    c_out = weight.shape[0]
    y = x.new_empty((n, s, c_out))
    config = gemm_launch_config(x.dtype, _conv3x3_levels_fwd_kernel)
    if config["FP32_DOT"]:  # as conv3x3's stride-1 launches: no software pipelining (fp32 variants spill on sm_90)
        config["num_stages"] = 1
    heights, widths, offsets = level_geometry(sizes)
    starts, tiles = segment_starts([triton.cdiv(n * h * w, config["BLOCK_M"]) for h, w in sizes])
    if finalize is None:
        unused = weight
        bn_args = [unused] * 6 + [unused] * 25 + [1.0, 0.0]
        bn_flags = dict(FINALIZE=False, HAS_RUNNING=False, HAS_COUNTER=False)
    else:
        f = finalize
        has_running, has_counter = f.running_means is not None, f.batches is not None
        stand_in = [f.outputs[0]] * MAX_LEVELS
        bn_args = [stats, f.counters, *f.outputs, *padded(f.weights), *padded(f.biases),
                   *(padded(f.running_means) if has_running else stand_in),
                   *(padded(f.running_vars) if has_running else stand_in),
                   *(padded(f.batches) if has_counter else stand_in), float(f.eps), float(f.momentum)]  # fmt: skip
        bn_flags = dict(FINALIZE=True, HAS_RUNNING=has_running, HAS_COUNTER=has_counter)
    has_prologue = scale is not None
    grid = (tiles, triton.cdiv(c_out, config["BLOCK_N"]))
    _conv3x3_levels_fwd_kernel[grid](
        y, *bn_args, x, weight, weight if bias is None else bias.contiguous(), scale if has_prologue else weight,
        shift if has_prologue else weight, n, s, c_in, c_out, *heights, *widths, *offsets, *starts, tiles,
        *weight.stride(), HAS_PROLOGUE=has_prologue, ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
        **bn_flags, **config,
    )  # fmt: skip
    return y


def conv3x3_levels_backward(dy, d_sum, d_sumsq, y, x, sizes, weight, scale, shift, activation, d_weight, d_bias,
                            d_affine, bn=None) -> list[torch.Tensor]:  # fmt: skip
    """``[dx (N, S, C_in) in x's dtype, [dγ; dβ] (L, 2, C_out) fp32 (empty without ``bn``)]``; dW, the bias gradient
    and the prologue's [d_scale; d_shift] are added into the zeroed fp32 ``d_weight`` (the weight's shape), ``d_bias``
    (C_out,) and ``d_affine`` (2, L, C_in) (None: no bias, no prologue). ``dy``, ``y``: (N, S, C_out) contiguous;
    ``bn`` = (γs, mean, var, eps), the levels' BN that y's statistics were finalised into (mean, var (L, C_out)), and
    ``d_sum``/``d_sumsq`` (L, C_out) are the gradients of its scale and shift; without it they are zeros and y is
    not read."""
    n, s, c_in = x.shape
    c_out = weight.shape[0]
    levels = len(sizes)
    has_prologue, has_bias = scale is not None, d_bias is not None
    if bn is None:  # a plain conv: the statistics' gradients to fold are the zeros given, y is never read
        gammas, mean, var, eps, y = [d_sum], d_sum, d_sum, 1.0, dy
        d_bn = d_sum.new_empty(0)
    else:
        gammas, mean, var, eps = bn
        d_bn = torch.empty((levels, 2, c_out), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    config = gemm_launch_config(x.dtype, _conv3x3_levels_backward_kernel)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    heights, widths, offsets = level_geometry(sizes)
    columns = triton.cdiv(c_in, block_n)  # input-channel blocks of a dgrad row and of a wgrad row
    wgrad_tiles = triton.cdiv(c_out, block_m) * columns
    pixels = [n * h * w for h, w in sizes]
    _, per_program = wgrad_split(sum(pixels), 9 * wgrad_tiles, block_k, x.device)
    d_starts, d_end = segment_starts([triton.cdiv(p, block_m) * columns for p in pixels])
    g_starts, g_end = segment_starts([9 * wgrad_tiles * triton.cdiv(p, per_program) for p in pixels])
    unused = d_weight
    d_scale, d_shift = d_affine.view(2, -1) if has_prologue else (unused, unused)
    _conv3x3_levels_backward_kernel[(d_end + g_end,)](
        dx, d_scale, d_shift, d_weight, d_bias if has_bias else unused, d_bn if bn is not None else unused, dy,
        d_sum.contiguous(), d_sumsq.contiguous(), *padded(list(gammas)), mean, var, float(eps), y, x, weight,
        scale if has_prologue else unused, shift if has_prologue else unused, n, s, c_in, c_out, *heights, *widths,
        *offsets, *d_starts, d_end, *g_starts, g_end, columns, columns, per_program, *d_weight.stride(),
        *weight.stride(), HAS_PROLOGUE=has_prologue, ACT=ACTIVATION_CODES[activation], HAS_BIAS=has_bias,
        FROM_AFFINE=bn is not None, **config,
    )  # fmt: skip
    return [dx, d_bn]
