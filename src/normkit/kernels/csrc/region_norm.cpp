// normkit's CPU kernels for Region Normalization (Yu et al., "Region Normalization for Image
// Inpainting", AAAI 2020, arXiv:1911.10375): RN-B and RN-L's region statistics, output and
// closed-form backward, for contiguous float32 / float64 (N, C, L) tensors and a binary one-channel
// mask m (N, L) (1 = region 1, the hole; 0 = region 0).
//
// Why fused: the ATen formulation (normkit.functional.region_norm._RegionNormFn) spends 7
// full-size passes in forward and 8 in backward (batched products with the mask matrix, the centred
// copy it saves); here a pass over x computes both regions' sums with the mask in registers, and the
// output / ∂x are one write.
//
//   Statistics (region r of a row, per (n, c) with per_sample, else per channel over the batch):
//     S_r = Σ [m = r] (at least 1, as the official Sr[Sr == 0] = 1), μ_r = Σ_r x / S_r,
//     σ²_r = Σ_r (x − μ_r)² / S_r, ρ_r = 1/sqrt(σ²_r + eps·count/S_r)  (count = L or N·L)
//   Output:  y = (x − μ_r)·ρ_r·G + B,  G = gc_r·gmap[n, l],  B = bc_r + bmap[n, l]
//     (RN-B: per-(channel, region) tables gc, bc, no maps; RN-L: maps, gc = 1, bc = 0).
//   Backward, rn = (x − μ_r)·ρ_r, with region sums over the statistics' domain
//     A_r = Σ_r ∂y·gmap, D_r = Σ_r ∂y·gmap·(x − μ_r), E_r = Σ_r ∂y:
//     ∂x = ρ_r·gc_r·(∂y·gmap − A_r/S_r − rn·ρ_r·D_r/S_r)
//     ∂gc_r = Σ ρ_r·D_r,  ∂bc_r = Σ E_r,  ∂gmap[n, l] = Σ_c ∂y·gc_r·rn,  ∂bmap[n, l] = Σ_c ∂y.
//
// Passes: forward reads each row once from memory for its region sums (the squared deviations from
// the row's region means come from cache) and writes y once (per_sample: in the same loop, the row
// in cache; batch statistics: after the per-channel combine, Chan et al.'s pairwise update in double).
// Backward likewise: one read of ∂y, x for the sums, one write of ∂x. With maps (RN-L) the
// per-position sums over the channels make the sums' loop parallel over samples.
// Overflow: the squares are taken in double (a float's square is exact there; float64 rows are
// scaled by 1/L first), every coefficient is formed in double on O(N·C) values and applied as
// products that stay O(1) to O(|x|), so float input at 1e±30 neither overflows nor underflows where
// the answer does not. A NaN stays in its region (the mask selects, it never multiplies).
//
// Portable build, runtime dispatch as evonorm.cpp (nk_isa.h).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "nk_isa.h"  // NK_ISA (default nk_baseline + NK_DISPATCH), the entry-point macros

