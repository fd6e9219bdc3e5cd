// bgd:: operators: compressed-domain inference for codebook (product-quantized) layers on CPU.
//
//   pq_decode(codes, codebook, shape, scale?)                          -> dense weight (a new
// tensor)
//   pq_conv2d(input, codes, codebook, weight_shape, scale?, bias?, stride, padding, dilation,
// groups)
//   pq_linear(input, codes, codebook, scale?, bias?)
//   pq_conv_transpose2d(input, codes, codebook, weight_shape, bias?, stride, padding,
// output_padding,
//                       groups, dilation)
//
// The convolutions decode the weight into a thread-local fp32 scratch buffer (grown on demand,
// reused by every later call on that thread), optionally scaling row o by scale[o] (folded
// BatchNorm), and hand it to the dense ATen convolution (oneDNN). A conv2d (groups = 1) weight
// larger than `_chunk_bytes` (2 MiB) whose output is at most a quarter of that is decoded and
// convolved in chunks of output channels, so the scratch stays cache-sized (see
// decode_rows_at_once for when this pays). Linear with <= 8 rows of input, and 1x1 convs with
// <= 8 output pixels, use the fused decode-dot kernel instead and never write the weight to memory.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/conv_transpose2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/narrow.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels.h"

namespace bgd {
namespace {

using at::Tensor;

// -------------------------------------------------------------------------------------------------
// Scratch: one 64-byte aligned fp32 buffer per calling thread, grown on demand and kept.

class Scratch {
 public:
  ~Scratch() { std::free(ptr_); }
  float* get(int64_t n) {
    if (n > cap_) {
      std::free(ptr_);
      ptr_ = nullptr;
      cap_ = 0;
      const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
      ptr_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(ptr_ != nullptr, "bgd: could not allocate a decode scratch buffer of ", bytes,
                  " bytes");
      cap_ = n;
    }
    return ptr_;
  }
  int64_t capacity() const { return cap_; }

 private:
  float* ptr_ = nullptr;
  int64_t cap_ = 0;
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// -------------------------------------------------------------------------------------------------
// Checks shared by every op.

void check_optional_vector(const c10::optional<Tensor>& t, int64_t n, const char* op,
                           const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", what, " must have shape [", n, "], got ",
              t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": ", what, " must be contiguous");
}

// Validates codes/codebook/scale against a weight of `rows` x `cols` and fills the kernel
// arguments.
PQArgs make_args(const Tensor& codes, const Tensor& codebook, const c10::optional<Tensor>& scale,
                 int64_t rows, int64_t cols, const char* op) {
  TORCH_CHECK(codes.device().is_cpu() && codebook.device().is_cpu(), op,
              ": codes and codebook must be CPU tensors, got ", codes.device(), " and ",
              codebook.device());
  TORCH_CHECK(codes.scalar_type() == at::kByte || codes.scalar_type() == at::kShort, op,
              ": codes must be uint8 (K <= 256) or int16, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2, op, ": codes must be 2-D [C_out, n_blocks], got shape ",
              codes.sizes());
  TORCH_CHECK(codes.is_contiguous(), op, ": codes must be contiguous");
  TORCH_CHECK(codebook.scalar_type() == at::kFloat, op,
              ": codebook must be float32 (convert an fp16 "
              "codebook once at load), got ",
              codebook.scalar_type());
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) >= 1 && codebook.size(1) >= 1, op,
              ": codebook must be 2-D [K, d] with K, d >= 1, got shape ", codebook.sizes());
  TORCH_CHECK(codebook.is_contiguous(), op, ": codebook must be contiguous");
  const int64_t K = codebook.size(0), d = codebook.size(1), n_blocks = codes.size(1);
  TORCH_CHECK(codes.size(0) == rows, op, ": codes has ", codes.size(0), " rows, the weight has ",
              rows, " output rows");
  TORCH_CHECK(cols >= 1 && n_blocks * d >= cols && (n_blocks - 1) * d < cols, op, ": codes [", rows,
              ", ", n_blocks, "] with block size d=", d, " cannot hold weight rows of ", cols,
              " values (need n_blocks = ceil(", cols, " / ", d, ") = ", (cols + d - 1) / d, ")");
  check_optional_vector(scale, rows, op, "scale");
  PQArgs a;
  a.codes = codes.data_ptr();
  a.codes_int16 = codes.scalar_type() == at::kShort;
  a.n_blocks = n_blocks;
  a.codebook = codebook.data_ptr<float>();
  a.K = K;
  a.d = d;
  a.cols = cols;
  a.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  return a;
}

