// Per-element and per-window maths of the fused ops, shared by the CUDA kernels (ops_cuda.cu) and their CPU
// twins (ops_cpu.cpp): both call these functions for every work item, so the CPU tests exercise the same code.
//
// Layout: every 4-D tensor is NHWC-contiguous (channels_last); a "pixel" is the flat index n·H·W + h·W + w and
// element (pixel, c) lives at pixel·C + c. Work items cover VEC consecutive channels (VEC = 1, or 16 bytes of
// storage where C and every pointer allow it). Maths is in acc_t: float for fp32/bf16/fp16 storage, double
// for double. Scales and shifts are acc_t vectors of length C.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define SF_HOST_DEVICE __host__ __device__ __forceinline__
#define SF_UNROLL _Pragma("unroll")
#else
#define SF_HOST_DEVICE inline
#define SF_UNROLL
#endif

namespace spinenet_fast {

enum Activation : int { kIdentity = 0, kRelu = 1, kSwish = 2 };

SF_HOST_DEVICE float exp_of(float x) { return expf(x); }
SF_HOST_DEVICE double exp_of(double x) { return exp(x); }
SF_HOST_DEVICE float log_of(float x) { return logf(x); }
SF_HOST_DEVICE double log_of(double x) { return log(x); }
SF_HOST_DEVICE float log1p_of(float x) { return log1pf(x); }
SF_HOST_DEVICE double log1p_of(double x) { return log1p(x); }

template <typename T>
SF_HOST_DEVICE bool is_nan(T x) {
  return x != x;
}

// act(x); relu keeps NaN (as F.relu does), swish is x·sigmoid(x).
template <typename T>
SF_HOST_DEVICE T activate(T x, int act) {
  if (act == kRelu) return x < T(0) ? T(0) : x;
  if (act == kSwish) return x * (T(1) / (T(1) + exp_of(-x)));
  return x;
}

// d act(x) / dx.
template <typename T>
SF_HOST_DEVICE T activation_grad(T x, int act) {
  if (act == kRelu) return x > T(0) ? T(1) : T(0);
  if (act == kSwish) {
    const T s = T(1) / (T(1) + exp_of(-x));
    return s * (T(1) + x * (T(1) - s));
  }
  return T(1);
}

// ---------------------------------------------------------------------------------------------- vector I/O
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename scalar_t, typename acc_t>
SF_HOST_DEVICE void load(const scalar_t* p, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
SF_UNROLL
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(pack.v[i]);
}

template <int VEC, typename scalar_t, typename acc_t>
SF_HOST_DEVICE void store(scalar_t* p, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pack;
SF_UNROLL
  for (int i = 0; i < VEC; ++i) pack.v[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pack;
}

// ----------------------------------------------------------------------------------------------- bn_finalize
// One BN's finalisation: statistics in (S: float64, or T), affine map (and batch mean / variance) out, running
// statistics updated (T).
template <typename T, typename S = T>
struct BnFinalizeArgs {
  const S *sums, *sumsq;
  const T *weight, *bias;
  T count, eps;
  T *scale, *shift, *mean, *var;
  T* running_mean;  // null: no running-statistics update
  T* running_var;
  T momentum, unbias;  // running ← running + momentum·(batch − running), the batch variance × unbias = n/(n − 1)
  int64_t* batches;    // null: no batch counter; else incremented by channel 0
};

// Channel c: mean = Σ/n, biased var = Σ²/n − mean² (≥ 0) in the statistics' dtype S (float64: the subtraction
// loses nothing the T outputs keep), scale = γ/sqrt(var + eps), shift = β − mean·scale; then nn.BatchNorm2d's
// running-statistics lerp.
template <typename T, typename S>
SF_HOST_DEVICE void bn_finalize_channel(const BnFinalizeArgs<T, S>& a, int64_t c) {
  const S mean = a.sums[c] / S(a.count);
  const S variance = a.sumsq[c] / S(a.count) - mean * mean;
  const T m = static_cast<T>(mean), v = variance < S(0) ? T(0) : static_cast<T>(variance);
  const T s = a.weight[c] / sqrt(v + a.eps);
  a.scale[c] = s;
  a.shift[c] = a.bias[c] - m * s;
  a.mean[c] = m;
  a.var[c] = v;
  if (a.running_mean != nullptr) {
    a.running_mean[c] += a.momentum * (m - a.running_mean[c]);
    a.running_var[c] += a.momentum * (v * a.unbias - a.running_var[c]);
  }
  if (c == 0 && a.batches != nullptr) ++*a.batches;
}

// Channel c of bn_finalize's backward: the chain rule through scale = γ·invstd, shift = β − mean·scale, mean = Σ/n,
// var = Σ²/n − mean². d_mean and d_var may be null (no gradient).
template <typename T>
SF_HOST_DEVICE void bn_finalize_backward_channel(const T* d_scale, const T* d_shift, const T* d_mean, const T* d_var,
                                                 const T* weight, const T* mean, const T* var, T count, T eps,
                                                 int64_t c, T* d_sums, T* d_sumsq, T* d_weight, T* d_bias) {
  const T invstd = T(1) / sqrt(var[c] + eps);
  const T d_affine = d_scale[c] - d_shift[c] * mean[c];
  T dv = T(-0.5) * weight[c] * d_affine * invstd * invstd * invstd;
  if (d_var != nullptr) dv += d_var[c];
  T dm = -d_shift[c] * weight[c] * invstd - T(2) * mean[c] * dv;
  if (d_mean != nullptr) dm += d_mean[c];
  d_sums[c] = dm / count;
  d_sumsq[c] = dv / count;
  d_weight[c] = invstd * d_affine;
  d_bias[c] = d_shift[c];
}

// ------------------------------------------------------------------------------------------------------ merge
// out = act(Σ_i f_i[n]·(scale_i·y_i[h/ρ_i, w/ρ_i] + shift_i) + extra) for one or two parents, f_i[n] = row_scale[n]
// for the row-scaled parent (stochastic depth) and 1 otherwise. For the backward, parent 0 is the coarser one (ρ_0 a
// multiple of ρ_1); the forward takes them in any order. The backward's output gradient is the sum of up to
// kMaxMergeGrads tensors (one per reader of the output), added as they are loaded.
constexpr int kMaxMergeGrads = 4;

template <typename scalar_t, typename acc_t>
struct MergeArgs {
  const scalar_t* parent[2];
  const acc_t* scale[2];
  const acc_t* shift[2];
  int64_t ratio[2];
  int num_parents;
  const scalar_t* extra;  // nullptr: none
  const acc_t* row_scale;  // nullptr: none; else (N,), the per-sample factor of parent `scaled_parent`'s term
  int scaled_parent;
  const scalar_t* grad[kMaxMergeGrads];  // backward only: (N, H, W, C) each, their sum the output gradient
  int64_t grad_sample_stride;  // backward only: elements between the grads' samples (H·W·C where NHWC-contiguous)
  int num_grads;
  scalar_t* out;          // forward: the merged output; backward: unused
  scalar_t* d_parent[2];  // backward outputs, at the parents' resolutions
  scalar_t* d_extra;      // backward output (nullptr without extra)
  int64_t N, H, W, C;     // the output's sizes
  int act;
};

// The flat pixel of parent `i` that output pixel (n, h, w) reads.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE int64_t parent_pixel(const MergeArgs<scalar_t, acc_t>& a, int i, int64_t n, int64_t h, int64_t w) {
  const int64_t r = a.ratio[i];
  return (n * (a.H / r) + h / r) * (a.W / r) + w / r;
}

// Parent i's per-sample factor in sample n: row_scale[n] for the row-scaled parent, else 1.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE acc_t row_factor(const MergeArgs<scalar_t, acc_t>& a, int i, int64_t n) {
  return a.row_scale != nullptr && i == a.scaled_parent ? a.row_scale[n] : acc_t(1);
}

