// The fused norm family's host entry points: declared once, defined in fused_norm.cu, bound in bindings.cpp.
#pragma once
#include <ATen/core/Tensor.h>

namespace vavae {
void norm_fwd_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& gate, const c10::optional<at::Tensor>& y,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale, at::Tensor& h,
                   at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, int64_t N, double eps, bool rms,
                   int64_t stream_handle);
void norm_bwd_cuda(const at::Tensor& dout, const c10::optional<at::Tensor>& dh, const at::Tensor& xin,
                   const c10::optional<at::Tensor>& gate, const c10::optional<at::Tensor>& y,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& scale, const at::Tensor& mean, const at::Tensor& rstd,
                   at::Tensor& dx, at::Tensor& dy, at::Tensor& pw, at::Tensor& pb, at::Tensor& pshift,
                   at::Tensor& pscale, at::Tensor& pg, int64_t N, int64_t R, bool rms, bool has_shift,
                   int64_t stream_handle);
}  // namespace vavae
