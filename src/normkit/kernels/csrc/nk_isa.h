// The per-ISA plumbing shared by every kernel source linked into the CPU library (cpu_norms.cpp,
// evonorm.cpp, power_norm.cpp, region_norm.cpp, rep_batch_norm.cpp). Each source lists its entry points once as an X-macro, X(name, kernel, params, args);
// it is compiled once per ISA copy (namespace NK_ISA: nk_baseline, nk_avx2, nk_avx512), and the
// baseline translation unit (NK_DISPATCH) also exports extern "C" nk_<name> functions that call the
// copy chosen when the library was loaded (cpu_norms.cpp's nk_isa()).
#pragma once

#ifndef NK_ISA  // a plain compile of a source alone: the baseline copy with the exported entry points
#define NK_ISA nk_baseline
#define NK_DISPATCH
#endif

// cpu.py compiles with -fvisibility=hidden: the library exports these nk_* functions only.
#define NK_API extern "C" __attribute__((visibility("default")))

// This copy's entry points: NK_ISA::<name>, plain C++ functions (external linkage).
#define NK_DEFINE(name, kernel, params, args) \
  void name params { kernel args; }
#define NK_DECLARE(name, kernel, params, args) void name params;

#ifdef NK_X86_VARIANTS
#if !defined(__x86_64__)
#error "NK_X86_VARIANTS is for x86-64 builds"
#endif
// In the baseline unit: declare the wider copies' entry points of one X-macro list.
#define NK_DECLARE_VARIANTS(ENTRY_POINTS) \
  namespace nk_avx2 {                     \
  ENTRY_POINTS(NK_DECLARE)                \
  }                                       \
  namespace nk_avx512 {                   \
  ENTRY_POINTS(NK_DECLARE)                \
  }
// Run copy `isa` (0 baseline, 1 AVX2, 2 AVX-512) of entry point `name`.
#define NK_CALL_VARIANT(isa, name, args)    \
  switch (isa) {                            \
    case 2: return nk_avx512::name args;    \
    case 1: return nk_avx2::name args;      \
    default: return nk_baseline::name args; \
  }
#else
#define NK_DECLARE_VARIANTS(ENTRY_POINTS)
#define NK_CALL_VARIANT(isa, name, args) return nk_baseline::name args;
#endif

// In the baseline unit of a source other than cpu_norms.cpp: export one X-macro list's extern "C"
// nk_<name> entry points, each running the copy cpu_norms.cpp's dispatcher chose (nk_isa()).
#define NK_EXPORT_ONE(name, kernel, params, args) \
  NK_API void nk_##name params { NK_CALL_VARIANT(nk_isa(), name, args) }
#define NK_EXPORT_ENTRY_POINTS(ENTRY_POINTS)                                           \
  NK_DECLARE_VARIANTS(ENTRY_POINTS)                                                    \
  extern "C" int nk_isa(); /* cpu_norms.cpp: the copy chosen when the library was loaded */ \
  ENTRY_POINTS(NK_EXPORT_ONE)