// factor·(scale_i·y_i + shift_i) for VEC channels from c, at flat parent pixel `pixel`.
template <int VEC, typename scalar_t, typename acc_t>
SF_HOST_DEVICE void parent_affine(const MergeArgs<scalar_t, acc_t>& a, int i, int64_t pixel, int64_t c, acc_t factor,
                                  acc_t (&y)[VEC], acc_t (&out)[VEC]) {
  load<VEC>(a.parent[i] + pixel * a.C + c, y);
SF_UNROLL
  for (int k = 0; k < VEC; ++k) out[k] = factor * (a.scale[i][c + k] * y[k] + a.shift[i][c + k]);
}

// Forward work item: output pixel `pixel`, channels [c, c + VEC).
template <int VEC, typename scalar_t, typename acc_t>
SF_HOST_DEVICE void merge_forward_item(const MergeArgs<scalar_t, acc_t>& a, int64_t pixel, int64_t c) {
  const int64_t w = pixel % a.W, h = (pixel / a.W) % a.H, n = pixel / (a.W * a.H);
  acc_t pre[VEC], y[VEC], term[VEC];
  parent_affine<VEC>(a, 0, parent_pixel(a, 0, n, h, w), c, row_factor(a, 0, n), y, pre);
  if (a.num_parents == 2) {
    parent_affine<VEC>(a, 1, parent_pixel(a, 1, n, h, w), c, row_factor(a, 1, n), y, term);
SF_UNROLL
    for (int k = 0; k < VEC; ++k) pre[k] += term[k];
  }
  if (a.extra != nullptr) {
    load<VEC>(a.extra + pixel * a.C + c, term);
SF_UNROLL
    for (int k = 0; k < VEC; ++k) pre[k] += term[k];
  }
SF_UNROLL
  for (int k = 0; k < VEC; ++k) pre[k] = activate(pre[k], a.act);
  store<VEC>(a.out + pixel * a.C + c, pre);
}