namespace NK_ISA {
namespace {

constexpr int64_t kBlock = 4096;  // values summed in T before the block sum is added in double

std::unique_ptr<double[]> zeros(int64_t n) { return std::unique_ptr<double[]>(new double[n]()); }

// Per-sample count of region 1 (Σ m), in double. One thread: N·L is 1/C of the input, less work than
// waking the pool for it costs on a busy machine.
template <typename T>
void region_counts(const T* m, double* cnt, int64_t N, int64_t L) {
  for (int64_t n = 0; n < N; ++n) {
    const T* mr = m + n * L;
    int64_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t l = 0; l < L; ++l) s += mr[l] != T(0) ? 1 : 0;
    cnt[n] = static_cast<double>(s);
  }
}

// One row's region moments: out = {mean_1, M2_1, mean_0, M2_0} (M2: the sum of squared deviations
// from the row's own region mean), n1/n0 the region sizes. Second pass from cache.
template <typename T>
inline void row_region_moments(const T* xr, const T* mr, int64_t L, double n1, double n0, double out[4]) {
  double s1 = 0, s0 = 0;
  for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
    const int64_t e = std::min(kBlock, L - l0);
    T a1 = 0, a0 = 0;
#pragma omp simd reduction(+ : a1, a0)
    for (int64_t l = l0; l < l0 + e; ++l) {
      const T v = xr[l];
      const bool in = mr[l] != T(0);
      a1 += in ? v : T(0);
      a0 += in ? T(0) : v;
    }
    s1 += a1, s0 += a0;
  }
  double mu1 = n1 > 0 ? s1 / n1 : 0.0, mu0 = n0 > 0 ? s0 / n0 : 0.0;
  double q1 = 0, q0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    // float lanes about the rounded means c: the mean c + Σ(x − c)/n and M2 = Σ(x − c)² − (Σ(x − c))²/n
    // (exact for any c; the float sums of x alone lose the digits that combining rows needs), in blocks
    const float c1 = static_cast<float>(mu1), c0 = static_cast<float>(mu0);
    double t1 = 0, t0 = 0;
    for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
      const int64_t e = std::min(kBlock, L - l0);
      float a1 = 0, a0 = 0, b1 = 0, b0 = 0;
#pragma omp simd reduction(+ : a1, a0, b1, b0)
      for (int64_t l = l0; l < l0 + e; ++l) {
        const bool in = mr[l] != T(0);
        const float d = xr[l] - (in ? c1 : c0), d2 = d * d;
        a1 += in ? d2 : 0.0f;
        a0 += in ? 0.0f : d2;
        b1 += in ? d : 0.0f;
        b0 += in ? 0.0f : d;
      }
      q1 += a1, q0 += a0, t1 += b1, t0 += b0;
    }
    q1 = n1 > 0 ? q1 - t1 * t1 / n1 : 0.0, q0 = n0 > 0 ? q0 - t0 * t0 / n0 : 0.0;
    if (std::isfinite(t1) && n1 > 0) mu1 = c1 + t1 / n1;
    if (std::isfinite(t0) && n0 > 0) mu0 = c0 + t0 / n0;
    // the squares overflow float (|x − μ| ≳ 1e19) or may have lost values below its normal range
    // (a sum under 1e-20): that row again in double (NaN input too: NaN either way)
    const bool redo = !(q1 < 1e37 && q0 < 1e37) || (n1 > 0 && q1 < 1e-20) || (n0 > 0 && q0 < 1e-20);
    if (redo) {
      q1 = q0 = 0;
#pragma omp simd reduction(+ : q1, q0)
      for (int64_t l = 0; l < L; ++l) {
        const bool in = mr[l] != T(0);
        const double d = static_cast<double>(xr[l]) - (in ? mu1 : mu0);
        const double d2 = d * d;
        q1 += in ? d2 : 0.0;
        q0 += in ? 0.0 : d2;
      }
    }
    q1 = q1 < 0 ? 0 : q1, q0 = q0 < 0 ? 0 : q0;  // rounding of the correction; NaN stays
  } else {  // float64: each square scaled by 1/L first (no overflow below |x| ~ 1e154·sqrt(L))
    const double inv = 1.0 / static_cast<double>(L);
#pragma omp simd reduction(+ : q1, q0)
    for (int64_t l = 0; l < L; ++l) {
      const bool in = mr[l] != T(0);
      const double d = xr[l] - (in ? mu1 : mu0);
      const double d2 = d * (d * inv);
      q1 += in ? d2 : 0.0;
      q0 += in ? 0.0 : d2;
    }
    q1 *= static_cast<double>(L), q0 *= static_cast<double>(L);
  }
  out[0] = mu1, out[1] = q1, out[2] = mu0, out[3] = q0;
}

// y for one row from its region coefficients (mu, a = ρ·gc, b = bc) and the optional maps.
template <typename T>
inline void row_out(const T* xr, const T* mr, T* yr, int64_t L, T mu1, T mu0, T a1, T a0, T b1, T b0, const T* gm,
                    const T* bm) {
  if (gm == nullptr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const bool in = mr[l] != T(0);
      yr[l] = (xr[l] - (in ? mu1 : mu0)) * (in ? a1 : a0) + (in ? b1 : b0);
    }
  } else {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const bool in = mr[l] != T(0);
      yr[l] = (xr[l] - (in ? mu1 : mu0)) * ((in ? a1 : a0) * gm[l]) + ((in ? b1 : b0) + bm[l]);
    }
  }
}

