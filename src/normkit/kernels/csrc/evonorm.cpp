// normkit's CPU kernels for EvoNorm-B0 and EvoNorm-S0 (Liu et al. 2020, arXiv:2004.02967):
// forward and closed-form backward, for contiguous float32 / float64 (N, C, L) tensors.
//
// Why fused: the ATen closed form (normkit.functional.evonorm._B0Fn/_S0Fn) spends 17-22
// elementwise passes over the input per forward+backward (sigmoid, max, divisions, masks, the
// per-(n, c) sums); here each pass over x (and g) computes everything it can from the values in
// registers, and EvoNorm-S0's segments (and EvoNorm-B0's rows in eval) are read a second time
// from cache, not memory.
//
//   B0:  s_I = sqrt(Var_L(x) + eps) per (n, c) row, a = sqrt(Var_B + eps) per channel (training:
//        Var_B of the whole batch, from the rows' moments by the law of total variance in double;
//        eval: the running variance), y = x / max(a, v·x + s_I) · w + b.
//        Forward: one pass for the rows' moments, one for y (eval: both per row, from cache).
//        Backward (T = g/den, u = x/den, m = [v·x + s_I > a], ties to a as TF's tf.maximum):
//          dx = w·T·(1 − v·m·u) + ((x − μ_I)/s_I)·ps + ((x − μ_B)/a)·qa
//          ps = −w·Σ_L m·T·u / L            (per row; P·s_I of the Python closed form)
//          qa = −w·Σ_{N,L} (1 − m)·T·u / (N·L)   (per channel, training only)
//        one pass for the per-row sums, one for dx (eval: per row, from cache).
//   S0:  segments of the C/G channels of one group of one sample (C/G·L values),
//        r = 1/sqrt(Var + eps), y = x·σ(v·x)·r·w + b; backward with s = σ(v·x),
//        s' = s·(1 − s), A_nc = Σ_L g·x·s, K = Σ_{c∈group} w_c·A_nc, M = C/G·L:
//          dx = w·r·g·(s + v·x·s') − ((x − μ)·r)·(r²·K/M)
//        per segment: pass 1 writes g·(s + v·x·s') to dx and takes the sums, pass 2 finishes dx.
// Every coefficient is formed in double on O(N·C) values and applied as products that stay O(1)
// to O(|x|) (e.g. ((x − μ)/s)·ps, never (x − μ)·(ps/s)), so float input at 1e±30 neither
// overflows nor underflows where the answer does not. Statistics as in cpu_norms.cpp: float rows
// take Σx and Σx² in double in one pass (a float's square is exact in double); float64 rows the
// mean, then the mean squared deviation, every term scaled by 1/n first. Long float sums are taken
// in T over blocks of 4096 values and the block sums added in double. NaN propagates.
//
// Portable build, runtime dispatch: cpu.py compiles this file once per kernel copy (the same
// -march flags and -DNK_ISA namespaces as cpu_norms.cpp) and links it into the same library,
// baseline objects first. The baseline translation unit (-DNK_DISPATCH) also holds the extern "C"
// entry points, which run the copy cpu_norms.cpp's dispatcher chose (nk_isa()).
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "nk_isa.h"  // NK_ISA (default nk_baseline + NK_DISPATCH), the entry-point macros