// Per-channel sums the merge backward accumulates: Σ f_0·d_pre·y_0 (→ d_scale_0), Σ f_1·d_pre·y_1 (→ d_scale_1),
// Σ d_pre (→ the d_shift of every parent without a row scale), and with a row scale (kNumRowScaledMergeSums rows)
// Σ row_scale·d_pre (→ the row-scaled parent's d_shift).
enum MergeSum : int { kScale0 = 0, kScale1 = 1, kShift = 2, kShiftScaled = 3 };
constexpr int kNumMergeSums = 3, kNumRowScaledMergeSums = 4;

// Backward work item: one pixel of the coarse parent 0 (its ρ_0×ρ_0 output block), channels [c, c + VEC).
// d_pre = grad·act'(pre) over the block; d_parent_i = f_i·scale_i·(block-sum of d_pre over ρ_i×ρ_i); d_extra = d_pre.
// Adds this item's contributions to `sums` (per channel lane; NUM_SUMS rows, 4 with a row scale).
template <int VEC, int NUM_SUMS, typename scalar_t, typename acc_t>
SF_HOST_DEVICE void merge_backward_item(const MergeArgs<scalar_t, acc_t>& a, int64_t coarse_pixel, int64_t c,
                                        acc_t (&sums)[NUM_SUMS][VEC]) {
  const int64_t r0 = a.ratio[0], r1 = a.num_parents == 2 ? a.ratio[1] : r0, q = r0 / r1;
  const int64_t w0 = coarse_pixel % (a.W / r0), h0 = (coarse_pixel / (a.W / r0)) % (a.H / r0);
  const int64_t n = coarse_pixel / ((a.W / r0) * (a.H / r0));
  const acc_t f0 = row_factor(a, 0, n), f1 = row_factor(a, 1, n);
  acc_t y0[VEC], pre0[VEC], y1[VEC], pre1[VEC], acc0[VEC], acc1[VEC], term[VEC];
  parent_affine<VEC>(a, 0, coarse_pixel, c, f0, y0, pre0);
SF_UNROLL
  for (int k = 0; k < VEC; ++k) acc0[k] = acc_t(0);
  for (int64_t sh = 0; sh < q; ++sh) {
    for (int64_t sw = 0; sw < q; ++sw) {
      const int64_t h1 = h0 * q + sh, w1 = w0 * q + sw;  // the parent-1 pixel of this sub-block
      const int64_t pixel1 = (n * (a.H / r1) + h1) * (a.W / r1) + w1;
SF_UNROLL
      for (int k = 0; k < VEC; ++k) pre1[k] = acc_t(0), acc1[k] = acc_t(0);
      if (a.num_parents == 2) parent_affine<VEC>(a, 1, pixel1, c, f1, y1, pre1);
      for (int64_t ih = 0; ih < r1; ++ih) {
        for (int64_t iw = 0; iw < r1; ++iw) {
          const int64_t pixel = (n * a.H + h1 * r1 + ih) * a.W + w1 * r1 + iw;
          acc_t pre[VEC], grad[VEC];
SF_UNROLL
          for (int k = 0; k < VEC; ++k) pre[k] = pre0[k] + pre1[k];
          if (a.extra != nullptr) {
            load<VEC>(a.extra + pixel * a.C + c, term);
SF_UNROLL
            for (int k = 0; k < VEC; ++k) pre[k] += term[k];
          }
          const int64_t at = n * a.grad_sample_stride + (pixel - n * a.H * a.W) * a.C + c;
          load<VEC>(a.grad[0] + at, grad);
          for (int g = 1; g < a.num_grads; ++g) {
            load<VEC>(a.grad[g] + at, term);
SF_UNROLL
            for (int k = 0; k < VEC; ++k) grad[k] += term[k];
          }
SF_UNROLL
          for (int k = 0; k < VEC; ++k) {
            term[k] = grad[k] * activation_grad(pre[k], a.act);
            acc1[k] += term[k];
          }
          if (a.d_extra != nullptr) store<VEC>(a.d_extra + pixel * a.C + c, term);
        }
      }
      if (a.num_parents == 2) {
SF_UNROLL
        for (int k = 0; k < VEC; ++k) {
          sums[kScale1][k] += f1 * acc1[k] * y1[k];
          term[k] = f1 * a.scale[1][c + k] * acc1[k];
        }
        store<VEC>(a.d_parent[1] + pixel1 * a.C + c, term);
      }
SF_UNROLL
      for (int k = 0; k < VEC; ++k) acc0[k] += acc1[k];
    }
  }
SF_UNROLL
  for (int k = 0; k < VEC; ++k) {
    sums[kScale0][k] += f0 * acc0[k] * y0[k];
    sums[kShift][k] += acc0[k];
    term[k] = f0 * a.scale[0][c + k] * acc0[k];
  }
  if constexpr (NUM_SUMS > kShiftScaled) {
    const acc_t f = a.row_scale[n];
SF_UNROLL
    for (int k = 0; k < VEC; ++k) sums[kShiftScaled][k] += f * acc0[k];
  }
  store<VEC>(a.d_parent[0] + coarse_pixel * a.C + c, term);
}

