// Codebook kernels of bgd_det: decode of product-quantized weights and the fused decode-dot
// product.
//
// Layout (the one defined by bgd_det.quantization.pq.pq_decode): row o of the dense weight,
// flattened to `cols` floats, is the concatenation over blocks b of codebook[codes[o, b]] (d floats
// each), truncated to `cols` (a partial last block keeps its first cols - (n_blocks - 1) * d
// floats).
//
// This header and kernels.cpp use no torch headers: ops.cpp does the checks and the dispatch.
#pragma once

#include <cstdint>

namespace bgd {

// Instruction set used by the kernels: 0 = portable scalar, 1 = AVX2 + FMA (chosen at run time).
int simd_mode();
// Set the mode (clamped to what the CPU supports); -1 only queries. Returns the mode now active.
int set_simd_mode(int mode);

struct PQArgs {
  const void* codes;  // [rows, n_blocks], uint8 or int16, row-major contiguous
  bool codes_int16;
  int64_t n_blocks;
  const float* codebook;  // [K, d] fp32 contiguous
  int64_t K;
  int64_t d;
  int64_t cols;        // floats per decoded row, (n_blocks - 1) * d < cols <= n_blocks * d
  const float* scale;  // [rows] per-row scale (folded BatchNorm) or nullptr
};

// Decode rows [r0, r1) into out[(o - r0) * ld + j]. Returns false if a code was out of range [0, K)
// (the rows are then partly written; the caller raises).
bool decode_rows(const PQArgs& a, int64_t r0, int64_t r1, float* out, int64_t ld);

// Fused decode-dot: y[n * ldy + o] = scale[o] * sum_j W[o, j] * x[n * ldx + j] + bias[o] for o in
// [r0, r1) and n < N (1 <= N <= kMaxFusedN); bias may be nullptr. The weight row is never written
// to memory for d in {4, 8, 16}; other d decode one row into a small thread-local buffer. Returns
// false on a bad code.
constexpr int64_t kMaxFusedN = 8;
bool fused_dot_rows(const PQArgs& a, int64_t r0, int64_t r1, const float* x, int64_t ldx, int64_t N,
                    const float* bias, float* y, int64_t ldy);

}  // namespace bgd