[[noreturn]] void fail_range(const PQArgs& a, const char* op) {
  TORCH_CHECK(false, op, ": codes out of range for a codebook of ", a.K, " centroids (valid: 0..",
              a.K - 1, ")");
  std::abort();
}

// Rows per parallel task: at least ~16k decoded floats of work each.
int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
}

// Decodes weight rows [r0, r1) into out[(o - r0) * cols + j].
void decode_into(const PQArgs& a, int64_t r0, int64_t r1, float* out, const char* op) {
  std::atomic<bool> ok{true};
  at::parallel_for(r0, r1, grain_rows(a.cols), [&](int64_t b, int64_t e) {
    if (!decode_rows(a, b, e, out + (b - r0) * a.cols, a.cols)) ok.store(false);
  });
  if (!ok.load()) fail_range(a, op);
}

// Chunk size in bytes (0: none); which weights are chunked is decode_rows_at_once's rule.
std::atomic<int64_t>& chunk_bytes() {
  static std::atomic<int64_t> v{int64_t{2} << 20};
  return v;
}

// Rows of a [rows, cols] weight per chunk of `limit` bytes: all of them unless the weight is
// larger, else about `limit` worth, in equal chunks rounded up to a multiple of 16 output channels
// (oneDNN's block).
int64_t chunk_rows(int64_t rows, int64_t cols, int64_t limit) {
  const int64_t bytes = rows * cols * static_cast<int64_t>(sizeof(float));
  if (limit <= 0 || bytes <= limit) return rows;
  const int64_t n_chunks = (bytes + limit - 1) / limit;
  const int64_t per = ((rows + n_chunks - 1) / n_chunks + 15) / 16 * 16;
  return std::min(rows, per);
}

// The ops whose weights are decoded into the scratch.
enum class Layer { kConv2d, kLinear, kConvTranspose2d };

// Rows of a [rows, cols] weight that `layer`'s op decodes into the scratch at a time (its decode +
// dense path; the fused kernel writes no weight), for an output of `out_bytes` (-1: any output).
// Only a conv2d with groups = 1 whose output is at most a quarter of chunk_bytes() decodes in
// chunks of chunk_rows(): there the decode is most of the layer's memory traffic and a cache-sized
// scratch pays; with larger outputs the chunks' copies and extra oneDNN calls cost more (measured in
// docs/performance.md). A grouped conv2d (chunks would cut groups), a linear layer's decode + GEMM and
// a transposed conv (its rows are input channels) decode the whole weight.
int64_t decode_rows_at_once(Layer layer, int64_t rows, int64_t cols, int64_t groups,
                            int64_t out_bytes) {
  if (layer != Layer::kConv2d || groups != 1 || out_bytes < 0) return rows;
  const int64_t limit = chunk_bytes().load(std::memory_order_relaxed);
  return out_bytes * 4 <= limit ? chunk_rows(rows, cols, limit) : rows;
}

c10::optional<Tensor> rows_of(const c10::optional<Tensor>& bias, int64_t r0, int64_t r1) {
  return bias.has_value() ? c10::optional<Tensor>(bias->narrow(0, r0, r1 - r0)) : c10::nullopt;
}

