// LACLIP fused scoring on the CPU.
//
// Work is split into chunks (a range of queries x a range of images), one per thread. A chunk walks its images
// in tiles of a few dozen images (~0.5 MiB of fp32 rows, so a tile stays in L2) and, for each group of queries,
// computes all dot products of the group against the tile's rows with a register-blocked micro-kernel
// (6 queries x 4 rows, D innermost), then a per-(query, image) epilogue: the K-softmax and weighted sum
// ("text" weights) or nothing at all ("image" weights: each image's pooled vector
// p = alpha g + (1 - alpha) sum_j w_j c_j is built once per tile, so the score is the single dot p . t).
// fp16 and bf16 rows are converted to fp32 once per tile, except bf16 rows with "text" weights on CPUs with the
// AVX-512 BF16 dot-product instruction (vdpbf16ps), whose micro-kernel reads bf16 queries and rows directly
// (products exact, fp32 accumulation): half the bytes and twice the multiply-adds per instruction of fp32.
// On CPUs with AMX (Sapphire Rapids and later) those bf16 dot products run on the tile unit instead: each query
// group is packed once into AMX's pair-interleaved layout, then 16 rows x 16 queries tiles accumulate 32 dims
// per instruction (1 TFLOP/s on one core measured, 4.6x that core's fp32 GEMM) and are transposed back.
// Top-k keeps one heap of k entries per (query, image range); heaps are merged at the end, so neither
// [Q, N, K] nor [Q, N] is ever stored.
//
// The hot loops have five implementations, chosen at run time (cpu_isa): portable loops the compiler
// vectorises at -O3 (baseline x86-64: SSE2), AVX2+FMA intrinsics (4-query x 3-row micro-kernel), AVX-512F
// intrinsics (6 x 4), AVX-512F plus the BF16 micro-kernel, and that plus AMX tiles for bf16 "text" dots
// (Linux, once the kernel grants the process the tile state). All accumulate in fp32.
#include "laclip.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define LACLIP_X86_SIMD 1
#include <immintrin.h>
#define LACLIP_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LACLIP_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#define LACLIP_AVX512 __attribute__((target("avx2,fma,f16c,avx512f")))
#define LACLIP_AVX512_INLINE __attribute__((target("avx2,fma,f16c,avx512f"), always_inline)) inline
#define LACLIP_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512bf16")))
#define LACLIP_AVX512BF16_INLINE \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512bf16"), always_inline)) inline
#if defined(__linux__)
#define LACLIP_AMX_TILES 1
#include <sys/syscall.h>
#include <unistd.h>
#define LACLIP_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))
#define LACLIP_AMX_INLINE \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16"), always_inline)) inline
#endif
#endif

