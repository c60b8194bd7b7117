// normkit's CPU kernels: LayerNorm / RMSNorm / GroupNorm / InstanceNorm (forward + closed-form
// backward) and DyT, for contiguous float32 / float64 tensors.
//
// Why hand-written: Inductor emits the column sums of a norm's backward (dw = Σ_rows g·x̂,
// db = Σ_rows g) as a second pass over g and x, and writes a channels-first norm's output in a
// second loop order. Here every row (segment) is read once per pass while it is in L1/L2, and
// the column sums go to per-thread double-precision buffers inside the row loop (as ATen does).
//
// Layouts (all contiguous):
//   seg: N segments of C·L values; segment i is normalized over all its C·L values and its
//        per-channel affine is w[(i % G)·C + c]. Token rows: (rows, D, 1), G = 1.
//        GroupNorm: (N·G, C/G, HW), G groups. InstanceNorm: (N·C, 1, HW), G = C.
//   cf:  (N, C, L) normalized over C for every (n, l) — LayerNorm2d / RMSNorm2d.
//   dyt: (N, C, L), y = w[c]·tanh(α·x) + b[c] elementwise.
// Weight and bias pointers are never null (the caller passes ones / zeros).
// Statistics: float LayerNorm rows/segments take Σx and Σx² in double in one pass (a float's
// square is exact in double; the cancellation in Σx²/n − mean² is ~1e-16·mean²/var, far below
// float resolution). float64, RMS and the channels-first kernels take the mean (0 for RMS), then
// the mean squared deviation (no E[x²] − E[x]² cancellation), every term scaled by 1/n before it
// is summed (no overflow where the squares' sum would leave the float range). Every other long
// sum is taken in T over a block — 4096 values (with kLanes partial sums), or 64 channels in the
// channels-first kernels — and the block sums are added in double; column sums (dw, db) go to
// per-thread double buffers. NaN in the input propagates to the output and the statistics.
//
// Portable build, runtime dispatch. A cached build may be copied to (or shared with) another
// machine, so nothing here is compiled for the build machine's CPU (-march=native would crash
// with SIGILL on an older one). cpu.py compiles this one file several times, as separate
// translation units built in parallel and linked into one library:
//   nk_baseline  -march=x86-64 (SSE2; on aarch64 armv8-a, elsewhere the compiler's default),
//                plus -DNK_DISPATCH: also the extern "C" entry points and the variant choice;
//   nk_avx2      -march=x86-64-v3 (AVX2, FMA, BMI1/2, ...), x86-64 only;
//   nk_avx512    -march=x86-64-v4 -mprefer-vector-width=512 (AVX-512 F/BW/CD/DQ/VL), x86-64 only.
// -DNK_ISA=<namespace> puts each copy of the kernels in its own namespace. The entry points
// switch on the variant chosen once, when the library is loaded: the widest this CPU runs
// (__builtin_cpu_supports), or the one cpu.py sets with nk_set_isa (NORMKIT_CPU_ISA). Code of
// a variant only ever runs after that check. Our code has internal linkage in every copy; the
// inline library code the copies share (std::vector members) is emitted in each object and the
// linker keeps the first, so cpu.py links the baseline object first and every shared function
// is its baseline copy (tests/test_cpu_kernels.py disassembles the library to check).
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "nk_isa.h"  // NK_ISA (default nk_baseline + NK_DISPATCH), the entry-point macros

namespace NK_ISA {
namespace {

constexpr int64_t kBlock = 4096;  // values summed in T before the block sum is added in double
constexpr int64_t kCfChunk = 256;          // positions l handled together by the channels-first kernels
constexpr int64_t kChanBlock = 64;         // channels summed in T before the sums go to double (cf)

#define NK_INLINE inline __attribute__((always_inline))

// Sums with kLanes independent partial sums (several vector registers): one vector accumulator
// would make every add wait for the previous one (latency-bound, measured 1.5× slower per pass).
constexpr int kLanes = 32;

template <typename T, typename F>
NK_INLINE void lane_sums(int64_t m, T& out1, T& out2, F f) {  // out1 += Σ f(i).first, out2 += Σ f(i).second
  T a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= m; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      T v1, v2;
      f(i + j, v1, v2);
      a1[j] += v1;
      a2[j] += v2;
    }
  }
  T t1 = 0, t2 = 0;
  for (; i < m; ++i) {
    T v1, v2;
    f(i, v1, v2);
    t1 += v1;
    t2 += v2;
  }
  for (int j = 0; j < kLanes; ++j) t1 += a1[j], t2 += a2[j];
  out1 += t1;
  out2 += t2;
}

template <typename T, typename F>
NK_INLINE T lane_sum(int64_t m, F f) {
  T a[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= m; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) a[j] += f(i + j);
  }
  T t = 0;
  for (; i < m; ++i) t += f(i);
  for (int j = 0; j < kLanes; ++j) t += a[j];
  return t;
}