// ---------------------------------------------------------------------------------------------- max-pooling
// `levels` chained 3×3/s2 max-pools of a = act(scale·y + shift) (or a = y without an affine), padded with −inf
// by `pad` before (1: torch, 0: tf_same) and up to the window after. Inputs (N, H, W, C), outputs (N, H/2^L,
// W/2^L, C).
template <typename scalar_t, typename acc_t>
struct PoolArgs {
  const scalar_t* y;
  const acc_t* scale;  // nullptr: no affine and no activation
  const acc_t* shift;
  scalar_t* out;        // forward output
  int32_t* route;       // forward output where not nullptr, backward input: per output element, the level-0 pixel
                        // (h·W + w) its gradient goes to, (N, OH, OW, C)
  const scalar_t* grad; // backward: the output gradient, (N, OH, OW, C)
  scalar_t* d_y;        // backward output
  int64_t N, H, W, C, OH, OW;
  int levels, pad, act;
};

// The level-0 index range [lo, hi] that index `o` of level `levels` covers along one axis of size `size0`:
// chained windows overlap (stride 2 < 3), so their union is one range, clipped to each level's size.
SF_HOST_DEVICE void chained_window(int64_t o, int levels, int pad, int64_t size0, int64_t* lo, int64_t* hi) {
  int64_t l = o, h = o;
  for (int level = levels - 1; level >= 0; --level) {
    const int64_t size = size0 >> level;
    l = 2 * l - pad;
    h = 2 * h - pad + 2;
    l = l < 0 ? 0 : l;
    h = h > size - 1 ? size - 1 : h;
  }
  *lo = l;
  *hi = h;
}

template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE acc_t pool_input(const PoolArgs<scalar_t, acc_t>& a, int64_t n, int64_t h, int64_t w, int64_t c) {
  const acc_t y = static_cast<acc_t>(a.y[((n * a.H + h) * a.W + w) * a.C + c]);
  return a.scale == nullptr ? y : activate(a.scale[c] * y + a.shift[c], a.act);
}

// ATen's max-pool comparison: a larger value or a NaN replaces the running maximum.
template <typename T>
SF_HOST_DEVICE bool replaces_max(T value, T best) {
  return value > best || is_nan(value);
}

// Whether the level-`level` position (h, w) — its chained window over level 0 — holds the value `best`.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE bool window_holds(const PoolArgs<scalar_t, acc_t>& a, int64_t n, int64_t h, int64_t w, int64_t c,
                                 int level, acc_t best) {
  int64_t h_lo, h_hi, w_lo, w_hi;
  chained_window(h, level, a.pad, a.H, &h_lo, &h_hi);
  chained_window(w, level, a.pad, a.W, &w_lo, &w_hi);
  for (int64_t i = h_lo; i <= h_hi; ++i) {
    for (int64_t j = w_lo; j <= w_hi; ++j) {
      const acc_t v = pool_input(a, n, i, j, c);
      if (v == best || (is_nan(v) && is_nan(best))) return true;
    }
  }
  return false;
}

