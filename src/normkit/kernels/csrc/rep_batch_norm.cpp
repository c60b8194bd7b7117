// normkit's CPU kernels for SLAB's RepBN and PRepBN's mix (Guo et al., ICML 2024, arXiv:2405.11582),
// for a contiguous float32 / float64 (R, C) token matrix (channels last: a row is one token).
//
//   PRepBN while mixing (0 < λ < 1, s = 1 − λ):  y = λ·LN(x) + s·(BN(x) + α·x)
//   written per element as  y = x̂_LN·w1 + (x − μ_c)·rg_c + x·sa + bb_c   with
//     x̂_LN = (x − m_i)·rs_i (per-row LayerNorm statistics), w1 = λ·γ_ln, rg = s·γ_bn·r_c,
//     r_c = (σ_c² + eps)^−½ (per-channel batch or running statistics), sa = s·α, bb = λ·β_ln + s·β_bn.
//   RepBN alone is the same with has_ln = 0 (no LN terms, s = 1).
//
// Why fused: ATen's ops read x four times in the forward (batch sums, LayerNorm, the RepBN affine
// added in place) and g, x six times in the backward. Here:
//   forward  pass 1 (prepbn_stats): per-row LN statistics and per-channel sums of (x − K) and
//            (x − K)² (K: the mean of the first 16 rows, so no cancellation where |μ| ≫ σ) in one sweep;
//            pass 2 (prepbn_out): the mixed output in one write.
//   backward pass 1: per-row sums A_i = Σ_c g·w1, B_i = Σ_c g·w1·x̂_LN and per-channel sums
//            S = Σ_rows g, P = Σ_rows g·x̂_BN, Q = Σ_rows g·x̂_LN (x̂_BN = (x − μ)·r) in one sweep;
//            pass 2: ∂L/∂x = rs_i·(g·w1 − A_i/C − x̂_LN·B_i/C) + g·a_c − x̂_BN·k1_c + k0_c,
//            a = gb·r + sa, k1 = gb·r·P/n, k0 = −gb·r·S/n (training; 0 in eval), gb = s·γ_bn.
//            In eval without LN ∂L/∂x = g·a needs no sums: one pass.
// Per-channel sums go to kColBlocks fixed row blocks (double partials) added in block order, so the
// result does not depend on the thread count. The x̂ forms keep float input at 1e±30 in range
// (never x·r², which underflows). Row statistics: the mean, then the mean squared deviation from the
// row in cache, both in double with every term scaled by 1/C first. NaN propagates.
//
// Portable build, runtime dispatch: as csrc/evonorm.cpp (per-ISA copies from nk_isa.h, the baseline
// unit's extern "C" entry points run the copy cpu_norms.cpp's nk_isa() chose).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "nk_isa.h"

namespace NK_ISA {
namespace {

constexpr int64_t kColBlocks = 32;  // fixed row blocks of the per-channel sums (deterministic order)
constexpr int64_t kShiftRows = 16;  // rows whose mean shifts the one-read batch variance
constexpr int64_t kBlock = 4096;    // values of a row summed in T before the block sum is added in double

std::unique_ptr<double[]> dzeros(int64_t n) { return std::unique_ptr<double[]>(new double[n]()); }

inline int64_t block_start(int64_t R, int64_t nb, int64_t b) { return R * b / nb; }

// col: 2·C doubles out (mean, biased variance per channel); ok: 1 when every row's and channel's
// variance is finite and every channel has m² ≤ kCond·var, m the mean of x − K (K: the mean of the
// first kShiftRows rows), else 0 (the caller's Welford / overflow-safe path). The one-read variance
// Σd²/n − m² in double loses log2(1 + m²/var) of double's 52 bits: float64 input keeps the bound 4
// (≤ 2.3 bits, as the unshifted test it replaces); float32 input allows 2^20 (≥ 31 bits left, more than
// float's 24).
// Per-row mean and rstd from a row in cache. float rows: Σx and Σx² in double in one loop (a float's
// square is exact in double and cannot overflow it), as cpu_norms.cpp's rows; float64 rows: the mean,
// then the mean squared deviation, every term scaled by 1/C first (no overflow up to ~1e154·√C). Sets
// bad on an infinite variance.
template <typename T>
inline void row_stats(const T* xr, int64_t C, double eps, T& mean, T& rstd, int& bad) {
  const double inv_c = 1.0 / static_cast<double>(C);
  if constexpr (sizeof(T) == 4) {
    double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t c = 0; c < C; ++c) {
      const double v = static_cast<double>(xr[c]);
      s1 += v;
      s2 += v * v;
    }
    const double mu = s1 * inv_c;
    double var = s2 * inv_c - mu * mu;
    var = var < 0 ? 0 : var;  // rounding; NaN compares false and stays
    mean = static_cast<T>(mu);
    rstd = static_cast<T>(1.0 / std::sqrt(var + eps));
    return;
  }
  double s1 = 0;
#pragma omp simd reduction(+ : s1)
  for (int64_t c = 0; c < C; ++c) s1 += static_cast<double>(xr[c]) * inv_c;
  double s2 = 0;
#pragma omp simd reduction(+ : s2)
  for (int64_t c = 0; c < C; ++c) {
    const double d = static_cast<double>(xr[c]) - s1;
    s2 += d * (d * inv_c);
  }
  if (std::isinf(s2) || std::isinf(s1)) bad = 1;
  mean = static_cast<T>(s1);
  rstd = static_cast<T>(1.0 / std::sqrt(s2 + eps));
}

// The per-channel sums of `rows` (1 or kGroup) consecutive rows into the block's double partials: one
// load and store of each partial per group, not per row (per row they cost more than reading x).
constexpr int64_t kGroup = 4;

template <typename T, int G>
inline void col_moments(const T* x, int64_t C, const double* K, double* c1, double* c2) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int j = 0; j < G; ++j) {
      const double d = static_cast<double>(x[j * C + c]) - K[c];
      a += d;
      b += d * d;
    }
    c1[c] += a;
    c2[c] += b;
  }
}