// Σ (x − mu)²·inv over m values in double: the overflow fallback of scaled_sqdev and cf_forward.
template <typename T>
double sqdev_double(const T* q, int64_t m, T mu, T inv, int64_t stride = 1) {
  double t = 0;
  for (int64_t i = 0; i < m; ++i) {
    const double d = static_cast<double>(q[i * stride]) - static_cast<double>(mu);
    t += d * d * static_cast<double>(inv);
  }
  return t;
}

// Σ x·inv and Σ (x − mu)²·inv over n values: every term is scaled by inv = 1/n before it is
// summed, so a row whose squares sum past the float range (|x| ~ 1e19 in fp32) stays finite.
template <typename T>
double scaled_sum(const T* p, int64_t n, T inv) {
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const T* q = p + i0;
    total += lane_sum<T>(std::min(kBlock, n - i0), [q, inv](int64_t i) __attribute__((always_inline)) { return q[i] * inv; });
  }
  return total;
}

// A float block whose scaled squares still leave the float range (|x − mu| past ~1e19·sqrt(n): the
// true variance may exceed FLT_MAX) is summed again in double, where nothing finite overflows; the
// check costs one compare per block of 4096 values, and normal rows never take the second pass.
template <typename T>
double scaled_sqdev(const T* p, int64_t n, T mu, T inv) {
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const T* q = p + i0;
    const int64_t m = std::min(kBlock, n - i0);
    const T part = lane_sum<T>(m, [q, mu, inv](int64_t i) __attribute__((always_inline)) {
      const T d = q[i] - mu;
      return d * (d * inv);
    });
    total += std::isfinite(part) ? static_cast<double>(part) : sqdev_double(q, m, mu, inv);
  }
  return total;
}

// ----------------------------------------------------------------------------------- seg --
template <typename T>
void seg_forward(const T* x, const T* res, T* s_out, const T* w, const T* b, T* y, T* mean, T* var, T* rstd,
                 int64_t N, int64_t C, int64_t L, int64_t G, bool center, double eps, int nt) {
  const int64_t n = C * L;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N; ++i) {
    const T* xi = x + i * n;
    if (res != nullptr) {  // pre-norm residual: s = x + res, written once, normalized from cache
      T* si = s_out + i * n;
      const T* ri = res + i * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) si[k] = xi[k] + ri[k];
      xi = si;
    }
    T m;
    double v;
    if (std::is_same_v<T, float> && center) {
      // float LayerNorm: one pass, Σx and Σx² in double. A float's square is exact in double, so
      // Σx²/n − mean² loses only ~1e-16·mean²/var — far below float's own resolution of x − mean
      // (6e-8·|mean|/std) — and nothing overflows. Saves a pass over the row (LN forward 1.2× faster).
      double s1 = 0, s2 = 0;
      lane_sums<double>(n, s1, s2, [xi](int64_t k, double& a, double& b) __attribute__((always_inline)) {
        const double xv = xi[k];
        a = xv;
        b = xv * xv;
      });
      const double mu = s1 / static_cast<double>(n);
      v = s2 / static_cast<double>(n) - mu * mu;
      v = v < 0 ? 0 : v;  // rounding; NaN compares false and stays
      m = static_cast<T>(mu);
    } else {
      // float64: two passes (mean, then mean squared deviation), each term scaled by 1/n first.
      // RMS (m = 0) is one pass either way; its float sums in blocks are 4% faster than in double.
      const T inv = static_cast<T>(1.0 / static_cast<double>(n));
      m = center ? static_cast<T>(scaled_sum(xi, n, inv)) : T(0);
      v = scaled_sqdev(xi, n, m, inv);  // m = 0: mean square
    }
    const T r = static_cast<T>(1.0 / std::sqrt(v + eps));
    mean[i] = m;
    var[i] = static_cast<T>(v);
    rstd[i] = r;
    T* yi = y + i * n;
    const T* wi = w + (i % G) * C;
    const T* bi = b + (i % G) * C;
    if (L == 1) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yi[c] = (xi[c] - m) * r * wi[c] + bi[c];
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const T wc = wi[c], bc = bi[c];
        const T* xc = xi + c * L;
        T* yc = yi + c * L;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) yc[l] = (xc[l] - m) * r * wc + bc;
      }
    }
  }
}

// Per-thread double buffers for the column sums, reduced after the parallel loop.
struct ColumnSums {
  int64_t width;
  std::vector<double> dw, db;
  ColumnSums(int nt, int64_t width, bool want) : width(width) {
    if (want) {
      dw.assign(static_cast<size_t>(nt) * width, 0.0);
      db.assign(static_cast<size_t>(nt) * width, 0.0);
    }
  }
  double* dw_of(int t) { return dw.data() + static_cast<int64_t>(t) * width; }
  double* db_of(int t) { return db.data() + static_cast<int64_t>(t) * width; }
  template <typename T>
  void reduce(int nt, T* out_w, T* out_b) {
    for (int64_t k = 0; k < width; ++k) {
      double sw = 0, sb = 0;
      for (int t = 0; t < nt; ++t) {
        sw += dw[static_cast<size_t>(t) * width + k];
        sb += db[static_cast<size_t>(t) * width + k];
      }
      if (out_w != nullptr) out_w[k] = static_cast<T>(sw);
      if (out_b != nullptr) out_b[k] = static_cast<T>(sb);
    }
  }
};

