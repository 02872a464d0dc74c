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
}
