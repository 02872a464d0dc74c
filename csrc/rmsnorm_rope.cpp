// Per-head RMSNorm (learnable weight) + interleaved RoPE (leapkernels/ops/qk_norm_rope.py).
//
//   qk_fwd(x, weight, cos?, sin?, eps, out)
//       n = x rsqrt(mean(x^2) + eps) w;  out[2i] = n[2i] c[2i] - n[2i+1] s[2i]
//                                        out[2i+1] = n[2i+1] c[2i+1] + n[2i] s[2i+1]
//   qk_bwd(g, x, weight, cos?, sin?, eps, dx, need_dx, need_dw) -> dweight
//       un-rotates g (dn = g c + R^T(g s)), recomputes rstd, writes dx; dweight = sum_rows dn xhat
// x, g: [B, S, H, Dh] with unit last stride (any other strides); weight: [Dh] contiguous, x's
// dtype; cos, sin: [S, Dh] in the accumulation dtype (fp32, fp64 for fp64 x) with unit last
// stride, or both absent (RMSNorm only).
#include "common.h"

namespace leapkernels_native {
namespace {

constexpr int64_t kQkRowsPerTile = 64;

struct Heads {
  explicit Heads(const at::Tensor& t)
      : batch(t.size(0)), seq(t.size(1)), heads(t.size(2)), dim(t.size(3)),
        sb(t.stride(0)), ss(t.stride(1)), sh(t.stride(2)) {}
  // Offset of row r (r = (b * S + s) * H + h) and its sequence index.
  int64_t offset(int64_t r) const {
    const int64_t h = r % heads, s = (r / heads) % seq, b = r / (heads * seq);
    return b * sb + s * ss + h * sh;
  }
  int64_t seq_index(int64_t r) const { return (r / heads) % seq; }
  int64_t rows() const { return batch * seq * heads; }
  int64_t batch, seq, heads, dim, sb, ss, sh;
};

void check_heads(const at::Tensor& t, const char* name) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 4, "leapkernels_native: ", name, " must be [B, S, H, Dh], got shape ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "leapkernels_native: ", name, " must have unit last stride, got strides ",
              t.strides());
  TORCH_CHECK(t.size(3) % 2 == 0, "leapkernels_native: ", name, "'s head dim must be even for interleaved RoPE, got ",
              t.size(3));
}

void check_rope(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, const at::Tensor& x) {
  TORCH_CHECK(cos.has_value() == sin.has_value(), "leapkernels_native: cos and sin must both be tensors or both be None");
  if (!cos.has_value()) return;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [t, name] : {std::pair{&*cos, "cos"}, std::pair{&*sin, "sin"}}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == acc, "leapkernels_native: ", name, " must be a ", acc,
                " CPU tensor, got ", t->scalar_type(), " on ", t->device());
    check_shape(*t, name, {x.size(1), x.size(3)}, "(sequence, head dim) of x");
    TORCH_CHECK(t->stride(1) == 1, "leapkernels_native: ", name, " must have unit last stride, got strides ", t->strides());
  }
}

// The RoPE tables (absent: RMSNorm only) and the norm weight, in the accumulation type.
template <typename acc_t>
struct RopeTables {
  RopeTables(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin)
      : cos_p(cos.has_value() ? cos->const_data_ptr<acc_t>() : nullptr),
        sin_p(sin.has_value() ? sin->const_data_ptr<acc_t>() : nullptr),
        cos_stride(cos.has_value() ? cos->stride(0) : 0), sin_stride(sin.has_value() ? sin->stride(0) : 0) {}
  bool on() const { return cos_p != nullptr; }
  const acc_t* cos_row(int64_t s) const { return cos_p + s * cos_stride; }
  const acc_t* sin_row(int64_t s) const { return sin_p + s * sin_stride; }
  const acc_t* cos_p;
  const acc_t* sin_p;
  int64_t cos_stride, sin_stride;
};

template <typename scalar_t>
std::vector<acc_type<scalar_t>> weight_acc(const at::Tensor& weight) {
  const scalar_t* p = weight.const_data_ptr<scalar_t>();
  return std::vector<acc_type<scalar_t>>(p, p + weight.numel());
}

// dn = the gradient of the normalised row: g un-rotated (g c + R^T(g s)), or g itself without RoPE.
template <typename scalar_t, typename acc_t>
void unrotate(const scalar_t* gr, const RopeTables<acc_t>& rope, int64_t s, int64_t d, acc_t* dn) {
  if (!rope.on()) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) dn[j] = ld(gr, j);
    return;
  }
  const acc_t* c = rope.cos_row(s);
  const acc_t* sn = rope.sin_row(s);
#pragma omp simd
  for (int64_t i = 0; i < d / 2; ++i) {
    const acc_t ge = ld(gr, 2 * i);
    const acc_t go = ld(gr, 2 * i + 1);
    dn[2 * i] = ge * c[2 * i] + go * sn[2 * i + 1];
    dn[2 * i + 1] = go * c[2 * i + 1] - ge * sn[2 * i];
  }
}