// The level-0 pixel (h·W + w) where ATen's pool-by-pool backward sends the gradient of output (oh, ow) of channel
// c, whose maximum is `best`: the first maximum of each 3×3 window in row-major order, stage by stage.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE int32_t maxpool_route(const PoolArgs<scalar_t, acc_t>& a, int64_t n, int64_t oh, int64_t ow, int64_t c,
                                     acc_t best) {
  int64_t h = oh, w = ow;
  for (int level = a.levels; level >= 1; --level) {
    const int64_t height = a.H >> (level - 1), width = a.W >> (level - 1);
    bool found = false;
    for (int dh = 0; dh < 3 && !found; ++dh) {
      const int64_t ch = 2 * h - a.pad + dh;
      if (ch < 0 || ch >= height) continue;
      for (int dw = 0; dw < 3 && !found; ++dw) {
        const int64_t cw = 2 * w - a.pad + dw;
        if (cw < 0 || cw >= width || !window_holds(a, n, ch, cw, c, level - 1, best)) continue;
        h = ch, w = cw, found = true;
      }
    }
  }
  return static_cast<int32_t>(h * a.W + w);
}

// Forward work item: output pixel `pixel`, channels [c, c + VEC): the maximum over its chained window and, where
// `a.route` is given (training), the level-0 pixel its gradient will go to.
template <int VEC, typename scalar_t, typename acc_t>
SF_HOST_DEVICE void maxpool_forward_item(const PoolArgs<scalar_t, acc_t>& a, int64_t pixel, int64_t c) {
  const int64_t ow = pixel % a.OW, oh = (pixel / a.OW) % a.OH, n = pixel / (a.OW * a.OH);
  int64_t h_lo, h_hi, w_lo, w_hi;
  chained_window(oh, a.levels, a.pad, a.H, &h_lo, &h_hi);
  chained_window(ow, a.levels, a.pad, a.W, &w_lo, &w_hi);
  acc_t best[VEC], y[VEC];
SF_UNROLL
  for (int k = 0; k < VEC; ++k) best[k] = -INFINITY;
  for (int64_t h = h_lo; h <= h_hi; ++h) {
    for (int64_t w = w_lo; w <= w_hi; ++w) {
      load<VEC>(a.y + ((n * a.H + h) * a.W + w) * a.C + c, y);
SF_UNROLL
      for (int k = 0; k < VEC; ++k) {
        const acc_t v = a.scale == nullptr ? y[k] : activate(a.scale[c + k] * y[k] + a.shift[c + k], a.act);
        if (replaces_max(v, best[k])) best[k] = v;
      }
    }
  }
  store<VEC>(a.out + pixel * a.C + c, best);
  if (a.route != nullptr) {
    for (int k = 0; k < VEC; ++k) a.route[pixel * a.C + c + k] = maxpool_route(a, n, oh, ow, c + k, best[k]);
  }
}

// The gradient w.r.t. a at level-0 pixel `pixel`, channel c: the sum, in a fixed order, of the output gradients
// routed there. An output o's chained window spans 2^(L+1) − 1 inputs from 2^L·o − pad·(2^L − 1) (L = levels), so
// the outputs that can hold input h are within (h >> L) − 1 .. (h >> L) + 1.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE acc_t maxpool_gathered_grad(const PoolArgs<scalar_t, acc_t>& a, int64_t pixel, int64_t c) {
  const int64_t w = pixel % a.W, h = (pixel / a.W) % a.H, n = pixel / (a.W * a.H);
  const int32_t target = static_cast<int32_t>(h * a.W + w);
  acc_t d = 0;
  for (int64_t oh = (h >> a.levels) - 1; oh <= (h >> a.levels) + 1; ++oh) {
    if (oh < 0 || oh >= a.OH) continue;
    for (int64_t ow = (w >> a.levels) - 1; ow <= (w >> a.levels) + 1; ++ow) {
      if (ow < 0 || ow >= a.OW) continue;
      const int64_t at = ((n * a.OH + oh) * a.OW + ow) * a.C + c;
      if (a.route[at] == target) d += static_cast<acc_t>(a.grad[at]);
    }
  }
  return d;
}

// Per-channel sums of the prologue backward: Σ d_pre·y (→ d_scale), Σ d_pre (→ d_shift).
enum PrologueSum : int { kPrologueScale = 0, kPrologueShift = 1, kNumPrologueSums = 2 };