namespace laclip {
namespace {

using idx_t = int64_t;

constexpr idx_t kQueryGroup = 64;      // queries whose dot products are held at once per tile
constexpr idx_t kTileBytes = 512 << 10;  // fp32 bytes of image rows (global + crops) per tile

// ------------------------------------------------------------------------------------------------------------
// Kernel table: one implementation per instruction set.
// ------------------------------------------------------------------------------------------------------------
struct Kernels {
  // out[q * ldo + m] = T_q . R_m for q < nq, m < nm; rows of D floats, row strides ldt / ldr.
  void (*dots)(const float* T, idx_t ldt, idx_t nq, const float* R, idx_t ldr, idx_t nm, idx_t D, float* out,
               idx_t ldo);
  // "text" weights, one query over nb images: out[n] = alpha sg[n] + (1 - alpha) sum_j w_j sc[n K + j],
  // w = softmax_j(sc[n K + j] * inv_tau).
  void (*text_epilogue)(const float* sg, const float* sc, idx_t nb, idx_t K, float alpha, float inv_tau,
                        float* out);
  // "image" weights, one image: p = alpha g + (1 - alpha) sum_j softmax_j(c_j . g * inv_tau) c_j. w: K floats.
  void (*pool)(const float* g, const float* c, idx_t K, idx_t D, float alpha, float inv_tau, float* w, float* p);
  void (*half_to_float)(const c10::Half* src, float* dst, idx_t n);
  void (*bf16_to_float)(const c10::BFloat16* src, float* dst, idx_t n);
  // As dots, on bf16 queries and rows; null where the CPU has no BF16 dot-product instruction.
  void (*dots_bf16)(const c10::BFloat16* T, idx_t ldt, idx_t nq, const c10::BFloat16* R, idx_t ldr, idx_t nm,
                    idx_t D, float* out, idx_t ldo);
  const char* name;
  // AMX (null elsewhere): pack nq bf16 queries once (packed_bf16_size(nq, D) elements; D a multiple of 32), then
  // as dots_bf16 from the packed queries.
  void (*pack_bf16)(const c10::BFloat16* T, idx_t ldt, idx_t nq, idx_t D, c10::BFloat16* packed) = nullptr;
  void (*dots_packed_bf16)(const c10::BFloat16* packed, idx_t nq, const c10::BFloat16* R, idx_t ldr, idx_t nm,
                           idx_t D, float* out, idx_t ldo) = nullptr;
};

constexpr idx_t kAmxDims = 32;  // bf16 dims per AMX tile row (64 bytes)
idx_t packed_bf16_size(idx_t nq, idx_t D) { return (nq + 15) / 16 * 16 * D; }

// Softmax of K scalars times (1 - alpha), in place (shared by both pool implementations).
inline void scaled_softmax(float* w, idx_t K, float alpha, float inv_tau) {
  float mx = w[0];
  for (idx_t j = 1; j < K; ++j) mx = std::max(mx, w[j]);
  float sum = 0.f;
  for (idx_t j = 0; j < K; ++j) {
    w[j] = std::exp((w[j] - mx) * inv_tau);
    sum += w[j];
  }
  const float scale = (1.f - alpha) / sum;
  for (idx_t j = 0; j < K; ++j) w[j] *= scale;
}

// ---------------------------------------------- portable ----------------------------------------------------
void dots_generic(const float* T, idx_t ldt, idx_t nq, const float* R, idx_t ldr, idx_t nm, idx_t D, float* out,
                  idx_t ldo) {
  for (idx_t q = 0; q < nq; ++q) {
    const float* t = T + q * ldt;
    for (idx_t m = 0; m < nm; ++m) {
      const float* r = R + m * ldr;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (idx_t d = 0; d < D; ++d) acc += t[d] * r[d];
      out[q * ldo + m] = acc;
    }
  }
}

void text_epilogue_generic(const float* sg, const float* sc, idx_t nb, idx_t K, float alpha, float inv_tau,
                           float* out) {
  for (idx_t n = 0; n < nb; ++n) {
    const float* s = sc + n * K;
    float mx = s[0];
    for (idx_t j = 1; j < K; ++j) mx = std::max(mx, s[j]);
    float esum = 0.f, ws = 0.f;
    for (idx_t j = 0; j < K; ++j) {
      const float e = std::exp((s[j] - mx) * inv_tau);
      esum += e;
      ws += e * s[j];
    }
    out[n] = alpha * sg[n] + (1.f - alpha) * (ws / esum);
  }
}

void pool_generic(const float* g, const float* c, idx_t K, idx_t D, float alpha, float inv_tau, float* w,
                  float* p) {
  dots_generic(g, D, 1, c, D, K, D, w, K);
  scaled_softmax(w, K, alpha, inv_tau);
  for (idx_t d = 0; d < D; ++d) p[d] = alpha * g[d];
  for (idx_t j = 0; j < K; ++j) {
    const float wj = w[j];
    const float* cj = c + j * D;
#pragma omp simd
    for (idx_t d = 0; d < D; ++d) p[d] += wj * cj[d];
  }
}

template <typename scalar_t>
void to_float_generic(const scalar_t* src, float* dst, idx_t n) {
  for (idx_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

const Kernels kGeneric{dots_generic,
                       text_epilogue_generic,
                       pool_generic,
                       to_float_generic<c10::Half>,
                       to_float_generic<c10::BFloat16>,
                       nullptr,
                       "generic"};

// ---------------------------------------------- AVX2 -------------------------------------------------------
#ifdef LACLIP_X86_SIMD

LACLIP_AVX2_INLINE float hsum256(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Lanes [0, count) set, count in 0..8.
LACLIP_AVX2_INLINE __m256i lanes256(idx_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<idx_t>(count, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// QB queries x MB rows of dot products with 8-float vectors; QB * MB + MB + 1 <= 16 registers.
template <int QB, int MB>
LACLIP_AVX2_INLINE void dot_tile_avx2(const float* T, idx_t ldt, const float* R, idx_t ldr, idx_t D, float* out,
                                      idx_t ldo) {
  __m256 acc[QB][MB];
#pragma GCC unroll 8
  for (int q = 0; q < QB; ++q)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[q][m] = _mm256_setzero_ps();
  idx_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 r[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) r[m] = _mm256_loadu_ps(R + m * ldr + d);
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) {
      const __m256 t = _mm256_loadu_ps(T + q * ldt + d);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[q][m] = _mm256_fmadd_ps(t, r[m], acc[q][m]);
    }
  }
  if (d < D) {
    const __m256i mk = lanes256(D - d);
    __m256 r[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) r[m] = _mm256_maskload_ps(R + m * ldr + d, mk);
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) {
      const __m256 t = _mm256_maskload_ps(T + q * ldt + d, mk);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[q][m] = _mm256_fmadd_ps(t, r[m], acc[q][m]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < QB; ++q)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) out[q * ldo + m] = hsum256(acc[q][m]);
}

template <int QB>
LACLIP_AVX2 void dots_rows_avx2(const float* T, idx_t ldt, const float* R, idx_t ldr, idx_t nm, idx_t D, float* out,
                                idx_t ldo) {
  idx_t m = 0;
  for (; m + 3 <= nm; m += 3) dot_tile_avx2<QB, 3>(T, ldt, R + m * ldr, ldr, D, out + m, ldo);
  switch (nm - m) {
    case 2: dot_tile_avx2<QB, 2>(T, ldt, R + m * ldr, ldr, D, out + m, ldo); break;
    case 1: dot_tile_avx2<QB, 1>(T, ldt, R + m * ldr, ldr, D, out + m, ldo); break;
    default: break;
  }
}

// Query blocks of 4 (4 x 3 accumulators + 3 rows + 1 query = 16 ymm registers).
LACLIP_AVX2 void dots_avx2(const float* T, idx_t ldt, idx_t nq, const float* R, idx_t ldr, idx_t nm, idx_t D,
                           float* out, idx_t ldo) {
  idx_t q = 0;
  for (; q + 4 <= nq; q += 4) dots_rows_avx2<4>(T + q * ldt, ldt, R, ldr, nm, D, out + q * ldo, ldo);
  const float* t = T + q * ldt;
  float* o = out + q * ldo;
  switch (nq - q) {
    case 3: dots_rows_avx2<3>(t, ldt, R, ldr, nm, D, o, ldo); break;
    case 2: dots_rows_avx2<2>(t, ldt, R, ldr, nm, D, o, ldo); break;
    case 1: dots_rows_avx2<1>(t, ldt, R, ldr, nm, D, o, ldo); break;
    default: break;
  }
}

// exp(x) for x <= 0 (the Cephes polynomial of exp512); x below -87 gives 2^-126-ish instead of 0.
LACLIP_AVX2_INLINE __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  x = _mm256_min_ps(x, _mm256_set1_ps(0.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

LACLIP_AVX2 void text_epilogue_avx2(const float* sg, const float* sc, idx_t nb, idx_t K, float alpha,
                                    float inv_tau, float* out) {
  const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(static_cast<int>(K)));
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(1.f - alpha), vt = _mm256_set1_ps(inv_tau);
  const __m256 zero = _mm256_setzero_ps();
  for (idx_t n = 0; n < nb; n += 8) {
    const __m256i mk = lanes256(nb - n);
    const __m256 mkf = _mm256_castsi256_ps(mk);
    const float* base = sc + n * K;
    __m256 mx = _mm256_mask_i32gather_ps(zero, base, offsets, mkf, 4);
    for (idx_t j = 1; j < K; ++j) mx = _mm256_max_ps(mx, _mm256_mask_i32gather_ps(zero, base + j, offsets, mkf, 4));
    __m256 esum = zero, ws = zero;
    for (idx_t j = 0; j < K; ++j) {
      const __m256 s = _mm256_mask_i32gather_ps(zero, base + j, offsets, mkf, 4);
      const __m256 e = exp256(_mm256_mul_ps(_mm256_sub_ps(s, mx), vt));
      esum = _mm256_add_ps(esum, e);
      ws = _mm256_fmadd_ps(e, s, ws);
    }
    const __m256 g = _mm256_maskload_ps(sg + n, mk);
    const __m256 res = _mm256_fmadd_ps(va, g, _mm256_mul_ps(vb, _mm256_div_ps(ws, esum)));
    _mm256_maskstore_ps(out + n, mk, res);
  }
}

LACLIP_AVX2 void pool_avx2(const float* g, const float* c, idx_t K, idx_t D, float alpha, float inv_tau, float* w,
                           float* p) {
  dots_avx2(g, D, 1, c, D, K, D, w, K);
  scaled_softmax(w, K, alpha, inv_tau);
  const __m256 va = _mm256_set1_ps(alpha);
  for (idx_t d = 0; d < D; d += 8) {
    const __m256i mk = lanes256(D - d);
    __m256 acc = _mm256_mul_ps(va, _mm256_maskload_ps(g + d, mk));
    for (idx_t j = 0; j < K; ++j)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_maskload_ps(c + j * D + d, mk), acc);
    _mm256_maskstore_ps(p + d, mk, acc);
  }
}

LACLIP_AVX2 void half_to_float_avx2(const c10::Half* src, float* dst, idx_t n) {
  idx_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

LACLIP_AVX2 void bf16_to_float_avx2(const c10::BFloat16* src, float* dst, idx_t n) {
  idx_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

const Kernels kAvx2{dots_avx2,         text_epilogue_avx2, pool_avx2, half_to_float_avx2,
                    bf16_to_float_avx2, nullptr,            "avx2"};

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// ---------------------------------------------- AVX-512 -----------------------------------------------------

LACLIP_AVX512_INLINE __mmask16 tail_mask(idx_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// Sums of four vectors: result lane i = sum of all 16 floats of input i.
LACLIP_AVX512_INLINE __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
  // 128-bit lane 0 holds a's four partial sums, lane 1 b's, lane 2 c's, lane 3 d's.
  __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, x));
}

// QB queries x MB rows of dot products, D innermost; QB * MB accumulators stay in registers.
// PF: software-prefetch the next MB rows (the first query block of a tile streams its rows from DRAM).
template <int QB, int MB, bool PF>
LACLIP_AVX512_INLINE void dot_tile(const float* T, idx_t ldt, const float* R, idx_t ldr, idx_t D, float* out,
                                   idx_t ldo) {
  __m512 acc[QB][MB];
#pragma GCC unroll 8
  for (int q = 0; q < QB; ++q)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[q][m] = _mm512_setzero_ps();
  idx_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 r[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) r[m] = _mm512_loadu_ps(R + m * ldr + d);
    if constexpr (PF) {
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
        _mm_prefetch(reinterpret_cast<const char*>(R + (m + MB) * ldr + d), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) {
      const __m512 t = _mm512_loadu_ps(T + q * ldt + d);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[q][m] = _mm512_fmadd_ps(t, r[m], acc[q][m]);
    }
  }
  if (d < D) {
    const __mmask16 mk = tail_mask(D - d);
    __m512 r[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) r[m] = _mm512_maskz_loadu_ps(mk, R + m * ldr + d);
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) {
      const __m512 t = _mm512_maskz_loadu_ps(mk, T + q * ldt + d);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[q][m] = _mm512_fmadd_ps(t, r[m], acc[q][m]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < QB; ++q) {
    // One reduction order for every row (tails padded with zeros), so identical rows give identical scores.
    const __m512 z = _mm512_setzero_ps();
    const __m128 sums = hsum4(acc[q][0], MB > 1 ? acc[q][MB > 1 ? 1 : 0] : z, MB > 2 ? acc[q][MB > 2 ? 2 : 0] : z,
                              MB > 3 ? acc[q][MB > 3 ? 3 : 0] : z);
    if constexpr (MB == 4) {
      _mm_storeu_ps(out + q * ldo, sums);
    } else {
      alignas(16) float tmp[4];
      _mm_store_ps(tmp, sums);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) out[q * ldo + m] = tmp[m];
    }
  }
}

template <int QB, bool PF>
LACLIP_AVX512 void dots_rows(const float* T, idx_t ldt, const float* R, idx_t ldr, idx_t nm, idx_t D, float* out,
                             idx_t ldo) {
  idx_t m = 0;
  for (; m + 4 <= nm; m += 4) dot_tile<QB, 4, PF>(T, ldt, R + m * ldr, ldr, D, out + m, ldo);
  switch (nm - m) {
    case 3: dot_tile<QB, 3, false>(T, ldt, R + m * ldr, ldr, D, out + m, ldo); break;
    case 2: dot_tile<QB, 2, false>(T, ldt, R + m * ldr, ldr, D, out + m, ldo); break;
    case 1: dot_tile<QB, 1, false>(T, ldt, R + m * ldr, ldr, D, out + m, ldo); break;
    default: break;
  }
}

template <int QB>
LACLIP_AVX512 void dots_block(bool first, const float* T, idx_t ldt, const float* R, idx_t ldr, idx_t nm, idx_t D,
                              float* out, idx_t ldo) {
  if (first)
    dots_rows<QB, true>(T, ldt, R, ldr, nm, D, out, ldo);
  else
    dots_rows<QB, false>(T, ldt, R, ldr, nm, D, out, ldo);
}

// Query blocks of 6; the first block reads the rows from memory (with prefetch), later blocks hit L2.
LACLIP_AVX512 void dots_avx512(const float* T, idx_t ldt, idx_t nq, const float* R, idx_t ldr, idx_t nm, idx_t D,
                               float* out, idx_t ldo) {
  idx_t q = 0;
  for (; q + 6 <= nq; q += 6) dots_block<6>(q == 0, T + q * ldt, ldt, R, ldr, nm, D, out + q * ldo, ldo);
  const float* t = T + q * ldt;
  float* o = out + q * ldo;
  const bool first = q == 0;
  switch (nq - q) {
    case 5: dots_block<5>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    case 4: dots_block<4>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    case 3: dots_block<3>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    case 2: dots_block<2>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    case 1: dots_block<1>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    default: break;
  }
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); large negative x flush towards 0.
LACLIP_AVX512_INLINE __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

LACLIP_AVX512 void text_epilogue_avx512(const float* sg, const float* sc, idx_t nb, idx_t K, float alpha,
                                        float inv_tau, float* out) {
  const __m512i offsets =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(K)));
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(1.f - alpha), vt = _mm512_set1_ps(inv_tau);
  const __m512 zero = _mm512_setzero_ps();
  for (idx_t n = 0; n < nb; n += 16) {
    const __mmask16 mk = tail_mask(nb - n);
    const float* base = sc + n * K;
    __m512 mx = _mm512_mask_i32gather_ps(zero, mk, offsets, base, 4);
    for (idx_t j = 1; j < K; ++j) mx = _mm512_max_ps(mx, _mm512_mask_i32gather_ps(zero, mk, offsets, base + j, 4));
    __m512 esum = zero, ws = zero;
    for (idx_t j = 0; j < K; ++j) {
      const __m512 s = _mm512_mask_i32gather_ps(zero, mk, offsets, base + j, 4);
      const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(s, mx), vt));
      esum = _mm512_add_ps(esum, e);
      ws = _mm512_fmadd_ps(e, s, ws);
    }
    const __m512 g = _mm512_maskz_loadu_ps(mk, sg + n);
    const __m512 res = _mm512_fmadd_ps(va, g, _mm512_mul_ps(vb, _mm512_div_ps(ws, esum)));
    _mm512_mask_storeu_ps(out + n, mk, res);
  }
}

LACLIP_AVX512 void pool_avx512(const float* g, const float* c, idx_t K, idx_t D, float alpha, float inv_tau,
                               float* w, float* p) {
  dots_avx512(g, D, 1, c, D, K, D, w, K);
  scaled_softmax(w, K, alpha, inv_tau);
  const __m512 va = _mm512_set1_ps(alpha);
  for (idx_t d = 0; d < D; d += 16) {
    const __mmask16 mk = tail_mask(D - d);
    __m512 acc = _mm512_mul_ps(va, _mm512_maskz_loadu_ps(mk, g + d));
    for (idx_t j = 0; j < K; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), _mm512_maskz_loadu_ps(mk, c + j * D + d), acc);
    _mm512_mask_storeu_ps(p + d, mk, acc);
  }
}

