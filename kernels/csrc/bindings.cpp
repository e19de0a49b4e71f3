// Python bindings of the CUDA extension `kernels._vavae_cuda` (called from kernels/cuda_ext.py).
#include <torch/extension.h>

#include "fused_norm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vavae-lightningdit fused norm kernels (sm_90a)";
  m.def("norm_fwd", &vavae::norm_fwd_cuda, "(gated residual +) norm (+ modulate) forward");
  m.def("norm_bwd", &vavae::norm_bwd_cuda, "(gated residual +) norm (+ modulate) backward");
}
