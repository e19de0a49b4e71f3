// Fused (gated residual +) RMSNorm/LayerNorm (+ adaLN modulate), forward and backward, for sm_90a.
//
//   h   = x + gate[b] * y                       (optional)
//   out = (norm(h) * weight + bias) * (1 + scale[b]) + shift[b]
//
// Same contract as the Triton kernels in kernels/fused_norm.py (see there for the math); one block per
// row in the forward, one block per (sample, chunk of rows) in the backward, 16-byte vector loads,
// warp-shuffle reductions, fp32 statistics. TX = dtype of x/h/out/weight/bias (and of their grads),
// TV = dtype of gate/y/shift/scale: all equal, or TX = float with bf16/fp16 TV (bf16 autocast). out (and its
// gradient dout) may be TV instead of TX (out_tv / dout_tv): under autocast the next GEMM reads out in bf16, so
// the kernel writes it so, and its gradient arrives so.
//
// Only ATen core and CUDA runtime headers: the CPU torch wheel (CI compile test) has no c10/cuda build
// headers, so the caller passes the current stream (torch.cuda.current_stream().cuda_stream).
#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fused_norm.h"

namespace vavae {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <int VEC, typename T>
__device__ __forceinline__ void load(const T* p, float (&f)[VEC]) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);  // one wide load
#pragma unroll
  for (int k = 0; k < VEC; ++k) f[k] = to_f(pk.v[k]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* p, const float (&f)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_f<T>(f[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* shm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // shm may still be read by a previous call
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? shm[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct FwdArgs {
  const void *x, *gate, *y, *weight, *bias, *shift, *scale;
  int64_t sx, sg, sy, sshift, sscale;
  void *h, *out;
  float *mean, *rstd;
  int64_t N;
  int C;
  float eps;
  bool rms, out_tv;
};

template <typename TX, typename TV, int VEC, int MAXV>
__global__ void norm_fwd_kernel(FwdArgs a) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x, b = row / a.N;
  const int nvec = a.C / VEC;
  float v[MAXV][VEC];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int c = (threadIdx.x + i * blockDim.x) * VEC;
    if (c < a.C) {
      load<VEC>(static_cast<const TX*>(a.x) + row * a.sx + c, v[i]);
      if (a.gate) {
        float g[VEC], y[VEC];
        load<VEC>(static_cast<const TV*>(a.gate) + b * a.sg + c, g);
        load<VEC>(static_cast<const TV*>(a.y) + row * a.sy + c, y);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = to_f(from_f<TX>(v[i][k] + g[k] * y[k]));  // the stored h
        store<VEC>(static_cast<TX*>(a.h) + row * a.C + c, v[i]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += a.rms ? v[i][k] * v[i][k] : v[i][k];
    }
  }
  sum = block_sum(sum, shm);
  float mu = 0.f, rstd;
  if (a.rms) {
    rstd = rsqrtf(sum / a.C + a.eps);
  } else {  // two-pass variance from registers
    mu = sum / a.C;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i)
      if ((threadIdx.x + i * blockDim.x) * VEC < a.C)
#pragma unroll
        for (int k = 0; k < VEC; ++k) sq += (v[i][k] - mu) * (v[i][k] - mu);
    rstd = rsqrtf(block_sum(sq, shm) / a.C + a.eps);
  }
  if (threadIdx.x == 0) {
    a.rstd[row] = rstd;
    if (!a.rms) a.mean[row] = mu;
  }
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int c = (threadIdx.x + i * blockDim.x) * VEC;
    if (c >= a.C) continue;
    float w[VEC], bi[VEC], sh[VEC], sc[VEC], o[VEC];
    if (a.weight) load<VEC>(static_cast<const TX*>(a.weight) + c, w);
    if (a.bias) load<VEC>(static_cast<const TX*>(a.bias) + c, bi);
    if (a.scale) load<VEC>(static_cast<const TV*>(a.scale) + b * a.sscale + c, sc);
    if (a.shift) load<VEC>(static_cast<const TV*>(a.shift) + b * a.sshift + c, sh);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float t = (v[i][k] - mu) * rstd;
      if (a.weight) t *= w[k];
      if (a.bias) t += bi[k];
      if (a.scale) t *= 1.f + sc[k];
      if (a.shift) t += sh[k];
      o[k] = t;
    }
    if (a.out_tv)
      store<VEC>(static_cast<TV*>(a.out) + row * a.C + c, o);
    else
      store<VEC>(static_cast<TX*>(a.out) + row * a.C + c, o);
  }
  (void)nvec;
}

struct BwdArgs {
  const void *dout, *dh, *xin, *gate, *y, *weight, *bias, *scale;
  int64_t sg, sy, sscale;
  const float *mean, *rstd;
  void *dx, *dy;
  float *pw, *pb, *pshift, *pscale, *pg;
  int64_t N, R;
  int C;
  bool rms, has_shift, dout_tv;
};

template <typename TX, typename TV, int VEC, int MAXV>
__global__ void norm_bwd_kernel(BwdArgs a) {
  __shared__ float shm[32];
  const int64_t b = blockIdx.x, chunk = blockIdx.y;
  float w[MAXV][VEC], bi[MAXV][VEC], sc1[MAXV][VEC], g[MAXV][VEC];
  float acc_w[MAXV][VEC], acc_b[MAXV][VEC], acc_sh[MAXV][VEC], acc_sc[MAXV][VEC], acc_g[MAXV][VEC];
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int c = (threadIdx.x + i * blockDim.x) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      w[i][k] = 1.f; bi[i][k] = 0.f; sc1[i][k] = 0.f; g[i][k] = 0.f;
      acc_w[i][k] = acc_b[i][k] = acc_sh[i][k] = acc_sc[i][k] = acc_g[i][k] = 0.f;
    }
    if (c < a.C) {
      if (a.weight) load<VEC>(static_cast<const TX*>(a.weight) + c, w[i]);
      if (a.bias) load<VEC>(static_cast<const TX*>(a.bias) + c, bi[i]);
      if (a.scale) load<VEC>(static_cast<const TV*>(a.scale) + b * a.sscale + c, sc1[i]);
      if (a.gate) load<VEC>(static_cast<const TV*>(a.gate) + b * a.sg + c, g[i]);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sc1[i][k] += 1.f;
  }
  const int64_t start = b * a.N + chunk * a.R;
  const int64_t end = min(start + a.R, (b + 1) * a.N);
  for (int64_t row = start; row < end; ++row) {
    const float rstd = a.rstd[row];
    const float mu = a.rms ? 0.f : a.mean[row];
    float xhat[MAXV][VEC], dxhat[MAXV][VEC];
    float s1 = 0.f, s2 = 0.f;  // sum(dxhat), sum(dxhat * xhat)
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int c = (threadIdx.x + i * blockDim.x) * VEC;
      if (c >= a.C) continue;
      float d[VEC];
      if (a.dout_tv)
        load<VEC>(static_cast<const TV*>(a.dout) + row * a.C + c, d);
      else
        load<VEC>(static_cast<const TX*>(a.dout) + row * a.C + c, d);
      load<VEC>(static_cast<const TX*>(a.xin) + row * a.C + c, xhat[i]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xhat[i][k] = (xhat[i][k] - mu) * rstd;
        acc_sh[i][k] += d[k];
        acc_sc[i][k] += d[k] * (xhat[i][k] * w[i][k] + bi[i][k]);
        const float dn = d[k] * sc1[i][k];
        acc_b[i][k] += dn;
        acc_w[i][k] += dn * xhat[i][k];
        dxhat[i][k] = dn * w[i][k];
        s1 += dxhat[i][k];
        s2 += dxhat[i][k] * xhat[i][k];
      }
    }
    s1 = a.rms ? 0.f : block_sum(s1, shm) / a.C;
    s2 = block_sum(s2, shm) / a.C;
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
      const int c = (threadIdx.x + i * blockDim.x) * VEC;
      if (c >= a.C) continue;
      float dx[VEC], dh[VEC];
      if (a.dh) load<VEC>(static_cast<const TX*>(a.dh) + row * a.C + c, dh);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dx[k] = rstd * (dxhat[i][k] - s1 - xhat[i][k] * s2) + (a.dh ? dh[k] : 0.f);
      store<VEC>(static_cast<TX*>(a.dx) + row * a.C + c, dx);
      if (a.gate) {
        float y[VEC], dy[VEC];
        load<VEC>(static_cast<const TV*>(a.y) + row * a.sy + c, y);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dy[k] = g[i][k] * dx[k];
          acc_g[i][k] += dx[k] * y[k];
        }
        store<VEC>(static_cast<TV*>(a.dy) + row * a.C + c, dy);
      }
    }
  }
  const int64_t p = (b * gridDim.y + chunk) * a.C;
