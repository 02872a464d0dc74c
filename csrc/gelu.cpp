// tanh-GELU, forward and recomputing backward (leapkernels/ops/gelu.py), elementwise on
// contiguous tensors:
//   gelu_fwd(h, out)       out = h sigmoid(2u),  u = sqrt(2/pi) (h + 0.044715 h^3)
//   gelu_bwd(da, h, dh)    dh = da (sig + 2 h sig (1 - sig) sqrt(2/pi) (1 + 3 * 0.044715 h^2))
// 0.5 (1 + tanh(u)) = sigmoid(2u) is formed from e = exp(-2|u|) <= 1, so neither sig nor 1 - sig
// cancels or overflows; exp is common.h's vectorisable one for fp32.
#include "common.h"

namespace leapkernels_native {
namespace {

constexpr double kK0 = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kK1 = 0.044715;

// sigmoid(2u) and 1 - sigmoid(2u) of u = sqrt(2/pi) (x + 0.044715 x^3), both accurate.
template <typename acc_t>
inline void gelu_gates(acc_t x, acc_t& sig, acc_t& sig_c) {
  const acc_t u = static_cast<acc_t>(kK0) * (x + static_cast<acc_t>(kK1) * x * x * x);
  const acc_t e = vexp(acc_t(-2) * std::abs(u));
  const acc_t inv = acc_t(1) / (acc_t(1) + e);
  sig = u >= 0 ? inv : e * inv;
  sig_c = u >= 0 ? e * inv : inv;
}

template <typename scalar_t>
void gelu_fwd_kernel(const scalar_t* h, scalar_t* out, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const acc_t x = ld(h, i);
    acc_t sig, sig_c;
    gelu_gates(x, sig, sig_c);
    st(out, i, x * sig);
  }
}

template <typename scalar_t>
void gelu_bwd_kernel(const scalar_t* da, const scalar_t* h, scalar_t* dh, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const acc_t k0 = static_cast<acc_t>(kK0), k1 = static_cast<acc_t>(kK1);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const acc_t x = ld(h, i);
    acc_t sig, sig_c;
    gelu_gates(x, sig, sig_c);
    const acc_t d = sig + acc_t(2) * x * sig * sig_c * k0 * (acc_t(1) + acc_t(3) * k1 * x * x);
    st(dh, i, ld(da, i) * d);
  }
}

void check_flat(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  check_cpu_float(t, name);
  check_same_dtype(t, name, like, like_name);
  check_shape(t, name, like.sizes(), like_name);
  TORCH_CHECK(t.is_contiguous(), "leapkernels_native: ", name, " must be contiguous, got strides ", t.strides());
}

void gelu_fwd(const at::Tensor& h, const at::Tensor& out) {
  check_flat(h, "h", h, "h");
  check_flat(out, "out", h, "h");
  const int64_t n = h.numel();
  LK_DISPATCH_FLOATING(h.scalar_type(), "gelu_fwd", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrainElements, [&](int64_t b, int64_t e) { gelu_fwd_kernel<scalar_t>(hp, op, b, e); });
  });
}

void gelu_bwd(const at::Tensor& da, const at::Tensor& h, const at::Tensor& dh) {
  check_flat(h, "h", h, "h");
  check_flat(da, "grad", h, "h");
  check_flat(dh, "dh", h, "h");
  const int64_t n = h.numel();
  LK_DISPATCH_FLOATING(h.scalar_type(), "gelu_bwd", [&] {
    const scalar_t* dap = da.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* op = dh.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrainElements,
                     [&](int64_t b, int64_t e) { gelu_bwd_kernel<scalar_t>(dap, hp, op, b, e); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(leapkernels_native, CPU, m) {
  m.impl("gelu_fwd", &gelu_fwd);
  m.impl("gelu_bwd", &gelu_bwd);
}

}  // namespace leapkernels_native