LACLIP_AVX512 void half_to_float_avx512(const c10::Half* src, float* dst, idx_t n) {
  idx_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

LACLIP_AVX512 void bf16_to_float_avx512(const c10::BFloat16* src, float* dst, idx_t n) {
  idx_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dot_tile on bf16 data: 32 elements per step; vdpbf16ps adds the products of element pairs (2i, 2i + 1) into
// fp32 lane i, so each accumulator's lanes still sum to the full dot product.
template <int QB, int MB, bool PF>
LACLIP_AVX512BF16_INLINE void dot_tile_bf16(const c10::BFloat16* T, idx_t ldt, const c10::BFloat16* R, idx_t ldr,
                                            idx_t D, float* out, idx_t ldo) {
  __m512 acc[QB][MB];
#pragma GCC unroll 8
  for (int q = 0; q < QB; ++q)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[q][m] = _mm512_setzero_ps();
  idx_t d = 0;
  for (; d + 32 <= D; d += 32) {
    __m512bh r[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) r[m] = (__m512bh)_mm512_loadu_si512(R + m * ldr + d);
    if constexpr (PF) {
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m)
        _mm_prefetch(reinterpret_cast<const char*>(R + (m + MB) * ldr + d), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) {
      const __m512bh t = (__m512bh)_mm512_loadu_si512(T + q * ldt + d);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[q][m] = _mm512_dpbf16_ps(acc[q][m], t, r[m]);
    }
  }
  if (d < D) {
    const __mmask32 mk = _cvtu32_mask32((1u << (D - d)) - 1u);  // D - d in 1..31
    __m512bh r[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) r[m] = (__m512bh)_mm512_maskz_loadu_epi16(mk, R + m * ldr + d);
#pragma GCC unroll 8
    for (int q = 0; q < QB; ++q) {
      const __m512bh t = (__m512bh)_mm512_maskz_loadu_epi16(mk, T + q * ldt + d);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[q][m] = _mm512_dpbf16_ps(acc[q][m], t, r[m]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < QB; ++q) {
    const __m512 z = _mm512_setzero_ps();
    const __m128 sums = hsum4(acc[q][0], MB > 1 ? acc[q][MB > 1 ? 1 : 0] : z, MB > 2 ? acc[q][MB > 2 ? 2 : 0] : z,
                              MB > 3 ? acc[q][MB > 3 ? 3 : 0] : z);
    alignas(16) float tmp[4];
    _mm_store_ps(tmp, sums);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) out[q * ldo + m] = tmp[m];
  }
}

template <int QB, bool PF>
LACLIP_AVX512BF16 void dots_rows_bf16(const c10::BFloat16* T, idx_t ldt, const c10::BFloat16* R, idx_t ldr,
                                      idx_t nm, idx_t D, float* out, idx_t ldo) {
  idx_t m = 0;
  for (; m + 4 <= nm; m += 4) dot_tile_bf16<QB, 4, PF>(T, ldt, R + m * ldr, ldr, D, out + m, ldo);
  switch (nm - m) {
    case 3: dot_tile_bf16<QB, 3, false>(T, ldt, R + m * ldr, ldr, D, out + m, ldo); break;
    case 2: dot_tile_bf16<QB, 2, false>(T, ldt, R + m * ldr, ldr, D, out + m, ldo); break;
    case 1: dot_tile_bf16<QB, 1, false>(T, ldt, R + m * ldr, ldr, D, out + m, ldo); break;
    default: break;
  }
}

template <int QB>
LACLIP_AVX512BF16 void dots_block_bf16(bool first, const c10::BFloat16* T, idx_t ldt, const c10::BFloat16* R,
                                       idx_t ldr, idx_t nm, idx_t D, float* out, idx_t ldo) {
  if (first)
    dots_rows_bf16<QB, true>(T, ldt, R, ldr, nm, D, out, ldo);
  else
    dots_rows_bf16<QB, false>(T, ldt, R, ldr, nm, D, out, ldo);
}

// As dots_avx512: query blocks of 6, the first block streams the rows from memory.
LACLIP_AVX512BF16 void dots_avx512_bf16(const c10::BFloat16* T, idx_t ldt, idx_t nq, const c10::BFloat16* R,
                                        idx_t ldr, idx_t nm, idx_t D, float* out, idx_t ldo) {
  idx_t q = 0;
  for (; q + 6 <= nq; q += 6) dots_block_bf16<6>(q == 0, T + q * ldt, ldt, R, ldr, nm, D, out + q * ldo, ldo);
  const c10::BFloat16* t = T + q * ldt;
  float* o = out + q * ldo;
  const bool first = q == 0;
  switch (nq - q) {
    case 5: dots_block_bf16<5>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    case 4: dots_block_bf16<4>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    case 3: dots_block_bf16<3>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    case 2: dots_block_bf16<2>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    case 1: dots_block_bf16<1>(first, t, ldt, R, ldr, nm, D, o, ldo); break;
    default: break;
  }
}

const Kernels kAvx512{dots_avx512,          text_epilogue_avx512, pool_avx512, half_to_float_avx512,
                      bf16_to_float_avx512, nullptr,              "avx512"};
const Kernels kAvx512Bf16{dots_avx512,          text_epilogue_avx512, pool_avx512,   half_to_float_avx512,
                          bf16_to_float_avx512, dots_avx512_bf16,     "avx512_bf16"};

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                         __builtin_cpu_supports("fma");
  return ok;
}

bool cpu_has_avx512_bf16() {
  static const bool ok =
      cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return ok;
}
#ifdef LACLIP_AMX_TILES
// ---------------------------------------------- AMX --------------------------------------------------------
// Tiles: tmm0-3 accumulate 16 rows x 16 queries (fp32), tmm4 holds 16 rows x 32 dims of R, tmm5 32 dims x 16
// queries of the packed queries: pairs of dims interleaved per query, the layout TDPBF16PS multiplies.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Packed layout: [query block of 16][32-dim chunk][16 dim pairs][16 queries x 2 dims]; missing queries are 0.
LACLIP_AMX void pack_bf16_amx(const c10::BFloat16* T, idx_t ldt, idx_t nq, idx_t D, c10::BFloat16* out) {
  const idx_t chunks = D / kAmxDims;
  for (idx_t b = 0; b < (nq + 15) / 16; ++b)
    for (idx_t c = 0; c < chunks; ++c) {
      c10::BFloat16* dst = out + (b * chunks + c) * 16 * kAmxDims;
      for (idx_t j = 0; j < 16; ++j) {
        const idx_t q = b * 16 + j;
        const c10::BFloat16* src = T + q * ldt + c * kAmxDims;
        for (idx_t i = 0; i < 16; ++i) {
          dst[i * kAmxDims + 2 * j] = q < nq ? src[2 * i] : c10::BFloat16(0.f);
          dst[i * kAmxDims + 2 * j + 1] = q < nq ? src[2 * i + 1] : c10::BFloat16(0.f);
        }
      }
    }
}

// One 128-bit-lane step of the 16 x 16 transpose: y[a + i] = lanes 0, 2 of x[a + i] then of x[b + i];
// y[b + i] = lanes 1, 3 (i < 4).
LACLIP_AMX_INLINE void lane_pairs(const __m512* x, __m512* y, int a, int b) {
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    y[a + i] = _mm512_shuffle_f32x4(x[a + i], x[b + i], 0x88);
    y[b + i] = _mm512_shuffle_f32x4(x[a + i], x[b + i], 0xdd);
  }
}

// A 16 x 16 fp32 tile a (row i = one R row, column j = one query) written transposed: out[j * ldo + i] for
// i < rows, j < cols (unpack, in-lane shuffles, then 128-bit lane shuffles).
LACLIP_AMX_INLINE void store_transposed(const float* a, idx_t rows, idx_t cols, float* out, idx_t ldo) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(a + 16 * i);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  lane_pairs(r, t, 0, 4);
  lane_pairs(r, t, 8, 12);
  lane_pairs(t, r, 0, 8);
  lane_pairs(t, r, 4, 12);
  const __mmask16 mk = tail_mask(rows);
  for (idx_t j = 0; j < cols; ++j) _mm512_mask_storeu_ps(out + j * ldo, mk, r[j]);
}