// Decodes the weight (shape `weight_shape`, rows = output channels) `chunk` rows at a time into the
// calling thread's scratch and returns apply(weight rows, bias rows) for the whole weight: the
// chunks' outputs are copied into place along dim 1 (in the memory format of the dense op's
// output); a single chunk returns the dense op's output itself.
template <typename Fn>
Tensor apply_in_chunks(const PQArgs& a, at::IntArrayRef weight_shape, int64_t chunk,
                       const c10::optional<Tensor>& bias, const at::TensorOptions& options,
                       const char* op, Fn apply) {
  const int64_t rows = weight_shape[0];
  float* w = scratch().get(chunk * a.cols);
  std::vector<int64_t> chunk_shape(weight_shape.begin(), weight_shape.end());
  Tensor out;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk);
    decode_into(a, r0, r1, w, op);
    chunk_shape[0] = r1 - r0;
    const Tensor weight = at::from_blob(w, chunk_shape, options);
    if (r1 - r0 == rows) return apply(weight, bias);
    const Tensor y = apply(weight, rows_of(bias, r0, r1));
    if (!out.defined()) {
      std::vector<int64_t> shape(y.sizes().begin(), y.sizes().end());
      shape[1] = rows;
      out = at::empty(shape, y.options().memory_format(y.suggest_memory_format()));
    }
    out.narrow(1, r0, r1 - r0).copy_(y);
  }
  return out;
}

// x2: [N, cols] contiguous fp32, N <= kMaxFusedN. Returns [N, rows].
Tensor fused_linear(const PQArgs& a, int64_t rows, const Tensor& x2,
                    const c10::optional<Tensor>& bias, const char* op) {
  const int64_t N = x2.size(0);
  Tensor y = at::empty({N, rows}, x2.options());
  const float* x = x2.data_ptr<float>();
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / (a.cols * N)), [&](int64_t r0, int64_t r1) {
    if (!fused_dot_rows(a, r0, r1, x, a.cols, N, b, yp, rows)) ok.store(false);
  });
  if (!ok.load()) fail_range(a, op);
  return y;
}

void check_input(const Tensor& input, int64_t dim, const char* op) {
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be a CPU tensor, got ", input.device());
  TORCH_CHECK(input.scalar_type() == at::kFloat, op, ": input must be float32, got ",
              input.scalar_type());
  if (dim > 0) {
    TORCH_CHECK(input.dim() == dim, op, ": input must be ", dim, "-D, got shape ", input.sizes());
  } else {
    TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension");
  }
}

int64_t row_length(at::IntArrayRef shape, const char* op) {
  TORCH_CHECK(shape.size() >= 2, op, ": weight shape must have at least 2 dims, got ", shape);
  int64_t cols = 1;
  for (size_t i = 1; i < shape.size(); ++i) {
    TORCH_CHECK(shape[i] >= 1, op, ": weight shape must be positive, got ", shape);
    cols *= shape[i];
  }
  TORCH_CHECK(shape[0] >= 1, op, ": weight shape must be positive, got ", shape);
  return cols;
}

// -------------------------------------------------------------------------------------------------
// Operators.

Tensor pq_decode_cpu(const Tensor& codes, const Tensor& codebook, at::IntArrayRef shape,
                     const c10::optional<Tensor>& scale) {
  const char* op = "bgd::pq_decode";
  const int64_t cols = row_length(shape, op);
  const PQArgs a = make_args(codes, codebook, scale, shape[0], cols, op);
  Tensor out = at::empty(shape, codebook.options());
  decode_into(a, 0, shape[0], out.data_ptr<float>(), op);
  return out;
}

Tensor pq_linear_cpu(const Tensor& input, const Tensor& codes, const Tensor& codebook,
                     const c10::optional<Tensor>& scale, const c10::optional<Tensor>& bias) {
  // Inference op without an autograd formula: the ATen ops inside must not record a graph.
  at::NoGradGuard no_grad;
  const char* op = "bgd::pq_linear";
  check_input(input, 0, op);
  const int64_t cols = input.size(-1);
  const int64_t rows = codes.dim() == 2 ? codes.size(0) : -1;
  const PQArgs a = make_args(codes, codebook, scale, rows, cols, op);
  check_optional_vector(bias, rows, op, "bias");
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = rows;
  const Tensor x2 = input.reshape({-1, cols}).contiguous();
  const int64_t N = x2.size(0);
  if (N == 0) return at::empty(out_shape, input.options());
  if (N <= kMaxFusedN) return fused_linear(a, rows, x2, bias, op).view(out_shape);
  const int64_t shape[2] = {rows, cols};
  const int64_t chunk = decode_rows_at_once(Layer::kLinear, rows, cols, 1, -1);
  return apply_in_chunks(a, shape, chunk, bias, codebook.options(), op,
                         [&](const Tensor& w, const c10::optional<Tensor>& b) {
                           return at::linear(x2, w, b);
                         })
      .view(out_shape);
}

