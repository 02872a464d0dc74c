// LayerNorm (no affine) + AdaLN modulation, and the gated residual
// (leapkernels/ops/modulated_layernorm.py, leapkernels/ops/gated_residual.py).
//
//   mln_fwd(x, scale, shift, eps, y)            y = LN(x) (1 + scale[b]) + shift[b]
//   mln_bwd(g, x, scale, eps, dx, need_dx, need_dmod) -> (dscale, dshift)
//       recomputes mean/rstd per row; dscale = sum_s g xhat, dshift = sum_s g
//   gr_fwd(x, gate, y, out)                     out = x + gate[b] y
//   gr_bwd(g, gate, y, dy, need_dy, need_dgate) -> dgate = sum_s g y;  dy = gate[b] g
// x, y, g: [B, S, D] with unit last stride (any batch/sequence strides); scale, shift, gate:
// [B, D] with unit last stride. Full-size outputs are caller-allocated and contiguous; the
// per-column sums are fp32 partials over tiles of kRowsPerTile rows, combined in fp64 in a
// fixed order, returned in the parameter's dtype (0-element tensors when not asked for).
#include "common.h"

namespace leapkernels_native {
namespace {

// A [B, S, D] view with unit last stride.
template <typename scalar_t>
struct TokensView {
  explicit TokensView(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), stride_b(t.stride(0)), stride_s(t.stride(1)) {}
  const scalar_t* row(int64_t b, int64_t s) const { return data + b * stride_b + s * stride_s; }
  const scalar_t* data;
  int64_t stride_b, stride_s;
};

void check_tokens(const at::Tensor& t, const char* name) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 3, "leapkernels_native: ", name, " must be [B, S, D], got shape ", t.sizes());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, "leapkernels_native: ", name,
              " must have unit last stride, got strides ", t.strides());
}

// A [B, S, D] operand of the shape and dtype of `like`.
void check_tokens_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  check_tokens(t, name);
  check_same_dtype(t, name, like, like_name);
  check_shape(t, name, like.sizes(), (std::string("the shape of ") + like_name).c_str());
}

void check_per_batch(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_cpu_float(t, name);
  check_same_dtype(t, name, x, "x");
  check_shape(t, name, {x.size(0), x.size(2)}, "(batch, features) of x");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "leapkernels_native: ", name,
              " must have unit last stride, got strides ", t.strides());
}

// Per-batch parameter rows converted once to the accumulation type: [B, D] contiguous.
template <typename scalar_t>
std::vector<acc_type<scalar_t>> per_batch_acc(const at::Tensor& t, acc_type<scalar_t> offset) {
  const int64_t batch = t.size(0), d = t.size(1);
  std::vector<acc_type<scalar_t>> out(batch * d);
  const scalar_t* p = t.const_data_ptr<scalar_t>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < d; ++j) out[b * d + j] = offset + static_cast<acc_type<scalar_t>>(p[b * t.stride(0) + j]);
  return out;
}

// Row statistics in the accumulation type: mean and 1/sqrt(var + eps), two passes (row in cache).
template <typename scalar_t>
std::pair<acc_type<scalar_t>, acc_type<scalar_t>> row_moments(const scalar_t* xr, int64_t d, double eps) {
  using acc_t = acc_type<scalar_t>;
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; ++j) sum += ld(xr, j);
  const acc_t mean = sum / static_cast<acc_t>(d);
  acc_t var = 0;
#pragma omp simd reduction(+ : var)
  for (int64_t j = 0; j < d; ++j) {
    const acc_t c = ld(xr, j) - mean;
    var += c * c;
  }
  const acc_t rstd = acc_t(1) / std::sqrt(var / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
  return {mean, rstd};
}

// Per-column sums over tokens (d-scale, d-shift, d-gate): partials per tile of kRowsPerTile rows
// ([B, tiles, D], accumulation type), combined in fp64 in a fixed order. Empty when not asked for.
template <typename acc_t>
struct ColumnSums {
  ColumnSums(bool on, int64_t batch, int64_t seq, int64_t d)
      : batch(batch), tiles(std::max<int64_t>(1, ceil_div(seq, kRowsPerTile))), d(d),
        part(on ? batch * tiles * d : 0, acc_t(0)) {}
  acc_t* tile(int64_t t) { return part.empty() ? nullptr : part.data() + t * d; }
  // The [B, D] sums in `dtype` (a 0-element tensor of `like`'s options when not asked for).
  at::Tensor sum(const at::Tensor& like) const {
    if (part.empty()) return at::empty({0}, like.options());
    at::Tensor out = at::empty({batch, d}, at::TensorOptions().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* ob = o + b * d;
        for (int64_t j = 0; j < d; ++j) ob[j] = 0;
        for (int64_t t = 0; t < tiles; ++t) {
          const acc_t* pt = part.data() + (b * tiles + t) * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) ob[j] += static_cast<double>(pt[j]);
        }
      }
    });
    return out.to(like.scalar_type());
  }
  int64_t batch, tiles, d;
  std::vector<acc_t> part;
};

