// LACLIP CPU kernels, AVX2 + FMA path: a 4-query x 3-row register-blocked dot micro-kernel, vector exp for the
// "text" epilogue, F16C/shift conversions of fp16/bf16 rows.
#include "kernels.h"

namespace laclip {
namespace cpu {

#ifdef LACLIP_X86_SIMD
namespace {

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

}  // namespace

const Kernels* avx2_kernels() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok ? &kAvx2 : nullptr;
}
#else
const Kernels* avx2_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace laclip
