// Schemas of the native ops. One TORCH_LIBRARY per namespace: every op is declared here, and each
// op's file registers its CPU kernels with TORCH_LIBRARY_IMPL. Forward and backward are separate
// ops; leapkernels/native.py adapts them to each op's kernel contract (leapkernels/ops/*.py), and
// the op's torch.autograd.Function (shared by every backend) decides what is saved and
// recomputed. Full-size outputs are passed in (`Tensor(a!)`), allocated by the Python side so
// tests can poison them; small reductions (per sample, per column) are returned.
#include <torch/library.h>

TORCH_LIBRARY(leapkernels_native, m) {
  // leap + connector + distance (csrc/leap_connector.cpp)
  m.def("leap_fwd(Tensor x_from, Tensor v, Tensor c, Tensor(a!) out) -> ()");
  m.def("leap_connector_fwd(Tensor x_from, Tensor v, Tensor c, Tensor x_true, Tensor(a!) out) -> Tensor");
  m.def("leap_bwd(Tensor grad, Tensor c, Tensor(a!) grad_v) -> ()");
  m.def("leap_bwd_dc(Tensor grad, Tensor v, Tensor c, Tensor(a!) grad_v) -> Tensor");
  // per-term gradient scaling (csrc/grad_scale.cpp)
  m.def("grad_scale_bwd(Tensor grad, Tensor alpha, float? max_norm, Tensor(a!) out) -> ()");
  // LayerNorm + AdaLN modulation, gated residual (csrc/modulation.cpp)
  m.def("mln_fwd(Tensor x, Tensor scale, Tensor shift, float eps, Tensor(a!) y) -> ()");
  m.def("mln_bwd(Tensor grad, Tensor x, Tensor scale, float eps, Tensor(a!) dx, bool need_dx, bool need_dmod)"
        " -> (Tensor, Tensor)");
  m.def("gr_fwd(Tensor x, Tensor gate, Tensor y, Tensor(a!) out) -> ()");
  m.def("gr_bwd(Tensor grad, Tensor gate, Tensor y, Tensor(a!) dy, bool need_dy, bool need_dgate) -> Tensor");
  // per-head QK RMSNorm + interleaved RoPE (csrc/rmsnorm_rope.cpp)
  m.def("qk_fwd(Tensor x, Tensor weight, Tensor? cos, Tensor? sin, float eps, Tensor(a!) out) -> ()");
  m.def("qk_bwd(Tensor grad, Tensor x, Tensor weight, Tensor? cos, Tensor? sin, float eps, Tensor(a!) dx,"
        " bool need_dx, bool need_dw) -> Tensor");
  // tanh-GELU (csrc/gelu.cpp)
  m.def("gelu_fwd(Tensor h, Tensor(a!) out) -> ()");
  m.def("gelu_bwd(Tensor grad, Tensor h, Tensor(a!) dh) -> ()");
  // SwiGLU (csrc/swiglu.cpp)
  m.def("swiglu_fwd(Tensor h, Tensor(a!) out) -> ()");
  m.def("swiglu_bwd(Tensor grad, Tensor h, Tensor(a!) dh) -> ()");
}