// out[q * ldo + m] = T_q . R_m from packed queries: per 16 rows, up to 4 query blocks at once (one R tile load
// per 32 dims serves four products). A last block of fewer than 16 rows is copied to a zero-padded buffer, so no
// tile load reads past R.
LACLIP_AMX void dots_packed_bf16_amx(const c10::BFloat16* P, idx_t nq, const c10::BFloat16* R, idx_t ldr,
                                     idx_t nm, idx_t D, float* out, idx_t ldo) {
  TileConfig config;
  for (int t = 0; t < 6; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  const idx_t chunks = D / kAmxDims, qblocks = (nq + 15) / 16, block = 16 * kAmxDims * chunks;
  alignas(64) float acc[4][256];
  std::vector<c10::BFloat16> tail;
  for (idx_t m0 = 0; m0 < nm; m0 += 16) {
    const idx_t rows = std::min<idx_t>(16, nm - m0);
    const c10::BFloat16* A = R + m0 * ldr;
    idx_t lda = ldr;
    if (rows < 16) {
      tail.assign(16 * D, c10::BFloat16(0.f));
      for (idx_t i = 0; i < rows; ++i) std::memcpy(tail.data() + i * D, A + i * ldr, D * sizeof(c10::BFloat16));
      A = tail.data();
      lda = D;
    }
    for (idx_t b0 = 0; b0 < qblocks; b0 += 4) {
      const idx_t nb = std::min<idx_t>(4, qblocks - b0);
      const c10::BFloat16* B = P + b0 * block;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (idx_t k = 0; k < chunks; ++k) {
        const c10::BFloat16* Bk = B + k * 16 * kAmxDims;
        _tile_loadd(4, A + k * kAmxDims, lda * sizeof(c10::BFloat16));
        _tile_loadd(5, Bk, kAmxDims * sizeof(c10::BFloat16));
        _tile_dpbf16ps(0, 4, 5);
        if (nb > 1) {
          _tile_loadd(5, Bk + block, kAmxDims * sizeof(c10::BFloat16));
          _tile_dpbf16ps(1, 4, 5);
        }
        if (nb > 2) {
          _tile_loadd(5, Bk + 2 * block, kAmxDims * sizeof(c10::BFloat16));
          _tile_dpbf16ps(2, 4, 5);
        }
        if (nb > 3) {
          _tile_loadd(5, Bk + 3 * block, kAmxDims * sizeof(c10::BFloat16));
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      _tile_stored(0, acc[0], 64);
      if (nb > 1) _tile_stored(1, acc[1], 64);
      if (nb > 2) _tile_stored(2, acc[2], 64);
      if (nb > 3) _tile_stored(3, acc[3], 64);
      for (idx_t b = 0; b < nb; ++b) {
        const idx_t q0 = (b0 + b) * 16;
        store_transposed(acc[b], rows, std::min<idx_t>(16, nq - q0), out + q0 * ldo + m0, ldo);
      }
    }
  }
  _tile_release();
}

// The kernel hands out AMX's tile state only to processes that ask for it (Linux 5.16+).
bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

bool cpu_has_amx_bf16() {
  static const bool ok = cpu_has_avx512_bf16() && __builtin_cpu_supports("amx-tile") &&
                         __builtin_cpu_supports("amx-bf16") && amx_permitted();
  return ok;
}

const Kernels kAmxBf16{dots_avx512,          text_epilogue_avx512, pool_avx512,   half_to_float_avx512,
                       bf16_to_float_avx512, dots_avx512_bf16,     "amx_bf16",    pack_bf16_amx,
                       dots_packed_bf16_amx};
#endif
#endif

// The CPU paths, slowest first (kPathNames); null for a path this CPU cannot run.
constexpr int kPaths = 5;
const char* const kPathNames[kPaths] = {"generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"};

const Kernels* path_kernels(int path) {
  switch (path) {
    case 0: return &kGeneric;
#ifdef LACLIP_X86_SIMD
    case 1: return cpu_has_avx2() ? &kAvx2 : nullptr;
    case 2: return cpu_has_avx512() ? &kAvx512 : nullptr;
    case 3: return cpu_has_avx512_bf16() ? &kAvx512Bf16 : nullptr;
#ifdef LACLIP_AMX_TILES
    case 4: return cpu_has_amx_bf16() ? &kAmxBf16 : nullptr;
#endif
#endif
    default: return nullptr;
  }
}

std::atomic<int> g_max_path{kPaths - 1};

const Kernels& kernels() {
  for (int path = g_max_path.load(); path > 0; --path)
    if (const Kernels* k = path_kernels(path)) return *k;
  return kGeneric;
}

// ------------------------------------------------------------------------------------------------------------
// Top-k heaps: root = worst entry (lowest score; on equal scores, highest index).
// ------------------------------------------------------------------------------------------------------------
inline bool worse(float a, idx_t ia, float b, idx_t ib) { return a < b || (a == b && ia > ib); }

struct Heaps {  // one heap of capacity k per query
  idx_t k = 0;
  std::vector<float> val;
  std::vector<idx_t> idx;
  std::vector<idx_t> size;
  Heaps(idx_t Q, idx_t k_) : k(k_), val(Q * k_), idx(Q * k_), size(Q, 0) {}

  void push(idx_t q, float s, idx_t id) {
    float* v = val.data() + q * k;
    idx_t* ix = idx.data() + q * k;
    idx_t& n = size[q];
    if (n < k) {
      idx_t pos = n++;
      while (pos > 0) {
        const idx_t parent = (pos - 1) / 2;
        if (!worse(s, id, v[parent], ix[parent])) break;
        v[pos] = v[parent];
        ix[pos] = ix[parent];
        pos = parent;
      }
      v[pos] = s;
      ix[pos] = id;
      return;
    }
    if (!worse(v[0], ix[0], s, id)) return;
    idx_t pos = 0;
    for (;;) {
      const idx_t l = 2 * pos + 1;
      if (l >= n) break;
      idx_t ch = l;
      if (l + 1 < n && worse(v[l + 1], ix[l + 1], v[l], ix[l])) ch = l + 1;
      if (!worse(v[ch], ix[ch], s, id)) break;
      v[pos] = v[ch];
      ix[pos] = ix[ch];
      pos = ch;
    }
    v[pos] = s;
    ix[pos] = id;
  }

  // Scores of images first_id, first_id + 1, ... (ids rise, so a score equal to the root's never enters).
  void push_row(idx_t q, const float* s, idx_t count, idx_t first_id) {
    const float* root = val.data() + q * k;
    for (idx_t i = 0; i < count; ++i) {
      if (size[q] == k && !(s[i] > root[0])) continue;
      push(q, s[i], first_id + i);
    }
  }
};

// ------------------------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------------------------
struct Problem {
  const float* T = nullptr;  // [Q, D] fp32
  const float* Gf = nullptr;
  const float* Cf = nullptr;  // fp32 rows, or
  const c10::Half* Gh = nullptr;
  const c10::Half* Ch = nullptr;  // fp16 rows, or
  const c10::BFloat16* Tb = nullptr;
  const c10::BFloat16* Gb = nullptr;
  const c10::BFloat16* Cb = nullptr;  // bf16 queries and rows
  idx_t Q = 0, N = 0, K = 0, D = 0;
  float alpha = 0.f, inv_tau = 1.f;
  bool text = false;
};

idx_t tile_images(idx_t K, idx_t D) {
  const idx_t per_image = (K + 1) * D * static_cast<idx_t>(sizeof(float));
  idx_t t = std::max<idx_t>(1, kTileBytes / per_image);
  if (t >= 32) t = t / 16 * 16;
  return std::min<idx_t>(t, 512);
}

// One chunk: queries [qa, qb) x images [na, nb). Writes scores rows (scores != nullptr) or pushes into heaps.
void run_chunk(const Problem& P, const Kernels& kern, idx_t qa, idx_t qb, idx_t na, idx_t nb, idx_t tile,
               float* scores, Heaps* heaps) {
  const idx_t K = P.K, D = P.D;
  const bool bf16_dots = P.text && P.Gb != nullptr && kern.dots_bf16 != nullptr;  // no conversion at all
  const bool convert = (P.Gh != nullptr || P.Gb != nullptr) && !bf16_dots;
  std::vector<float> gbuf(convert ? tile * D : 0), cbuf(convert ? tile * K * D : 0);
  std::vector<float> pbuf(P.text ? 0 : tile * D), wbuf(K);
  const idx_t qg = std::min(kQueryGroup, qb - qa);
  std::vector<float> sg(qg * tile), sc(P.text ? qg * tile * K : 0), row(tile);
  // AMX: every query group of the chunk packed once, before the tiles that reuse it
  const bool packed_dots = bf16_dots && kern.dots_packed_bf16 != nullptr && D % kAmxDims == 0;
  std::vector<std::vector<c10::BFloat16>> packed;
  for (idx_t q0 = qa; packed_dots && q0 < qb; q0 += qg) {
    const idx_t nq = std::min(qg, qb - q0);
    packed.emplace_back(packed_bf16_size(nq, D));
    kern.pack_bf16(P.Tb + q0 * D, D, nq, D, packed.back().data());
  }

  for (idx_t n0 = na; n0 < nb; n0 += tile) {
    const idx_t nt = std::min(tile, nb - n0);
    const float* g = P.Gf ? P.Gf + n0 * D : gbuf.data();
    const float* c = P.Cf ? P.Cf + n0 * K * D : cbuf.data();
    if (convert && P.Gh) {
      kern.half_to_float(P.Gh + n0 * D, gbuf.data(), nt * D);
      kern.half_to_float(P.Ch + n0 * K * D, cbuf.data(), nt * K * D);
    } else if (convert) {
      kern.bf16_to_float(P.Gb + n0 * D, gbuf.data(), nt * D);
      kern.bf16_to_float(P.Cb + n0 * K * D, cbuf.data(), nt * K * D);
    }
    if (!P.text) {
      for (idx_t i = 0; i < nt; ++i)
        kern.pool(g + i * D, c + i * K * D, K, D, P.alpha, P.inv_tau, wbuf.data(), pbuf.data() + i * D);
    }
    for (idx_t q0 = qa; q0 < qb; q0 += qg) {
      const idx_t nq = std::min(qg, qb - q0);
      const float* t = P.T + q0 * D;
      if (packed_dots) {
        const c10::BFloat16* tp = packed[(q0 - qa) / qg].data();
        kern.dots_packed_bf16(tp, nq, P.Gb + n0 * D, D, nt, D, sg.data(), nt);
        kern.dots_packed_bf16(tp, nq, P.Cb + n0 * K * D, D, nt * K, D, sc.data(), nt * K);
      } else if (bf16_dots) {
        const c10::BFloat16* tb = P.Tb + q0 * D;
        kern.dots_bf16(tb, D, nq, P.Gb + n0 * D, D, nt, D, sg.data(), nt);
        kern.dots_bf16(tb, D, nq, P.Cb + n0 * K * D, D, nt * K, D, sc.data(), nt * K);
      } else if (P.text) {
        kern.dots(t, D, nq, g, D, nt, D, sg.data(), nt);
        kern.dots(t, D, nq, c, D, nt * K, D, sc.data(), nt * K);
      }
      if (P.text) {
        for (idx_t i = 0; i < nq; ++i) {
          float* dst = scores ? scores + (q0 + i) * P.N + n0 : row.data();
          kern.text_epilogue(sg.data() + i * nt, sc.data() + i * nt * K, nt, K, P.alpha, P.inv_tau, dst);
          if (heaps) heaps->push_row(q0 + i, dst, nt, n0);
        }
      } else if (scores) {
        kern.dots(t, D, nq, pbuf.data(), D, nt, D, scores + q0 * P.N + n0, P.N);
      } else {
        kern.dots(t, D, nq, pbuf.data(), D, nt, D, sg.data(), nt);
        for (idx_t i = 0; i < nq; ++i) heaps->push_row(q0 + i, sg.data() + i * nt, nt, n0);
      }
    }
  }
}

struct Plan {
  idx_t tile, ntiles, nsplit, qsplit;
  idx_t n_begin(idx_t s, idx_t N) const { return std::min(N, (ntiles * s / nsplit) * tile); }
  idx_t q_begin(idx_t s, idx_t Q) const {
    // split queries on multiples of the micro-kernel's 6-query block where possible
    const idx_t blocks = (Q + 5) / 6;
    return std::min(Q, (blocks * s / qsplit) * 6);
  }
};

Plan make_plan(const Problem& P) {
  Plan plan;
  plan.tile = tile_images(P.K, P.D);
  plan.ntiles = (P.N + plan.tile - 1) / plan.tile;
  const idx_t threads = std::max<idx_t>(1, at::get_num_threads());
  plan.nsplit = std::min(threads, plan.ntiles);
  plan.qsplit = std::max<idx_t>(1, std::min(threads / plan.nsplit, (P.Q + 5) / 6));
  return plan;
}

// T, G, C: contiguous, one dtype; Tf: T as contiguous fp32.
Problem make_problem(const at::Tensor& T, const at::Tensor& Tf, const at::Tensor& G, const at::Tensor& C,
                     double alpha, double tau, bool text) {
  Problem P;
  P.T = Tf.data_ptr<float>();
  switch (G.scalar_type()) {
    case at::kHalf:
      P.Gh = G.data_ptr<at::Half>();
      P.Ch = C.data_ptr<at::Half>();
      break;
    case at::kBFloat16:
      P.Tb = T.data_ptr<at::BFloat16>();
      P.Gb = G.data_ptr<at::BFloat16>();
      P.Cb = C.data_ptr<at::BFloat16>();
      break;
    default:
      P.Gf = G.data_ptr<float>();
      P.Cf = C.data_ptr<float>();
  }
  P.Q = Tf.size(0);
  P.D = Tf.size(1);
  P.N = G.size(0);
  P.K = C.size(1);
  P.alpha = static_cast<float>(alpha);
  const double inv_tau = 1.0 / tau;
  P.inv_tau = static_cast<float>(std::min<double>(inv_tau, std::numeric_limits<float>::max()));
  P.text = text;
  return P;
}

}  // namespace

const char* cpu_isa() { return kernels().name; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (int path = 0; path < kPaths; ++path)
    if (path_kernels(path) != nullptr) names.emplace_back(kPathNames[path]);
  return names;
}

void set_max_isa(const std::string& name) {
  if (name.empty()) {
    g_max_path.store(kPaths - 1);
    return;
  }
  const auto* found = std::find(kPathNames, kPathNames + kPaths, name);
  TORCH_CHECK_VALUE(found != kPathNames + kPaths, "laclip: unknown CPU path '", name,
                    "'; expected generic, avx2, avx512, avx512_bf16 or amx_bf16");
  g_max_path.store(static_cast<int>(found - kPathNames));
}

at::Tensor scores_cpu(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C, double alpha, double tau,
                      bool weights_is_text) {
  const at::Tensor Tf = T.to(at::kFloat).contiguous();
  const Problem P = make_problem(T, Tf, G, C, alpha, tau, weights_is_text);
  const Kernels& kern = kernels();
  const Plan plan = make_plan(P);
  at::Tensor out = at::empty({P.Q, P.N}, T.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, plan.nsplit * plan.qsplit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const idx_t ns = c / plan.qsplit, qs = c % plan.qsplit;
      run_chunk(P, kern, plan.q_begin(qs, P.Q), plan.q_begin(qs + 1, P.Q), plan.n_begin(ns, P.N),
                plan.n_begin(ns + 1, P.N), plan.tile, o, nullptr);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& T, const at::Tensor& G, const at::Tensor& C,
                                            int64_t k, double alpha, double tau, bool weights_is_text) {
  const at::Tensor Tf = T.to(at::kFloat).contiguous();
  const Problem P = make_problem(T, Tf, G, C, alpha, tau, weights_is_text);
  const Kernels& kern = kernels();
  const Plan plan = make_plan(P);
  std::vector<Heaps> heaps;
  heaps.reserve(plan.nsplit);
  for (idx_t s = 0; s < plan.nsplit; ++s) heaps.emplace_back(P.Q, k);
  at::parallel_for(0, plan.nsplit * plan.qsplit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const idx_t ns = c / plan.qsplit, qs = c % plan.qsplit;
      run_chunk(P, kern, plan.q_begin(qs, P.Q), plan.q_begin(qs + 1, P.Q), plan.n_begin(ns, P.N),
                plan.n_begin(ns + 1, P.N), plan.tile, nullptr, &heaps[ns]);
    }
  });

  at::Tensor values = at::empty({P.Q, k}, T.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({P.Q, k}, T.options().dtype(at::kLong));
  float* vo = values.data_ptr<float>();
  int64_t* io = indices.data_ptr<int64_t>();
  at::parallel_for(0, P.Q, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, idx_t>> all;
    for (int64_t q = begin; q < end; ++q) {
      all.clear();
      for (const Heaps& h : heaps)
        for (idx_t i = 0; i < h.size[q]; ++i) all.emplace_back(h.val[q * k + i], h.idx[q * k + i]);
      const idx_t take = std::min<idx_t>(k, static_cast<idx_t>(all.size()));
      std::partial_sort(all.begin(), all.begin() + take, all.end(), [](const auto& a, const auto& b) {
        return worse(b.first, b.second, a.first, a.second);
      });
      for (idx_t i = 0; i < take; ++i) {
        vo[q * k + i] = all[i].first;
        io[q * k + i] = all[i].second;
      }
    }
  });
  return {values, indices};
}

}  // namespace laclip