template <typename scalar_t>
acc_type<scalar_t> row_rstd(const scalar_t* xr, int64_t d, double eps) {
  using acc_t = acc_type<scalar_t>;
  acc_t sumsq = 0;
#pragma omp simd reduction(+ : sumsq)
  for (int64_t j = 0; j < d; ++j) {
    const acc_t v = ld(xr, j);
    sumsq += v * v;
  }
  return acc_t(1) / std::sqrt(sumsq / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
}

template <typename scalar_t>
void qk_fwd_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& cos,
                   const std::optional<at::Tensor>& sin, double eps, const at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const Heads hx(x);
  const int64_t d = hx.dim, half = d / 2;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const auto w = weight_acc<scalar_t>(weight);
  const RopeTables<acc_t> rope(cos, sin);
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, hx.rows(), row_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + hx.offset(r);
      scalar_t* orow = op + r * d;
      const acc_t rstd = row_rstd(xr, d, eps);
      if (!rope.on()) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) st(orow, j, ld(xr, j) * rstd * w[j]);
        continue;
      }
      const acc_t* c = rope.cos_row(hx.seq_index(r));
      const acc_t* sn = rope.sin_row(hx.seq_index(r));
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const acc_t ne = ld(xr, 2 * i) * rstd * w[2 * i];
        const acc_t no = ld(xr, 2 * i + 1) * rstd * w[2 * i + 1];
        st(orow, 2 * i, ne * c[2 * i] - no * sn[2 * i]);
        st(orow, 2 * i + 1, no * c[2 * i + 1] + ne * sn[2 * i + 1]);
      }
    }
  });
}

template <typename scalar_t>
at::Tensor qk_bwd_kernel(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, double eps,
                         const at::Tensor& dx, bool need_dx, bool need_dw) {
  using acc_t = acc_type<scalar_t>;
  const Heads hx(x), hg(g);
  const int64_t d = hx.dim, rows = hx.rows();
  const int64_t tiles = std::max<int64_t>(1, ceil_div(rows, kQkRowsPerTile));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const auto w = weight_acc<scalar_t>(weight);
  const RopeTables<acc_t> rope(cos, sin);
  scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
  std::vector<acc_t> dw_part(need_dw ? tiles * d : 0, acc_t(0));
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> dn(d);  // the un-rotated gradient of the normalised row
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* dwt = need_dw ? dw_part.data() + t * d : nullptr;
      for (int64_t r = t * kQkRowsPerTile; r < std::min(rows, (t + 1) * kQkRowsPerTile); ++r) {
        const scalar_t* xr = xp + hx.offset(r);
        const scalar_t* gr = gp + hg.offset(r);
        unrotate(gr, rope, hx.seq_index(r), d, dn.data());
        const acc_t rstd = row_rstd(xr, d, eps);
        if (need_dw) {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) dwt[j] += dn[j] * ld(xr, j) * rstd;
        }
        if (need_dx) {
          acc_t c2 = 0;
#pragma omp simd reduction(+ : c2)
          for (int64_t j = 0; j < d; ++j) c2 += dn[j] * w[j] * ld(xr, j) * rstd;
          c2 *= inv_d;
          scalar_t* dxr = dxp + r * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            const acc_t xhat = ld(xr, j) * rstd;
            st(dxr, j, (dn[j] * w[j] - xhat * c2) * rstd);
          }
        }
      }
    }
  });
  if (!need_dw) return at::empty({0}, weight.options());
  at::Tensor dw = at::zeros({d}, at::TensorOptions().dtype(at::kDouble));
  double* dwp = dw.data_ptr<double>();
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t j = 0; j < d; ++j) dwp[j] += static_cast<double>(dw_part[t * d + j]);
  return dw.to(weight.scalar_type());
}

void check_weight(const at::Tensor& weight, const at::Tensor& x) {
  check_cpu_float(weight, "weight");
  check_same_dtype(weight, "weight", x, "x");
  check_shape(weight, "weight", {x.size(3)}, "the head dim of x");
  TORCH_CHECK(weight.is_contiguous(), "leapkernels_native: weight must be contiguous");
}

void qk_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& cos,
            const std::optional<at::Tensor>& sin, double eps, const at::Tensor& out) {
  check_heads(x, "x");
  check_weight(weight, x);
  check_rope(cos, sin, x);
  check_output(out, "out", x, "x");
  TORCH_CHECK(eps > 0, "leapkernels_native: eps must be positive, got ", eps);
  LK_DISPATCH_FLOATING(x.scalar_type(), "qk_fwd", [&] { qk_fwd_kernel<scalar_t>(x, weight, cos, sin, eps, out); });
}

at::Tensor qk_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& cos,
                  const std::optional<at::Tensor>& sin, double eps, const at::Tensor& dx, bool need_dx, bool need_dw) {
  check_heads(x, "x");
  check_heads(g, "grad");
  check_same_dtype(g, "grad", x, "x");
  check_shape(g, "grad", x.sizes(), "the shape of x");
  check_weight(weight, x);
  check_rope(cos, sin, x);
  if (need_dx) check_output(dx, "dx", x, "x");
  return LK_DISPATCH_FLOATING(x.scalar_type(), "qk_bwd",
                              [&] { return qk_bwd_kernel<scalar_t>(g, x, weight, cos, sin, eps, dx, need_dx, need_dw); });
}

}  // namespace

TORCH_LIBRARY_IMPL(leapkernels_native, CPU, m) {
  m.impl("qk_fwd", &qk_fwd);
  m.impl("qk_bwd", &qk_bwd);
}

}  // namespace leapkernels_native
