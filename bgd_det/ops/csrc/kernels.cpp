// Decode and fused decode-dot kernels: a portable scalar path and an AVX2/FMA path compiled with
// target attributes (no -mavx2 for the whole file), chosen at run time. See kernels.h for the
// layout.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define BGD_HAVE_AVX2 1
#include <immintrin.h>
#define BGD_AVX2 __attribute__((target("avx2,fma,bmi2")))
#else
#define BGD_HAVE_AVX2 0
#endif

namespace bgd {
namespace {

// -------------------------------------------------------------------------------------------------
// Run-time choice of the instruction set.

bool cpu_has_avx2() {
#if BGD_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("bmi2");
  return ok;
#else
  return false;
#endif
}

int initial_mode() {
  const char* env = std::getenv("BGD_SIMD");  // "scalar" forces the portable path
  if (env != nullptr && std::strcmp(env, "scalar") == 0) return 0;
  return cpu_has_avx2() ? 1 : 0;
}

std::atomic<int>& mode_ref() {
  static std::atomic<int> mode{initial_mode()};
  return mode;
}

template <typename CodeT>
inline uint32_t code_at(const CodeT* p, int64_t i) {
  // int16 codes are read as uint16 so that a negative code is out of range, never a negative
  // offset.
  return static_cast<uint32_t>(static_cast<std::make_unsigned_t<CodeT>>(p[i]));
}

// -------------------------------------------------------------------------------------------------
// Scalar path.

template <typename CodeT, bool CHECK, int D = 0>
bool decode_row_scalar(const CodeT* codes, const PQArgs& a, const float* scale_ptr, float* out) {
  const int64_t d =
      D ? D : a.d;  // a compile-time d lets the compiler unroll / vectorize the copies
  const uint32_t K = static_cast<uint32_t>(a.K);
  const int64_t nfull = a.cols / d;
  const int64_t rem = a.cols - nfull * d;
  for (int64_t b = 0; b < nfull; ++b) {
    const uint32_t c = code_at(codes, b);
    if (CHECK && c >= K) return false;
    const float* src = a.codebook + static_cast<int64_t>(c) * d;
    float* dst = out + b * d;
    if (scale_ptr != nullptr) {
      const float s = *scale_ptr;
      for (int64_t j = 0; j < d; ++j) dst[j] = src[j] * s;
    } else {
      std::memcpy(dst, src, sizeof(float) * d);
    }
  }
  if (rem) {
    const uint32_t c = code_at(codes, nfull);
    if (CHECK && c >= K) return false;
    const float* src = a.codebook + static_cast<int64_t>(c) * d;
    const float s = scale_ptr != nullptr ? *scale_ptr : 1.0f;
    for (int64_t j = 0; j < rem; ++j) out[nfull * d + j] = src[j] * s;
  }
  return true;
}

template <typename CodeT, bool CHECK, int D>
bool decode_rows_scalar_d(const PQArgs& a, int64_t r0, int64_t r1, float* out, int64_t ld) {
  const CodeT* codes = static_cast<const CodeT*>(a.codes);
  for (int64_t o = r0; o < r1; ++o) {
    const float* s = a.scale ? a.scale + o : nullptr;
    if (!decode_row_scalar<CodeT, CHECK, D>(codes + o * a.n_blocks, a, s, out + (o - r0) * ld))
      return false;
  }
  return true;
}

template <typename CodeT, bool CHECK>
bool decode_rows_scalar(const PQArgs& a, int64_t r0, int64_t r1, float* out, int64_t ld) {
  switch (a.d) {
    case 4:
      return decode_rows_scalar_d<CodeT, CHECK, 4>(a, r0, r1, out, ld);
    case 8:
      return decode_rows_scalar_d<CodeT, CHECK, 8>(a, r0, r1, out, ld);
    case 9:
      return decode_rows_scalar_d<CodeT, CHECK, 9>(a, r0, r1, out, ld);
    case 16:
      return decode_rows_scalar_d<CodeT, CHECK, 16>(a, r0, r1, out, ld);
    case 18:
      return decode_rows_scalar_d<CodeT, CHECK, 18>(a, r0, r1, out, ld);
    default:
      return decode_rows_scalar_d<CodeT, CHECK, 0>(a, r0, r1, out, ld);
  }
}

float dot_scalar(const float* w, const float* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += w[i + k] * x[i + k];
  float s = 0;
  for (; i < n; ++i) s += w[i] * x[i];
  return s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

std::vector<float>& row_buffer(int64_t n) {
  static thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf;
}

template <typename CodeT, bool CHECK>
bool fused_rows_scalar(const PQArgs& a, int64_t r0, int64_t r1, const float* x, int64_t ldx,
                       int64_t N, const float* bias, float* y, int64_t ldy) {
  const CodeT* codes = static_cast<const CodeT*>(a.codes);
  float* row = row_buffer(a.cols).data();
  for (int64_t o = r0; o < r1; ++o) {
    if (!decode_row_scalar<CodeT, CHECK>(codes + o * a.n_blocks, a, nullptr, row)) return false;
    const float s = a.scale != nullptr ? a.scale[o] : 1.0f;
    const float b = bias != nullptr ? bias[o] : 0.0f;
    for (int64_t n = 0; n < N; ++n) y[n * ldy + o] = dot_scalar(row, x + n * ldx, a.cols) * s + b;
  }
  return true;
}

// -------------------------------------------------------------------------------------------------
// AVX2 + FMA path.

#if BGD_HAVE_AVX2

// Eight consecutive codes with one (uint8) or two (int16) 64-bit loads, as unsigned values.
template <typename CodeT>
inline void load8(const CodeT* p, uint32_t (&c)[8]) {
  if constexpr (sizeof(CodeT) == 1) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    for (int i = 0; i < 8; ++i) c[i] = static_cast<uint32_t>((v >> (8 * i)) & 0xffu);
  } else {
    uint64_t v[2];
    std::memcpy(v, p, 16);
    for (int i = 0; i < 8; ++i)
      c[i] = static_cast<uint32_t>((v[i / 4] >> (16 * (i % 4))) & 0xffffu);
  }
}

// Byte offsets code * 2^SHIFT of eight consecutive codes (the centroid stride is a power of two for
// d in {4, 8, 16}): one or two 64-bit loads and two ALU operations per code (shrx + and), no
// multiply.
template <typename CodeT, int SHIFT>
BGD_AVX2 inline void load8_offsets(const CodeT* p, uint64_t (&off)[8]) {
  constexpr int BITS = 8 * sizeof(CodeT);
  constexpr uint64_t MASK = ((uint64_t{1} << BITS) - 1) << SHIFT;
  constexpr int PER = 64 / BITS;
  uint64_t v[8 / PER];
  std::memcpy(v, p, 8 * sizeof(CodeT));
  for (int i = 0; i < 8; ++i) {
    const uint64_t w = v[i / PER];
    const int pos = BITS * (i % PER);
    off[i] = (pos >= SHIFT ? (w >> (pos - SHIFT)) : (w << (SHIFT - pos))) & MASK;
  }
}

constexpr int log2_int(int v) { return v <= 1 ? 0 : 1 + log2_int(v / 2); }

// Largest code of a row (unsigned compare, so a negative int16 code counts as huge).
template <typename CodeT>
BGD_AVX2 uint32_t max_code_avx2(const CodeT* p, int64_t n) {
  constexpr int64_t per = 32 / sizeof(CodeT);
  __m256i m = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + per <= n; i += per) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    m = sizeof(CodeT) == 1 ? _mm256_max_epu8(m, v) : _mm256_max_epu16(m, v);
  }
  alignas(32) CodeT lanes[per];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m);
  uint32_t best = 0;
  for (int64_t j = 0; j < per; ++j) best = std::max(best, code_at(lanes, j));
  for (; i < n; ++i) best = std::max(best, code_at(p, i));
  return best;
}