#pragma unroll
  for (int i = 0; i < MAXV; ++i) {
    const int c = (threadIdx.x + i * blockDim.x) * VEC;
    if (c >= a.C) continue;
    if (a.pw) store<VEC>(a.pw + p + c, acc_w[i]);
    if (a.pb) store<VEC>(a.pb + p + c, acc_b[i]);
    if (a.has_shift) store<VEC>(a.pshift + p + c, acc_sh[i]);
    if (a.pscale) store<VEC>(a.pscale + p + c, acc_sc[i]);
    if (a.pg) store<VEC>(a.pg + p + c, acc_g[i]);
  }
}

// ----------------------------------------------------------------------------- host side

namespace {

const void* ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }
int64_t stride0(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->stride(0) : 0; }
float* fptr(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

int threads_for(int nvec, int maxv) {
  const int t = (nvec + maxv - 1) / maxv;
  return std::max(32, std::min(1024, (t + 31) / 32 * 32));
}

// The threads a launch of `kernel` may use: its registers per thread can cap it below 1024 (the backward at 74-127
// registers: ~512-885 threads), which the width check must know before launching.
template <typename K>
int max_threads(K kernel) {
  cudaFuncAttributes attr;
  TORCH_CHECK(cudaFuncGetAttributes(&attr, kernel) == cudaSuccess, "vavae CUDA fused_norm: cudaFuncGetAttributes");
  return attr.maxThreadsPerBlock;
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "vavae CUDA ", what, " launch failed: ", cudaGetErrorString(err));
}