Tensor pq_conv2d_cpu(const Tensor& input, const Tensor& codes, const Tensor& codebook,
                     at::IntArrayRef weight_shape, const c10::optional<Tensor>& scale,
                     const c10::optional<Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  // Inference op without an autograd formula: the ATen ops inside must not record a graph.
  at::NoGradGuard no_grad;
  const char* op = "bgd::pq_conv2d";
  check_input(input, 4, op);
  TORCH_CHECK(weight_shape.size() == 4, op,
              ": weight_shape must be [C_out, C_in/groups, kh, kw], got ", weight_shape);
  const int64_t cols = row_length(weight_shape, op);
  const int64_t rows = weight_shape[0];
  TORCH_CHECK(groups >= 1 && rows % groups == 0 && weight_shape[1] * groups == input.size(1), op,
              ": input has ", input.size(1), " channels; weight ", weight_shape,
              " with groups=", groups, " expects ", weight_shape[1] * groups);
  const PQArgs a = make_args(codes, codebook, scale, rows, cols, op);
  check_optional_vector(bias, rows, op, "bias");

  int64_t out_hw[2];  // output height and width (0 for arguments at::conv2d rejects itself)
  for (int i = 0; i < 2; ++i) {
    const int64_t k = dilation[i] * (weight_shape[2 + i] - 1) + 1;
    const int64_t span = input.size(2 + i) + 2 * padding[i] - k;
    out_hw[i] = stride[i] >= 1 && span >= 0 ? span / stride[i] + 1 : 0;
  }
  const int64_t B = input.size(0), Ho = out_hw[0], Wo = out_hw[1];
  const bool pointwise = weight_shape[2] == 1 && weight_shape[3] == 1 && groups == 1 &&
                         padding[0] == 0 && padding[1] == 0 && stride[0] >= 1 && stride[1] >= 1;
  if (pointwise) {
    const int64_t H = input.size(2), W = input.size(3);
    if (B * Ho * Wo >= 1 && B * Ho * Wo <= kMaxFusedN) {
      Tensor xs = input;
      if (stride[0] > 1 || stride[1] > 1)
        xs = xs.slice(2, 0, H, stride[0]).slice(3, 0, W, stride[1]);
      const Tensor x2 = xs.permute({0, 2, 3, 1}).reshape({B * Ho * Wo, cols}).contiguous();
      const Tensor y = fused_linear(a, rows, x2, bias, op);  // [B*Ho*Wo, C_out]
      return y.view({B, Ho, Wo, rows}).permute({0, 3, 1, 2}).contiguous();
    }
  }
  const int64_t out_bytes = B * rows * Ho * Wo * static_cast<int64_t>(sizeof(float));
  const int64_t chunk = decode_rows_at_once(Layer::kConv2d, rows, cols, groups, out_bytes);
  return apply_in_chunks(a, weight_shape, chunk, bias, codebook.options(), op,
                         [&](const Tensor& w, const c10::optional<Tensor>& b) {
                           return at::conv2d(input, w, b, stride, padding, dilation, groups);
                         });
}

Tensor pq_conv_transpose2d_cpu(const Tensor& input, const Tensor& codes, const Tensor& codebook,
                               at::IntArrayRef weight_shape, const c10::optional<Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef output_padding, int64_t groups,
                               at::IntArrayRef dilation) {
  // Inference op without an autograd formula: the ATen ops inside must not record a graph.
  at::NoGradGuard no_grad;
  const char* op = "bgd::pq_conv_transpose2d";
  check_input(input, 4, op);
  TORCH_CHECK(weight_shape.size() == 4, op,
              ": weight_shape must be [C_in, C_out/groups, kh, kw], got ", weight_shape);
  const int64_t cols = row_length(weight_shape, op);
  const int64_t rows = weight_shape[0];
  TORCH_CHECK(groups >= 1 && rows == input.size(1) && rows % groups == 0, op, ": input has ",
              input.size(1), " channels; weight ", weight_shape, " expects ", rows);
  const PQArgs a = make_args(codes, codebook, c10::nullopt, rows, cols, op);
  check_optional_vector(bias, weight_shape[1] * groups, op, "bias");
  // One chunk: apply_in_chunks assembles chunks along output channels, which are not the rows here.
  const int64_t whole = decode_rows_at_once(Layer::kConvTranspose2d, rows, cols, groups, -1);
  TORCH_INTERNAL_ASSERT(whole == rows, op, ": a transposed conv decodes its whole weight");
  return apply_in_chunks(a, weight_shape, whole, bias, codebook.options(), op,
                         [&](const Tensor& w, const c10::optional<Tensor>& b) {
                           return at::conv_transpose2d(input, w, b, stride, padding, output_padding,
                                                       groups, dilation);
                         });
}