// Copy (and scale) one centroid of d floats. d >= 8: 8-float chunks, the last one shifted back to
// end at d (overlapping stores of equal values); 4 <= d < 8: two 4-float chunks; d < 4: scalar.
template <int D, bool SCALED>
BGD_AVX2 inline void copy_block_avx2(const float* src, float* dst, int64_t d_rt, __m256 vs) {
  const int64_t d = D ? D : d_rt;
  if (d >= 8) {
    int64_t off = 0;
    for (; off + 8 < d; off += 8) {
      __m256 v = _mm256_loadu_ps(src + off);
      _mm256_storeu_ps(dst + off, SCALED ? _mm256_mul_ps(v, vs) : v);
    }
    __m256 v = _mm256_loadu_ps(src + d - 8);
    _mm256_storeu_ps(dst + d - 8, SCALED ? _mm256_mul_ps(v, vs) : v);
  } else if (d >= 4) {
    const __m128 s4 = _mm256_castps256_ps128(vs);
    __m128 v = _mm_loadu_ps(src);
    _mm_storeu_ps(dst, SCALED ? _mm_mul_ps(v, s4) : v);
    v = _mm_loadu_ps(src + d - 4);
    _mm_storeu_ps(dst + d - 4, SCALED ? _mm_mul_ps(v, s4) : v);
  } else {
    const float s = _mm256_cvtss_f32(vs);
    for (int64_t j = 0; j < d; ++j) dst[j] = SCALED ? src[j] * s : src[j];
  }
}

