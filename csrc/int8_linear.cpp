// int8 linear layers (see int8_linear.h): weight packing, per-row activation quantisation, and the GEMM in three
// implementations with identical int32 sums: AVX512-VNNI (VPDPBUSD, 8 rows x 32 channels per register tile), AVX2
// (VPMADDUBSW, exact because weights are packed in 7 bits: see kWeightMax) and portable loops.
#include "int8_linear.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "laclip.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

namespace laclip {
namespace {

constexpr int64_t kRows = 8;  // rows per register tile
// Weights are quantised to [-64, 64] (7 bits and the sign's extra level), on every path: AVX2's VPMADDUBSW adds
// two u8 x s8 products in int16, and 2 x 255 x 64 = 32640 still fits (with +-127 weights 2 x 255 x 127 would
// saturate at 32767), so the AVX2 path multiplies 32 pairs per instruction and its sums equal the other paths'.
// ONNX Runtime's dynamic int8 keeps 7-bit weights for the same reason (export/quantize.py).
constexpr float kWeightMax = 64.f;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Activations of one call: uint8 rows padded to a multiple of 4 features, with each row's scale and zero point.
struct QuantizedRows {
  std::vector<uint8_t> data;
  std::vector<float> scale;
  std::vector<int32_t> zero;
  int64_t stride = 0;
};

// A row's uint8 scale and zero point over [min(0, row min), max(0, row max)], so 0.0 is exact.
void row_scale(float lo, float hi, float* scale, int32_t* zero) {
  *scale = hi > lo ? (hi - lo) / 255.f : 1.f;
  *zero = static_cast<int32_t>(std::clamp(std::nearbyint(-lo / *scale), 0.f, 255.f));
}

uint8_t quantize_one(float x, float inv, float zero) {
  return static_cast<uint8_t>(std::clamp(std::nearbyint(x * inv) + zero, 0.f, 255.f));
}

void quantize_row_generic(const float* row, int64_t k, uint8_t* out, float* scale, int32_t* zero) {
  float lo = 0.f, hi = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    lo = std::min(lo, row[j]);
    hi = std::max(hi, row[j]);
  }
  row_scale(lo, hi, scale, zero);
  const float inv = 1.f / *scale;
  for (int64_t j = 0; j < k; ++j) out[j] = quantize_one(row[j], inv, static_cast<float>(*zero));
}

// The vector paths' shared step: the row range over [from, k) folded into [lo, hi], then the row's scale and zero
// point; returns 1 / scale.
float finish_range(const float* row, int64_t from, int64_t k, float lo, float hi, float* scale, int32_t* zero) {
  for (int64_t t = from; t < k; ++t) {
    lo = std::min(lo, row[t]);
    hi = std::max(hi, row[t]);
  }
  row_scale(lo, hi, scale, zero);
  return 1.f / *scale;
}

// The same values 16 at a time (round to nearest even, as nearbyint in the default rounding mode).
__attribute__((target("avx512f,avx512bw"))) void quantize_row_avx512(const float* row, int64_t k, uint8_t* out,
                                                                   float* scale, int32_t* zero) {
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m512 v = _mm512_loadu_ps(row + j);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  const float inv = finish_range(row, j, k, _mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi), scale, zero);
  const float z = static_cast<float>(*zero);
  const __m512 vinv = _mm512_set1_ps(inv), vz = _mm512_set1_ps(z), top = _mm512_set1_ps(255.f);
  for (j = 0; j + 16 <= k; j += 16) {
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(row + j), vinv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vz), _mm512_setzero_ps()), top);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
  }
  for (; j < k; ++j) out[j] = quantize_one(row[j], inv, z);
}

// The same values 8 at a time with AVX2 (round to nearest even, as nearbyint in the default rounding mode).
__attribute__((target("avx2,fma"))) void quantize_row_avx2(const float* row, int64_t k, uint8_t* out,
                                                           float* scale, int32_t* zero) {
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 v = _mm256_loadu_ps(row + j);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  alignas(32) float lanes_lo[8], lanes_hi[8];
  _mm256_store_ps(lanes_lo, vlo);
  _mm256_store_ps(lanes_hi, vhi);
  float lo = 0.f, hi = 0.f;
  for (int i = 0; i < 8; ++i) {
    lo = std::min(lo, lanes_lo[i]);
    hi = std::max(hi, lanes_hi[i]);
  }
  const float inv = finish_range(row, j, k, lo, hi, scale, zero), z = static_cast<float>(*zero);
  const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(z), top = _mm256_set1_ps(255.f);
  for (j = 0; j + 8 <= k; j += 8) {
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j), vinv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), _mm256_setzero_ps()), top);
    const __m256i v32 = _mm256_cvtps_epi32(q);  // 0..255
    const __m128i v16 = _mm_packus_epi32(_mm256_castsi256_si128(v32), _mm256_extracti128_si256(v32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j), _mm_packus_epi16(v16, v16));
  }
  for (; j < k; ++j) out[j] = quantize_one(row[j], inv, z);
}

