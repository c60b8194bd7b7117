// normkit's CPU kernels for PowerNorm's training step (Shen et al. 2020, arXiv:2003.07845, official
// code sIncerass/powernorm MaskPowerNorm): GroupScaling1D + the ψ-normalization + affine forward,
// and the approximate backward with GroupScaling's exact backward, for contiguous float32 / float64
// (N, C) token rows, no pad mask, no synchronization (normkit.functional.power_norm routes here).
//
// Why fused: the ATen path spends ~10 passes over the input per forward+backward (GroupScaling's
// engine forward and backward, the column sums, the affine, the backward's two elementwise
// terms); here, per direction, each row is read from memory at most twice and finished while in L1.
//
// Forward, with r = 1/sqrt(mean_group(x²) + geps) per (row, group) (G = 0: r = 1, no GroupScaling),
// xs = x·r, Σ_c = Σ_rows xs², var = Σ/N, inv_b = 1/sqrt(var + eps):
//   inv_f = inv_b while t = iters + 1 ≤ warmup (batch statistics), else 1/sqrt(phi + eps);
//   y = xs·(inv_f·w) + b.
// Pass 1 takes r and the column sums Σ xs²; pass 2 writes y. After warmup inv_f does not depend
// on the batch and pass 1 writes y too (one pass). Returned per channel (stats, 4·C values of T):
//   [inv_f, inv_bwd (inv_b, or inv_f with paper_exact), gam = inv_f²·Σ xs², var]
// (gam: Σ_rows z² of the backward's ema update, formed in double so that ψ² past the float range
// does not turn it into inf·0). Per (row, group) r (rrow, N·G values).
// Backward, with a = w·inv_bwd, q = k·inv_f·inv_bwd (k = (1 − α_bkw)·ema_gz, per channel):
//   dxs = g·a − xs·q                                   (the approximate ĝ·inv_bwd)
//   dx  = r·(dxs − xs·mean_group(dxs·xs))              (GroupScaling's exact backward; G = 0: dxs)
//   S_c = Σ_rows g·xs, B_c = Σ_rows g                  (the caller forms ∂w, ∂b, the ema_gz update)
// One pass: each row's dxs is written to dx, its group sums taken, and dx finished from cache.
//
// Column sums: the rows are cut into a fixed number of blocks (a function of N only), each block
// sums its rows into its own double buffer (GroupScaled squares, bounded by C/G, first in T over
// kFlush rows), and the buffers are added in block order — the same result for any thread count.
// Row sums in double (a float's square is exact in double: no overflow for float input at any
// scale), with kLanes partial sums. NaN propagates.
//
// Portable build, runtime dispatch: as evonorm.cpp (nk_isa.h's per-ISA copies; the baseline unit
// exports the extern "C" entry points, which run the copy cpu_norms.cpp's nk_isa() chose).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "nk_isa.h"  // NK_ISA (default nk_baseline + NK_DISPATCH), the entry-point macros

namespace NK_ISA {
namespace {

#define NK_PN_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;       // independent partial sums of a row reduction (not latency-bound)
constexpr int64_t kMaxBlocks = 64;  // row blocks of the column sums
constexpr int64_t kFlush = 16;      // rows of GroupScaled squares summed in T before they go to double

// Σ_{i<m} f(i) in double with kLanes partial sums.
template <typename F>
NK_PN_INLINE double lane_sum(int64_t m, F f) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= m; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  }
  double t = 0;
  for (; i < m; ++i) t += f(i);
  for (int j = 0; j < kLanes; ++j) t += acc[j];
  return t;
}

int64_t n_blocks(int64_t N) { return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, N / 16)); }

// This thread's row blocks [first_block, end_block) of nb, inside a parallel region: the same
// contiguous share in every pass of a call (with the same thread count).
int64_t first_block(int64_t nb) { return nb * omp_get_thread_num() / omp_get_num_threads(); }
int64_t end_block(int64_t nb) { return nb * (omp_get_thread_num() + 1) / omp_get_num_threads(); }

// part[0:m] = Σ_k part[k·m : (k+1)·m], the nb blocks' sums added in block order (the same result for
// any thread count); on the calling thread: O(nb·m) work is not worth another parallel region's
// start and barrier, which cost most when the cores are shared.
void add_blocks(double* part, int64_t nb, int64_t m) {
  for (int64_t k = 1; k < nb; ++k) {
    const double* pk = part + k * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) part[j] += pk[j];
  }
}

std::unique_ptr<double[]> zeros(int64_t n) { return std::unique_ptr<double[]>(new double[n]()); }

// 1/sqrt(mean(x²) + geps) of m values (the RMS of a channel group; a float's square is exact in double).
template <typename T>
NK_PN_INLINE T group_rstd(const T* p, int64_t m, double geps) {
  const double ss = lane_sum(m, [p](int64_t i) {
    const double v = static_cast<double>(p[i]);
    return v * v;
  });
  return static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(m) + geps));
}