// Eight blocks of an odd d (9, 18) written as d whole 8-float vectors, no overlapping stores:
// vector j takes floats from block k = 8j / d at offset s = 8j % d and, where it runs past that
// block, the start of block k + 1 (a blend of two loads). Loads may read up to 7 floats beyond a
// centroid, so `c` point into a copy of the codebook padded by 8 floats on both sides.
template <int D, int J, bool SCALED>
BGD_AVX2 inline void packed8_avx2(const float* const* c, float* dst, __m256 vs) {
  constexpr int k = 8 * J / D, s = 8 * J % D;
  __m256 v;
  if constexpr (s + 8 <= D) {
    v = _mm256_loadu_ps(c[k] + s);
  } else {
    v = _mm256_blend_ps(_mm256_loadu_ps(c[k] + s), _mm256_loadu_ps(c[k + 1] + s - D),
                        (0xFF << (D - s)) & 0xFF);
  }
  _mm256_storeu_ps(dst + 8 * J, SCALED ? _mm256_mul_ps(v, vs) : v);
  if constexpr (J + 1 < D) packed8_avx2<D, J + 1, SCALED>(c, dst, vs);
}

const float* padded_codebook(const PQArgs& a) {
  static thread_local std::vector<float> buf;
  const size_t n = static_cast<size_t>(a.K * a.d);
  if (buf.size() < n + 16) buf.resize(n + 16);
  std::memcpy(buf.data() + 8, a.codebook, n * sizeof(float));
  return buf.data() + 8;
}

template <int D, typename CodeT, bool CHECK, bool SCALED>
BGD_AVX2 bool decode_rows_avx2(const PQArgs& a, int64_t r0, int64_t r1, float* out, int64_t ld) {
  const int64_t d = D ? D : a.d;
  const uint32_t K = static_cast<uint32_t>(a.K);
  const int64_t nfull = a.cols / d;
  const int64_t rem = a.cols - nfull * d;
  const CodeT* codes = static_cast<const CodeT*>(a.codes);
  constexpr bool PACKED = D == 9 || D == 18;
  const float* C = PACKED ? padded_codebook(a) : a.codebook;
  for (int64_t o = r0; o < r1; ++o) {
    const CodeT* rc = codes + o * a.n_blocks;
    if (CHECK && max_code_avx2(rc, a.n_blocks) >= K) return false;
    float* dst = out + (o - r0) * ld;
    const float s = SCALED ? a.scale[o] : 1.0f;
    const __m256 vs = _mm256_set1_ps(s);
    int64_t b = 0;
    for (; b + 8 <= nfull; b += 8) {
      if constexpr (D == 4) {  // two centroids per 8-float store
        uint64_t off[8];
        load8_offsets<CodeT, 4>(rc + b, off);
        const char* Cb = reinterpret_cast<const char*>(C);
#pragma GCC unroll 4
        for (int i = 0; i < 8; i += 2) {
          __m256 v = _mm256_insertf128_ps(
              _mm256_castps128_ps256(_mm_loadu_ps(reinterpret_cast<const float*>(Cb + off[i]))),
              _mm_loadu_ps(reinterpret_cast<const float*>(Cb + off[i + 1])), 1);
          _mm256_storeu_ps(dst + (b + i) * 4, SCALED ? _mm256_mul_ps(v, vs) : v);
        }
      } else if constexpr (D == 8 || D == 16) {
        uint64_t off[8];
        load8_offsets<CodeT, log2_int(4 * D)>(rc + b, off);
        const char* Cb = reinterpret_cast<const char*>(C);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i)
          copy_block_avx2<D, SCALED>(reinterpret_cast<const float*>(Cb + off[i]), dst + (b + i) * D,
                                     D, vs);
      } else if constexpr (PACKED) {
        uint32_t c[8];
        load8(rc + b, c);
        const float* ptr[8];
        for (int i = 0; i < 8; ++i) ptr[i] = C + static_cast<int64_t>(c[i]) * D;
        packed8_avx2<D, 0, SCALED>(ptr, dst + b * D, vs);
      } else {
        uint32_t c[8];
        load8(rc + b, c);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i)
          copy_block_avx2<D, SCALED>(C + static_cast<int64_t>(c[i]) * d, dst + (b + i) * d, d, vs);
      }
    }
    for (; b < nfull; ++b)
      copy_block_avx2<D, SCALED>(C + static_cast<int64_t>(code_at(rc, b)) * d, dst + b * d, d, vs);
    if (rem) {
      const float* src = C + static_cast<int64_t>(code_at(rc, nfull)) * d;
      for (int64_t j = 0; j < rem; ++j) dst[nfull * d + j] = src[j] * s;
    }
  }
  return true;
}