// mu, rho: (R, 2) with R = N·C (per_sample) or C; region 1 in column 0. gc, bc: (C, 2). gmap, bmap: (N, L)
// or null (together).
template <typename T>
void rn_forward(const T* x, const T* m, const T* gc, const T* bc, const T* gmap, const T* bmap, T* y, T* mu, T* rho,
                int64_t N, int64_t C, int64_t L, int per_sample, double eps, int nt) {
  auto cnt = zeros(N);
  region_counts(m, cnt.get(), N, L);
  const double Ld = static_cast<double>(L);
  if (per_sample) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < N * C; ++i) {
      const int64_t n = i / C, c = i % C;
      const double n1 = cnt[n], n0 = Ld - n1;
      double o[4];
      row_region_moments(x + i * L, m + n * L, L, n1, n0, o);
      const double s1 = std::max(n1, 1.0), s0 = std::max(n0, 1.0);
      const double r1 = 1.0 / std::sqrt(o[1] / s1 + eps * Ld / s1);
      const double r0 = 1.0 / std::sqrt(o[3] / s0 + eps * Ld / s0);
      mu[2 * i] = static_cast<T>(o[0]), mu[2 * i + 1] = static_cast<T>(o[2]);
      rho[2 * i] = static_cast<T>(r1), rho[2 * i + 1] = static_cast<T>(r0);
      const T* gm = gmap == nullptr ? nullptr : gmap + n * L;
      const T* bm = bmap == nullptr ? nullptr : bmap + n * L;
      row_out(x + i * L, m + n * L, y + i * L, L, mu[2 * i], mu[2 * i + 1], static_cast<T>(r1 * gc[2 * c]),
              static_cast<T>(r0 * gc[2 * c + 1]), bc[2 * c], bc[2 * c + 1], gm, bm);
    }
    return;
  }
  auto rows = zeros(4 * N * C);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N * C; ++i) {
    const int64_t n = i / C;
    row_region_moments(x + i * L, m + n * L, L, cnt[n], Ld - cnt[n], rows.get() + 4 * i);
  }
  double tot1 = 0;
  for (int64_t n = 0; n < N; ++n) tot1 += cnt[n];
  const double count = static_cast<double>(N) * Ld, tot0 = count - tot1;
  for (int64_t c = 0; c < C; ++c) {  // Chan's pairwise combine of the rows' (count, mean, M2), per region
    double st[2][3] = {{0, 0, 0}, {0, 0, 0}};
    for (int64_t n = 0; n < N; ++n) {
      const double* o = rows.get() + 4 * (n * C + c);
      const double k[2] = {cnt[n], Ld - cnt[n]};
      for (int r = 0; r < 2; ++r) {
        if (k[r] == 0) continue;
        const double nb = st[r][0] + k[r], delta = o[2 * r] - st[r][1];
        st[r][1] += delta * (k[r] / nb);
        st[r][2] += o[2 * r + 1] + delta * delta * (st[r][0] * k[r] / nb);
        st[r][0] = nb;
      }
    }
    const double s[2] = {std::max(tot1, 1.0), std::max(tot0, 1.0)};
    for (int r = 0; r < 2; ++r) {
      mu[2 * c + r] = static_cast<T>(st[r][1]);
      rho[2 * c + r] = static_cast<T>(1.0 / std::sqrt(st[r][2] / s[r] + eps * count / s[r]));
    }
  }
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N * C; ++i) {
    const int64_t n = i / C, c = i % C;
    const T* gm = gmap == nullptr ? nullptr : gmap + n * L;
    const T* bm = bmap == nullptr ? nullptr : bmap + n * L;
    const T a1 = static_cast<T>(static_cast<double>(rho[2 * c]) * gc[2 * c]);
    const T a0 = static_cast<T>(static_cast<double>(rho[2 * c + 1]) * gc[2 * c + 1]);
    row_out(x + i * L, m + n * L, y + i * L, L, mu[2 * c], mu[2 * c + 1], a1, a0, bc[2 * c], bc[2 * c + 1], gm, bm);
  }
}