namespace NK_ISA {
namespace {

constexpr int64_t kBlock = 4096;  // values summed in T before the block sum is added in double

std::unique_ptr<double[]> zeros(int64_t n) { return std::unique_ptr<double[]>(new double[n]()); }

// Moments of n contiguous values: mean (T) and the biased variance (double, so a float row whose
// variance exceeds FLT_MAX keeps its true value for the rstd).
template <typename T>
void row_moments(const T* p, int64_t n, T& mean, double& var) {
  if constexpr (std::is_same_v<T, float>) {
    double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < n; ++i) {
      const double v = p[i];
      s1 += v;
      s2 += v * v;
    }
    const double mu = s1 / static_cast<double>(n);
    const double v = s2 / static_cast<double>(n) - mu * mu;
    var = v < 0 ? 0 : v;  // rounding; NaN compares false and stays
    mean = static_cast<T>(mu);
  } else {
    const T inv = T(1) / static_cast<T>(n);
    double s1 = 0;
#pragma omp simd reduction(+ : s1)
    for (int64_t i = 0; i < n; ++i) s1 += p[i] * inv;
    const T mu = static_cast<T>(s1);
    double s2 = 0;
#pragma omp simd reduction(+ : s2)
    for (int64_t i = 0; i < n; ++i) {
      const T d = p[i] - mu;
      s2 += d * (d * inv);
    }
    mean = mu;
    var = s2;
  }
}

// exp(−|z|) and σ(z), σ'(z) = σ(z)·(1 − σ(z)) from it, without cancellation:
// e = exp(−|z|), q = 1/(1 + e): σ = q (z ≥ 0) or e·q (z < 0), σ' = e·q².
// float: exp by Cody–Waite reduction r = x − n·ln2, a degree-7 Taylor polynomial (|r| ≤ ln2/2,
// truncation < 5e-9 relative) and 2^n from the exponent bits, which the compiler vectorizes.
inline __attribute__((always_inline)) float exp_neg_abs(float z) {
  const float x0 = -std::fabs(z);
  const float x = x0 < -87.0f ? -87.0f : x0;  // keeps 2^n normal
  const float t = x * 1.44269504088896341f + 0.5f;
#if defined(__x86_64__) && !defined(__SSE4_1__)
  // SSE2 has no vector floor: truncate and correct (as cpu_norms.cpp's DyT)
  const float tt = static_cast<float>(static_cast<int32_t>(t));
  const float fx = tt > t ? tt - 1.0f : tt;
#else
  const float fx = std::floor(t);
#endif
  const float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;  // exp(r)
  const float s = std::bit_cast<float>((static_cast<int32_t>(fx) + 127) << 23);  // 2^n
  return x0 < -87.0f ? 0.0f : p * s;  // NaN is not < -87: it stays NaN through p
}

inline __attribute__((always_inline)) double exp_neg_abs(double z) { return std::exp(-std::fabs(z)); }

template <typename T>
inline __attribute__((always_inline)) void sigmoid_and_slope(T z, T& s, T& ds) {
  const T e = exp_neg_abs(z);
  const T q = T(1) / (T(1) + e);
  s = z >= T(0) ? q : e * q;  // NaN: e·q, NaN
  ds = e * q * q;
}

// ------------------------------------------------------------------------------------- B0 --
template <typename T>
inline __attribute__((always_inline)) void b0_row_out(const T* xr, T* yr, int64_t L, T v, T s, T a, T w, T b) {
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) {
    const T d = v * xr[l] + s;
    const T den = d > a ? d : a;
    yr[l] = xr[l] / den * w + b;
  }
}

// y, and per row mean_i, std_i; per channel var_b (the biased batch variance, training) or a copy
// of rvar (eval), mean_b (training), a = sqrt(var_b + eps).
template <typename T>
void b0_forward(const T* x, const T* w, const T* b, const T* v, const T* rvar, T* y, T* var_b, T* mean_b, T* a,
                T* mean_i, T* std_i, int64_t N, int64_t C, int64_t L, int training, double eps, int nt) {
  if (!training) {
    for (int64_t c = 0; c < C; ++c) {
      var_b[c] = rvar[c];
      mean_b[c] = T(0);
      a[c] = static_cast<T>(std::sqrt(static_cast<double>(rvar[c]) + eps));
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < N * C; ++i) {  // statistics and output per row, the row in cache
      const int64_t c = i % C;
      T m;
      double var;
      row_moments(x + i * L, L, m, var);
      const T s = static_cast<T>(std::sqrt(var + eps));
      mean_i[i] = m, std_i[i] = s;
      b0_row_out(x + i * L, y + i * L, L, v[c], s, a[c], w[c], b[c]);
    }
    return;
  }
  auto vi = zeros(N * C);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N * C; ++i) {
    T m;
    row_moments(x + i * L, L, m, vi[i]);
    mean_i[i] = m;
    std_i[i] = static_cast<T>(std::sqrt(vi[i] + eps));
  }
  for (int64_t c = 0; c < C; ++c) {  // law of total variance, in double on N values
    double mu = 0, within = 0, between = 0;
    for (int64_t n = 0; n < N; ++n) mu += static_cast<double>(mean_i[n * C + c]);
    mu /= static_cast<double>(N);
    for (int64_t n = 0; n < N; ++n) {
      const double d = static_cast<double>(mean_i[n * C + c]) - mu;
      within += vi[n * C + c];
      between += d * d;
    }
    const double vb = (within + between) / static_cast<double>(N);
    var_b[c] = static_cast<T>(vb);  // inf only where the true value exceeds T's range
    mean_b[c] = static_cast<T>(mu);
    a[c] = static_cast<T>(std::sqrt(vb + eps));
  }
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N * C; ++i) {
    const int64_t c = i % C;
    b0_row_out(x + i * L, y + i * L, L, v[c], std_i[i], a[c], w[c], b[c]);
  }
}