// Σ (x·r)² of m values added to ag (in A), and y = (x·r)·scale + b where yg is not null.
template <typename T, typename A>
NK_PN_INLINE void square_sums(const T* xg, T r, A* ag, T* yg, const T* sg, const T* bg, int64_t m) {
  if (yg == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const A s = static_cast<A>(xg[j] * r);
      ag[j] += s * s;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const T xs = xg[j] * r;
      const A s = static_cast<A>(xs);
      ag[j] += s * s;
      yg[j] = xs * sg[j] + bg[j];
    }
  }
}

template <typename T>
void pn_forward(const T* x, const T* w, const T* b, const T* phi, const int64_t* iters, T* y, T* rrow, T* stats,
                int64_t N, int64_t C, int64_t G, int64_t warmup, int paper_exact, double eps, double geps, int nt) {
  const bool batch = iters[0] + 1 <= warmup;  // t ≤ warmup: batch statistics
  const int64_t ng = G > 0 ? G : 1, cg = C / ng, nb = n_blocks(N);
  T* inv_f = stats;
  T* inv_bwd = stats + C;
  T* gam = stats + 2 * C;
  T* var = stats + 3 * C;
  std::unique_ptr<T[]> scale(new T[C]);  // inv_f·w
  if (!batch) {
    for (int64_t c = 0; c < C; ++c) {
      inv_f[c] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(phi[c]) + eps));
      scale[c] = inv_f[c] * w[c];
    }
  }
  auto part = zeros(nb * C);  // per block: Σ xs²
#pragma omp parallel num_threads(nt)
  {
    // GroupScaled values are at most sqrt(C/G) in size: their squares are summed in T over kFlush rows,
    // then added to the block's double sums (no conversion in the row loop). Without GroupScaling x
    // may have any size, and its squares go to double directly.
    std::unique_ptr<T[]> rows_acc(new T[G > 0 ? C : 0]());
    for (int64_t k = first_block(nb); k < end_block(nb); ++k) {
      double* acc = part.get() + k * C;
      const int64_t r0 = N * k / nb, r1 = N * (k + 1) / nb;
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t gi = 0; gi < ng; ++gi) {
          const int64_t o = gi * cg;
          const T* xg = x + i * C + o;
          T* yg = batch ? nullptr : y + i * C + o;  // after warmup the scale is known: y in this pass
          if (G > 0) {
            const T r = rrow[i * G + gi] = group_rstd(xg, cg, geps);
            square_sums(xg, r, rows_acc.get() + o, yg, scale.get() + o, b + o, cg);
          } else {
            square_sums(xg, T(1), acc + o, yg, scale.get() + o, b + o, cg);
          }
        }
        if (G > 0 && ((i - r0) % kFlush == kFlush - 1 || i == r1 - 1)) {
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) {
            acc[j] += static_cast<double>(rows_acc[j]);
            rows_acc[j] = T(0);
          }
        }
      }
    }
  }
  const double dn = static_cast<double>(N);
  add_blocks(part.get(), nb, C);
  for (int64_t c = 0; c < C; ++c) {
    const double sq = part[c];
    double v = sq / dn, ib = 1.0 / std::sqrt(v + eps);
    // float64 without GroupScaling: Σx² overflows double for |x| past ~1e154. Redo the column scaled by
    // its largest |x| (only then): ψ² = m²·s/N with s = Σ(x/m)², 1/sqrt(ψ² + eps) = 1/(m·sqrt(s/N + eps/m²)).
    double m = 1.0, s = sq;
    if (G == 0 && std::isinf(sq)) {
      m = 0;
      for (int64_t i = 0; i < N; ++i) m = std::max(m, std::abs(static_cast<double>(x[i * C + c])));
      s = 0;
      for (int64_t i = 0; i < N; ++i) {
        const double t = static_cast<double>(x[i * C + c]) / m;
        s += t * t;
      }
      v = m * m * (s / dn);  // inf only where the true value exceeds double's range
      ib = 1.0 / (m * std::sqrt(s / dn + eps / (m * m)));
    }
    if (batch) {
      inv_f[c] = static_cast<T>(ib);
      scale[c] = inv_f[c] * w[c];
    }
    const double f = batch ? ib : 1.0 / std::sqrt(static_cast<double>(phi[c]) + eps);
    inv_bwd[c] = paper_exact ? inv_f[c] : static_cast<T>(ib);
    gam[c] = static_cast<T>((f * m) * (f * m) * s);  // f²·Σx²
    var[c] = static_cast<T>(v);  // inf only where the true value exceeds T's range
  }
  if (!batch) return;
  // each thread takes its pass-1 rows backwards: the rows it read last may still be in cache