// col: 2·C doubles out (mean, biased variance per channel); ok: 1 when every row's and channel's
// variance is finite and every channel has m² ≤ kCond·var, m the mean of x − K (K: the mean of the
// first kShiftRows rows), else 0 (the caller's Welford / overflow-safe path). The one-read variance
// Σd²/n − m² in double loses log2(1 + m²/var) of double's 52 bits: float64 input keeps the bound 4
// (≤ 2.3 bits, as the unshifted test it replaces); float32 input allows 2^20 (≥ 31 bits left, more than
// float's 24).
template <typename T>
void prep_stats(const T* x, T* row_mean, T* row_rstd, double* col, double* ok, int64_t R, int64_t C, int has_ln,
                double eps, int nt) {
  const int64_t nb = std::min<int64_t>(R, kColBlocks);
  const int64_t stride = 2 * C + 16;  // (the pad keeps a block's two partials off the same 4 KiB offsets)
  auto part = dzeros(nb * stride);
  const int64_t k_rows = std::min<int64_t>(R, kShiftRows);
  auto K = dzeros(C);  // the shift: mean of the first rows, close to μ for any stationary batch
  for (int64_t i = 0; i < k_rows; ++i)
    for (int64_t c = 0; c < C; ++c) K[c] += static_cast<double>(x[i * C + c]);
  for (int64_t c = 0; c < C; ++c) K[c] /= static_cast<double>(k_rows);
  const double cond = sizeof(T) == 4 ? 1048576.0 : 4.0;
  int bad_rows = 0;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(| : bad_rows)
  for (int64_t b = 0; b < nb; ++b) {
    double* c1 = part.get() + b * stride;
    double* c2 = c1 + C + 8;
    const int64_t i1 = block_start(R, nb, b + 1);
    for (int64_t i = block_start(R, nb, b); i < i1;) {
      const int64_t k = i + kGroup <= i1 ? kGroup : 1;
      if (k == kGroup) {
        col_moments<T, kGroup>(x + i * C, C, K.get(), c1, c2);
      } else {
        col_moments<T, 1>(x + i * C, C, K.get(), c1, c2);
      }
      if (has_ln) {  // the group's rows are in cache
        for (int64_t j = i; j < i + k; ++j) row_stats(x + j * C, C, eps, row_mean[j], row_rstd[j], bad_rows);
      }
      i += k;
    }
  }
  const double inv_r = 1.0 / static_cast<double>(R);
  bool good = bad_rows == 0;
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t b = 0; b < nb; ++b) {
      s1 += part[b * stride + c];
      s2 += part[b * stride + C + 8 + c];
    }
    const double ms = s1 * inv_r;
    double var = s2 * inv_r - ms * ms;
    var = var < 0 ? 0 : var;  // rounding; NaN compares false and stays
    good = good && std::isfinite(var) && var * cond >= ms * ms;
    col[c] = K[c] + ms;
    col[C + c] = var;
  }
  *ok = good ? 1.0 : 0.0;
}