enum class Path { kGeneric, kAvx2, kVnni };

// Activations of one call (finite values): uint8 rows padded to a multiple of 4 features, with each row's scale
// and zero point.
QuantizedRows quantize_rows(const float* x, int64_t m, int64_t k, Path path) {
  QuantizedRows q;
  q.stride = ceil_div(k, kInt8Group) * kInt8Group;
  q.data.assign(static_cast<size_t>(m * q.stride), 0);
  q.scale.resize(m);
  q.zero.resize(m);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* out = q.data.data() + r * q.stride;
      if (path == Path::kVnni)
        quantize_row_avx512(x + r * k, k, out, &q.scale[r], &q.zero[r]);
      else if (path == Path::kAvx2)
        quantize_row_avx2(x + r * k, k, out, &q.scale[r], &q.zero[r]);
      else
        quantize_row_generic(x + r * k, k, out, &q.scale[r], &q.zero[r]);
    }
  });
  return q;
}

// acc[r][c] for rows [r0, r0 + rows) and the 32 channels of block `block`: portable loops.
void tile_generic(const QuantizedRows& a, int64_t r0, int64_t rows, const int8_t* block, int64_t groups,
                  int32_t acc[kRows][kInt8Cols]) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = a.data.data() + (r0 + r) * a.stride;
    for (int64_t c = 0; c < kInt8Cols; ++c) acc[r][c] = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* w = block + g * kInt8Cols * kInt8Group;
      for (int64_t c = 0; c < kInt8Cols; ++c)
        for (int64_t i = 0; i < kInt8Group; ++i)
          acc[r][c] += static_cast<int32_t>(row[g * kInt8Group + i]) * static_cast<int32_t>(w[c * kInt8Group + i]);
    }
  }
}