#pragma omp parallel num_threads(nt)
  for (int64_t i = N * end_block(nb) / nb - 1; i >= N * first_block(nb) / nb; --i) {
    for (int64_t gi = 0; gi < ng; ++gi) {
      const T* xg = x + i * C + gi * cg;
      T* yg = y + i * C + gi * cg;
      const T* sg = scale.get() + gi * cg;
      const T* bg = b + gi * cg;
      const T r = G > 0 ? rrow[i * G + gi] : T(1);
#pragma omp simd
      for (int64_t j = 0; j < cg; ++j) yg[j] = (xg[j] * r) * sg[j] + bg[j];
    }
  }
}

template <typename T>
void pn_backward(const T* g, const T* x, const T* w, const T* rrow, const T* stats, const T* ema, double keep,
                 T* dx, T* colsum, T* gsum, int64_t N, int64_t C, int64_t G, int nt) {
  const int64_t ng = G > 0 ? G : 1, cg = C / ng, nb = n_blocks(N);
  const T* inv_f = stats;
  const T* inv_bwd = stats + C;
  std::unique_ptr<T[]> a(new T[C]), q(new T[C]);
  for (int64_t c = 0; c < C; ++c) {
    const T k = static_cast<T>(keep) * ema[c];
    a[c] = w[c] * inv_bwd[c];
    q[c] = k * inv_f[c] * inv_bwd[c];
  }
  auto part = zeros(2 * nb * C);  // per block: Σ g·xs, Σ g
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t k = 0; k < nb; ++k) {
    double* as = part.get() + 2 * k * C;
    double* ab = as + C;
    const int64_t r0 = N * k / nb, r1 = N * (k + 1) / nb;
    for (int64_t i = r0; i < r1; ++i) {
      for (int64_t gi = 0; gi < ng; ++gi) {
        const int64_t o = i * C + gi * cg;
        const T* gg = g + o;
        const T* xg = x + o;
        T* dg = dx + o;
        const T* ag = a.get() + gi * cg;
        const T* qg = q.get() + gi * cg;
        double* sg = as + gi * cg;
        double* bg = ab + gi * cg;
        const T r = G > 0 ? rrow[i * G + gi] : T(1);
#pragma omp simd
        for (int64_t j = 0; j < cg; ++j) {
          const T xs = xg[j] * r;
          sg[j] += static_cast<double>(gg[j]) * static_cast<double>(xs);
          bg[j] += static_cast<double>(gg[j]);
          dg[j] = gg[j] * ag[j] - xs * qg[j];
        }
        if (G > 0) {  // GroupScaling's backward, the group in cache
          const double m = lane_sum(cg, [dg, xg, r](int64_t j) {
            return static_cast<double>(dg[j]) * static_cast<double>(xg[j] * r);
          }) / static_cast<double>(cg);
          const T mt = static_cast<T>(m);
#pragma omp simd
          for (int64_t j = 0; j < cg; ++j) dg[j] = r * (dg[j] - (xg[j] * r) * mt);
        }
      }
    }
  }
  add_blocks(part.get(), nb, 2 * C);
  for (int64_t c = 0; c < C; ++c) {
    colsum[c] = static_cast<T>(part[c]);
    gsum[c] = static_cast<T>(part[C + c]);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ C entry points --
#define NK_PN_ENTRY_POINTS_OF(X, T, SUF)                                                                        \
  X(pn_fwd_##SUF, pn_forward<T>,                                                                                \
    (const T* x, const T* w, const T* b, const T* phi, const int64_t* iters, T* y, T* rrow, T* stats, int64_t N, \
     int64_t C, int64_t G, int64_t warmup, int paper_exact, double eps, double geps, int nt),                   \
    (x, w, b, phi, iters, y, rrow, stats, N, C, G, warmup, paper_exact, eps, geps, nt))                          \
  X(pn_bwd_##SUF, pn_backward<T>,                                                                               \
    (const T* g, const T* x, const T* w, const T* rrow, const T* stats, const T* ema, double keep, T* dx,        \
     T* colsum, T* gsum, int64_t N, int64_t C, int64_t G, int nt),                                              \
    (g, x, w, rrow, stats, ema, keep, dx, colsum, gsum, N, C, G, nt))
#define NK_PN_ENTRY_POINTS(X) NK_PN_ENTRY_POINTS_OF(X, float, f32) NK_PN_ENTRY_POINTS_OF(X, double, f64)

NK_PN_ENTRY_POINTS(NK_DEFINE)

}  // namespace NK_ISA

#ifdef NK_DISPATCH
NK_EXPORT_ENTRY_POINTS(NK_PN_ENTRY_POINTS)
#endif  // NK_DISPATCH