// Backward at input pixel `pixel`, channels [c, c + VEC): d_a gathered from the routed output gradients, then
// through a = act(scale·y + shift): d_y = scale·act'·d_a.
template <int VEC, typename scalar_t, typename acc_t>
SF_HOST_DEVICE void maxpool_backward_item(const PoolArgs<scalar_t, acc_t>& a, int64_t pixel, int64_t c,
                                          acc_t (&sums)[kNumPrologueSums][VEC]) {
  acc_t y[VEC], d[VEC];
  load<VEC>(a.y + pixel * a.C + c, y);
SF_UNROLL
  for (int k = 0; k < VEC; ++k) d[k] = maxpool_gathered_grad(a, pixel, c + k);
  if (a.scale != nullptr) {
SF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      const acc_t d_pre = d[k] * activation_grad(a.scale[c + k] * y[k] + a.shift[c + k], a.act);
      sums[kPrologueScale][k] += d_pre * y[k];
      sums[kPrologueShift][k] += d_pre;
      d[k] = a.scale[c + k] * d_pre;
    }
  }
  store<VEC>(a.d_y + pixel * a.C + c, d);
}

// ------------------------------------------------------------------------------------------- depthwise 3×3
// y[n, i, j, c] = b[c] + Σ_{kh, kw} W[c, 3·kh + kw]·a[n, s·i + kh − pad, s·j + kw − pad, c] with a = act(scale·x +
// shift) rounded to the storage dtype (a = x without a prologue) and 0 outside the input (padding after the
// prologue). x (N, H, W, C), y (N, OH, OW, C) = (N, H/s, W/s, C); the weight (C, 9) and bias rounded to the storage
// dtype by the caller, held in the maths dtype. Backward: g = dy + dΣ + 2·y·dΣ² (the statistics' gradients folded;
// g = dy where they are absent — d_sum null — and then y is not read).
template <typename scalar_t, typename acc_t>
struct DepthwiseArgs {
  const scalar_t* x;
  const acc_t* weight;   // (C, 9)
  const acc_t* bias;     // (C,) or nullptr
  const acc_t* scale;    // nullptr: no prologue
  const acc_t* shift;
  scalar_t* y;           // forward output, backward input (as stored; nullptr without the statistics' gradients)
  const scalar_t* dy;    // backward
  const acc_t* d_sum;    // backward: dΣ, dΣ² (C,), or nullptr (no statistics' gradients)
  const acc_t* d_sumsq;
  scalar_t* dx;          // backward output
  int64_t N, H, W, C, OH, OW;
  int stride, pad, act;
};

// Sums of the depthwise ops: the forward's statistics [Σy; Σy²] (kNumPrologueSums rows alike), the wgrad's nine
// taps' Σ g·a and the bias' Σ g.
enum DepthwiseSum : int { kNumStatSums = 2, kDepthwiseBias = 9, kNumDepthwiseWeightSums = 10 };

// a at input pixel (h, w) of image n, channel c: 0 outside the input.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE acc_t depthwise_operand(const DepthwiseArgs<scalar_t, acc_t>& a, int64_t n, int64_t h, int64_t w,
                                       int64_t c) {
  if (h < 0 || h >= a.H || w < 0 || w >= a.W) return acc_t(0);
  const acc_t x = static_cast<acc_t>(a.x[((n * a.H + h) * a.W + w) * a.C + c]);
  if (a.scale == nullptr) return x;
  return static_cast<acc_t>(static_cast<scalar_t>(activate(a.scale[c] * x + a.shift[c], a.act)));
}

// g at output pixel `pixel` (flat over N·OH·OW), channel c.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE acc_t depthwise_output_grad(const DepthwiseArgs<scalar_t, acc_t>& a, int64_t pixel, int64_t c) {
  const int64_t at = pixel * a.C + c;
  if (a.d_sum == nullptr) return static_cast<acc_t>(a.dy[at]);
  return static_cast<acc_t>(a.dy[at]) + a.d_sum[c] + acc_t(2) * static_cast<acc_t>(a.y[at]) * a.d_sumsq[c];
}

// Forward work item: output pixel `pixel`, channel c: y stored, its Σ and Σ² (of the stored value) added to `sums`
// in sum_t (double for a BN's float64 statistics: a square of a float is exact in it, and so is the cancellation of
// the variance that the finalize takes).
template <typename scalar_t, typename acc_t, typename sum_t>
SF_HOST_DEVICE void depthwise_forward_item(const DepthwiseArgs<scalar_t, acc_t>& a, int64_t pixel, int64_t c,
                                           sum_t (&sums)[kNumStatSums][1]) {
  const int64_t j = pixel % a.OW, i = (pixel / a.OW) % a.OH, n = pixel / (a.OW * a.OH);
  acc_t acc = 0;
  for (int tap = 0; tap < 9; ++tap) {
    const int64_t h = a.stride * i + tap / 3 - a.pad, w = a.stride * j + tap % 3 - a.pad;
    acc += a.weight[c * 9 + tap] * depthwise_operand(a, n, h, w, c);
  }
  if (a.bias != nullptr) acc += a.bias[c];
  const scalar_t stored = static_cast<scalar_t>(acc);
  a.y[pixel * a.C + c] = stored;
  const sum_t v = static_cast<sum_t>(stored);
  sums[0][0] += v;
  sums[1][0] += v * v;
}