// Runs run(cols, flag) with flag = std::true_type when dw or db is wanted (the kernel then keeps
// per-thread column sums, reduced into dw/db afterwards), else std::false_type and no buffers.
template <typename T, typename Run>
void with_column_sums(int nt, int64_t width, T* dw, T* db, Run run) {
  const bool want = dw != nullptr || db != nullptr;
  ColumnSums cols(nt, width, want);
  if (want) {
    run(cols, std::true_type{});
    cols.reduce(nt, dw, db);
  } else {
    run(cols, std::false_type{});
  }
}

// Column sums of row layouts (L = 1): each thread adds rows into buffers of T and folds them into
// its double buffers every kFlushRows rows — exact enough (at most kFlushRows terms summed in T)
// without paying a double conversion per element.
constexpr int kFlushRows = 32;

template <typename T>
struct RowPartials {
  std::vector<T> w, b;
  int rows = 0;
  RowPartials(int64_t width, bool want) {
    if (want) w.assign(width, T(0)), b.assign(width, T(0));
  }
  void flush(double* cw, double* cb) {
    const int64_t n = static_cast<int64_t>(w.size());
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      cw[k] += w[k];
      cb[k] += b[k];
      w[k] = 0;
      b[k] = 0;
    }
    rows = 0;
  }
  void row_done(double* cw, double* cb) {
    if (++rows == kFlushRows) flush(cw, cb);
  }
};

template <typename T, bool kCols>
void seg_backward_impl(const T* g, const T* gs, const T* s, const T* w, const T* mean, const T* rstd, T* dx,
                       ColumnSums& cols, int64_t N, int64_t C, int64_t L, int64_t G, bool center, int nt) {
  const int64_t n = C * L;
  const double inv_n = 1.0 / static_cast<double>(n);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    double* cw = kCols ? cols.dw_of(t) : nullptr;
    double* cb = kCols ? cols.db_of(t) : nullptr;
    RowPartials<T> part(cols.width, kCols && L == 1);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < N; ++i) {
      const T* gi = g + i * n;
      const T* si = s + i * n;
      const T* wi = w + (i % G) * C;
      const int64_t off = (i % G) * C;
      const T m = mean[i], r = rstd[i];
      double sum_gw = 0, sum_gwx = 0;  // Σ g·w and Σ g·w·x̂ over the segment
      if (L == 1) {
        T* pw = kCols ? part.w.data() + off : nullptr;
        T* pb = kCols ? part.b.data() + off : nullptr;
        for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
          T a = 0, bb = 0;
          lane_sums<T>(std::min(kBlock, C - c0), a, bb, [=](int64_t j, T& v1, T& v2) __attribute__((always_inline)) {
            const int64_t c = c0 + j;
            const T xh = (si[c] - m) * r;
            const T gw = gi[c] * wi[c];
            v1 = gw;
            v2 = gw * xh;
            if constexpr (kCols) {
              pw[c] += gi[c] * xh;
              pb[c] += gi[c];
            }
          });
          sum_gw += a;
          sum_gwx += bb;
        }
        if constexpr (kCols) part.row_done(cw, cb);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const T wc = wi[c];
          double sg = 0, sgx = 0;  // Σ g and Σ g·x̂ over this channel's positions
          for (int64_t l0 = 0; l0 < L; l0 += kBlock) {
            const T* gc = gi + c * L + l0;
            const T* sc = si + c * L + l0;
            T a = 0, bb = 0;
#pragma omp simd reduction(+ : a, bb)
            for (int64_t l = 0; l < std::min(kBlock, L - l0); ++l) {
              a += gc[l];
              bb += gc[l] * ((sc[l] - m) * r);
            }
            sg += a;
            sgx += bb;
          }
          sum_gw += sg * wc;
          sum_gwx += sgx * wc;
          if constexpr (kCols) {
            cw[off + c] += sgx;
            cb[off + c] += sg;
          }
        }
      }
      const T ma = center ? static_cast<T>(sum_gw * inv_n) : T(0);
      const T mb = static_cast<T>(sum_gwx * inv_n);
      T* dxi = dx + i * n;
      const T* gsi = gs != nullptr ? gs + i * n : nullptr;
      if (L == 1) {
        if (gsi != nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dxi[c] = (gi[c] * wi[c] - ma - (si[c] - m) * r * mb) * r + gsi[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dxi[c] = (gi[c] * wi[c] - ma - (si[c] - m) * r * mb) * r;
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const T wc = wi[c];
          const T* gc = gi + c * L;
          const T* sc = si + c * L;
          T* dc = dxi + c * L;
          if (gsi != nullptr) {
            const T* gsc = gsi + c * L;
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) dc[l] = (gc[l] * wc - ma - (sc[l] - m) * r * mb) * r + gsc[l];
          } else {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) dc[l] = (gc[l] * wc - ma - (sc[l] - m) * r * mb) * r;
          }
        }
      }
    }
    if (kCols && L == 1) part.flush(cw, cb);
  }
}