// One row's backward sums: o = {A_1, D_1, E_1, A_0, D_0, E_0} (see the header), T within blocks, double
// across. With maps (gm), also adds this row's share of ∂gmap (∂y·(x − μ_r)·w_r, w_r = ρ_r·gc_r) and
// ∂bmap (∂y) to the sample's per-position sums dgm / dbm (either may be null), in the same loop.
template <typename T>
inline void row_bwd_sums(const T* gr, const T* xr, const T* mr, const T* gm, int64_t L, T mu1, T mu0, T w1, T w0,
                         T* dgm, T* dbm, double o[6]) {
  double t[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
    const int64_t e = std::min(kBlock, L - l0);
    T a1 = 0, d1 = 0, e1 = 0, a0 = 0, d0 = 0, e0 = 0;
    if (gm == nullptr) {
#pragma omp simd reduction(+ : a1, d1, a0, d0)
      for (int64_t l = l0; l < l0 + e; ++l) {
        const bool in = mr[l] != T(0);
        const T gv = gr[l];
        const T gd = gv * (xr[l] - (in ? mu1 : mu0));
        a1 += in ? gv : T(0);
        a0 += in ? T(0) : gv;
        d1 += in ? gd : T(0);
        d0 += in ? T(0) : gd;
      }
      e1 = a1, e0 = a0;
    } else if (dgm != nullptr && dbm != nullptr) {
#pragma omp simd reduction(+ : a1, d1, e1, a0, d0, e0)
      for (int64_t l = l0; l < l0 + e; ++l) {
        const bool in = mr[l] != T(0);
        const T gv = gr[l], gx = gv * (xr[l] - (in ? mu1 : mu0)), gd = gx * gm[l];
        a1 += in ? gv * gm[l] : T(0);
        a0 += in ? T(0) : gv * gm[l];
        d1 += in ? gd : T(0);
        d0 += in ? T(0) : gd;
        e1 += in ? gv : T(0);
        e0 += in ? T(0) : gv;
        dgm[l] += gx * (in ? w1 : w0);
        dbm[l] += gv;
      }
    } else {
#pragma omp simd reduction(+ : a1, d1, e1, a0, d0, e0)
      for (int64_t l = l0; l < l0 + e; ++l) {
        const bool in = mr[l] != T(0);
        const T gv = gr[l], gx = gv * (xr[l] - (in ? mu1 : mu0)), gd = gx * gm[l];
        a1 += in ? gv * gm[l] : T(0);
        a0 += in ? T(0) : gv * gm[l];
        d1 += in ? gd : T(0);
        d0 += in ? T(0) : gd;
        e1 += in ? gv : T(0);
        e0 += in ? T(0) : gv;
        if (dgm != nullptr) dgm[l] += gx * (in ? w1 : w0);
        if (dbm != nullptr) dbm[l] += gv;
      }
    }
    t[0] += a1, t[1] += d1, t[2] += e1, t[3] += a0, t[4] += d0, t[5] += e0;
  }
  for (int k = 0; k < 6; ++k) o[k] = t[k];
}