// The same sums with VPDPBUSD: per group of 4 features, two 64-byte weight loads and one dot product per row and
// 16-channel half. With K <= 32768 (ops check it) neither the sums of 255 x 127 products nor the zero-point
// correction overflow int32.
template <int kTileRows>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni_rows(const QuantizedRows& a, int64_t r0,
                                                                           const int8_t* block, int64_t groups,
                                                                           int32_t acc[kRows][kInt8Cols]) {
  __m512i lo[kTileRows], hi[kTileRows];
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
  const uint8_t* base = a.data.data() + r0 * a.stride;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* w = block + g * kInt8Cols * kInt8Group;
    const __m512i w0 = _mm512_loadu_si512(w);
    const __m512i w1 = _mm512_loadu_si512(w + 64);
    _mm_prefetch(reinterpret_cast<const char*>(w + 1024), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int r = 0; r < kTileRows; ++r) {
      int32_t four;
      std::memcpy(&four, base + r * a.stride + g * kInt8Group, sizeof four);
      const __m512i x = _mm512_set1_epi32(four);
      lo[r] = _mm512_dpbusd_epi32(lo[r], x, w0);
      hi[r] = _mm512_dpbusd_epi32(hi[r], x, w1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r) {
    _mm512_storeu_si512(acc[r], lo[r]);
    _mm512_storeu_si512(acc[r] + 16, hi[r]);
  }
}

// The row count is a template argument so the accumulators stay in registers.
void tile_vnni(const QuantizedRows& a, int64_t r0, int64_t rows, const int8_t* block, int64_t groups,
               int32_t acc[kRows][kInt8Cols]) {
  switch (rows) {
    case 8: tile_vnni_rows<8>(a, r0, block, groups, acc); break;
    case 7: tile_vnni_rows<7>(a, r0, block, groups, acc); break;
    case 6: tile_vnni_rows<6>(a, r0, block, groups, acc); break;
    case 5: tile_vnni_rows<5>(a, r0, block, groups, acc); break;
    case 4: tile_vnni_rows<4>(a, r0, block, groups, acc); break;
    case 3: tile_vnni_rows<3>(a, r0, block, groups, acc); break;
    case 2: tile_vnni_rows<2>(a, r0, block, groups, acc); break;
    default: tile_vnni_rows<1>(a, r0, block, groups, acc); break;
  }
}

// The same sums with AVX2: per group of 4 features, one 32-byte load holds 8 channels x 4 weights; the row's 4
// activation bytes are broadcast to every 32-bit lane; VPMADDUBSW multiplies them (pairs summed in int16, exact
// with 7-bit weights: kWeightMax) and VPMADDWD by ones adds each channel's two pairs into its int32 lane. kR rows x
// kC registers of 8 channels accumulate in registers (kR kC + kC + 2 <= 16: no spills, which would cost a
// store-to-load round trip per step) while a pass walks a chunk of kChunkGroups groups (8 KiB of the block, in L1
// for the block's other passes, the next chunk prefetched); partial sums wait in `part` between chunks.
constexpr int64_t kChunkGroups = 64;

template <int kR, int kC>
__attribute__((target("avx2,fma"))) void tile_avx2_rows(const uint8_t* base, int64_t stride, const int8_t* block,
                                                        int64_t groups, int32_t (*acc)[kInt8Cols]) {
  constexpr int64_t kPasses = kInt8Cols / (8 * kC);
  constexpr int64_t kPrefetchStep = kInt8Cols * kInt8Group / kPasses / 2;  // bytes: the passes cover half a chunk
  alignas(32) int32_t part[kR][kInt8Cols] = {};
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g0 = 0; g0 < groups; g0 += kChunkGroups) {
    const int64_t g1 = std::min(groups, g0 + kChunkGroups);
    for (int64_t pass = 0; pass < kPasses; ++pass) {
      __m256i sum[kR][kC];
#pragma GCC unroll 8
      for (int r = 0; r < kR; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < kC; ++c)
          sum[r][c] = _mm256_load_si256(reinterpret_cast<const __m256i*>(part[r] + 8 * (pass * kC + c)));
      const int8_t* w = block + g0 * kInt8Cols * kInt8Group + pass * 32 * kC;
      // The next chunk (or the next block: they are contiguous), two slices per step, spread over the passes.
      const char* ahead = reinterpret_cast<const char*>(block + g1 * kInt8Cols * kInt8Group) +
                          pass * kChunkGroups * 2 * kPrefetchStep;
      for (int64_t g = g0; g < g1; ++g, w += kInt8Cols * kInt8Group, ahead += 2 * kPrefetchStep) {
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + kPrefetchStep, _MM_HINT_T0);
        __m256i wv[kC];
#pragma GCC unroll 8
        for (int c = 0; c < kC; ++c) wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * c));
#pragma GCC unroll 8
        for (int r = 0; r < kR; ++r) {
          int32_t four;
          std::memcpy(&four, base + r * stride + g * kInt8Group, sizeof four);
          const __m256i x = _mm256_set1_epi32(four);
#pragma GCC unroll 8
          for (int c = 0; c < kC; ++c)
            sum[r][c] = _mm256_add_epi32(sum[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(x, wv[c]), ones));
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < kR; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < kC; ++c)
          _mm256_store_si256(reinterpret_cast<__m256i*>(part[r] + 8 * (pass * kC + c)), sum[r][c]);
    }
  }
  for (int r = 0; r < kR; ++r) std::memcpy(acc[r], part[r], sizeof part[r]);
}

// A tile of up to 8 rows in sub-tiles of 4 rows x 16 channels (14 registers), the last 1-3 rows with all 32
// channels per pass so each broadcast activation still meets several weight registers.
void tile_avx2(const QuantizedRows& a, int64_t r0, int64_t rows, const int8_t* block, int64_t groups,
               int32_t acc[kRows][kInt8Cols]) {
  const uint8_t* base = a.data.data() + r0 * a.stride;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) tile_avx2_rows<4, 2>(base + r * a.stride, a.stride, block, groups, acc + r);
  switch (rows - r) {
    case 3: tile_avx2_rows<3, 2>(base + r * a.stride, a.stride, block, groups, acc + r); break;
    case 2: tile_avx2_rows<2, 4>(base + r * a.stride, a.stride, block, groups, acc + r); break;
    case 1: tile_avx2_rows<1, 4>(base + r * a.stride, a.stride, block, groups, acc + r); break;
    default: break;
  }
}

// One tile's output rows: sa * sw * (acc - za * colsum) + bias, rounding as the loops in int8_linear_into but
// with each product-and-add fused (results agree to float rounding, the int32 sums exactly).
__attribute__((target("avx512f"))) void epilogue_avx512(const int32_t acc[kRows][kInt8Cols], int64_t rows,
                                                       int64_t cols, const float* sa, const int32_t* za,
                                                       const PackedLinear& layer, int64_t c0, float* out) {
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t lanes = std::clamp<int64_t>(cols - 16 * h, 0, 16);
    if (lanes == 0) break;
    const __mmask16 mask = static_cast<__mmask16>(lanes == 16 ? 0xFFFF : (1u << lanes) - 1);
    const int64_t c = c0 + 16 * h;
    const __m512i colsum = _mm512_maskz_loadu_epi32(mask, layer.colsum + c);
    const __m512 sw = _mm512_maskz_loadu_ps(mask, layer.scale + c);
    const __m512 bias = layer.bias ? _mm512_maskz_loadu_ps(mask, layer.bias + c) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512i sum = _mm512_sub_epi32(_mm512_loadu_si512(acc[r] + 16 * h),
                                           _mm512_mullo_epi32(_mm512_set1_epi32(za[r]), colsum));
      const __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_set1_ps(sa[r]), sw), bias);
      _mm512_mask_storeu_ps(out + r * layer.n + c, mask, value);
    }
  }
}

