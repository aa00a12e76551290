// LACLIP CPU kernels, AMX path (Sapphire Rapids and later, Linux): the avx512_bf16 table with its bf16 "text"
// dot products on the tile unit. Each query group is packed once into AMX's pair-interleaved layout, then
// 16 rows x 16 queries tiles accumulate 32 dims per instruction and are transposed back with AVX-512.
#include "kernels.h"

#include <cstring>
#include <vector>

namespace laclip {
namespace cpu {

#if defined(LACLIP_X86_SIMD) && defined(LACLIP_AMX_TILES)
namespace {

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
  static const bool ok = avx512_bf16_kernels() != nullptr && __builtin_cpu_supports("amx-tile") &&
                         __builtin_cpu_supports("amx-bf16") && amx_permitted();
  return ok;
}

}  // namespace

const Kernels* amx_bf16_kernels() {
  if (!cpu_has_amx_bf16()) return nullptr;
  static const Kernels table = [] {
    Kernels k = *avx512_bf16_kernels();
    k.name = "amx_bf16";
    k.pack_bf16 = pack_bf16_amx;
    k.dots_packed_bf16 = dots_packed_bf16_amx;
    return k;
  }();
  return &table;
}
#else
const Kernels* amx_bf16_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace laclip