template <typename T>
void seg_backward(const T* g, const T* gs, const T* s, const T* w, const T* mean, const T* rstd, T* dx, T* dw,
                  T* db, int64_t N, int64_t C, int64_t L, int64_t G, bool center, int nt) {
  with_column_sums(nt, G * C, dw, db, [&](ColumnSums& cols, auto on) {
    seg_backward_impl<T, decltype(on)::value>(g, gs, s, w, mean, rstd, dx, cols, N, C, L, G, center, nt);
  });
}

// ------------------------------------------------------------------------------------ cf --
// Task = (sample n, chunk of positions); the chunk's C×chunk values stay in L2 between the
// passes, the per-position sums in L1. x and dx are (N, C, L) memory. y (forward, y_nlc) and g
// (backward, g_nlc) may instead be (N, L, C) memory: the output layout of timm's LayerNorm2d
// (permute, layer_norm, permute back: channels-last strides for an NCHW input), in which the 1×1
// convolutions of a ConvNeXt block run channels_last (oneDNN) without a copy either way. Those
// variants take cf_chunk_nlc(C) positions per task and a per-thread C×chunk buffer in (C, chunk) order:
// the forward computes y's chunk there exactly as in the (N, C, L) case and transposes it out, the
// backward transposes g's chunk in and runs the (N, C, L) code on the buffer (transposes in vector
// registers, below); same arithmetic, so
// same values as the (N, C, L) kernels up to the chunk boundaries of ∂w/∂b's partial sums.
// Positions per task when y or g is (N, L, C) memory: 64 (of 32/64/128/256 the fastest at C = 64, 96,
// 768, 1 thread), fewer past C = 1024 so that a task's x and buffer (2·C·chunk values) stay in L2.
NK_INLINE int64_t cf_chunk_nlc(int64_t C) { return std::clamp<int64_t>((65536 / std::max<int64_t>(C, 1)) & ~int64_t(7), 16, 64); }