// ∂x of one row: ρgc·(∂y·gmap − A/S − rn·q), rn = (x − μ)·ρ, q = ρ·D/S (coefficients per region), plus
// RN-L's pooling gradient when pm (∂ of the channel mean, already divided by C) is given: pm[l], and
// px[l] where this row's channel c is the arg-max ix[l].
template <typename T>
inline void row_dx(const T* gr, const T* xr, const T* mr, const T* gm, T* dr, int64_t L, T mu1, T mu0, T r1, T r0,
                   T p1, T p0, T h1, T h0, T q1, T q0, const T* pm, const T* px, const int32_t* ix, int32_t c) {
  if (gm == nullptr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const bool in = mr[l] != T(0);
      const T rn = (xr[l] - (in ? mu1 : mu0)) * (in ? r1 : r0);
      dr[l] = (in ? p1 : p0) * (gr[l] - (in ? h1 : h0) - rn * (in ? q1 : q0));
    }
  } else if (pm == nullptr) {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const bool in = mr[l] != T(0);
      const T rn = (xr[l] - (in ? mu1 : mu0)) * (in ? r1 : r0);
      dr[l] = (in ? p1 : p0) * (gr[l] * gm[l] - (in ? h1 : h0) - rn * (in ? q1 : q0));
    }
  } else {
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const bool in = mr[l] != T(0);
      const T rn = (xr[l] - (in ? mu1 : mu0)) * (in ? r1 : r0);
      const T v = (in ? p1 : p0) * (gr[l] * gm[l] - (in ? h1 : h0) - rn * (in ? q1 : q0)) + pm[l];
      dr[l] = ix[l] == c ? v + px[l] : v;
    }
  }
}

// Row i's dx coefficients from the region sums (a row's own for per_sample, the channel's otherwise).
template <typename T>
inline void dx_coefs(const double* sums, double s1, double s0, T r1, T r0, T g1, T g0, T out[6]) {
  const double s[2] = {s1, s0}, r[2] = {r1, r0}, g[2] = {g1, g0};
  for (int k = 0; k < 2; ++k) {
    out[k] = static_cast<T>(r[k] * g[k]);                        // p = ρ·gc
    out[2 + k] = static_cast<T>(sums[3 * k] / s[k]);             // h = A/S
    out[4 + k] = static_cast<T>(r[k] * sums[3 * k + 1] / s[k]);  // q = ρ·D/S
  }
}

// Backward, first half: the per-row region sums into `sums` (6·N·C doubles, kept by the caller for
// rn_bwd_dx) and the parameter gradients (each output may be null).
template <typename T>
void rn_bwd_sums(const T* g, const T* x, const T* m, const T* gc, const T* gmap, const T* mu, const T* rho,
                 double* sums, T* dgc, T* dbc, T* dgmap, T* dbmap, int64_t N, int64_t C, int64_t L, int per_sample,
                 int nt) {
  auto stat = [&](int64_t n, int64_t c) { return per_sample ? n * C + c : c; };
  if (gmap != nullptr) {  // per-position sums over channels: one sample per thread
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; ++n) {
      T* dgm = dgmap == nullptr ? nullptr : dgmap + n * L;
      T* dbm = dbmap == nullptr ? nullptr : dbmap + n * L;
      for (int64_t l = 0; l < L; ++l) {
        if (dgm != nullptr) dgm[l] = T(0);
        if (dbm != nullptr) dbm[l] = T(0);
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = n * C + c, k = stat(n, c);
        const T w1 = static_cast<T>(static_cast<double>(rho[2 * k]) * gc[2 * c]);
        const T w0 = static_cast<T>(static_cast<double>(rho[2 * k + 1]) * gc[2 * c + 1]);
        row_bwd_sums(g + i * L, x + i * L, m + n * L, gmap + n * L, L, mu[2 * k], mu[2 * k + 1], w1, w0, dgm, dbm,
                     sums + 6 * i);
      }
    }
  } else {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < N * C; ++i) {
      const int64_t n = i / C, k = stat(n, i % C);
      row_bwd_sums<T>(g + i * L, x + i * L, m + n * L, nullptr, L, mu[2 * k], mu[2 * k + 1], T(0), T(0), nullptr,
                      nullptr, sums + 6 * i);
    }
  }
  for (int64_t c = 0; c < C; ++c) {  // the per-(channel, region) tables' gradients, in double
    double sg[2] = {0, 0}, sb[2] = {0, 0};
    for (int64_t n = 0; n < N; ++n) {
      const double* o = sums + 6 * (n * C + c);
      const int64_t k = stat(n, c);
      for (int r = 0; r < 2; ++r) {
        sg[r] += static_cast<double>(rho[2 * k + r]) * o[3 * r + 1];
        sb[r] += o[3 * r + 2];
      }
    }
    for (int r = 0; r < 2; ++r) {
      if (dgc != nullptr) dgc[2 * c + r] = static_cast<T>(sg[r]);
      if (dbc != nullptr) dbc[2 * c + r] = static_cast<T>(sb[r]);
    }
  }
}