BGD_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

// Register blocking of the fused kernel: a tile is R weight rows x NT inputs with U accumulator
// chains each, chosen so that the accumulators, the shared input vectors and the centroids fit in
// 16 ymm registers and >= 8 independent FMA chains hide the FMA latency when possible.
constexpr int vecs_per_unit(int D) { return D == 16 ? 2 : 1; }
constexpr int tile_rows(int D, int NT) {
  return vecs_per_unit(D) == 1 ? (NT <= 2 ? 4 : NT <= 4 ? 2 : 1) : (NT == 1 ? 4 : NT == 2 ? 2 : 1);
}
constexpr int tile_chains(int D, int NT) {
  return vecs_per_unit(D) == 1 ? (NT == 1 ? 2 : 1) : (NT <= 4 ? 2 : 1);
}

// Centroid vectors of one unit: d=4 packs two centroids into one ymm, d=8 is one ymm, d=16 two.
template <int D>
BGD_AVX2 inline void unit_weights(const float* C, const uint32_t* c,
                                  __m256 (&w)[vecs_per_unit(D)]) {
  if constexpr (D == 4) {
    w[0] = _mm256_insertf128_ps(
        _mm256_castps128_ps256(_mm_loadu_ps(C + 4 * static_cast<int64_t>(c[0]))),
        _mm_loadu_ps(C + 4 * static_cast<int64_t>(c[1])), 1);
  } else {
    for (int v = 0; v < vecs_per_unit(D); ++v)
      w[v] = _mm256_loadu_ps(C + static_cast<int64_t>(c[0]) * D + 8 * v);
  }
}