// One K×K block of the transpose below, in vector registers: dst[j·ds + i] = src[i·ss + j] for
// i, j < K. K = 8 floats / 4 doubles with AVX (the AVX2 and AVX-512 copies), 4 / 2 with SSE2 (the x86-64
// baseline); elsewhere K = 1 (plain loads and stores). The scalar loop measured ~4× slower (GCC does
// not vectorize a transpose), a third of the kernel's time.
#if defined(__AVX__)
constexpr int64_t kTrF = 8, kTrD = 4;
NK_INLINE void transpose_block(const float* s, int64_t ss, float* d, int64_t ds) {
  __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ss), r2 = _mm256_loadu_ps(s + 2 * ss),
         r3 = _mm256_loadu_ps(s + 3 * ss), r4 = _mm256_loadu_ps(s + 4 * ss), r5 = _mm256_loadu_ps(s + 5 * ss),
         r6 = _mm256_loadu_ps(s + 6 * ss), r7 = _mm256_loadu_ps(s + 7 * ss);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(d + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(d + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(d + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(d + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(d + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(d + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(d + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
}
NK_INLINE void transpose_block(const double* s, int64_t ss, double* d, int64_t ds) {
  const __m256d r0 = _mm256_loadu_pd(s), r1 = _mm256_loadu_pd(s + ss), r2 = _mm256_loadu_pd(s + 2 * ss),
                r3 = _mm256_loadu_pd(s + 3 * ss);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1), t2 = _mm256_unpacklo_pd(r2, r3),
                t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(d + ds, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(d + 2 * ds, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(d + 3 * ds, _mm256_permute2f128_pd(t1, t3, 0x31));
}
#elif defined(__SSE2__)
constexpr int64_t kTrF = 4, kTrD = 2;
NK_INLINE void transpose_block(const float* s, int64_t ss, float* d, int64_t ds) {
  __m128 r0 = _mm_loadu_ps(s), r1 = _mm_loadu_ps(s + ss), r2 = _mm_loadu_ps(s + 2 * ss), r3 = _mm_loadu_ps(s + 3 * ss);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(d, r0), _mm_storeu_ps(d + ds, r1), _mm_storeu_ps(d + 2 * ds, r2), _mm_storeu_ps(d + 3 * ds, r3);
}
NK_INLINE void transpose_block(const double* s, int64_t ss, double* d, int64_t ds) {
  const __m128d r0 = _mm_loadu_pd(s), r1 = _mm_loadu_pd(s + ss);
  _mm_storeu_pd(d, _mm_unpacklo_pd(r0, r1)), _mm_storeu_pd(d + ds, _mm_unpackhi_pd(r0, r1));
}
#else
constexpr int64_t kTrF = 1, kTrD = 1;
template <typename T>
NK_INLINE void transpose_block(const T* s, int64_t, T* d, int64_t) { *d = *s; }
#endif

// dst[j·ds + i] = src[i·ss + j] for i < rows, j < cols: K×K register blocks, the edges element by element.
template <typename T>
NK_INLINE void transpose(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols) {
  constexpr int64_t K = std::is_same_v<T, float> ? kTrF : kTrD;
  const int64_t rk = rows - rows % K, ck = cols - cols % K;
  for (int64_t i0 = 0; i0 < rk; i0 += K) {
    for (int64_t j0 = 0; j0 < ck; j0 += K) transpose_block(src + i0 * ss + j0, ss, dst + j0 * ds + i0, ds);
    for (int64_t j = ck; j < cols; ++j)
      for (int64_t i = i0; i < i0 + K; ++i) dst[j * ds + i] = src[i * ss + j];
  }
  for (int64_t i = rk; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
}

template <typename T>
void cf_forward(const T* x, const T* w, const T* b, T* y, T* mean, T* var, T* rstd, int64_t N, int64_t C, int64_t L,
                bool center, double eps, bool y_nlc, int nt) {
  const int64_t ck = y_nlc ? cf_chunk_nlc(C) : kCfChunk;
  const int64_t chunks = (L + ck - 1) / ck;
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> buf(y_nlc ? C * ck : 0);  // this thread's chunk of y in (C, chunk) order
#pragma omp for schedule(static)
    for (int64_t task = 0; task < N * chunks; ++task) {
      const int64_t nn = task / chunks, l0 = (task % chunks) * ck, m = std::min(ck, L - l0);
      const T* xn = x + nn * C * L + l0;
      T* yn = y_nlc ? buf.data() : y + nn * C * L + l0;  // y's chunk, channel c at yn + c·ys
      const int64_t ys = y_nlc ? ck : L;
      T mu[kCfChunk], r[kCfChunk], part[kCfChunk];
      double total[kCfChunk];
      const T inv_c = T(1) / static_cast<T>(C);
      // Σ over c in blocks of kChanBlock channels summed in T, the block sums added in double
      // (a plain float sum down thousands of channels loses digits: 5-15× torch's error at C = 2048-4096)
      for (int64_t l = 0; l < m; ++l) mu[l] = 0, total[l] = 0;
      if (center) {
        for (int64_t c0 = 0; c0 < C; c0 += kChanBlock) {
          for (int64_t l = 0; l < m; ++l) part[l] = 0;
          for (int64_t c = c0; c < std::min(C, c0 + kChanBlock); ++c) {
            const T* xc = xn + c * L;
#pragma omp simd
            for (int64_t l = 0; l < m; ++l) part[l] += xc[l] * inv_c;
          }
          for (int64_t l = 0; l < m; ++l) total[l] += part[l];
        }
        for (int64_t l = 0; l < m; ++l) mu[l] = static_cast<T>(total[l]), total[l] = 0;
      }
      for (int64_t c0 = 0; c0 < C; c0 += kChanBlock) {
        for (int64_t l = 0; l < m; ++l) part[l] = 0;
        for (int64_t c = c0; c < std::min(C, c0 + kChanBlock); ++c) {
          const T* xc = xn + c * L;
#pragma omp simd
          for (int64_t l = 0; l < m; ++l) {
            const T d = xc[l] - mu[l];
            part[l] += d * (d * inv_c);  // scaled before summing, as scaled_sqdev
          }
        }
        // a block sum that left the float range (true variance past FLT_MAX) is redone in double
        for (int64_t l = 0; l < m; ++l)
          total[l] += std::isfinite(part[l]) ? static_cast<double>(part[l])
                                             : sqdev_double(xn + c0 * L + l, std::min(C, c0 + kChanBlock) - c0, mu[l], inv_c, L);
      }
      T* mo = mean + nn * L + l0;
      T* vo = var + nn * L + l0;
      T* ro = rstd + nn * L + l0;
      for (int64_t l = 0; l < m; ++l) {
        // r from the double sum: a variance past FLT_MAX is stored as inf (its true value) but r stays right
        r[l] = static_cast<T>(1.0 / std::sqrt(total[l] + eps));
        mo[l] = mu[l], vo[l] = static_cast<T>(total[l]), ro[l] = r[l];
      }
      for (int64_t c = 0; c < C; ++c) {
        const T wc = w[c], bc = b[c];
        const T* xc = xn + c * L;
        T* yc = yn + c * ys;
#pragma omp simd
        for (int64_t l = 0; l < m; ++l) yc[l] = (xc[l] - mu[l]) * r[l] * wc + bc;
      }
      if (y_nlc) transpose(yn, ck, y + (nn * L + l0) * C, C, C, m);
    }
  }
}

template <typename T, bool kCols>
void cf_backward_impl(const T* g, const T* s, const T* w, const T* mean, const T* rstd, T* dx, ColumnSums& cols,
                      int64_t N, int64_t C, int64_t L, bool center, bool g_nlc, int nt) {
  const int64_t ck = g_nlc ? cf_chunk_nlc(C) : kCfChunk;
  const int64_t chunks = (L + ck - 1) / ck;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    double* cw = kCols ? cols.dw_of(t) : nullptr;
    double* cb = kCols ? cols.db_of(t) : nullptr;
    std::vector<T> buf(g_nlc ? C * ck : 0);  // this thread's chunk of g in (C, chunk) order
#pragma omp for schedule(static)
    for (int64_t task = 0; task < N * chunks; ++task) {
      const int64_t nn = task / chunks, l0 = (task % chunks) * ck, m = std::min(ck, L - l0);
      if (g_nlc) transpose(g + (nn * L + l0) * C, C, buf.data(), ck, m, C);
      const T* gn = g_nlc ? buf.data() : g + nn * C * L + l0;  // g's chunk, channel c at gn + c·gs
      const int64_t gs = g_nlc ? ck : L;
      const T* sn = s + nn * C * L + l0;
      T* dn = dx + nn * C * L + l0;
      const T* mu = mean + nn * L + l0;
      const T* r = rstd + nn * L + l0;
      T a[kCfChunk], bb[kCfChunk];
      double ta[kCfChunk], tbb[kCfChunk];  // block sums over channels, as in cf_forward
      for (int64_t l = 0; l < m; ++l) ta[l] = 0, tbb[l] = 0;
      for (int64_t c0 = 0; c0 < C; c0 += kChanBlock) {
        for (int64_t l = 0; l < m; ++l) a[l] = 0, bb[l] = 0;
        for (int64_t c = c0; c < std::min(C, c0 + kChanBlock); ++c) {
          const T wc = w[c];
          const T* gc = gn + c * gs;
          const T* sc = sn + c * L;
          T tw = 0, tb = 0;
#pragma omp simd reduction(+ : tw, tb)
          for (int64_t l = 0; l < m; ++l) {
            const T xh = (sc[l] - mu[l]) * r[l];
            const T gw = gc[l] * wc;
            a[l] += gw;
            bb[l] += gw * xh;
            if constexpr (kCols) {
              tw += gc[l] * xh;
              tb += gc[l];
            }
          }
          if constexpr (kCols) {
            cw[c] += tw;
            cb[c] += tb;
          }
        }
        for (int64_t l = 0; l < m; ++l) ta[l] += a[l], tbb[l] += bb[l];
      }
      const double inv_c = 1.0 / static_cast<double>(C);
      for (int64_t l = 0; l < m; ++l) {
        a[l] = center ? static_cast<T>(ta[l] * inv_c) : T(0);
        bb[l] = static_cast<T>(tbb[l] * inv_c);
      }
      for (int64_t c = 0; c < C; ++c) {
        const T wc = w[c];
        const T* gc = gn + c * gs;
        const T* sc = sn + c * L;
        T* dc = dn + c * L;
#pragma omp simd
        for (int64_t l = 0; l < m; ++l) dc[l] = (gc[l] * wc - a[l] - (sc[l] - mu[l]) * r[l] * bb[l]) * r[l];
      }
    }
  }
}

template <typename T>
void cf_backward(const T* g, const T* s, const T* w, const T* mean, const T* rstd, T* dx, T* dw, T* db, int64_t N,
                 int64_t C, int64_t L, bool center, bool g_nlc, int nt) {
  with_column_sums(nt, C, dw, db, [&](ColumnSums& cols, auto on) {
    cf_backward_impl<T, decltype(on)::value>(g, s, w, mean, rstd, dx, cols, N, C, L, center, g_nlc, nt);
  });
}

// ----------------------------------------------------------------------------------- dyt --
// tanh and sech² = 1 − tanh² from one range reduction: with e = exp(−2|z|) and
// em = expm1(−2|z|) = e − 1,
//     tanh(z) = −sign(z) · em / (2 + em),     sech²(z) = 4e / (2 + em)²,
// one division, no cancellation anywhere: em keeps its digits for small |z| (where 1 − e would
// not) and e for large |z| (where 1 − tanh² would not). float: exp/expm1 by Cody–Waite reduction
// r = x − n·ln2, a degree-7 Taylor polynomial for expm1(r) (|r| ≤ ln2/2, truncation < 2e-8
// relative) and 2^n from the exponent bits, which the compiler vectorizes (SSE2 up); float64: libm.
// NaN propagates (the clamp compares, so NaN passes through); ±inf give ±1 and sech² ≈ 0.
NK_INLINE void exp_expm1_m2abs(float z, float& e, float& em) {
  const float x0 = -2.0f * std::fabs(z);
  const float x = x0 < -86.0f ? -86.0f : x0;  // keeps 2^n normal; tanh is ±1 in float long before
  const float t = x * 1.44269504088896341f + 0.5f;  // in [-124.2, 0.5], or NaN
#if defined(__x86_64__) && !defined(__SSE4_1__)
  // the SSE2 baseline has no vector floor (roundps): floor by truncation and a correction, or
  // this loop would not vectorize at all there (~9x slower). The AVX copies keep std::floor
  // (one vroundps; GCC 12 leaves the truncation form unvectorized there).
  const float tt = static_cast<float>(static_cast<int32_t>(t));
  const float fx = tt > t ? tt - 1.0f : tt;
#else
  const float fx = std::floor(t);
#endif
  const float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float p = r * (1.0f / 5040.0f);
  p = r * (p + 1.0f / 720.0f);
  p = r * (p + 1.0f / 120.0f);
  p = r * (p + 1.0f / 24.0f);
  p = r * (p + 1.0f / 6.0f);
  p = r * (p + 0.5f);
  p = r + r * p;  // expm1(r)
  const float s = std::bit_cast<float>((static_cast<int32_t>(fx) + 127) << 23);  // 2^n
  const bool under = x0 < -86.0f;  // e underflows: exactly 0 (a 4e-38 floor would leak into Σ x·sech²); NaN is not
  e = under ? 0.0f : s * p + s;
  em = under ? -1.0f : s * p + (s - 1.0f);
}

NK_INLINE void exp_expm1_m2abs(double z, double& e, double& em) {
  const double x = -2.0 * std::fabs(z);
  e = std::exp(x);
  em = std::expm1(x);
}

template <typename T>
NK_INLINE void tanh_sech2(T z, T& t, T& sech2) {
  T e, em;
  exp_expm1_m2abs(z, e, em);
  const T q = T(1) / (T(2) + em);
  t = std::copysign(-em * q, z);
  sech2 = T(4) * e * q * q;
}

template <typename T>
void dyt_forward(const T* x, T alpha, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t L, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < N; ++i) {
    const T* xi = x + i * C * L;
    T* yi = y + i * C * L;
    if (L == 1) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        T t, s2;
        tanh_sech2(alpha * xi[c], t, s2);
        yi[c] = t * w[c] + b[c];
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const T wc = w[c], bc = b[c];
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          T t, s2;
          tanh_sech2(alpha * xi[c * L + l], t, s2);
          yi[c * L + l] = t * wc + bc;
        }
      }
    }
  }
}

template <typename T>
void dyt_backward(const T* g, const T* x, T alpha, const T* w, T* dx, double* dalpha, T* dw, T* db, int64_t N,
                  int64_t C, int64_t L, int nt) {
  const bool want = dw != nullptr || db != nullptr;
  ColumnSums cols(nt, C, true);
  std::vector<double> da(nt, 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    double* cw = cols.dw_of(t);
    double* cb = cols.db_of(t);
    double da_t = 0;
    RowPartials<T> part(C, L == 1);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < N; ++i) {
      const T* gi = g + i * C * L;
      const T* xi = x + i * C * L;
      T* di = dx + i * C * L;
      if (L == 1) {
        T* pw = part.w.data();
        T* pb = part.b.data();
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < C; ++c) {
          T th, s2;
          tanh_sech2(alpha * xi[c], th, s2);
          const T dpre = gi[c] * w[c] * s2;
          di[c] = dpre * alpha;
          acc += dpre * xi[c];
          pw[c] += gi[c] * th;
          pb[c] += gi[c];
        }
        da_t += acc;
        part.row_done(cw, cb);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const T wc = w[c];
          const T* gc = gi + c * L;
          const T* xc = xi + c * L;
          T* dc = di + c * L;
          T acc = 0, tw = 0, tb = 0;
#pragma omp simd reduction(+ : acc, tw, tb)
          for (int64_t l = 0; l < L; ++l) {
            T th, s2;
            tanh_sech2(alpha * xc[l], th, s2);
            const T dpre = gc[l] * wc * s2;
            dc[l] = dpre * alpha;
            acc += dpre * xc[l];
            tw += gc[l] * th;
            tb += gc[l];
          }
          da_t += acc;
          cw[c] += tw;
          cb[c] += tb;
        }
      }
    }
    if (L == 1) part.flush(cw, cb);
    da[t] = da_t;
  }
  double total = 0;
  for (int t = 0; t < nt; ++t) total += da[t];
  *dalpha = total;
  if (want) cols.reduce(nt, dw, db);
}

}  // namespace