// Backward, second half: ∂x from rn_bwd_sums' sums, one write; with RN-L's pooling gradient pg (N, 2, L)
// and arg-max channels idx (N, L) (both or neither) added in the same write.
template <typename T>
void rn_bwd_dx(const T* g, const T* x, const T* m, const T* gc, const T* gmap, const T* mu, const T* rho,
               const double* sums, const T* pg, const int32_t* idx, T* dx, int64_t N, int64_t C, int64_t L,
               int per_sample, int nt) {
  auto cnt = zeros(N);
  region_counts(m, cnt.get(), N, L);
  const double Ld = static_cast<double>(L);
  std::unique_ptr<T[]> pm;
  if (pg != nullptr) {  // the channel mean's share ∂/C, once per position
    pm.reset(new T[N * L]);
    const T inv = T(1) / static_cast<T>(C);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t l = 0; l < L; ++l) pm[n * L + l] = pg[2 * n * L + l] * inv;
  }
  auto coefs = std::unique_ptr<T[]>(new T[6 * (per_sample ? N * C : C)]);
  if (per_sample) {
    for (int64_t i = 0; i < N * C; ++i) {
      const int64_t n = i / C, c = i % C;
      dx_coefs(sums + 6 * i, std::max(cnt[n], 1.0), std::max(Ld - cnt[n], 1.0), rho[2 * i], rho[2 * i + 1],
               gc[2 * c], gc[2 * c + 1], coefs.get() + 6 * i);
    }
  } else {
    double tot1 = 0;
    for (int64_t n = 0; n < N; ++n) tot1 += cnt[n];
    const double s1 = std::max(tot1, 1.0), s0 = std::max(static_cast<double>(N) * Ld - tot1, 1.0);
    for (int64_t c = 0; c < C; ++c) {
      double tot[6] = {0, 0, 0, 0, 0, 0};
      for (int64_t n = 0; n < N; ++n)
        for (int j = 0; j < 6; ++j) tot[j] += sums[6 * (n * C + c) + j];
      dx_coefs(tot, s1, s0, rho[2 * c], rho[2 * c + 1], gc[2 * c], gc[2 * c + 1], coefs.get() + 6 * c);
    }
  }
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N * C; ++i) {
    const int64_t n = i / C, c = i % C, k = per_sample ? i : c;
    const T* kc = coefs.get() + 6 * k;
    row_dx(g + i * L, x + i * L, m + n * L, gmap == nullptr ? nullptr : gmap + n * L, dx + i * L, L, mu[2 * k],
           mu[2 * k + 1], rho[2 * k], rho[2 * k + 1], kc[0], kc[1], kc[2], kc[3], kc[4], kc[5],
           pg == nullptr ? nullptr : pm.get() + n * L, pg == nullptr ? nullptr : pg + (2 * n + 1) * L,
           idx == nullptr ? nullptr : idx + n * L, static_cast<int32_t>(c));
  }
}