// dgrad work item: input pixel `pixel` (flat over N·H·W), channel c: d_a = Σ over the taps that reach it of g·W,
// then the prologue's backward (dx = scale·act'·d_a; Σ d_pre·x, Σ d_pre added to `sums`).
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE void depthwise_dgrad_item(const DepthwiseArgs<scalar_t, acc_t>& a, int64_t pixel, int64_t c,
                                         acc_t (&sums)[kNumPrologueSums][1]) {
  const int64_t w = pixel % a.W, h = (pixel / a.W) % a.H, n = pixel / (a.W * a.H);
  acc_t d_a = 0;
  for (int tap = 0; tap < 9; ++tap) {
    const int64_t rh = h + a.pad - tap / 3, rw = w + a.pad - tap % 3;  // s·i and s·j of the output that reads it
    if (rh < 0 || rw < 0 || rh % a.stride != 0 || rw % a.stride != 0) continue;
    const int64_t i = rh / a.stride, j = rw / a.stride;
    if (i >= a.OH || j >= a.OW) continue;
    d_a += a.weight[c * 9 + tap] * depthwise_output_grad(a, (n * a.OH + i) * a.OW + j, c);
  }
  if (a.scale != nullptr) {
    const acc_t x = static_cast<acc_t>(a.x[pixel * a.C + c]);
    const acc_t d_pre = d_a * activation_grad(a.scale[c] * x + a.shift[c], a.act);
    sums[kPrologueScale][0] += d_pre * x;
    sums[kPrologueShift][0] += d_pre;
    d_a = d_pre * a.scale[c];
  }
  a.dx[pixel * a.C + c] = static_cast<scalar_t>(d_a);
}

// wgrad work item: output pixel `pixel`, channel c: g·a of each tap and g (the bias) added to `sums`.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE void depthwise_wgrad_item(const DepthwiseArgs<scalar_t, acc_t>& a, int64_t pixel, int64_t c,
                                         acc_t (&sums)[kNumDepthwiseWeightSums][1]) {
  const int64_t j = pixel % a.OW, i = (pixel / a.OW) % a.OH, n = pixel / (a.OW * a.OH);
  const acc_t g = depthwise_output_grad(a, pixel, c);
  for (int tap = 0; tap < 9; ++tap) {
    sums[tap][0] += g * depthwise_operand(a, n, a.stride * i + tap / 3 - a.pad, a.stride * j + tap % 3 - a.pad, c);
  }
  sums[kDepthwiseBias][0] += g;
}

// ------------------------------------------------------------------------------------------------ RetinaNet loss
// Row r = n·A + a of contiguous cls_logits (N, A, K) and box_regression (N, A, 4); matched (N, A): a ground-truth
// index, −1 background, −2 ignored; gt_labels (N, G); gt_boxes (N, G, 4) and anchors (N, A, 4) in acc_t.
enum LossSum : int { kFocalSum = 0, kBoxSum = 1, kMatchedCount = 2, kNumLossSums = 3 };

template <typename scalar_t, typename acc_t>
struct LossArgs {
  const scalar_t* logits;
  const scalar_t* regression;
  const int64_t* matched;
  const int64_t* labels;
  const acc_t* boxes;
  const acc_t* anchors;
  const acc_t* grad;        // backward: the gradient (3,) of the sums
  scalar_t* d_logits;       // backward
  scalar_t* d_regression;   // backward
  int64_t A, K, G;
  acc_t alpha, gamma, delta;
};