// Runs BODY with TX, TV bound to the supported dtype pairs: all equal, or fp32 x with bf16/fp16 vectors.
#define VAVAE_DISPATCH(tx, tv, ...)                                                                    \
  [&] {                                                                                                \
    using at::ScalarType;                                                                              \
    if (tx == ScalarType::Float && tv == ScalarType::Float) {                                          \
      using TX = float; using TV = float; __VA_ARGS__();                                               \
    } else if (tx == ScalarType::Float && tv == ScalarType::BFloat16) {                                \
      using TX = float; using TV = __nv_bfloat16; __VA_ARGS__();                                       \
    } else if (tx == ScalarType::Float && tv == ScalarType::Half) {                                    \
      using TX = float; using TV = __half; __VA_ARGS__();                                              \
    } else if (tx == ScalarType::BFloat16 && tv == ScalarType::BFloat16) {                             \
      using TX = __nv_bfloat16; using TV = __nv_bfloat16; __VA_ARGS__();                               \
    } else if (tx == ScalarType::Half && tv == ScalarType::Half) {                                     \
      using TX = __half; using TV = __half; __VA_ARGS__();                                             \
    } else {                                                                                           \
      TORCH_CHECK(false, "vavae CUDA fused_norm: unsupported dtypes x=", tx, " vectors=", tv,          \
                  " (supported: all equal, or fp32 x with bf16/fp16 gate/y/shift/scale)");             \
    }                                                                                                  \
  }()

}  // namespace