// Per-row sums of the backward: Σ m·T·u, Σ T·u, Σ m·T·u·x, Σ g·u, Σ g (in double, by blocks).
template <typename T>
inline __attribute__((always_inline)) void b0_row_sums(const T* gr, const T* xr, int64_t L, T v, T s, T a,
                                                       double out[5]) {
  double o0 = 0, o1 = 0, o2 = 0, o3 = 0, o4 = 0;
  for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
    const int64_t m = std::min(kBlock, L - l0);
    const T* gq = gr + l0;
    const T* xq = xr + l0;
    T sw = 0, sa = 0, swx = 0, sgu = 0, sg = 0;
#pragma omp simd reduction(+ : sw, sa, swx, sgu, sg)
    for (int64_t l = 0; l < m; ++l) {
      const T xv = xq[l], gv = gq[l];
      const T d = v * xv + s;
      const bool mk = d > a;
      const T rd = T(1) / (mk ? d : a);
      const T u = xv * rd;
      const T tu = gv * rd * u;
      const T wm = mk ? tu : T(0);
      sw += wm;
      sa += tu;
      swx += wm * xv;
      sgu += gv * u;
      sg += gv;
    }
    o0 += sw, o1 += sa, o2 += swx, o3 += sgu, o4 += sg;
  }
  out[0] = o0, out[1] = o1, out[2] = o2, out[3] = o3, out[4] = o4;
}

template <typename T>
inline __attribute__((always_inline)) void b0_row_dx(const T* gr, const T* xr, T* dr, int64_t L, T v, T s, T a, T w,
                                                     T mi, T ri, T ps, T mb, T ra, T qa) {
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) {
    const T xv = xr[l];
    const T d = v * xv + s;
    const bool mk = d > a;
    const T rd = T(1) / (mk ? d : a);
    const T u = xv * rd;
    const T vmu = mk ? v * u : T(0);
    dr[l] = w * (gr[l] * rd) * (T(1) - vmu) + ((xv - mi) * ri) * ps + ((xv - mb) * ra) * qa;
  }
}

