// torch_ext.cpp -- PyTorch binding of the low-bit GEMM kernels (runtime/gemm_ext.py builds it JIT).
//
// Same kernels as the TensorRT plugin, so they can be tested and benchmarked without TensorRT.
// Built by torch.utils.cpp_extension with the C++ standard torch requires (17 or 20); the kernels stay C++14.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "lowbit_gemm.h"
#include "lowbit_host.h"
#include "qvit_lowbit_format.h"

namespace {

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return QVIT_DTYPE_F32;
    case torch::kFloat16: return QVIT_DTYPE_F16;
    case torch::kInt8: return QVIT_DTYPE_I8;
    case torch::kInt32: return QVIT_DTYPE_I32;
    default: return -1;
  }
}

torch::ScalarType scalar_of(int64_t code) {
  switch (code) {
    case QVIT_DTYPE_F32: return torch::kFloat32;
    case QVIT_DTYPE_F16: return torch::kFloat16;
    case QVIT_DTYPE_I32: return torch::kInt32;
    default: TORCH_CHECK(false, "unsupported output dtype code ", code);
  }
}

// y[m, n] = QvitLowBitLinear(x2d[m, k]) with an explicit kernel id (QVIT_KERNEL_*).
torch::Tensor gemm(const torch::Tensor& x2d, const torch::Tensor& w, const torch::Tensor& weight_scale,
                   const c10::optional<torch::Tensor>& bias, int64_t bits, int64_t n, double act_scale,
                   int64_t act_lo, int64_t act_hi, int64_t kernel, int64_t out_dtype) {
  TORCH_CHECK(x2d.is_cuda() && w.is_cuda() && weight_scale.is_cuda(), "tensors must be on a CUDA device");
  TORCH_CHECK(x2d.dim() == 2 && x2d.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(w.scalar_type() == torch::kInt32 && w.is_contiguous() && w.dim() == 2, "w must be repacked int32 words");
  TORCH_CHECK(weight_scale.scalar_type() == torch::kFloat32 && weight_scale.numel() == n, "weight_scale: float32 [N]");
  const int64_t m = x2d.size(0);
  const int64_t k = x2d.size(1);
  TORCH_CHECK(m <= INT32_MAX && k <= INT32_MAX && n <= INT32_MAX, "problem too large");
  TORCH_CHECK(w.size(0) == qvit_repacked_rows(static_cast<int>(n)) &&
                  w.size(1) == qvit_repacked_words(static_cast<int>(k), static_cast<int>(bits)),
              "w has the wrong repacked shape for N, K, bits");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == torch::kFloat32 && bias->numel() == n, "bias: float32 [N]");
    bias_ptr = bias->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(x2d.device());
  torch::Tensor y = torch::empty({m, n}, x2d.options().dtype(scalar_of(out_dtype)));
  const size_t ws_bytes = qvit_workspace_size(static_cast<int>(m), static_cast<int>(k), static_cast<int>(kernel));
  torch::Tensor ws;
  if (ws_bytes > 0) ws = torch::empty({static_cast<int64_t>(ws_bytes)}, x2d.options().dtype(torch::kUInt8));
  qvit::LowBitGemmArgs a;
  a.m = static_cast<int>(m);
  a.n = static_cast<int>(n);
  a.k = static_cast<int>(k);
  a.bits = static_cast<int>(bits);
  a.x = x2d.data_ptr();
  a.x_dtype = dtype_code(x2d);
  a.y = y.data_ptr();
  a.y_dtype = static_cast<int>(out_dtype);
  a.w = reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
  a.ldw = static_cast<int>(w.size(1));
  a.weight_scale = weight_scale.data_ptr<float>();
  a.bias = bias_ptr;
  a.act_scale = static_cast<float>(act_scale);
  a.act_lo = static_cast<int>(act_lo);
  a.act_hi = static_cast<int>(act_hi);
  a.workspace = ws_bytes > 0 ? ws.data_ptr() : nullptr;
  a.workspace_bytes = ws_bytes;
  const cudaError_t err = qvit::lowbit_gemm(a, static_cast<int>(kernel), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "lowbit_gemm(", qvit_kernel_name(static_cast<int>(kernel)),
              ") failed: ", cudaGetErrorString(err));
  return y;
}

int64_t select_kernel(int64_t m, int64_t n, int64_t k, int64_t bits, int64_t x_dtype, int64_t path, int64_t cc_major,
                      int64_t cc_minor) {
  return qvit_select_kernel(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(bits),
                            static_cast<int>(x_dtype), static_cast<int>(path), static_cast<int>(cc_major),
                            static_cast<int>(cc_minor));
}

std::string kernel_name(int64_t kernel) { return qvit_kernel_name(static_cast<int>(kernel)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qvit-edge packed 2/3/4-bit GEMM kernels (QvitLowBitLinear)";
  m.def("gemm", &gemm, "QvitLowBitLinear on [M, K] with an explicit kernel id");
  m.def("select_kernel", &select_kernel, "kernel id for (m, n, k, bits, x_dtype, path, cc_major, cc_minor)");
  m.def("kernel_name", &kernel_name, "short kernel name");
}