bool cpu_has_vnni() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// The LACLIP path in use caps this one: capped at generic, the loops; at avx2, the AVX2 GEMM even on a VNNI CPU.
Path int8_path() {
  const std::string cap = cpu_isa();
  const bool avx512 = cap.rfind("avx512", 0) == 0 || cap == "amx_bf16";
  if (cpu_has_vnni() && avx512) return Path::kVnni;
  if (cpu_has_avx2() && (avx512 || cap == "avx2")) return Path::kAvx2;
  return Path::kGeneric;
}

}  // namespace

const char* int8_isa() {
  switch (int8_path()) {
    case Path::kVnni: return "avx512_vnni";
    case Path::kAvx2: return "avx2";
    default: return "generic";
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_pack_weight(const at::Tensor& weight) {
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const int64_t n = w.size(0), k = w.size(1), blocks = ceil_div(n, kInt8Cols), groups = ceil_div(k, kInt8Group);
  at::Tensor packed = at::zeros({blocks, groups, kInt8Cols, kInt8Group}, at::kChar);
  at::Tensor scale = at::empty({n}, at::kFloat), colsum = at::empty({n}, at::kInt);
  const float* src = w.data_ptr<float>();
  int8_t* dst = packed.data_ptr<int8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float* row = src + c * k;
      float peak = 0.f;
      for (int64_t j = 0; j < k; ++j) peak = std::max(peak, std::fabs(row[j]));
      const float s = peak > 0.f ? peak / kWeightMax : 1.f;
      int32_t sum = 0;
      int8_t* out = dst + (c / kInt8Cols) * groups * kInt8Cols * kInt8Group + (c % kInt8Cols) * kInt8Group;
      for (int64_t j = 0; j < k; ++j) {
        const auto q = static_cast<int8_t>(std::clamp(std::nearbyint(row[j] / s), -kWeightMax, kWeightMax));
        out[(j / kInt8Group) * kInt8Cols * kInt8Group + j % kInt8Group] = q;
        sum += q;
      }
      scale.data_ptr<float>()[c] = s;
      colsum.data_ptr<int32_t>()[c] = sum;
    }
  });
  return {packed, scale, colsum};
}

void int8_linear_into(const float* x, int64_t m, const PackedLinear& layer, float* out) {
  const Path path = int8_path();
  const bool vnni = path == Path::kVnni;
  const QuantizedRows a = quantize_rows(x, m, layer.k, path);
  const int64_t groups = ceil_div(layer.k, kInt8Group), blocks = ceil_div(layer.n, kInt8Cols);
  const int64_t tiles = ceil_div(m, kRows);
  // Task t = block * tiles + tile: a thread's contiguous range reuses each weight block across row tiles.
  at::parallel_for(0, blocks * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kRows][kInt8Cols];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = t / tiles, r0 = (t % tiles) * kRows, rows = std::min(kRows, m - r0);
      const int8_t* w = layer.packed + block * groups * kInt8Cols * kInt8Group;
      if (vnni)
        tile_vnni(a, r0, rows, w, groups, acc);
      else if (path == Path::kAvx2)
        tile_avx2(a, r0, rows, w, groups, acc);
      else
        tile_generic(a, r0, rows, w, groups, acc);
      const int64_t c0 = block * kInt8Cols, cols = std::min(kInt8Cols, layer.n - c0);
      if (vnni) {
        epilogue_avx512(acc, rows, cols, &a.scale[r0], &a.zero[r0], layer, c0, out + r0 * layer.n);
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float sa = a.scale[r0 + r];
        const int32_t za = a.zero[r0 + r];
        float* o = out + (r0 + r) * layer.n + c0;
        for (int64_t c = 0; c < cols; ++c) {
          const int32_t sum = acc[r][c] - za * layer.colsum[c0 + c];
          o[c] = sa * layer.scale[c0 + c] * static_cast<float>(sum) + (layer.bias ? layer.bias[c0 + c] : 0.f);
        }
      }
    }
  });
}

}  // namespace laclip