template <typename T>
void b0_backward(const T* g, const T* x, const T* w, const T* v, const T* mean_i, const T* std_i, const T* mean_b,
                 const T* a, T* dx, T* dw, T* db, T* dv, int64_t N, int64_t C, int64_t L, int training, int nt) {
  const int64_t R = N * C;
  auto sums = zeros(5 * R);  // per row: Σ m·T·u, Σ T·u, Σ m·T·u·x, Σ g·u, Σ g
  const double invL = 1.0 / static_cast<double>(L);
  if (!training) {  // no path through the batch statistics: sums and dx per row, the row in cache
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < R; ++i) {
      const int64_t c = i % C;
      double* o = sums.get() + 5 * i;
      b0_row_sums(g + i * L, x + i * L, L, v[c], std_i[i], a[c], o);
      const T ps = static_cast<T>(-static_cast<double>(w[c]) * o[0] * invL);
      const T ri = static_cast<T>(1.0 / static_cast<double>(std_i[i]));
      b0_row_dx(g + i * L, x + i * L, dx + i * L, L, v[c], std_i[i], a[c], w[c], mean_i[i], ri, ps, T(0), T(0), T(0));
    }
  } else {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < R; ++i) {
      const int64_t c = i % C;
      b0_row_sums(g + i * L, x + i * L, L, v[c], std_i[i], a[c], sums.get() + 5 * i);
    }
    auto qa = zeros(C);
    for (int64_t c = 0; c < C; ++c) {
      double t = 0;
      for (int64_t n = 0; n < N; ++n) t += sums[5 * (n * C + c) + 1] - sums[5 * (n * C + c)];
      qa[c] = -static_cast<double>(w[c]) * t / (static_cast<double>(N) * static_cast<double>(L));
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < R; ++i) {
      const int64_t c = i % C;
      const double* o = sums.get() + 5 * i;
      const T ps = static_cast<T>(-static_cast<double>(w[c]) * o[0] * invL);
      const T ri = static_cast<T>(1.0 / static_cast<double>(std_i[i]));
      const T ra = static_cast<T>(1.0 / static_cast<double>(a[c]));
      b0_row_dx(g + i * L, x + i * L, dx + i * L, L, v[c], std_i[i], a[c], w[c], mean_i[i], ri, ps, mean_b[c], ra,
                static_cast<T>(qa[c]));
    }
  }
  for (int64_t c = 0; c < C; ++c) {  // parameter gradients: column sums over the N rows, in double
    double sv = 0, sw = 0, sb = 0;
    for (int64_t n = 0; n < N; ++n) {
      const double* o = sums.get() + 5 * (n * C + c);
      sv += o[2], sw += o[3], sb += o[4];
    }
    if (dv != nullptr) dv[c] = static_cast<T>(-static_cast<double>(w[c]) * sv);
    if (dw != nullptr) dw[c] = static_cast<T>(sw);
    if (db != nullptr) db[c] = static_cast<T>(sb);
  }
}

// ------------------------------------------------------------------------------------- S0 --
template <typename T>
void s0_forward(const T* x, const T* w, const T* b, const T* v, T* y, T* mean, T* rstd, int64_t N, int64_t C,
                int64_t L, int64_t G, double eps, int nt) {
  const int64_t cg = C / G, n = cg * L;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N * G; ++i) {
    const T* xi = x + i * n;
    T* yi = y + i * n;
    T m;
    double var;
    row_moments(xi, n, m, var);
    const T r = static_cast<T>(1.0 / std::sqrt(var + eps));
    mean[i] = m, rstd[i] = r;
    const int64_t c0 = (i % G) * cg;
    for (int64_t k = 0; k < cg; ++k) {
      const T vc = v[c0 + k], sc = r * w[c0 + k], bc = b[c0 + k];
      const T* xc = xi + k * L;
      T* yc = yi + k * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        T s, ds;
        sigmoid_and_slope(vc * xc[l], s, ds);
        yc[l] = xc[l] * s * sc + bc;
      }
    }
  }
}

