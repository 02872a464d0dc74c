// Per-term gradient magnitude scaling, backward only (leapkernels/ops/grad_scale.py; the forward
// is a view):
//   grad_scale_bwd(g, alpha, max_norm, out)
//     out_b = alpha_b g_b                                   (max_norm = None)
//     out_b = alpha_b g_b min(1, max_norm / ||alpha_b g_b||)  (per sample b)
// With the cap: one pass of per-chunk sums of squares, one pass that scales (the norm must be
// known before the first element is written). No buffer but the output.
#include "common.h"

namespace leapkernels_native {
namespace {

template <typename scalar_t>
double sumsq_kernel(const scalar_t* gp, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = begin; i < end; ++i) {
    const acc_t gi = ld(gp, i);
    sum += static_cast<double>(gi * gi);
  }
  return sum;
}

template <typename scalar_t>
void scale_kernel(const scalar_t* gp, acc_type<scalar_t> factor, scalar_t* op, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) st(op, i, factor * ld(gp, i));
}

void grad_scale_bwd(const at::Tensor& g, const at::Tensor& alpha, std::optional<double> max_norm,
                    const at::Tensor& out) {
  check_rows(g, "grad");
  check_output(out, "out", g, "grad");
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(alpha.device().is_cpu() && alpha.scalar_type() == acc && alpha.dim() == 1 &&
                  alpha.size(0) == g.size(0) && alpha.is_contiguous(),
              "leapkernels_native: alpha must be a contiguous ", acc, " CPU tensor of shape [", g.size(0), "], got ",
              alpha.scalar_type(), " ", alpha.sizes(), " on ", alpha.device());
  TORCH_CHECK(!max_norm.has_value() || *max_norm > 0, "leapkernels_native: max_norm must be positive or None, got ",
              *max_norm);
  const int64_t batch = g.size(0), n = g.size(1);
  LK_DISPATCH_FLOATING(g.scalar_type(), "grad_scale_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const RowsView<scalar_t> gv(g);
    scalar_t* op = out.data_ptr<scalar_t>();
    std::vector<acc_t> factor(alpha.const_data_ptr<acc_t>(), alpha.const_data_ptr<acc_t>() + batch);
    if (max_norm.has_value()) {
      const at::Tensor sumsq = reduce_chunks(batch, n, /*mean=*/false, at::kDouble, [&](int64_t b, int64_t begin, int64_t end) {
        return sumsq_kernel<scalar_t>(gv.row(b), begin, end);
      });
      const acc_t cap = static_cast<acc_t>(*max_norm);
      for (int64_t b = 0; b < batch; ++b) {
        const acc_t norm = static_cast<acc_t>(std::abs(static_cast<double>(factor[b])) * std::sqrt(sumsq.data_ptr<double>()[b]));
        if (norm > cap) factor[b] *= cap / norm;
      }
    }
    for_each_chunk(batch, n, [&](int64_t b, int64_t begin, int64_t end, int64_t) {
      scale_kernel<scalar_t>(gv.row(b), factor[b], op + b * n, begin, end);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(leapkernels_native, CPU, m) { m.impl("grad_scale_bwd", &grad_scale_bwd); }

}  // namespace leapkernels_native