// ----------------------------------------------------------------------------- RN-L's maps --
// [mean_c x, max_c x] (N, 2, L) and the arg-max channel (N, L; int32) in one read of x (ATen's max(dim=1)
// with indices measured 10x slower than the read). Ties go to the first channel; a NaN wins and stays.
template <typename T>
void rn_pool(const T* x, T* out, int32_t* idx, int64_t N, int64_t C, int64_t L, int nt) {
  constexpr int64_t kTile = 512;  // positions per tile: the running sums, maxima and indices stay in L1
  const int64_t tiles = (L + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < N * tiles; ++t) {
    const int64_t n = t / tiles, l0 = (t % tiles) * kTile, e = std::min(kTile, L - l0);
    T sm[kTile], mx[kTile];
    int32_t ix[kTile];
    const T* x0 = x + n * C * L + l0;
#pragma omp simd
    for (int64_t l = 0; l < e; ++l) sm[l] = x0[l], mx[l] = x0[l], ix[l] = 0;
    for (int64_t c = 1; c < C; ++c) {
      const T* xr = x0 + c * L;
      const int32_t ci = static_cast<int32_t>(c);
#pragma omp simd
      for (int64_t l = 0; l < e; ++l) {
        const T v = xr[l], m = mx[l];
        const bool up = v > m || (v != v && m == m);
        sm[l] += v;
        mx[l] = up ? v : m;
        ix[l] = up ? ci : ix[l];
      }
    }
    const T inv = T(1) / static_cast<T>(C);
    T* om = out + 2 * n * L + l0;
    T* ox = om + L;
    int32_t* oi = idx + n * L + l0;
#pragma omp simd
    for (int64_t l = 0; l < e; ++l) om[l] = sm[l] * inv, ox[l] = mx[l], oi[l] = ix[l];
  }
}

// One (H, W) plane copied into a zero-padded (H + 2p, W + 2p) buffer: every tap then runs over whole rows
// (no ragged edges, whose scalar remainders cost more than the vector body at W ~ 56).
template <typename T>
inline void pad_plane(const T* sp, T* pad, int64_t H, int64_t W, int64_t p) {
  const int64_t Wp = W + 2 * p;
  std::fill(pad, pad + (H + 2 * p) * Wp, T(0));
  for (int64_t r = 0; r < H; ++r) std::copy(sp + r * W, sp + (r + 1) * W, pad + (r + p) * Wp + p);
}

// y = conv2d(s, w, b, padding = k/2) for few-channel (N, Ci, H, W) maps, direct: per (n, co) plane,
// each tap one contiguous multiply-add over a row (oneDNN measured 4x slower at 2->1 channels, 7x7).
template <typename T>
void rn_conv(const T* s, const T* w, const T* b, T* y, int64_t N, int64_t Ci, int64_t Co, int64_t H, int64_t W,
             int64_t k, int nt) {
  const int64_t p = k / 2, P = H * W, Wp = W + 2 * p;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N * Co; ++i) {
    const int64_t n = i / Co, co = i % Co;
    std::unique_ptr<T[]> pad(new T[(H + 2 * p) * Wp]);
    T* yp = y + i * P;
    const T b0 = b == nullptr ? T(0) : b[co];
    for (int64_t q = 0; q < P; ++q) yp[q] = b0;
    for (int64_t ci = 0; ci < Ci; ++ci) {
      pad_plane(s + (n * Ci + ci) * P, pad.get(), H, W, p);
      const T* wk = w + (co * Ci + ci) * k * k;
      for (int64_t r = 0; r < H; ++r) {
        T* yr = yp + r * W;
        for (int64_t ky = 0; ky < k; ++ky) {
          const T* pr = pad.get() + (r + ky) * Wp;
          for (int64_t kx = 0; kx < k; ++kx) {
            const T wv = wk[ky * k + kx];
            const T* sr = pr + kx;
#pragma omp simd
            for (int64_t c = 0; c < W; ++c) yr[c] += wv * sr[c];
          }
        }
      }
    }
  }
}