template <typename T>
void s0_backward(const T* g, const T* x, const T* w, const T* v, const T* mean, const T* rstd, T* dx, T* dw, T* db,
                 T* dv, int64_t N, int64_t C, int64_t L, int64_t G, int nt) {
  const int64_t cg = C / G;
  auto sums = zeros(3 * N * C);  // per (n, c): A = Σ g·x·s, E = Σ g·x²·s', B = Σ g
  const double inv_m = 1.0 / (static_cast<double>(cg) * static_cast<double>(L));
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N * G; ++i) {
    const int64_t c0 = (i % G) * cg, off = i * cg * L;
    double k_sum = 0;
    for (int64_t k = 0; k < cg; ++k) {
      const T vc = v[c0 + k];
      const T* gc = g + off + k * L;
      const T* xc = x + off + k * L;
      T* dc = dx + off + k * L;
      double ta = 0, te = 0, tb = 0;
      for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
        const int64_t m = std::min(kBlock, L - l0);
        T sa = 0, se = 0, sb = 0;
#pragma omp simd reduction(+ : sa, se, sb)
        for (int64_t l = l0; l < l0 + m; ++l) {
          T s, ds;
          sigmoid_and_slope(vc * xc[l], s, ds);
          const T gx = gc[l] * xc[l];
          const T gxd = gx * ds;
          sa += gx * s;
          se += gxd * xc[l];
          sb += gc[l];
          dc[l] = gc[l] * s + vc * gxd;  // g·(s + v·x·s'), finished below
        }
        ta += sa, te += se, tb += sb;
      }
      double* o = sums.get() + 3 * (i / G * C + c0 + k);
      o[0] = ta, o[1] = te, o[2] = tb;
      k_sum += static_cast<double>(w[c0 + k]) * ta;
    }
    const double r = static_cast<double>(rstd[i]);
    const T c2 = static_cast<T>(r * r * k_sum * inv_m);  // r²·K/M: O(1/|x|) at any input scale
    const T mu = mean[i], rt = rstd[i];
    for (int64_t k = 0; k < cg; ++k) {
      const T wr = static_cast<T>(static_cast<double>(w[c0 + k]) * r);
      const T* xc = x + off + k * L;
      T* dc = dx + off + k * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) dc[l] = wr * dc[l] - ((xc[l] - mu) * rt) * c2;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0, sv = 0, sb = 0;
    for (int64_t n = 0; n < N; ++n) {
      const double* o = sums.get() + 3 * (n * C + c);
      const double r = static_cast<double>(rstd[n * G + c / cg]);
      sw += r * o[0], sv += r * o[1], sb += o[2];
    }
    if (dw != nullptr) dw[c] = static_cast<T>(sw);
    if (dv != nullptr) dv[c] = static_cast<T>(static_cast<double>(w[c]) * sv);
    if (db != nullptr) db[c] = static_cast<T>(sb);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ C entry points --
#define NK_EVO_ENTRY_POINTS_OF(X, T, SUF)                                                                          \
  X(evo_b0_fwd_##SUF, b0_forward<T>,                                                                               \
    (const T* x, const T* w, const T* b, const T* v, const T* rvar, T* y, T* var_b, T* mean_b, T* a, T* mean_i,    \
     T* std_i, int64_t N, int64_t C, int64_t L, int training, double eps, int nt),                                 \
    (x, w, b, v, rvar, y, var_b, mean_b, a, mean_i, std_i, N, C, L, training, eps, nt))                           \
  X(evo_b0_bwd_##SUF, b0_backward<T>,                                                                              \
    (const T* g, const T* x, const T* w, const T* v, const T* mean_i, const T* std_i, const T* mean_b, const T* a, \
     T* dx, T* dw, T* db, T* dv, int64_t N, int64_t C, int64_t L, int training, int nt),                           \
    (g, x, w, v, mean_i, std_i, mean_b, a, dx, dw, db, dv, N, C, L, training, nt))                                \
  X(evo_s0_fwd_##SUF, s0_forward<T>,                                                                               \
    (const T* x, const T* w, const T* b, const T* v, T* y, T* mean, T* rstd, int64_t N, int64_t C, int64_t L,      \
     int64_t G, double eps, int nt),                                                                               \
    (x, w, b, v, y, mean, rstd, N, C, L, G, eps, nt))                                                              \
  X(evo_s0_bwd_##SUF, s0_backward<T>,                                                                              \
    (const T* g, const T* x, const T* w, const T* v, const T* mean, const T* rstd, T* dx, T* dw, T* db, T* dv,     \
     int64_t N, int64_t C, int64_t L, int64_t G, int nt),                                                          \
    (g, x, w, v, mean, rstd, dx, dw, db, dv, N, C, L, G, nt))
#define NK_EVO_ENTRY_POINTS(X) NK_EVO_ENTRY_POINTS_OF(X, float, f32) NK_EVO_ENTRY_POINTS_OF(X, double, f64)

NK_EVO_ENTRY_POINTS(NK_DEFINE)

}  // namespace NK_ISA

#ifdef NK_DISPATCH
NK_EXPORT_ENTRY_POINTS(NK_EVO_ENTRY_POINTS)
#endif  // NK_DISPATCH