// Decode-in-register dot products of R rows with NT inputs, for d in {4, 8, 16}. Each centroid is
// loaded once by its code and multiplied into the NT inputs; each input vector is loaded once per R
// rows. A "unit" is 8 floats of a row (d=4: two centroids) or 16 (d=16); codes are read 8 at a
// time. Units [u0, u1) (u0 a multiple of the group) of rows [o, o + R): the partial sums are stored
// into y (`first`) or added to it; `last` adds the scalar tail and applies scale and bias.
template <int D, int NT, int R, typename CodeT>
BGD_AVX2 void fused_tile_reg(const PQArgs& a, int64_t o, int64_t u0, int64_t u1, bool first,
                             bool last, const float* x, int64_t ldx, const float* bias, float* y,
                             int64_t ldy) {
  constexpr int U = tile_chains(D, NT);
  constexpr int BPU = D == 4 ? 2 : 1;  // blocks per unit
  constexpr int VPU = vecs_per_unit(D);
  constexpr int FPU = BPU * D;  // floats per unit
  constexpr int G = 8 / BPU;    // units per group of 8 codes
  const float* C = a.codebook;
  const CodeT* rc[R];
  for (int r = 0; r < R; ++r) rc[r] = static_cast<const CodeT*>(a.codes) + (o + r) * a.n_blocks;
  const int64_t nunits = (a.cols / D) / BPU;

  __m256 acc[R][NT][U];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NT; ++n)
      for (int k = 0; k < U; ++k) acc[r][n][k] = _mm256_setzero_ps();

  const char* Cb = reinterpret_cast<const char*>(C);
  int64_t u = u0;
  for (; u + G <= u1; u += G) {
    uint64_t c[R][8];
    for (int r = 0; r < R; ++r) load8_offsets<CodeT, log2_int(4 * D)>(rc[r] + u * BPU, c[r]);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const int64_t off = (u + g) * FPU;
      __m256 xv[R == 1 ? 1 : NT]
               [VPU];  // inputs shared by the R rows (R == 1: straight from memory)
      if constexpr (R > 1) {
        for (int n = 0; n < NT; ++n)
          for (int v = 0; v < VPU; ++v) xv[n][v] = _mm256_loadu_ps(x + n * ldx + off + 8 * v);
      }
      for (int r = 0; r < R; ++r) {
        __m256 w[VPU];
        if constexpr (D == 4) {
          w[0] = _mm256_insertf128_ps(
              _mm256_castps128_ps256(
                  _mm_loadu_ps(reinterpret_cast<const float*>(Cb + c[r][2 * g]))),
              _mm_loadu_ps(reinterpret_cast<const float*>(Cb + c[r][2 * g + 1])), 1);
        } else {
          for (int v = 0; v < VPU; ++v)
            w[v] = _mm256_loadu_ps(reinterpret_cast<const float*>(Cb + c[r][g]) + 8 * v);
        }
        for (int n = 0; n < NT; ++n)
          for (int v = 0; v < VPU; ++v) {
            const int k = (g * VPU + v) % U;
            const __m256 xin =
                R > 1 ? xv[R > 1 ? n : 0][v] : _mm256_loadu_ps(x + n * ldx + off + 8 * v);
            acc[r][n][k] = _mm256_fmadd_ps(w[v], xin, acc[r][n][k]);
          }
      }
    }
  }
  for (; u < u1; ++u) {
    const int64_t off = u * FPU;
    for (int r = 0; r < R; ++r) {
      uint32_t c[2] = {code_at(rc[r], u * BPU), BPU == 2 ? code_at(rc[r], u * BPU + 1) : 0u};
      __m256 w[VPU];
      unit_weights<D>(C, c, w);
      for (int n = 0; n < NT; ++n)
        for (int v = 0; v < VPU; ++v)
          acc[r][n][0] =
              _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x + n * ldx + off + 8 * v), acc[r][n][0]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float res[NT];
    for (int n = 0; n < NT; ++n) {
      __m256 t = acc[r][n][0];
      for (int k = 1; k < U; ++k) t = _mm256_add_ps(t, acc[r][n][k]);
      res[n] = hsum_avx2(t);
    }
    if (!first)
      for (int n = 0; n < NT; ++n) res[n] += y[n * ldy + o + r];
    if (last) {
      // Tail: an odd d=4 block and a partial last block, scalar.
      for (int64_t i = nunits * FPU; i < a.cols; ++i) {
        const float w = C[static_cast<int64_t>(code_at(rc[r], i / D)) * D + i % D];
        for (int n = 0; n < NT; ++n) res[n] += w * x[n * ldx + i];
      }
      const float s = a.scale != nullptr ? a.scale[o + r] : 1.0f;
      const float bo = bias != nullptr ? bias[o + r] : 0.0f;
      for (int n = 0; n < NT; ++n) res[n] = res[n] * s + bo;
    }
    for (int n = 0; n < NT; ++n) y[n * ldy + o + r] = res[n];
  }
}