int64_t simd_mode_op(int64_t mode) { return set_simd_mode(static_cast<int>(mode)); }

int64_t chunk_bytes_op(int64_t bytes) {
  if (bytes >= 0) chunk_bytes().store(bytes);
  return chunk_bytes().load();
}

int64_t decode_rows_op(c10::string_view layer, int64_t rows, int64_t cols, int64_t groups,
                       int64_t out_bytes) {
  const char* op = "bgd::_decode_rows";
  TORCH_CHECK(rows >= 1 && cols >= 1 && groups >= 1, op,
              ": rows, cols and groups must be >= 1, got ", rows, ", ", cols, ", ", groups);
  TORCH_CHECK(out_bytes >= -1, op, ": out_bytes must be -1 (any output) or >= 0, got ", out_bytes);
  const bool conv2d = layer == "conv2d", linear = layer == "linear";
  TORCH_CHECK(conv2d || linear || layer == "conv_transpose2d", op,
              ": layer must be 'conv2d', 'linear' or 'conv_transpose2d', got '", layer, "'");
  const Layer kind = conv2d ? Layer::kConv2d : linear ? Layer::kLinear : Layer::kConvTranspose2d;
  return decode_rows_at_once(kind, rows, cols, groups, out_bytes);
}

int64_t scratch_capacity_op() { return scratch().capacity() * static_cast<int64_t>(sizeof(float)); }

}  // namespace
}  // namespace bgd

TORCH_LIBRARY(bgd, m) {
  m.def("pq_decode(Tensor codes, Tensor codebook, int[] shape, Tensor? scale=None) -> Tensor");
  m.def(
      "pq_conv2d(Tensor input, Tensor codes, Tensor codebook, int[] weight_shape, Tensor? scale, "
      "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "pq_linear(Tensor input, Tensor codes, Tensor codebook, Tensor? scale, Tensor? bias) -> "
      "Tensor");
  m.def(
      "pq_conv_transpose2d(Tensor input, Tensor codes, Tensor codebook, int[] weight_shape, "
      "Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] output_padding, int groups, int[2] dilation) -> "
      "Tensor");
  // Utilities (no tensors): kernel instruction set (-1 queries, 0 scalar, 1 AVX2) and the calling
  // thread's scratch size in bytes.
  m.def("_simd_mode(int mode=-1) -> int", &bgd::simd_mode_op);
  m.def("_scratch_bytes() -> int", &bgd::scratch_capacity_op);
  // Conv2d (groups = 1) weights larger than this many bytes are decoded and convolved in chunks of
  // output channels when the output is small (0: never; -1 only queries), and the rows of a
  // [rows, cols] weight that a layer's op decodes at a time for an output of out_bytes (-1: any).
  m.def("_chunk_bytes(int bytes=-1) -> int", &bgd::chunk_bytes_op);
  m.def("_decode_rows(str layer, int rows, int cols, int groups=1, int out_bytes=-1) -> int",
        &bgd::decode_rows_op);
}

TORCH_LIBRARY_IMPL(bgd, CPU, m) {
  m.impl("pq_decode", &bgd::pq_decode_cpu);
  m.impl("pq_conv2d", &bgd::pq_conv2d_cpu);
  m.impl("pq_linear", &bgd::pq_linear_cpu);
  m.impl("pq_conv_transpose2d", &bgd::pq_conv_transpose2d_cpu);
}