// Sigmoid focal loss of logit x for the target `positive` and, where d_x is given, its derivative: with z = ±x and
// p_t = sigmoid(z), loss = −α_t (1 − p_t)^γ log p_t and d loss / dz = α_t (1 − p_t)^γ (γ p_t log p_t − (1 − p_t)).
template <typename T>
SF_HOST_DEVICE T focal_loss(T x, bool positive, T alpha, T gamma, T* d_x) {
  const T z = positive ? x : -x;
  const T t = log1p_of(exp_of(z < T(0) ? z : -z));
  const T log_p = -((z < T(0) ? -z : T(0)) + t), log_q = -((z > T(0) ? z : T(0)) + t);  // log p_t, log(1 − p_t)
  const T alpha_t = positive ? alpha : T(1) - alpha;
  const T modulator = exp_of(gamma * log_q);
  if (d_x != nullptr) {
    const T dz = alpha_t * modulator * (gamma * exp_of(log_p) * log_p - exp_of(log_q));
    *d_x = positive ? dz : -dz;
  }
  return -alpha_t * modulator * log_p;
}

// Σ_c huber(regression − encode(gt_boxes[gt], anchors[r]), δ) / 4 of row r (torchvision's BoxCoder with weights 1);
// where `d_regression` is set, its gradient clamp(·, −δ, δ) / 4 · g is stored.
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE acc_t box_loss_row(const LossArgs<scalar_t, acc_t>& a, int64_t r, int64_t gt, acc_t g) {
  const acc_t* anchor = a.anchors + r * 4;
  const acc_t* box = a.boxes + gt * 4;
  const acc_t aw = anchor[2] - anchor[0], ah = anchor[3] - anchor[1];
  const acc_t gw = box[2] - box[0], gh = box[3] - box[1];
  const acc_t target[4] = {((box[0] + acc_t(0.5) * gw) - (anchor[0] + acc_t(0.5) * aw)) / aw,
                           ((box[1] + acc_t(0.5) * gh) - (anchor[1] + acc_t(0.5) * ah)) / ah, log_of(gw / aw),
                           log_of(gh / ah)};
  acc_t loss = 0;
SF_UNROLL
  for (int c = 0; c < 4; ++c) {
    const acc_t d = static_cast<acc_t>(a.regression[r * 4 + c]) - target[c];
    const acc_t abs_d = d < acc_t(0) ? -d : d;
    loss += abs_d < a.delta ? acc_t(0.5) * d * d : a.delta * (abs_d - acc_t(0.5) * a.delta);
    if (a.d_regression != nullptr) {
      const acc_t clamped = d < -a.delta ? -a.delta : (d > a.delta ? a.delta : d);
      a.d_regression[r * 4 + c] = static_cast<scalar_t>(clamped * acc_t(0.25) * g);
    }
  }
  return acc_t(0.25) * loss;
}

// Forward work item (row r, class k): its focal loss (rows not ignored), and at k = 0 the row's box loss and count
// (matched rows).
template <int VEC, typename scalar_t, typename acc_t>
SF_HOST_DEVICE void retinanet_loss_item(const LossArgs<scalar_t, acc_t>& a, int64_t r, int64_t k,
                                        acc_t (&sums)[kNumLossSums][VEC]) {
  const int64_t m = a.matched[r];
  if (m < -1) return;
  const int64_t gt = (r / a.A) * a.G + m;
  const bool positive = m >= 0 && a.labels[gt] == k;
  sums[kFocalSum][0] += focal_loss(static_cast<acc_t>(a.logits[r * a.K + k]), positive, a.alpha, a.gamma,
                                   static_cast<acc_t*>(nullptr));
  if (k == 0 && m >= 0) {
    sums[kBoxSum][0] += box_loss_row(a, r, gt, acc_t(0));
    sums[kMatchedCount][0] += acc_t(1);
  }
}

// Backward work item (row r, class k): d_logits[r, k] and at k = 0 the row's d_regression (0 where not matched).
template <typename scalar_t, typename acc_t>
SF_HOST_DEVICE void retinanet_loss_backward_item(const LossArgs<scalar_t, acc_t>& a, int64_t r, int64_t k) {
  const int64_t m = a.matched[r];
  const int64_t gt = (r / a.A) * a.G + (m < 0 ? 0 : m);
  acc_t d_x = 0;
  if (m >= -1) {
    focal_loss(static_cast<acc_t>(a.logits[r * a.K + k]), m >= 0 && a.labels[gt] == k, a.alpha, a.gamma, &d_x);
    d_x *= a.grad[kFocalSum];
  }
  a.d_logits[r * a.K + k] = static_cast<scalar_t>(d_x);
  if (k != 0) return;
  if (m >= 0) {
    box_loss_row(a, r, gt, a.grad[kBoxSum]);
  } else {
SF_UNROLL
    for (int c = 0; c < 4; ++c) a.d_regression[r * 4 + c] = static_cast<scalar_t>(0);
  }
}

}  // namespace spinenet_fast
