// SwiGLU, forward and recomputing backward (leapkernels/ops/swiglu.py), on rows [R, 2K] whose
// halves are the gate g and the linear part u:
//   swiglu_fwd(h, out)        out = silu(g) u = g sig(g) u
//   swiglu_bwd(da, h, dh)     dg = da u sig (1 + g (1 - sig)),  du = da g sig
// h: [R, 2K] with unit column stride and any row stride (FLUX.2's single blocks pass the MLP half
// of the fused projection, a strided view); out, da: [R, K] contiguous; dh: [R, 2K] contiguous.
// sig and 1 - sig come from e = exp(-|g|) <= 1, so neither cancels nor overflows; exp is
// common.h's vectorisable one for fp32. No reductions: results do not depend on the thread count.
#include "common.h"

namespace leapkernels_native {
namespace {

template <typename acc_t>
inline void sigmoid_pair(acc_t g, acc_t& sig, acc_t& sig_c) {
  const acc_t e = vexp(-std::abs(g));
  const acc_t inv = acc_t(1) / (acc_t(1) + e);
  sig = g >= 0 ? inv : e * inv;
  sig_c = g >= 0 ? e * inv : inv;
}

template <typename scalar_t>
void swiglu_fwd_row(const scalar_t* h, scalar_t* out, int64_t k) {
  using acc_t = acc_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) {
    const acc_t g = ld(h, j);
    acc_t sig, sig_c;
    sigmoid_pair(g, sig, sig_c);
    st(out, j, g * sig * ld(h, k + j));
  }
}

template <typename scalar_t>
void swiglu_bwd_row(const scalar_t* da, const scalar_t* h, scalar_t* dh, int64_t k) {
  using acc_t = acc_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) {
    const acc_t g = ld(h, j), u = ld(h, k + j), d = ld(da, j);
    acc_t sig, sig_c;
    sigmoid_pair(g, sig, sig_c);
    st(dh, j, d * u * sig * (acc_t(1) + g * sig_c));
    st(dh, k + j, d * g * sig);
  }
}

// h: [R, 2K] rows with unit column stride.
void check_h(const at::Tensor& h) {
  check_rows(h, "h");
  TORCH_CHECK(h.size(1) % 2 == 0, "leapkernels_native: h's last dim must be even (gate and linear halves), got shape ",
              h.sizes());
}

void swiglu_fwd(const at::Tensor& h, const at::Tensor& out) {
  check_h(h);
  const int64_t rows = h.size(0), k = h.size(1) / 2;
  check_cpu_float(out, "out");
  check_same_dtype(out, "out", h, "h");
  check_shape(out, "out", {rows, k}, "(rows of h, half of h's columns)");
  TORCH_CHECK(out.is_contiguous(), "leapkernels_native: out must be contiguous, got strides ", out.strides());
  LK_DISPATCH_FLOATING(h.scalar_type(), "swiglu_fwd", [&] {
    const RowsView<scalar_t> hv(h);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(2 * k), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) swiglu_fwd_row<scalar_t>(hv.row(r), op + r * k, k);
    });
  });
}

void swiglu_bwd(const at::Tensor& da, const at::Tensor& h, const at::Tensor& dh) {
  check_h(h);
  const int64_t rows = h.size(0), k = h.size(1) / 2;
  check_cpu_float(da, "grad");
  check_same_dtype(da, "grad", h, "h");
  check_shape(da, "grad", {rows, k}, "(rows of h, half of h's columns)");
  TORCH_CHECK(da.is_contiguous(), "leapkernels_native: grad must be contiguous, got strides ", da.strides());
  check_cpu_float(dh, "dh");
  check_same_dtype(dh, "dh", h, "h");
  check_shape(dh, "dh", h.sizes(), "the shape of h");
  TORCH_CHECK(dh.is_contiguous(), "leapkernels_native: dh must be contiguous, got strides ", dh.strides());
  LK_DISPATCH_FLOATING(h.scalar_type(), "swiglu_bwd", [&] {
    const RowsView<scalar_t> hv(h);
    const scalar_t* dap = da.const_data_ptr<scalar_t>();
    scalar_t* dp = dh.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(3 * k), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) swiglu_bwd_row<scalar_t>(dap + r * k, hv.row(r), dp + r * 2 * k, k);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(leapkernels_native, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
}

}  // namespace leapkernels_native
