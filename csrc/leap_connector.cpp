// Leap + straight-through connector + per-sample distance (leapkernels/ops/leap_connector.py).
//
// Kernel contract (rows: [B, N] with unit column stride, any row stride; c: [B] in the
// accumulation dtype):
//   leap_fwd(x, v, c, out)                  out = x + c v                (x's dtype)
//   leap_connector_fwd(x, v, c, x_true, out) out = x_true; returns mean|x_true - leap| per sample (acc dtype)
//   leap_bwd(g, c, grad_v)                  grad_v = c g
//   leap_bwd_dc(g, v, c, grad_v)            grad_v = c g; returns dc = sum(g v) per sample (acc dtype)
// Full-size outputs are allocated by the caller (contiguous [B, N]; tests poison them with NaN).
// With the connector on, the leap is never stored: its fp32 value only feeds the distance.
#include "common.h"

namespace leapkernels_native {
namespace {

void check_coef(const at::Tensor& c, const at::Tensor& like) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == acc && c.dim() == 1 && c.size(0) == like.size(0) &&
                  c.is_contiguous(),
              "leapkernels_native: c must be a contiguous ", acc, " CPU tensor of shape [", like.size(0),
              "], got ", c.scalar_type(), " ", c.sizes(), " on ", c.device());
}

template <typename scalar_t>
void leap_kernel(const RowsView<scalar_t>& x, const RowsView<scalar_t>& v, const acc_type<scalar_t>* c,
                 scalar_t* out, int64_t n, int64_t b, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* xp = x.row(b);
  const scalar_t* vp = v.row(b);
  scalar_t* op = out + b * n;
  const acc_t cb = c[b];
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    st(op, i, ld(xp, i) + cb * ld(vp, i));
  }
}

template <typename scalar_t>
double connector_kernel(const RowsView<scalar_t>& x, const RowsView<scalar_t>& v,
                                    const RowsView<scalar_t>& t, const acc_type<scalar_t>* c, scalar_t* out,
                                    int64_t n, int64_t b, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* xp = x.row(b);
  const scalar_t* vp = v.row(b);
  const scalar_t* tp = t.row(b);
  scalar_t* op = out + b * n;
  const acc_t cb = c[b];
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = begin; i < end; ++i) {
    const acc_t ti = ld(tp, i);  // exact: every input dtype widens losslessly to acc_t
    st(op, i, ti);
    const acc_t leap = ld(xp, i) + cb * ld(vp, i);
    sum += static_cast<double>(std::abs(ti - leap));
  }
  return sum;
}

template <typename scalar_t>
double leap_bwd_kernel(const RowsView<scalar_t>& g, const RowsView<scalar_t>* v,
                                   const acc_type<scalar_t>* c, scalar_t* grad_v, int64_t n, int64_t b,
                                   int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* gp = g.row(b);
  scalar_t* op = grad_v + b * n;
  const acc_t cb = c[b];
  if (v == nullptr) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) st(op, i, cb * ld(gp, i));
    return 0;
  }
  const scalar_t* vp = v->row(b);
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = begin; i < end; ++i) {
    const acc_t gi = ld(gp, i);
    st(op, i, cb * gi);
    sum += static_cast<double>(gi * ld(vp, i));
  }
  return sum;
}

void leap_fwd(const at::Tensor& x, const at::Tensor& v, const at::Tensor& c, const at::Tensor& out) {
  check_rows(x, "x_from");
  check_rows_like(v, "v", x, "x_from");
  check_coef(c, x);
  check_output(out, "out", x, "x_from");
  const int64_t batch = x.size(0), n = x.size(1);
  LK_DISPATCH_FLOATING(x.scalar_type(), "leap_fwd", [&] {
    const RowsView<scalar_t> xv(x), vv(v);
    const auto* cp = c.data_ptr<acc_type<scalar_t>>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_chunk(batch, n, [&](int64_t b, int64_t begin, int64_t end, int64_t) {
      leap_kernel<scalar_t>(xv, vv, cp, op, n, b, begin, end);
    });
  });
}

at::Tensor leap_connector_fwd(const at::Tensor& x, const at::Tensor& v, const at::Tensor& c, const at::Tensor& x_true,
                              const at::Tensor& out) {
  check_rows(x, "x_from");
  check_rows_like(v, "v", x, "x_from");
  check_rows_like(x_true, "x_true", x, "x_from");
  check_coef(c, x);
  check_output(out, "out", x, "x_from");
  const int64_t batch = x.size(0), n = x.size(1);
  at::Tensor distance;  // in c's (the accumulation) dtype: fp32, fp64 for fp64 latents
  LK_DISPATCH_FLOATING(x.scalar_type(), "leap_connector_fwd", [&] {
    const RowsView<scalar_t> xv(x), vv(v), tv(x_true);
    const auto* cp = c.data_ptr<acc_type<scalar_t>>();
    scalar_t* op = out.data_ptr<scalar_t>();
    distance = reduce_chunks(batch, n, /*mean=*/true, c.scalar_type(), [&](int64_t b, int64_t begin, int64_t end) {
      return connector_kernel<scalar_t>(xv, vv, tv, cp, op, n, b, begin, end);
    });
  });
  return distance;
}

void leap_bwd(const at::Tensor& g, const at::Tensor& c, const at::Tensor& grad_v) {
  check_rows(g, "grad");
  check_coef(c, g);
  check_output(grad_v, "grad_v", g, "grad");
  const int64_t batch = g.size(0), n = g.size(1);
  LK_DISPATCH_FLOATING(g.scalar_type(), "leap_bwd", [&] {
    const RowsView<scalar_t> gv(g);
    const auto* cp = c.data_ptr<acc_type<scalar_t>>();
    scalar_t* op = grad_v.data_ptr<scalar_t>();
    for_each_chunk(batch, n, [&](int64_t b, int64_t begin, int64_t end, int64_t) {
      leap_bwd_kernel<scalar_t>(gv, nullptr, cp, op, n, b, begin, end);
    });
  });
}

at::Tensor leap_bwd_dc(const at::Tensor& g, const at::Tensor& v, const at::Tensor& c, const at::Tensor& grad_v) {
  check_rows(g, "grad");
  check_rows_like(v, "v", g, "grad");
  check_coef(c, g);
  check_output(grad_v, "grad_v", g, "grad");
  const int64_t batch = g.size(0), n = g.size(1);
  at::Tensor dc;
  LK_DISPATCH_FLOATING(g.scalar_type(), "leap_bwd_dc", [&] {
    const RowsView<scalar_t> gv(g), vv(v);
    const auto* cp = c.data_ptr<acc_type<scalar_t>>();
    scalar_t* op = grad_v.data_ptr<scalar_t>();
    dc = reduce_chunks(batch, n, /*mean=*/false, c.scalar_type(), [&](int64_t b, int64_t begin, int64_t end) {
      return leap_bwd_kernel<scalar_t>(gv, &vv, cp, op, n, b, begin, end);
    });
  });
  return dc;
}

}  // namespace

TORCH_LIBRARY_IMPL(leapkernels_native, CPU, m) {
  m.impl("leap_fwd", &leap_fwd);
  m.impl("leap_connector_fwd", &leap_connector_fwd);
  m.impl("leap_bwd", &leap_bwd);
  m.impl("leap_bwd_dc", &leap_bwd_dc);
}

}  // namespace leapkernels_native
