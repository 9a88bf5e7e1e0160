// torch_ext.cpp -- PyTorch binding of the low-bit GEMM kernels (runtime/torchtools/gemm_ext.py builds it JIT).
//
// Same kernels as the TensorRT plugin, so they can be tested and benchmarked without TensorRT.
// Built by torch.utils.cpp_extension with the C++ standard torch requires (17 or 20); the kernels stay C++14.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>

#include <tuple>

#include "lowbit_gemm.h"
#include "lowbit_host.h"
#include "qvit_lowbit_format.h"

namespace {

// Messages are built with std::to_string, never by streaming integers: with the H200 image's
// toolchain, TORCH_CHECK streaming an int64 into c10's ostringstream crashed (SIGSEGV in
// basic_ostream::_M_insert<long>, seen in the first GPU window); strings and devices are safe.
template <typename T>
std::string num(T v) {
  return std::to_string(v);
}

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
    default: TORCH_CHECK(false, "unsupported output dtype code " + num(code));
  }
}

// t is a contiguous CUDA tensor of `dtype` with `numel` elements on x's device.
void check_operand(const torch::Tensor& t, const torch::Tensor& x, torch::ScalarType dtype, int64_t numel,
                   const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), what, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, what, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(numel < 0 || t.numel() == numel, what, " must have " + num(numel) + " elements, got " + num(t.numel()));
}

// y[:, col_map] = QvitLowBitLinear(x2d[m, k]) over the n weight rows of w, with an explicit kernel id.
// y [m, ldy] is written in place (ldy = y.size(1)); col_map (int32 [n]) maps weight row -> y column.
void gemm_into(torch::Tensor y, const torch::Tensor& x2d, const torch::Tensor& w, const torch::Tensor& weight_scale,
               const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& col_map, int64_t bits,
               int64_t n, double act_scale, int64_t act_lo, int64_t act_hi, int64_t kernel,
               const c10::optional<torch::Tensor>& workspace) {
  TORCH_CHECK(x2d.is_cuda(), "x must be a CUDA tensor, got ", x2d.device());
  TORCH_CHECK(x2d.dim() == 2 && x2d.is_contiguous(), "x must be a contiguous [M, K] tensor");
  const int x_dtype = dtype_code(x2d);
  TORCH_CHECK(x_dtype == QVIT_DTYPE_F32 || x_dtype == QVIT_DTYPE_F16 || x_dtype == QVIT_DTYPE_I8,
              "x must be float32, float16 or int8 (act codes), got ", x2d.scalar_type());
  const int64_t m = x2d.size(0);
  const int64_t k = x2d.size(1);
  TORCH_CHECK(m <= INT32_MAX && k <= INT32_MAX && n <= INT32_MAX && n > 0, "problem too large or empty");
  const int rows = qvit_repacked_rows(static_cast<int>(n));
  // mma_int4 reads the nibble-order layout (qvit_repack_weights_nib), every other kernel the expand order.
  const int ldw = qvit_weight_words(static_cast<int>(k), static_cast<int>(bits), static_cast<int>(kernel));
  TORCH_CHECK(ldw > 0, "bits must be 2, 3 or 4, got " + num(bits));
  check_operand(w, x2d, torch::kInt32, -1, "w (repacked words)");
  const std::string want = "w must be repacked [" + num(rows) + ", " + num(ldw) + "] for N=" + num(n) + " K=" +
                           num(k) + " bits=" + num(bits);
  TORCH_CHECK(w.dim() == 2, want + ", got a " + num(w.dim()) + "-d tensor");
  TORCH_CHECK(w.size(0) == rows && w.size(1) == ldw, want + ", got [" + num(w.size(0)) + ", " + num(w.size(1)) + "]");
  check_operand(y, x2d, y.scalar_type(), -1, "y");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == m, "y must be [M, *]");
  const int64_t ldy = y.size(1);
  const int* map_ptr = nullptr;
  if (col_map.has_value() && col_map->defined()) {
    check_operand(*col_map, x2d, torch::kInt32, n, "col_map");
    map_ptr = col_map->data_ptr<int>();
  } else {
    TORCH_CHECK(ldy == n, "y must have N=" + num(n) + " columns without a col_map");
  }
  check_operand(weight_scale, x2d, torch::kFloat32, ldy, "weight_scale");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_operand(*bias, x2d, torch::kFloat32, ldy, "bias");
    bias_ptr = bias->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(x2d.device());
  const size_t ws_bytes = qvit_workspace_size(static_cast<int>(m), static_cast<int>(k), static_cast<int>(bits),
                                              static_cast<int>(kernel));
  torch::Tensor ws;
  if (ws_bytes > 0) {
    if (workspace.has_value() && workspace->defined() && static_cast<size_t>(workspace->numel()) >= ws_bytes) {
      check_operand(*workspace, x2d, torch::kUInt8, -1, "workspace");
      ws = *workspace;
    } else {
      ws = torch::empty({static_cast<int64_t>(ws_bytes)}, x2d.options().dtype(torch::kUInt8));
    }
  }
  qvit::LowBitGemmArgs a;
  a.m = static_cast<int>(m);
  a.n = static_cast<int>(n);
  a.k = static_cast<int>(k);
  a.bits = static_cast<int>(bits);
  a.x = x2d.data_ptr();
  a.x_dtype = x_dtype;
  a.y = y.data_ptr();
  a.y_dtype = dtype_code(y);
  a.w = reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>());
  a.ldw = ldw;
  a.col_map = map_ptr;
  a.ldy = static_cast<int>(ldy);
  a.weight_scale = weight_scale.data_ptr<float>();
  a.bias = bias_ptr;
  a.act_scale = static_cast<float>(act_scale);
  a.act_lo = static_cast<int>(act_lo);
  a.act_hi = static_cast<int>(act_hi);
  a.workspace = ws_bytes > 0 ? ws.data_ptr() : nullptr;
  a.workspace_bytes = ws_bytes;
  const cudaError_t err = qvit::lowbit_gemm(a, static_cast<int>(kernel), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, std::string("lowbit_gemm(") + qvit_kernel_name(static_cast<int>(kernel)) +
                                      ") failed: " + cudaGetErrorString(err) + " (m=" + num(m) + " n=" + num(n) +
                                      " k=" + num(k) + " bits=" + num(bits) + ")");
}