// dw[co, ci, ky, kx] = Σ_n Σ_(r, c) g[n, co, r, c]·s[n, ci, r + ky − p, c + kx − p] (zero padding): the
// weight gradient of rn_conv, per-thread partial sums in double added at the end.
template <typename T>
void rn_conv_dw(const T* s, const T* g, T* dw, int64_t N, int64_t Ci, int64_t Co, int64_t H, int64_t W, int64_t k,
                int nt) {
  const int64_t p = k / 2, P = H * W, K = Co * Ci * k * k, Wp = W + 2 * p;
  auto acc = zeros(static_cast<int64_t>(nt) * K);
#pragma omp parallel num_threads(nt)
  {
    double* a = acc.get() + static_cast<int64_t>(omp_get_thread_num()) * K;
    std::unique_ptr<T[]> pad(new T[(H + 2 * p) * Wp]);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N * Co * Ci; ++i) {
      const int64_t n = i / (Co * Ci), co = (i / Ci) % Co, ci = i % Ci;
      const T* gp = g + (n * Co + co) * P;
      pad_plane(s + (n * Ci + ci) * P, pad.get(), H, W, p);
      double* ak = a + (co * Ci + ci) * k * k;
      for (int64_t ky = 0; ky < k; ++ky) {
        for (int64_t kx = 0; kx < k; ++kx) {
          T t = 0;
          for (int64_t r = 0; r < H; ++r) {
            const T* gr = gp + r * W;
            const T* sr = pad.get() + (r + ky) * Wp + kx;
#pragma omp simd reduction(+ : t)
            for (int64_t c = 0; c < W; ++c) t += gr[c] * sr[c];
          }
          ak[ky * k + kx] += t;
        }
      }
    }
  }
  for (int64_t j = 0; j < K; ++j) {
    double t = 0;
    for (int th = 0; th < nt; ++th) t += acc[static_cast<int64_t>(th) * K + j];
    dw[j] = static_cast<T>(t);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ C entry points --
#define NK_RN_ENTRY_POINTS_OF(X, T, SUF)                                                                           \
  X(rn_fwd_##SUF, rn_forward<T>,                                                                                   \
    (const T* x, const T* m, const T* gc, const T* bc, const T* gmap, const T* bmap, T* y, T* mu, T* rho,          \
     int64_t N, int64_t C, int64_t L, int per_sample, double eps, int nt),                                         \
    (x, m, gc, bc, gmap, bmap, y, mu, rho, N, C, L, per_sample, eps, nt))                                          \
  X(rn_bwd_sums_##SUF, rn_bwd_sums<T>,                                                                             \
    (const T* g, const T* x, const T* m, const T* gc, const T* gmap, const T* mu, const T* rho, double* sums,      \
     T* dgc, T* dbc, T* dgmap, T* dbmap, int64_t N, int64_t C, int64_t L, int per_sample, int nt),                 \
    (g, x, m, gc, gmap, mu, rho, sums, dgc, dbc, dgmap, dbmap, N, C, L, per_sample, nt))                           \
  X(rn_bwd_dx_##SUF, rn_bwd_dx<T>,                                                                                 \
    (const T* g, const T* x, const T* m, const T* gc, const T* gmap, const T* mu, const T* rho, const double* sums, \
     const T* pg, const int32_t* idx, T* dx, int64_t N, int64_t C, int64_t L, int per_sample, int nt),            \
    (g, x, m, gc, gmap, mu, rho, sums, pg, idx, dx, N, C, L, per_sample, nt))                             \
  X(rn_pool_##SUF, rn_pool<T>, (const T* x, T* out, int32_t* idx, int64_t N, int64_t C, int64_t L, int nt),        \
    (x, out, idx, N, C, L, nt))                                                                                    \
  X(rn_conv_##SUF, rn_conv<T>,                                                                                     \
    (const T* s, const T* w, const T* b, T* y, int64_t N, int64_t Ci, int64_t Co, int64_t H, int64_t W, int64_t k, \
     int nt),                                                                                                      \
    (s, w, b, y, N, Ci, Co, H, W, k, nt))                                                                          \
  X(rn_conv_dw_##SUF, rn_conv_dw<T>,                                                                               \
    (const T* s, const T* g, T* dw, int64_t N, int64_t Ci, int64_t Co, int64_t H, int64_t W, int64_t k, int nt),  \
    (s, g, dw, N, Ci, Co, H, W, k, nt))
#define NK_RN_ENTRY_POINTS(X) NK_RN_ENTRY_POINTS_OF(X, float, f32) NK_RN_ENTRY_POINTS_OF(X, double, f64)

NK_RN_ENTRY_POINTS(NK_DEFINE)

}  // namespace NK_ISA

#ifdef NK_DISPATCH
NK_EXPORT_ENTRY_POINTS(NK_RN_ENTRY_POINTS)
#endif  // NK_DISPATCH
