// qvit_lowbit_device.cpp -- LowBitLinearRunner: device weights and the enqueue dispatch (CUDA runtime only).
//
// Everything allocating or copying happens in create() (TensorRT: initialize() / the V3 runtime
// phase), never in enqueue(), so an enqueue may be captured into a CUDA graph.
#include <cuda_runtime_api.h>

#include "lowbit_gemm.h"
#include "lowbit_host.h"
#include "qvit_lowbit_core.h"

namespace qvit {

namespace {

bool ok(cudaError_t err, const char* what, std::string* error) {
  if (err == cudaSuccess) return true;
  if (error != nullptr) *error = std::string(what) + ": " + cudaGetErrorString(err);
  return false;
}

template <typename T>
bool upload(T** dst, const T* src, size_t count, const char* what, std::string* error) {
  const size_t bytes = count * sizeof(T);
  return ok(cudaMalloc(reinterpret_cast<void**>(dst), bytes), what, error) &&
         ok(cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice), what, error);
}

}  // namespace

std::shared_ptr<LowBitLinearRunner> LowBitLinearRunner::create(const LowBitLinearParams& p, std::string* error) {
  std::shared_ptr<LowBitLinearRunner> r(new LowBitLinearRunner());
  int dev = 0;
  if (!ok(cudaGetDevice(&dev), "cudaGetDevice", error) ||
      !ok(cudaDeviceGetAttribute(&r->cc_major_, cudaDevAttrComputeCapabilityMajor, dev), "cc", error) ||
      !ok(cudaDeviceGetAttribute(&r->cc_minor_, cudaDevAttrComputeCapabilityMinor, dev), "cc", error)) {
    return nullptr;
  }
  std::vector<HostSegment> host;
  try {
    host = build_segments(p, int4_worthwhile(p, r->cc_major_));
  } catch (const std::exception& e) {
    if (error != nullptr) *error = e.what();
    return nullptr;
  }
  for (const HostSegment& h : host) {
    Segment s;
    s.bits = h.bits;
    s.rows = h.rows;
    s.ldw = qvit_repacked_words(p.in_features, h.bits);
    r->segments_.push_back(s);  // owned by r from here on: freed by its destructor on failure too
    Segment& d = r->segments_.back();
    if (!upload(&d.w, h.words.data(), h.words.size(), "weights", error)) return nullptr;
    if (!h.nib_words.empty()) {
      d.ldw_nib = qvit_nib_words(p.in_features, h.bits);
      if (!upload(&d.w_nib, h.nib_words.data(), h.nib_words.size(), "int4 weights", error)) return nullptr;
    }
    if (!h.col_map.empty() && !upload(&d.col_map, h.col_map.data(), h.col_map.size(), "col_map", error)) {
      return nullptr;
    }
  }
  const size_t n = static_cast<size_t>(p.out_features);
  if (!upload(&r->weight_scale_, p.weight_scale.data(), n, "weight_scale", error) ||
      !upload(&r->bias_, p.bias.data(), n, "bias", error)) {
    return nullptr;
  }
  return r;
}

LowBitLinearRunner::~LowBitLinearRunner() {
  for (Segment& s : segments_) {
    cudaFree(s.w);
    cudaFree(s.w_nib);
    cudaFree(s.col_map);
  }
  cudaFree(weight_scale_);
  cudaFree(bias_);
}

int LowBitLinearRunner::enqueue(const LowBitLinearParams& p, int64_t m, const void* x, int x_dtype, void* y,
                                int y_dtype, void* workspace, size_t workspace_size, void* stream, int path,
                                std::string* error) const {
  if (m < 0 || m > INT32_MAX) {
    if (error != nullptr) *error = "rows out of range";
    return -1;
  }
  for (const Segment& s : segments_) {
    int kernel = qvit_select_kernel_act(static_cast<int>(m), s.rows, p.in_features, s.bits, x_dtype, path, cc_major_,
                                        cc_minor_, p.act_lo, p.act_hi);
    if (kernel == QVIT_KERNEL_MMA_INT4 && s.w_nib == nullptr) kernel = QVIT_KERNEL_INVALID;  // not built: refuse
    LowBitGemmArgs a;
    a.m = static_cast<int>(m);
    a.n = s.rows;
    a.k = p.in_features;
    a.bits = s.bits;
    a.x = x;
    a.x_dtype = x_dtype;
    a.y = y;
    a.y_dtype = y_dtype;
    const bool nib = kernel == QVIT_KERNEL_MMA_INT4;
    a.w = nib ? s.w_nib : s.w;
    a.ldw = nib ? s.ldw_nib : s.ldw;
    a.col_map = s.col_map;
    a.ldy = p.out_features;
    a.weight_scale = weight_scale_;
    a.bias = bias_;
    a.act_scale = p.act_scale;
    a.act_lo = p.act_lo;
    a.act_hi = p.act_hi;
    a.workspace = workspace;
    a.workspace_bytes = workspace_size;
    if (!ok(lowbit_gemm(a, kernel, static_cast<cudaStream_t>(stream)), qvit_kernel_name(kernel), error)) return -1;
  }
  return 0;
}

}  // namespace qvit
