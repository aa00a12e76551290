// LACLIP CPU kernels, AVX-512 paths: AVX-512F (a 6-query x 4-row dot micro-kernel with prefetch, vector exp),
// and AVX-512F plus the BF16 dot-product instruction (vdpbf16ps) reading bf16 queries and rows directly
// (products exact, fp32 accumulation) for "text" weights.
#include "kernels.h"

namespace laclip {
namespace cpu {

#ifdef LACLIP_X86_SIMD
namespace {

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

}  // namespace

const Kernels* avx512_kernels() { return cpu_has_avx512() ? &kAvx512 : nullptr; }

const Kernels* avx512_bf16_kernels() {
  static const bool ok =
      cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return ok ? &kAvx512Bf16 : nullptr;
}
#else
const Kernels* avx512_kernels() { return nullptr; }
const Kernels* avx512_bf16_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace laclip
