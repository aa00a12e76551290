// LACLIP CPU kernels, portable path: plain loops the compiler vectorises at -O3 (baseline x86-64: SSE2).
#include "kernels.h"

namespace laclip {
namespace cpu {
namespace {

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

}  // namespace

const Kernels* generic_kernels() { return &kGeneric; }

}  // namespace cpu
}  // namespace laclip
