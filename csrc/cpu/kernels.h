// The CPU kernel table shared by the LACLIP driver (csrc/laclip_cpu.cpp) and its per-ISA implementations
// (csrc/cpu/laclip_{generic,avx2,avx512,amx}.cpp). Each implementation file defines one accessor that returns its
// path's table, or nullptr when this CPU (or this build's compiler and platform) cannot run it; the driver
// picks the fastest non-null one at run time (laclip::cpu_isa).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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
namespace cpu {

using idx_t = int64_t;

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
inline idx_t packed_bf16_size(idx_t nq, idx_t D) { return (nq + 15) / 16 * 16 * D; }

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

#ifdef LACLIP_X86_SIMD
// Lanes [0, count) of 16 set (AVX-512 tails; the AMX transpose uses it too).
LACLIP_AVX512_INLINE __mmask16 tail_mask(idx_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}
#endif

// The kernel tables, slowest first; nullptr where this CPU or build cannot run the path.
const Kernels* generic_kernels();      // portable loops (always available)
const Kernels* avx2_kernels();         // AVX2 + FMA
const Kernels* avx512_kernels();       // AVX-512F
const Kernels* avx512_bf16_kernels();  // AVX-512F plus the AVX-512 BF16 dot products
const Kernels* amx_bf16_kernels();     // avx512_bf16 with bf16 "text" dots on AMX tiles (Linux)

}  // namespace cpu
}  // namespace laclip