void norm_fwd_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& gate, const c10::optional<at::Tensor>& y,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& scale, at::Tensor& h,
                   at::Tensor& out, at::Tensor& mean, at::Tensor& rstd, int64_t N, double eps, bool rms,
                   int64_t stream_handle) {
  const int C = x.size(1);
  const int64_t rows = x.size(0);
  const at::ScalarType tv = gate ? gate->scalar_type() : scale ? scale->scalar_type() : x.scalar_type();
  FwdArgs a{x.data_ptr(), ptr(gate), ptr(y), ptr(weight), ptr(bias), ptr(shift), ptr(scale),
            x.stride(0), stride0(gate), stride0(y), stride0(shift), stride0(scale),
            h.numel() ? h.data_ptr() : nullptr, out.data_ptr(), fptr(mean), fptr(rstd), N, C, (float)eps, rms,
            out.scalar_type() != x.scalar_type()};
  TORCH_CHECK(out.scalar_type() == x.scalar_type() || out.scalar_type() == tv,
              "vavae CUDA fused_norm: out must have x's dtype or the vectors' (got ", out.scalar_type(), ")");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  VAVAE_DISPATCH(x.scalar_type(), tv, [&] {
    constexpr int VEC = 16 / sizeof(TX), MAXV = 4;
    const int nvec = C / VEC;
    const int most = max_threads(norm_fwd_kernel<TX, TV, VEC, MAXV>) / 32 * 32;
    TORCH_CHECK(C % VEC == 0 && nvec <= most * MAXV, "vavae CUDA fused_norm: C=", C, " must be a multiple of ",
                VEC, " and at most ", most * MAXV * VEC, " (the kernel's registers allow ", most, " threads)");
    norm_fwd_kernel<TX, TV, VEC, MAXV><<<rows, threads_for(nvec, MAXV), 0, stream>>>(a);
    check_launch("norm_fwd");
  });
}

void norm_bwd_cuda(const at::Tensor& dout, const c10::optional<at::Tensor>& dh, const at::Tensor& xin,
                   const c10::optional<at::Tensor>& gate, const c10::optional<at::Tensor>& y,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& scale, const at::Tensor& mean, const at::Tensor& rstd,
                   at::Tensor& dx, at::Tensor& dy, at::Tensor& pw, at::Tensor& pb, at::Tensor& pshift,
                   at::Tensor& pscale, at::Tensor& pg, int64_t N, int64_t R, bool rms, bool has_shift,
                   int64_t stream_handle) {
  const int C = xin.size(1);
  const int64_t rows = xin.size(0), B = rows / N, chunks = (N + R - 1) / R;
  const at::ScalarType tv = gate ? gate->scalar_type() : scale ? scale->scalar_type() : xin.scalar_type();
  BwdArgs a{dout.data_ptr(), ptr(dh), xin.data_ptr(), ptr(gate), ptr(y), ptr(weight), ptr(bias), ptr(scale),
            stride0(gate), stride0(y), stride0(scale), rms ? nullptr : mean.data_ptr<float>(),
            rstd.data_ptr<float>(), dx.data_ptr(), dy.numel() ? dy.data_ptr() : nullptr,
            fptr(pw), fptr(pb), fptr(pshift), fptr(pscale), fptr(pg), N, R, C, rms, has_shift,
            dout.scalar_type() != xin.scalar_type()};
  TORCH_CHECK(dout.scalar_type() == xin.scalar_type() || dout.scalar_type() == tv,
              "vavae CUDA fused_norm: dout must have xin's dtype or the vectors' (got ", dout.scalar_type(), ")");
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  VAVAE_DISPATCH(xin.scalar_type(), tv, [&] {
    constexpr int VEC = 16 / sizeof(TX), MAXV = 1;  // 5 fp32 accumulators per element: keep registers low
    const int nvec = C / VEC;
    const int most = max_threads(norm_bwd_kernel<TX, TV, VEC, MAXV>) / 32 * 32;
    TORCH_CHECK(C % VEC == 0 && nvec <= most * MAXV, "vavae CUDA fused_norm backward: C=", C, " must be a multiple of ",
                VEC, " and at most ", most * MAXV * VEC, " (the kernel's registers allow ", most,
                " threads); use the triton backend");
    TORCH_CHECK(chunks <= 65535, "vavae CUDA fused_norm backward: ", chunks, " row chunks per sample, over the grid's "
                "65535; use the triton backend");
    norm_bwd_kernel<TX, TV, VEC, MAXV><<<dim3(B, chunks), threads_for(nvec, MAXV), 0, stream>>>(a);
    check_launch("norm_bwd");
  });
}

}  // namespace vavae