// ------------------------------------------------------------------------------ C entry points --
// X(name, kernel, C parameters, arguments) for every entry point of one dtype: the one list the
// per-variant definitions, their declarations and the dispatching extern "C" functions expand.
// The kernels take the C arguments as they are (int center -> bool, double alpha -> T).
#define NK_ENTRY_POINTS_OF(X, T, SUF)                                                                               \
  X(seg_fwd_##SUF, seg_forward<T>,                                                                                  \
    (const T* x, const T* res, T* s_out, const T* w, const T* b, T* y, T* mean, T* var, T* rstd, int64_t N,        \
     int64_t C, int64_t L, int64_t G, int center, double eps, int nt),                                              \
    (x, res, s_out, w, b, y, mean, var, rstd, N, C, L, G, center, eps, nt))                                    \
  X(seg_bwd_##SUF, seg_backward<T>,                                                                                 \
    (const T* g, const T* gs, const T* s, const T* w, const T* mean, const T* rstd, T* dx, T* dw, T* db, int64_t N, \
     int64_t C, int64_t L, int64_t G, int center, int nt),                                                          \
    (g, gs, s, w, mean, rstd, dx, dw, db, N, C, L, G, center, nt))                                             \
  X(cf_fwd_##SUF, cf_forward<T>,                                                                                    \
    (const T* x, const T* w, const T* b, T* y, T* mean, T* var, T* rstd, int64_t N, int64_t C, int64_t L,           \
     int center, double eps, int y_nlc, int nt),                                                                    \
    (x, w, b, y, mean, var, rstd, N, C, L, center, eps, y_nlc, nt))                                            \
  X(cf_bwd_##SUF, cf_backward<T>,                                                                                   \
    (const T* g, const T* s, const T* w, const T* mean, const T* rstd, T* dx, T* dw, T* db, int64_t N, int64_t C,   \
     int64_t L, int center, int g_nlc, int nt),                                                                     \
    (g, s, w, mean, rstd, dx, dw, db, N, C, L, center, g_nlc, nt))                                             \
  X(dyt_fwd_##SUF, dyt_forward<T>,                                                                                  \
    (const T* x, double alpha, const T* w, const T* b, T* y, int64_t N, int64_t C, int64_t L, int nt),              \
    (x, alpha, w, b, y, N, C, L, nt))                                                               \
  X(dyt_bwd_##SUF, dyt_backward<T>,                                                                                 \
    (const T* g, const T* x, double alpha, const T* w, T* dx, double* dalpha, T* dw, T* db, int64_t N, int64_t C,   \
     int64_t L, int nt),                                                                                            \
    (g, x, alpha, w, dx, dalpha, dw, db, N, C, L, nt))