// Calls body(b, s, r) for every token r = b * seq + s, in parallel (~32K elements a task).
template <typename F>
void for_each_token(int64_t batch, int64_t seq, int64_t d, const F& body) {
  at::parallel_for(0, batch * seq, row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) body(r / seq, r % seq, r);
  });
}

// ---------------------------------------------------------------------------- modulated LayerNorm
template <typename scalar_t>
void mln_fwd_kernel(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, double eps,
                    const at::Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = x.size(0), seq = x.size(1), d = x.size(2);
  const TokensView<scalar_t> xv(x);
  const auto one_plus_scale = per_batch_acc<scalar_t>(scale, acc_t(1));
  const auto shift_acc = per_batch_acc<scalar_t>(shift, acc_t(0));
  scalar_t* yp = y.data_ptr<scalar_t>();
  for_each_token(batch, seq, d, [&](int64_t b, int64_t s, int64_t r) {
    const scalar_t* xr = xv.row(b, s);
    const auto [mean, rstd] = row_moments(xr, d, eps);
    const acc_t* sc = one_plus_scale.data() + b * d;
    const acc_t* sh = shift_acc.data() + b * d;
    scalar_t* yr = yp + r * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) st(yr, j, (ld(xr, j) - mean) * rstd * sc[j] + sh[j]);
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> mln_bwd_kernel(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                                                  double eps, const at::Tensor& dx, bool need_dx, bool need_dmod) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = x.size(0), seq = x.size(1), d = x.size(2);
  const TokensView<scalar_t> xv(x), gv(g);
  const auto one_plus_scale = per_batch_acc<scalar_t>(scale, acc_t(1));
  scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
  ColumnSums<acc_t> dscale(need_dmod, batch, seq, d), dshift(need_dmod, batch, seq, d);
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  for_each_tile(batch, seq, kRowsPerTile, 1, [&](int64_t b, int64_t s0, int64_t s1, int64_t tile) {
    const acc_t* sc = one_plus_scale.data() + b * d;
    acc_t* dsc = dscale.tile(tile);
    acc_t* dsh = dshift.tile(tile);
    for (int64_t s = s0; s < s1; ++s) {
      const scalar_t* xr = xv.row(b, s);
      const scalar_t* gr = gv.row(b, s);
      const auto [mean, rstd] = row_moments(xr, d, eps);
      if (need_dmod) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          const acc_t gj = ld(gr, j);
          dsc[j] += gj * (ld(xr, j) - mean) * rstd;
          dsh[j] += gj;
        }
      }
      if (need_dx) {
        acc_t c1 = 0, c2 = 0;
#pragma omp simd reduction(+ : c1, c2)
        for (int64_t j = 0; j < d; ++j) {
          const acc_t dxhat = ld(gr, j) * sc[j];
          c1 += dxhat;
          c2 += dxhat * (ld(xr, j) - mean) * rstd;
        }
        c1 *= inv_d;
        c2 *= inv_d;
        scalar_t* dxr = dxp + (b * seq + s) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          const acc_t xhat = (ld(xr, j) - mean) * rstd;
          st(dxr, j, (ld(gr, j) * sc[j] - c1 - xhat * c2) * rstd);
        }
      }
    }
  });
  return {dscale.sum(scale), dshift.sum(scale)};
}

void mln_fwd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, double eps, const at::Tensor& y) {
  check_tokens(x, "x");
  check_per_batch(scale, "scale", x);
  check_per_batch(shift, "shift", x);
  check_output(y, "y", x, "x");
  TORCH_CHECK(eps > 0, "leapkernels_native: eps must be positive, got ", eps);
  LK_DISPATCH_FLOATING(x.scalar_type(), "mln_fwd", [&] { mln_fwd_kernel<scalar_t>(x, scale, shift, eps, y); });
}