template <typename T>
void prep_out(const T* x, const T* row_mean, const T* row_rstd, const T* w1, const T* rg, const T* mu, const T* bb,
              double sa_d, T* y, int64_t R, int64_t C, int has_ln, int nt) {
  const T sa = static_cast<T>(sa_d);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < R; ++i) {
    const T* xr = x + i * C;
    T* yr = y + i * C;
    if (has_ln) {
      const T m = row_mean[i], rs = row_rstd[i];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T v = xr[c];
        yr[c] = ((v - m) * rs) * w1[c] + (v - mu[c]) * rg[c] + v * sa + bb[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T v = xr[c];
        yr[c] = (v - mu[c]) * rg[c] + v * sa + bb[c];
      }
    }
  }
}

// The backward's per-channel sums over G consecutive rows (S += Σ g, P += Σ g·x̂_BN, Q += Σ g·x̂_LN with
// the rows' LayerNorm statistics m, rs when LN), and with DX (eval RepBN) ∂L/∂x = g·a written as well.
// The G terms are O(|g|) (x̂ is O(1) at any input scale): summed in T, the group's sum added in double.
template <typename T, int G, bool LN, bool DX>
inline void col_grads(const T* g, const T* x, const T* m, const T* rs, const T* mu, const T* r, const T* a, T* dx,
                      int64_t C, double* ps, double* pp, double* pq) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    T s = 0, p = 0, q = 0;
    for (int j = 0; j < G; ++j) {
      const T gv = g[j * C + c], v = x[j * C + c];
      s += gv;
      p += gv * ((v - mu[c]) * r[c]);
      if constexpr (LN) q += gv * ((v - m[j]) * rs[j]);
      if constexpr (DX) dx[j * C + c] = gv * a[c];
    }
    ps[c] += s;
    pp[c] += p;
    if constexpr (LN) pq[c] += q;
  }
}

template <typename T, bool LN, bool DX>
inline void col_grads_rows(const T* g, const T* x, const T* m, const T* rs, const T* mu, const T* r, const T* a,
                           T* dx, int64_t C, int64_t k, double* ps, double* pp, double* pq) {
  if (k == kGroup) {
    col_grads<T, kGroup, LN, DX>(g, x, m, rs, mu, r, a, dx, C, ps, pp, pq);
  } else {
    col_grads<T, 1, LN, DX>(g, x, m, rs, mu, r, a, dx, C, ps, pp, pq);
  }
}