#define NK_ENTRY_POINTS(X) NK_ENTRY_POINTS_OF(X, float, f32) NK_ENTRY_POINTS_OF(X, double, f64)

// This variant's entry points: NK_ISA::seg_fwd_f32 etc. (NK_DEFINE: nk_isa.h).
NK_ENTRY_POINTS(NK_DEFINE)

}  // namespace NK_ISA

#ifdef NK_DISPATCH
NK_DECLARE_VARIANTS(NK_ENTRY_POINTS)

namespace {

#ifdef NK_X86_VARIANTS
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};
#else
constexpr const char* kIsaNames[] = {"baseline"};
#endif
constexpr int kIsaCount = sizeof(kIsaNames) / sizeof(kIsaNames[0]);

// Whether this CPU (and OS: __builtin_cpu_supports checks the saved vector state) runs variant
// isa. GCC >= 12 tests the x86-64 levels the variants are compiled for; older compilers test
// the features of those levels the kernels can use.
bool isa_supported(int isa) {
#ifdef NK_X86_VARIANTS
  __builtin_cpu_init();  // may run before libgcc's own constructor (we call it from one)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  const bool v3 = __builtin_cpu_supports("x86-64-v3");
  const bool v4 = __builtin_cpu_supports("x86-64-v4");
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
#endif
  if (isa == 1) return v3;
  if (isa == 2) return v4;
#endif
  return isa == 0;
}

int best_isa() {
  int best = 0;
  for (int i = 1; i < kIsaCount; ++i)
    if (isa_supported(i)) best = i;
  return best;
}

int g_isa = best_isa();  // resolved once, when the library is loaded

}  // namespace

NK_API int nk_isa_count() { return kIsaCount; }
NK_API const char* nk_isa_name(int isa) { return isa >= 0 && isa < kIsaCount ? kIsaNames[isa] : nullptr; }
NK_API int nk_isa_supported(int isa) { return isa >= 0 && isa < kIsaCount && isa_supported(isa); }
NK_API int nk_isa() { return g_isa; }
// Use variant isa from now on (call it before any kernel runs); refused (returns 0) where the CPU lacks it.
NK_API int nk_set_isa(int isa) {
  if (!nk_isa_supported(isa)) return 0;
  g_isa = isa;
  return 1;
}

#define NK_EXPORT(name, kernel, params, args) \
  NK_API void nk_##name params { NK_CALL_VARIANT(g_isa, name, args) }
NK_ENTRY_POINTS(NK_EXPORT)

#endif  // NK_DISPATCH