std::tuple<at::Tensor, at::Tensor> mln_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale, double eps,
                                           const at::Tensor& dx, bool need_dx, bool need_dmod) {
  check_tokens(x, "x");
  check_tokens_like(g, "grad", x, "x");
  check_per_batch(scale, "scale", x);
  if (need_dx) check_output(dx, "dx", x, "x");
  return LK_DISPATCH_FLOATING(x.scalar_type(), "mln_bwd",
                              [&] { return mln_bwd_kernel<scalar_t>(g, x, scale, eps, dx, need_dx, need_dmod); });
}

}  // namespace

TORCH_LIBRARY_IMPL(leapkernels_native, CPU, m) {
  m.impl("mln_fwd", &mln_fwd);
  m.impl("mln_bwd", &mln_bwd);
}

namespace {

// ---------------------------------------------------------------------------- gated residual
template <typename scalar_t>
void gr_fwd_kernel(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y, const at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = x.size(0), seq = x.size(1), d = x.size(2);
  const TokensView<scalar_t> xv(x), yv(y);
  const auto gate_acc = per_batch_acc<scalar_t>(gate, acc_t(0));
  scalar_t* op = out.data_ptr<scalar_t>();
  for_each_token(batch, seq, d, [&](int64_t b, int64_t s, int64_t r) {
    const scalar_t* xr = xv.row(b, s);
    const scalar_t* yr = yv.row(b, s);
    const acc_t* gt = gate_acc.data() + b * d;
    scalar_t* orow = op + r * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) st(orow, j, ld(xr, j) + gt[j] * ld(yr, j));
  });
}

template <typename scalar_t>
at::Tensor gr_bwd_kernel(const at::Tensor& g, const at::Tensor& gate, const at::Tensor& y, const at::Tensor& dy,
                         bool need_dy, bool need_dgate) {
  using acc_t = acc_type<scalar_t>;
  const int64_t batch = g.size(0), seq = g.size(1), d = g.size(2);
  const TokensView<scalar_t> gv(g), yv(y);
  const auto gate_acc = per_batch_acc<scalar_t>(gate, acc_t(0));
  scalar_t* dyp = need_dy ? dy.data_ptr<scalar_t>() : nullptr;
  ColumnSums<acc_t> dgate(need_dgate, batch, seq, d);
  for_each_tile(batch, seq, kRowsPerTile, 1, [&](int64_t b, int64_t s0, int64_t s1, int64_t tile) {
    const acc_t* gt = gate_acc.data() + b * d;
    acc_t* dgt = dgate.tile(tile);
    for (int64_t s = s0; s < s1; ++s) {
      const scalar_t* gr = gv.row(b, s);
      if (need_dy) {
        scalar_t* dyr = dyp + (b * seq + s) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) st(dyr, j, ld(gr, j) * gt[j]);
      }
      if (need_dgate) {
        const scalar_t* yr = yv.row(b, s);
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) dgt[j] += ld(gr, j) * ld(yr, j);
      }
    }
  });
  return dgate.sum(gate);
}

void gr_fwd(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& y, const at::Tensor& out) {
  check_tokens(x, "x");
  check_tokens_like(y, "y", x, "x");
  check_per_batch(gate, "gate", x);
  check_output(out, "out", x, "x");
  LK_DISPATCH_FLOATING(x.scalar_type(), "gr_fwd", [&] { gr_fwd_kernel<scalar_t>(x, gate, y, out); });
}

at::Tensor gr_bwd(const at::Tensor& g, const at::Tensor& gate, const at::Tensor& y, const at::Tensor& dy, bool need_dy,
                  bool need_dgate) {
  check_tokens(g, "grad");
  check_tokens_like(y, "y", g, "grad");
  check_per_batch(gate, "gate", g);
  if (need_dy) check_output(dy, "dy", g, "grad");
  return LK_DISPATCH_FLOATING(g.scalar_type(), "gr_bwd",
                              [&] { return gr_bwd_kernel<scalar_t>(g, gate, y, dy, need_dy, need_dgate); });
}

}  // namespace

TORCH_LIBRARY_IMPL(leapkernels_native, CPU, m) {
  m.impl("gr_fwd", &gr_fwd);
  m.impl("gr_bwd", &gr_bwd);
}

}  // namespace leapkernels_native
