// Shared pieces of the native CPU kernels: argument checks, dtype dispatch, the accumulation
// type, a vectorisable exp, and the tiling used by every per-sample / per-column reduction.
//
// Every kernel reads its inputs in their own dtype (fp32, bf16, fp16, fp64), computes in
// at::opmath_type (fp32 for the 16-bit types, fp64 for fp64 so gradcheck is exact), and writes in
// the output's dtype. Inner loops are plain `#pragma omp simd` loops the compiler vectorises;
// rows are spread over threads with at::parallel_for, so torch.set_num_threads governs them.
// Reductions accumulate in fp64 over fixed-size tiles whose partials are combined in a fixed
// order: results do not depend on the thread count, and long sums keep fp32-reference accuracy.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace leapkernels_native {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

#define LK_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Elements handled by one task of a reduction over a sample (fixed: keeps results independent
// of the thread count).
constexpr int64_t kReduceChunk = 16384;
// Rows handled by one task of a per-column reduction (d-scale, d-shift, d-gate, d-weight).
constexpr int64_t kRowsPerTile = 32;
// Elements one at::parallel_for task should touch at least (as ATen's own kernels).
constexpr int64_t kGrainElements = 32768;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per at::parallel_for grain so one task touches ~32K elements.
inline int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_length));
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "leapkernels_native: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "leapkernels_native: ", name,
              " must be a floating tensor, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "leapkernels_native: ", name, " has dtype ", t.scalar_type(),
              " but ", like_name, " has ", like.scalar_type(), "; expected the same dtype");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* what) {
  TORCH_CHECK(t.sizes() == expected, "leapkernels_native: ", name, " must have shape ", expected, " (", what,
              "), got ", t.sizes());
}

// A [B] fp32 per-sample coefficient (the Python side normalises scalars to this).
inline void check_per_sample(const at::Tensor& t, const char* name, int64_t batch) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == batch,
              "leapkernels_native: ", name, " must be a float32 CPU tensor of shape [", batch,
              "] (one per sample), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// ---------------------------------------------------------------------------- element access
// Loads and stores in the accumulation type. bf16 goes through its bits (a shift in, round to
// nearest even out, NaN kept) so loops over bf16 vectorise; c10::BFloat16's own conversions
// (a struct temporary per element) stop the vectoriser. Other dtypes use the c10 conversions.
template <typename T>
inline acc_type<T> ld(const T* p, int64_t i) {
  return static_cast<acc_type<T>>(p[i]);
}
inline float ld(const c10::BFloat16* p, int64_t i) {
  return std::bit_cast<float>(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}
template <typename T>
inline void st(T* p, int64_t i, acc_type<T> v) {
  p[i] = static_cast<T>(v);
}
inline void st(c10::BFloat16* p, int64_t i, float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// exp for float that the compiler can vectorise (Cephes polynomial, ~1 ulp on the clamped range
// [-87.3, 88.3]); double uses libm (only gradcheck runs fp64).
inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}
inline double vexp(double x) { return std::exp(x); }

template <typename T>
inline T vsigmoid(T z) {
  return T(1) / (T(1) + vexp(-z));
}

// ---------------------------------------------------------------------------- rows
// A 2-D [rows, n] view with unit column stride and any row stride (what Python's as_rows gives).
template <typename scalar_t>
struct RowsView {
  explicit RowsView(const at::Tensor& t) : data(t.const_data_ptr<scalar_t>()), row_stride(t.stride(0)) {}
  const scalar_t* row(int64_t r) const { return data + r * row_stride; }
  const scalar_t* data;
  int64_t row_stride;
};

inline void check_rows(const at::Tensor& t, const char* name) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 2, "leapkernels_native: ", name, " must be 2-D rows [B, N], got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "leapkernels_native: ", name,
              " must have unit column stride, got strides ", t.strides());
}

inline void check_rows_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  check_rows(t, name);
  check_same_dtype(t, name, like, like_name);
  check_shape(t, name, like.sizes(), like_name);
}

// A caller-allocated output: contiguous, shape and dtype of `like`.
inline void check_output(const at::Tensor& out, const char* name, const at::Tensor& like, const char* like_name) {
  check_cpu_float(out, name);
  check_same_dtype(out, name, like, like_name);
  check_shape(out, name, like.sizes(), like_name);
  TORCH_CHECK(out.is_contiguous(), "leapkernels_native: ", name, " must be contiguous, got strides ", out.strides());
}

// ---------------------------------------------------------------------------- per-sample reductions
inline int64_t chunks_per_row(int64_t n) { return std::max<int64_t>(1, ceil_div(n, kReduceChunk)); }

// Calls body(b, begin, end, tile) over fixed-size tiles [begin, end) (tile_len long) of each of
// `batch` rows of `length`, in parallel, a task taking >= `grain` tiles; tile = b * tiles + k
// indexes a partial-sum slot. Fixed tiles keep every reduction independent of the thread count.
template <typename F>
void for_each_tile(int64_t batch, int64_t length, int64_t tile_len, int64_t grain, const F& body) {
  const int64_t tiles = std::max<int64_t>(1, ceil_div(length, tile_len));
  at::parallel_for(0, batch * tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles;
      const int64_t begin = (t % tiles) * tile_len;
      body(b, begin, std::min(length, begin + tile_len), t);
    }
  });
}

// Column chunks of every per-sample row (kReduceChunk elements). A task takes >= 4 chunks (64K
// elements): small latents stay on one thread, where a parallel region would cost more than it saves.
template <typename F>
void for_each_chunk(int64_t batch, int64_t n, const F& body) {
  for_each_tile(batch, n, kReduceChunk, 4, body);
}

// Sums each row's chunk partials in a fixed order (optionally divided by n): a [batch] tensor.
template <typename acc_t>
at::Tensor sum_chunks(const std::vector<acc_t>& part, int64_t batch, int64_t n, bool mean) {
  const int64_t chunks = chunks_per_row(n);
  at::Tensor out = at::empty({batch}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* o = out.data_ptr<acc_t>();
  for (int64_t b = 0; b < batch; ++b) {
    acc_t s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += part[b * chunks + k];
    o[b] = mean ? s / static_cast<acc_t>(std::max<int64_t>(n, 1)) : s;
  }
  return out;
}

// Runs chunk(b, begin, end) -> double on every chunk of every row, in parallel; returns the
// per-sample sums (means with `mean`) in `dtype`, combined in a fixed order.
template <typename F>
at::Tensor reduce_chunks(int64_t batch, int64_t n, bool mean, at::ScalarType dtype, const F& chunk) {
  std::vector<double> part(batch * chunks_per_row(n), 0.0);
  for_each_chunk(batch, n, [&](int64_t b, int64_t begin, int64_t end, int64_t tile) { part[tile] = chunk(b, begin, end); });
  return sum_chunks(part, batch, n, mean).to(dtype);
}

}  // namespace leapkernels_native