// Allocating form: y [M, N] of out_dtype.
torch::Tensor gemm(const torch::Tensor& x2d, const torch::Tensor& w, const torch::Tensor& weight_scale,
                   const c10::optional<torch::Tensor>& bias, int64_t bits, int64_t n, double act_scale,
                   int64_t act_lo, int64_t act_hi, int64_t kernel, int64_t out_dtype) {
  TORCH_CHECK(x2d.dim() == 2, "x must be [M, K]");
  torch::Tensor y = torch::empty({x2d.size(0), n}, x2d.options().dtype(scalar_of(out_dtype)));
  gemm_into(y, x2d, w, weight_scale, bias, c10::nullopt, bits, n, act_scale, act_lo, act_hi, kernel, c10::nullopt);
  return y;
}

int64_t select_kernel(int64_t m, int64_t n, int64_t k, int64_t bits, int64_t x_dtype, int64_t path, int64_t cc_major,
                      int64_t cc_minor, int64_t act_lo, int64_t act_hi) {
  return qvit_select_kernel_act(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(bits),
                                static_cast<int>(x_dtype), static_cast<int>(path), static_cast<int>(cc_major),
                                static_cast<int>(cc_minor), static_cast<int>(act_lo), static_cast<int>(act_hi));
}

// Fused LayerNorm + quantize (the producer side): (codes int8 [M, K], row_sum int32 [M]).
std::tuple<torch::Tensor, torch::Tensor> layernorm_quantize(const torch::Tensor& x2d, const torch::Tensor& gamma,
                                                            const torch::Tensor& beta, double eps, double act_scale,
                                                            int64_t act_lo, int64_t act_hi) {
  TORCH_CHECK(x2d.is_cuda() && x2d.dim() == 2 && x2d.is_contiguous(), "x must be a contiguous CUDA [M, K] tensor");
  const int x_dtype = dtype_code(x2d);
  TORCH_CHECK(x_dtype == QVIT_DTYPE_F32 || x_dtype == QVIT_DTYPE_F16, "x must be float32 or float16");
  const int64_t m = x2d.size(0);
  const int64_t k = x2d.size(1);
  TORCH_CHECK(m <= INT32_MAX && k > 0 && k % 4 == 0 && k <= INT32_MAX, "K must be a positive multiple of 4");
  check_operand(gamma, x2d, torch::kFloat32, k, "gamma");
  check_operand(beta, x2d, torch::kFloat32, k, "beta");
  const c10::cuda::CUDAGuard guard(x2d.device());
  torch::Tensor codes = torch::empty({m, k}, x2d.options().dtype(torch::kInt8));
  torch::Tensor sums = torch::empty({m}, x2d.options().dtype(torch::kInt32));
  qvit::LayerNormQuantArgs a;
  a.m = static_cast<int>(m);
  a.k = static_cast<int>(k);
  a.x = x2d.data_ptr();
  a.x_dtype = x_dtype;
  a.gamma = gamma.data_ptr<float>();
  a.beta = beta.data_ptr<float>();
  a.eps = static_cast<float>(eps);
  a.act_scale = static_cast<float>(act_scale);
  a.act_lo = static_cast<int>(act_lo);
  a.act_hi = static_cast<int>(act_hi);
  a.codes = codes.data_ptr<int8_t>();
  a.ldq = static_cast<int>(k);
  a.row_sum = sums.data_ptr<int>();
  const cudaError_t err = qvit::layernorm_quantize(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, std::string("layernorm_quantize failed: ") + cudaGetErrorString(err));
  return std::make_tuple(codes, sums);
}

int64_t workspace_size(int64_t m, int64_t k, int64_t bits, int64_t kernel) {
  return static_cast<int64_t>(qvit_workspace_size(static_cast<int>(m), static_cast<int>(k), static_cast<int>(bits),
                                                  static_cast<int>(kernel)));
}

std::string kernel_name(int64_t kernel) { return qvit_kernel_name(static_cast<int>(kernel)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qvit-edge packed 2/3/4-bit GEMM kernels (QvitLowBitLinear)";
  m.def("gemm", &gemm, "QvitLowBitLinear on [M, K] with an explicit kernel id");
  m.def("gemm_into", &gemm_into, "QvitLowBitLinear into a preallocated y (optional col_map, workspace)");
  m.def("layernorm_quantize", &layernorm_quantize, "fused LayerNorm + activation quantizer -> (int8 codes, row sums)");
  m.def("select_kernel", &select_kernel,
        "kernel id for (m, n, k, bits, x_dtype, path, cc_major, cc_minor, act_lo, act_hi)");
  m.def("workspace_size", &workspace_size, "workspace bytes for (m, k, bits, kernel)");
  m.def("kernel_name", &kernel_name, "short kernel name");
}