template <int D, int NT, typename CodeT, bool CHECK>
BGD_AVX2 bool fused_rows_reg_avx2(const PQArgs& a, int64_t r0, int64_t r1, const float* x,
                                  int64_t ldx, const float* bias, float* y, int64_t ldy) {
  static_assert(D == 4 || D == 8 || D == 16, "register path is for d in {4, 8, 16}");
  if constexpr (NT == 8) {
    // Two passes of 4 inputs: at 8 the inputs no longer fit in registers beside the accumulators
    // and are re-read for every row (5-16% slower than 4 + 4 on an AMD EPYC core, d = 4, 8, 16).
    return fused_rows_reg_avx2<D, 4, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy) &&
           fused_rows_reg_avx2<D, 4, CodeT, CHECK>(a, r0, r1, x + 4 * ldx, ldx, bias, y + 4 * ldy,
                                                   ldy);
  }
  constexpr int R = tile_rows(D, NT);
  if (CHECK) {
    const uint32_t K = static_cast<uint32_t>(a.K);
    const CodeT* codes = static_cast<const CodeT*>(a.codes);
    for (int64_t o = r0; o < r1; ++o)
      if (max_code_avx2(codes + o * a.n_blocks, a.n_blocks) >= K) return false;
  }
  // Column blocking: the NT input rows of one chunk stay in L1 (~16 KB) while all rows pass over
  // it.
  constexpr int FPU = (D == 4 ? 2 : 1) * D;
  constexpr int G = D == 4 ? 4 : 8;
  constexpr int64_t chunk = std::max<int64_t>(G, (4096 / NT) / FPU / G * G);  // in units
  const int64_t nunits = (a.cols / D) / (D == 4 ? 2 : 1);
  int64_t u0 = 0;
  do {
    const int64_t u1 = std::min(nunits, u0 + chunk);
    const bool first = u0 == 0, last = u1 == nunits;
    int64_t o = r0;
    for (; o + R <= r1; o += R)
      fused_tile_reg<D, NT, R, CodeT>(a, o, u0, u1, first, last, x, ldx, bias, y, ldy);
    for (; o < r1; ++o)
      fused_tile_reg<D, NT, 1, CodeT>(a, o, u0, u1, first, last, x, ldx, bias, y, ldy);
    u0 = u1;
  } while (u0 < nunits);
  return true;
}

// Any other d: decode the row into an L1/L2-resident buffer, then NT dot products over it.
template <int NT, typename CodeT, bool CHECK>
BGD_AVX2 bool fused_rows_buf_avx2(const PQArgs& a, int64_t r0, int64_t r1, const float* x,
                                  int64_t ldx, const float* bias, float* y, int64_t ldy) {
  constexpr int U = NT == 1 ? 4 : (NT <= 3 ? 2 : 1);  // independent accumulator chains
  float* row = row_buffer(a.cols).data();
  const int64_t cols = a.cols;
  for (int64_t o = r0; o < r1; ++o) {
    if (!decode_rows_avx2<0, CodeT, CHECK, false>(a, o, o + 1, row, cols)) return false;
    __m256 acc[NT][U];
    for (int n = 0; n < NT; ++n)
      for (int k = 0; k < U; ++k) acc[n][k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 * U <= cols; i += 8 * U) {
#pragma GCC unroll 4
      for (int k = 0; k < U; ++k) {
        const __m256 w = _mm256_loadu_ps(row + i + 8 * k);
#pragma GCC unroll 8
        for (int n = 0; n < NT; ++n)
          acc[n][k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + n * ldx + i + 8 * k), acc[n][k]);
      }
    }
    for (; i + 8 <= cols; i += 8) {
      const __m256 w = _mm256_loadu_ps(row + i);
      for (int n = 0; n < NT; ++n)
        acc[n][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + n * ldx + i), acc[n][0]);
    }
    float res[NT];
    for (int n = 0; n < NT; ++n) {
      __m256 t = acc[n][0];
      for (int k = 1; k < U; ++k) t = _mm256_add_ps(t, acc[n][k]);
      res[n] = hsum_avx2(t);
    }
    for (; i < cols; ++i)
      for (int n = 0; n < NT; ++n) res[n] += row[i] * x[n * ldx + i];
    const float s = a.scale != nullptr ? a.scale[o] : 1.0f;
    const float bo = bias != nullptr ? bias[o] : 0.0f;
    for (int n = 0; n < NT; ++n) y[n * ldy + o] = res[n] * s + bo;
  }
  return true;
}

template <typename CodeT, bool CHECK, bool SCALED>
bool decode_dispatch_d(const PQArgs& a, int64_t r0, int64_t r1, float* out, int64_t ld) {
  switch (a.d) {
    case 4:
      return decode_rows_avx2<4, CodeT, CHECK, SCALED>(a, r0, r1, out, ld);
    case 8:
      return decode_rows_avx2<8, CodeT, CHECK, SCALED>(a, r0, r1, out, ld);
    case 9:
      return decode_rows_avx2<9, CodeT, CHECK, SCALED>(a, r0, r1, out, ld);
    case 16:
      return decode_rows_avx2<16, CodeT, CHECK, SCALED>(a, r0, r1, out, ld);
    case 18:
      return decode_rows_avx2<18, CodeT, CHECK, SCALED>(a, r0, r1, out, ld);
    default:
      return decode_rows_avx2<0, CodeT, CHECK, SCALED>(a, r0, r1, out, ld);
  }
}