// sums: 3·C doubles out: S = Σ g, P = Σ g·x̂_BN, Q = Σ g·x̂_LN (Q only with has_ln).
template <typename T>
void prep_bwd(const T* g, const T* x, const T* row_mean, const T* row_rstd, const T* w1, const T* gb, const T* mu,
              const T* r, double sa, T* dx, double* sums, int64_t R, int64_t C, int has_ln, int training, int nt) {
  const int64_t nb = std::min<int64_t>(R, kColBlocks);
  const int64_t stride = 3 * C + 24;  // (padded as in prep_stats)
  auto part = dzeros(nb * stride);
  auto rows = has_ln ? dzeros(2 * R) : nullptr;
  std::unique_ptr<T[]> coef(new T[3 * C]);  // a, k1, k0
  T* a = coef.get();
  T* k1 = a + C;
  T* k0 = k1 + C;
  for (int64_t c = 0; c < C; ++c) a[c] = static_cast<T>(static_cast<double>(gb[c]) * r[c] + sa);
  const bool one_pass = !has_ln && !training;  // ∂L/∂x = g·a: written with the sums
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t b = 0; b < nb; ++b) {
    double* ps = part.get() + b * stride;
    double* pp = ps + C + 8;
    double* pq = pp + C + 8;
    const int64_t i1 = block_start(R, nb, b + 1);
    for (int64_t i = block_start(R, nb, b); i < i1;) {
      const int64_t k = i + kGroup <= i1 ? kGroup : 1;
      const T* gi = g + i * C;
      const T* xi = x + i * C;
      if (has_ln) {
        col_grads_rows<T, true, false>(gi, xi, row_mean + i, row_rstd + i, mu, r, a, nullptr, C, k, ps, pp, pq);
        for (int64_t j = 0; j < k; ++j) {  // LayerNorm's row sums, the rows in cache
          const T* gr = gi + j * C;
          const T* xr = xi + j * C;
          const T m = row_mean[i + j], rs = row_rstd[i + j];
          double sa_ = 0, sb_ = 0;
          for (int64_t c0 = 0; c0 < C; c0 += kBlock) {  // in T over blocks, the block sums in double
            const int64_t c1 = std::min(C, c0 + kBlock);
            T ta = 0, tb = 0;
#pragma omp simd reduction(+ : ta, tb)
            for (int64_t c = c0; c < c1; ++c) {
              const T gw = gr[c] * w1[c];
              ta += gw;
              tb += gw * ((xr[c] - m) * rs);
            }
            sa_ += ta, sb_ += tb;
          }
          rows[2 * (i + j)] = sa_;
          rows[2 * (i + j) + 1] = sb_;
        }
      } else if (one_pass) {
        col_grads_rows<T, false, true>(gi, xi, nullptr, nullptr, mu, r, a, dx + i * C, C, k, ps, pp, pq);
      } else {
        col_grads_rows<T, false, false>(gi, xi, nullptr, nullptr, mu, r, a, nullptr, C, k, ps, pp, pq);
      }
      i += k;
    }
  }
  const double inv_r = 1.0 / static_cast<double>(R);
  for (int64_t c = 0; c < C; ++c) {
    double s = 0, p = 0, q = 0;
    for (int64_t b = 0; b < nb; ++b) {
      s += part[b * stride + c];
      p += part[b * stride + C + 8 + c];
      q += part[b * stride + 2 * C + 16 + c];
    }
    sums[c] = s, sums[C + c] = p, sums[2 * C + c] = q;
    const double gr = static_cast<double>(gb[c]) * r[c];
    k1[c] = training ? static_cast<T>(gr * p * inv_r) : T(0);
    k0[c] = training ? static_cast<T>(-gr * s * inv_r) : T(0);
  }
  if (one_pass) return;
  const double inv_c = 1.0 / static_cast<double>(C);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < R; ++i) {
    const T* gr = g + i * C;
    const T* xr = x + i * C;
    T* dr = dx + i * C;
    if (has_ln) {
      const T m = row_mean[i], rs = row_rstd[i];
      const double rsd = static_cast<double>(rs);
      const T ca = static_cast<T>(rsd * rows[2 * i] * inv_c), cb = static_cast<T>(rsd * rows[2 * i + 1] * inv_c);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T gv = gr[c], v = xr[c];
        const T xl = (v - m) * rs;
        dr[c] = gv * (rs * w1[c] + a[c]) - xl * cb - ca - ((v - mu[c]) * r[c]) * k1[c] + k0[c];
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T gv = gr[c];
        dr[c] = gv * a[c] - ((xr[c] - mu[c]) * r[c]) * k1[c] + k0[c];
      }
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------ C entry points --
#define NK_PREPBN_ENTRY_POINTS_OF(X, T, SUF)                                                                       \
  X(prepbn_stats_##SUF, prep_stats<T>,                                                                             \
    (const T* x, T* row_mean, T* row_rstd, double* col, double* ok, int64_t R, int64_t C, int has_ln, double eps, \
     int nt),                                                                                                      \
    (x, row_mean, row_rstd, col, ok, R, C, has_ln, eps, nt))                                                       \
  X(prepbn_out_##SUF, prep_out<T>,                                                                                 \
    (const T* x, const T* row_mean, const T* row_rstd, const T* w1, const T* rg, const T* mu, const T* bb,         \
     double sa, T* y, int64_t R, int64_t C, int has_ln, int nt),                                                   \
    (x, row_mean, row_rstd, w1, rg, mu, bb, sa, y, R, C, has_ln, nt))                                              \
  X(prepbn_bwd_##SUF, prep_bwd<T>,                                                                                 \
    (const T* g, const T* x, const T* row_mean, const T* row_rstd, const T* w1, const T* gb, const T* mu,          \
     const T* r, double sa, T* dx, double* sums, int64_t R, int64_t C, int has_ln, int training, int nt),          \
    (g, x, row_mean, row_rstd, w1, gb, mu, r, sa, dx, sums, R, C, has_ln, training, nt))
#define NK_PREPBN_ENTRY_POINTS(X) NK_PREPBN_ENTRY_POINTS_OF(X, float, f32) NK_PREPBN_ENTRY_POINTS_OF(X, double, f64)

NK_PREPBN_ENTRY_POINTS(NK_DEFINE)

}  // namespace NK_ISA

#ifdef NK_DISPATCH
NK_EXPORT_ENTRY_POINTS(NK_PREPBN_ENTRY_POINTS)
#endif  // NK_DISPATCH