template <int NT, typename CodeT, bool CHECK>
bool fused_dispatch_d(const PQArgs& a, int64_t r0, int64_t r1, const float* x, int64_t ldx,
                      const float* bias, float* y, int64_t ldy) {
  switch (a.d) {
    case 4:
      return fused_rows_reg_avx2<4, NT, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    case 8:
      return fused_rows_reg_avx2<8, NT, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    case 16:
      return fused_rows_reg_avx2<16, NT, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    default:
      return fused_rows_buf_avx2<NT, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
  }
}

template <typename CodeT, bool CHECK>
bool fused_dispatch_n(const PQArgs& a, int64_t r0, int64_t r1, const float* x, int64_t ldx,
                      int64_t N, const float* bias, float* y, int64_t ldy) {
  switch (N) {
    case 1:
      return fused_dispatch_d<1, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    case 2:
      return fused_dispatch_d<2, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    case 3:
      return fused_dispatch_d<3, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    case 4:
      return fused_dispatch_d<4, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    case 5:
      return fused_dispatch_d<5, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    case 6:
      return fused_dispatch_d<6, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    case 7:
      return fused_dispatch_d<7, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
    default:
      return fused_dispatch_d<8, CodeT, CHECK>(a, r0, r1, x, ldx, bias, y, ldy);
  }
}

#endif  // BGD_HAVE_AVX2

// Codes need a range check unless they are uint8 and the codebook has all 256 rows.
bool needs_check(const PQArgs& a) { return a.codes_int16 || a.K < 256; }

}  // namespace

int simd_mode() { return mode_ref().load(std::memory_order_relaxed); }

int set_simd_mode(int mode) {
  if (mode >= 0) mode_ref().store(mode >= 1 && cpu_has_avx2() ? 1 : 0);
  return simd_mode();
}

bool decode_rows(const PQArgs& a, int64_t r0, int64_t r1, float* out, int64_t ld) {
  const bool check = needs_check(a);
#if BGD_HAVE_AVX2
  if (simd_mode() == 1) {
    if (a.codes_int16) {
      return a.scale ? decode_dispatch_d<int16_t, true, true>(a, r0, r1, out, ld)
                     : decode_dispatch_d<int16_t, true, false>(a, r0, r1, out, ld);
    }
    if (check) {
      return a.scale ? decode_dispatch_d<uint8_t, true, true>(a, r0, r1, out, ld)
                     : decode_dispatch_d<uint8_t, true, false>(a, r0, r1, out, ld);
    }
    return a.scale ? decode_dispatch_d<uint8_t, false, true>(a, r0, r1, out, ld)
                   : decode_dispatch_d<uint8_t, false, false>(a, r0, r1, out, ld);
  }
#endif
  if (a.codes_int16) return decode_rows_scalar<int16_t, true>(a, r0, r1, out, ld);
  if (check) return decode_rows_scalar<uint8_t, true>(a, r0, r1, out, ld);
  return decode_rows_scalar<uint8_t, false>(a, r0, r1, out, ld);
}

bool fused_dot_rows(const PQArgs& a, int64_t r0, int64_t r1, const float* x, int64_t ldx, int64_t N,
                    const float* bias, float* y, int64_t ldy) {
  if (N < 1 || N > kMaxFusedN) return false;
  const bool check = needs_check(a);
#if BGD_HAVE_AVX2
  if (simd_mode() == 1) {
    if (a.codes_int16) return fused_dispatch_n<int16_t, true>(a, r0, r1, x, ldx, N, bias, y, ldy);
    if (check) return fused_dispatch_n<uint8_t, true>(a, r0, r1, x, ldx, N, bias, y, ldy);
    return fused_dispatch_n<uint8_t, false>(a, r0, r1, x, ldx, N, bias, y, ldy);
  }
#endif
  if (a.codes_int16) return fused_rows_scalar<int16_t, true>(a, r0, r1, x, ldx, N, bias, y, ldy);
  if (check) return fused_rows_scalar<uint8_t, true>(a, r0, r1, x, ldx, N, bias, y, ldy);
  return fused_rows_scalar<uint8_t, false>(a, r0, r1, x, ldx, N, bias, y, ldy);
}

}  // namespace bgd
