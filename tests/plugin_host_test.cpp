// plugin_host_test.cpp -- runs the QvitLowBitLinear plugin front-ends on the CPU (tests/test_plugin_host.py).
//
// Built against the TensorRT API shim (tests/trt_api_subset, -DQVIT_SHIM_TRT_MAJOR=8 for the
// IPluginV2DynamicExt front-end, =10 for IPluginV3) with the plugin core and:
//   * a fake plugin registry and expression builder (what libnvinfer would provide),
//   * a fake CUDA runtime (host memory, compute capability 8.7) and a recording lowbit_gemm,
// so creator, fields, serialization, type/shape rules, clone and the enqueue dispatch run for real.
// Prints one JSON object of checks: {"name": true/false, ...} plus a few values.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "lowbit_gemm.h"
#include "lowbit_host.h"
#include "qvit_lowbit_format.h"
#if QVIT_SHIM_TRT_MAJOR >= 10
#include "qvit_lowbit_plugin_v3.h"
#else
#include "qvit_lowbit_plugin.h"
#endif

// ------------------------------------------------------------------ fakes: TensorRT

namespace {
struct FakeExpr : nvinfer1::IDimensionExpr {
  int64_t value = -1;
};
std::vector<FakeExpr*> g_exprs;

#if QVIT_SHIM_TRT_MAJOR >= 10
using Creator = nvinfer1::IPluginCreatorInterface;
#else
using Creator = nvinfer1::IPluginCreator;
#endif
struct FakeRegistry : nvinfer1::IPluginRegistry {
  std::vector<Creator*> creators;
  bool registerCreator(Creator& c, nvinfer1::AsciiChar const*) noexcept override {
    creators.push_back(&c);
    return true;
  }
};
FakeRegistry& registry() {
  static FakeRegistry r;
  return r;
}
}  // namespace

extern "C" nvinfer1::IPluginRegistry* getPluginRegistry() noexcept { return &registry(); }

namespace nvinfer1 {
bool IDimensionExpr::isConstant() const noexcept { return static_cast<FakeExpr const*>(this)->value >= 0; }
IDimensionExpr const* IExprBuilder::constant(QvitDimConst value) noexcept {
  FakeExpr* e = new FakeExpr();
  e->value = value;
  g_exprs.push_back(e);
  return e;
}
IDimensionExpr const* IExprBuilder::operation(DimensionOperation, IDimensionExpr const&,
                                              IDimensionExpr const&) noexcept {
  return constant(-1);
}
}  // namespace nvinfer1

namespace {
struct FakeBuilder : nvinfer1::IExprBuilder {};
}  // namespace

// ------------------------------------------------------------------ fakes: CUDA runtime + kernels

namespace {
int g_mallocs = 0;
int g_memcpys = 0;
// Set while onShapeChange / enqueue run: any cudaMalloc / cudaMemcpy then is a call that a CUDA
// graph capture would reject (counted, checked to stay 0).
bool g_in_hot_path = false;
int g_hot_path_calls = 0;
std::map<void*, size_t> g_live;
int g_cc_major = 8, g_cc_minor = 7;  // Orin unless a check says otherwise
struct Call {
  int m, n, k, bits, x_dtype, y_dtype, ldy, kernel, ldw;
  std::vector<int> col_map;
};
std::vector<Call> g_calls;
}  // namespace

extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? g_cc_major : g_cc_minor;
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  g_live[*p] = bytes;
  ++g_mallocs;
  g_hot_path_calls += g_in_hot_path;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (p != nullptr) {
    g_live.erase(p);
    std::free(p);
  }
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  ++g_memcpys;
  g_hot_path_calls += g_in_hot_path;
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t) { return "fake cuda error"; }
}

namespace qvit {
cudaError_t lowbit_gemm(const LowBitGemmArgs& a, int kernel, cudaStream_t) {
  Call c{a.m, a.n, a.k, a.bits, a.x_dtype, a.y_dtype, a.ldy, kernel, a.ldw, {}};
  if (a.col_map != nullptr) c.col_map.assign(a.col_map, a.col_map + a.n);
  g_calls.push_back(c);
  return cudaSuccess;
}
}  // namespace qvit

// ------------------------------------------------------------------ the node under test

namespace {
std::vector<std::pair<std::string, std::string>> g_results;

void check(const std::string& name, bool ok) { g_results.emplace_back(name, ok ? "true" : "false"); }
void value(const std::string& name, long long v) { g_results.emplace_back(name, std::to_string(v)); }

// A mixed node as the ONNX parser hands it over: N = 10 rows in groups of 4 at 4 / 2 / 3 bits, K = 70.
struct Node {
  int32_t bits = 4, k = 70, n = 10, lo = -100, hi = 27, act_bits = 7, group_size = 4;
  float act_scale = 0.05f;
  std::vector<int32_t> group_bits{4, 2, 3};
  std::vector<int32_t> packed;
  std::vector<float> scale, bias;
  std::vector<nvinfer1::PluginField> fields;

  explicit Node(bool mixed) {
    if (!mixed) group_size = 0;
    for (int r = 0; r < n; ++r) {
      const int b = mixed ? group_bits[static_cast<size_t>(r / group_size)] : bits;
      for (int w = 0; w < qvit::packed_words(k, b); ++w) packed.push_back(static_cast<int32_t>(0x9E3779B9u * (r + 1) + w));
      scale.push_back(0.01f * (r + 1));
      bias.push_back(0.5f * r);
    }
    using T = nvinfer1::PluginFieldType;
    fields = {{"bits", &bits, T::kINT32, 1},
              {"in_features", &k, T::kINT32, 1},
              {"out_features", &n, T::kINT32, 1},
              {"weight_packed", packed.data(), T::kINT32, static_cast<int32_t>(packed.size())},
              {"weight_scale", scale.data(), T::kFLOAT32, n},
              {"bias", bias.data(), T::kFLOAT32, n},
              {"act_scale", &act_scale, T::kFLOAT32, 1},
              {"act_lo", &lo, T::kINT32, 1},
              {"act_hi", &hi, T::kINT32, 1},
              {"act_bits", &act_bits, T::kINT32, 1},
              {"plugin_version", "1", T::kCHAR, 1},
              {"plugin_namespace", "", T::kCHAR, 0}};
    if (mixed) {
      fields.push_back({"group_size", &group_size, T::kINT32, 1});
      fields.push_back({"group_bits", group_bits.data(), T::kINT32, static_cast<int32_t>(group_bits.size())});
    }
  }
  nvinfer1::PluginFieldCollection collection() const {
    return nvinfer1::PluginFieldCollection{static_cast<int32_t>(fields.size()), fields.data()};
  }
};

nvinfer1::PluginTensorDesc desc(nvinfer1::DataType t, std::vector<int> dims,
                                nvinfer1::TensorFormat f = nvinfer1::TensorFormat::kLINEAR) {
  nvinfer1::PluginTensorDesc d{};
  d.dims.nbDims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) d.dims.d[i] = dims[i];
  d.type = t;
  d.format = f;
  d.scale = 1.0f;
  return d;
}

// Rows of the mixed node at `bits`, i.e. what each launch's col_map must list.
std::vector<int> rows_at(const Node& node, int bits) {
  std::vector<int> r;
  for (int i = 0; i < node.n; ++i) {
    if (node.group_bits[static_cast<size_t>(i / node.group_size)] == bits) r.push_back(i);
  }
  return r;
}

void check_dispatch(const Node& node, const std::string& tag) {
  // M = 197: one launch per width (2, 3, 4), rows through col_map, y stride N, mma.sync on sm_87.
  bool ok = g_calls.size() == 3;
  for (size_t i = 0; ok && i < 3; ++i) {
    const Call& c = g_calls[i];
    ok = c.bits == static_cast<int>(i) + 2 && c.m == 2 * 197 && c.k == node.k && c.ldy == node.n &&
         c.col_map == rows_at(node, c.bits) && c.n == static_cast<int>(c.col_map.size()) &&
         c.kernel == QVIT_KERNEL_MMA_SYNC && c.x_dtype == QVIT_DTYPE_F16 && c.y_dtype == QVIT_DTYPE_F16;
  }
  check(tag + "_dispatch_mixed_m197", ok);
}
}  // namespace

#if QVIT_SHIM_TRT_MAJOR >= 10
// ------------------------------------------------------------------ IPluginV3

int main() {
  check("registered_one_creator", registry().creators.size() == 1);
  auto* creator = dynamic_cast<nvinfer1::IPluginCreatorV3One*>(registry().creators.at(0));
  check("creator_identity", creator != nullptr && std::strcmp(creator->getPluginName(), "QvitLowBitLinear") == 0 &&
                                std::strcmp(creator->getPluginVersion(), "1") == 0 &&
                                std::strcmp(creator->getPluginNamespace(), "") == 0);
  const nvinfer1::PluginFieldCollection* names = creator->getFieldNames();
  check("field_names", names->nbFields == qvit::kNumLowbitAttrs &&
                           std::strcmp(names->fields[qvit::kAttrWeightScale].name, "weight_scale") == 0 &&
                           names->fields[qvit::kAttrWeightScale].type == nvinfer1::PluginFieldType::kFLOAT32);
  Node node(true);
  nvinfer1::PluginFieldCollection fc = node.collection();
  nvinfer1::IPluginV3* plugin = creator->createPlugin("qkv", &fc, nvinfer1::TensorRTPhase::kBUILD);
  check("create_from_parser_fields", plugin != nullptr);
  auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
  auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
  auto* run = static_cast<nvinfer1::IPluginV3OneRuntime*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  check("capabilities", core != nullptr && build != nullptr && run != nullptr &&
                            std::strcmp(core->getPluginName(), "QvitLowBitLinear") == 0);

  // INT64 / FLOAT64 fields (what a newer parser may hand over) give the same plugin.
  std::vector<int64_t> packed64(node.packed.begin(), node.packed.end());
  std::vector<double> scale64(node.scale.begin(), node.scale.end());
  Node alt(true);
  alt.fields[qvit::kAttrWeightPacked] = {"weight_packed", packed64.data(), nvinfer1::PluginFieldType::kINT64,
                                         static_cast<int32_t>(packed64.size())};
  alt.fields[qvit::kAttrWeightScale] = {"weight_scale", scale64.data(), nvinfer1::PluginFieldType::kFLOAT64, alt.n};
  nvinfer1::PluginFieldCollection afc = alt.collection();
  nvinfer1::IPluginV3* alt_plugin = creator->createPlugin("qkv", &afc, nvinfer1::TensorRTPhase::kBUILD);
  check("create_from_int64_float64_fields", alt_plugin != nullptr);

  // Bad fields: a missing one, inconsistent groups -> nullptr (one logged line), never a throw.
  Node bad(true);
  bad.fields.erase(bad.fields.begin() + qvit::kAttrActScale);
  nvinfer1::PluginFieldCollection bfc = bad.collection();
  check("missing_field_rejected", creator->createPlugin("x", &bfc, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
  Node bad2(true);
  bad2.group_bits[1] = 5;
  nvinfer1::PluginFieldCollection b2 = bad2.collection();
  check("bad_group_bits_rejected", creator->createPlugin("x", &b2, nvinfer1::TensorRTPhase::kBUILD) == nullptr);

  // Serialization is TensorRT's: fields out -> createPlugin(kRUNTIME) -> the same fields.
  const nvinfer1::PluginFieldCollection* sfc = run->getFieldsToSerialize();
  nvinfer1::IPluginV3* again = creator->createPlugin("qkv", sfc, nvinfer1::TensorRTPhase::kRUNTIME);
  bool same = again != nullptr;
  if (same) {
    auto* run2 = static_cast<nvinfer1::IPluginV3OneRuntime*>(again->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    const nvinfer1::PluginFieldCollection* s2 = run2->getFieldsToSerialize();
    same = s2->nbFields == sfc->nbFields;
    for (int i = 0; same && i < sfc->nbFields; ++i) {
      const nvinfer1::PluginField &a = sfc->fields[i], &b = s2->fields[i];
      const size_t elem = a.type == nvinfer1::PluginFieldType::kCHAR ? 1 : 4;
      same = std::strcmp(a.name, b.name) == 0 && a.type == b.type && a.length == b.length &&
             std::memcmp(a.data, b.data, elem * static_cast<size_t>(a.length)) == 0;
    }
  }
  check("serialize_round_trip", same);
  value("serialized_fields", sfc->nbFields);

  // Types: fp32 -> fp32, fp16 -> fp16; int8 and non-linear formats are not offered.
  using DT = nvinfer1::DataType;
  auto dyn = [](nvinfer1::PluginTensorDesc d) {
    nvinfer1::DynamicPluginTensorDesc x{};
    x.desc = d;
    x.min = x.max = x.opt = d.dims;
    return x;
  };
  auto combo = [&](DT in, DT out, nvinfer1::TensorFormat f) {
    nvinfer1::DynamicPluginTensorDesc io[2] = {dyn(desc(in, {2, 197, 70}, f)), dyn(desc(out, {2, 197, 10}))};
    return build->supportsFormatCombination(0, io, 1, 1) && build->supportsFormatCombination(1, io, 1, 1);
  };
  check("formats", combo(DT::kFLOAT, DT::kFLOAT, nvinfer1::TensorFormat::kLINEAR) &&
                       combo(DT::kHALF, DT::kHALF, nvinfer1::TensorFormat::kLINEAR) &&
                       !combo(DT::kHALF, DT::kFLOAT, nvinfer1::TensorFormat::kLINEAR) &&
                       !combo(DT::kINT8, DT::kFLOAT, nvinfer1::TensorFormat::kLINEAR) &&
                       !combo(DT::kFLOAT, DT::kFLOAT, nvinfer1::TensorFormat::kCHW4));
  DT out_type = DT::kFLOAT;
  const DT in_half = DT::kHALF;
  check("output_type_follows_input", build->getOutputDataTypes(&out_type, 1, &in_half, 1) == 0 && out_type == DT::kHALF);

  // Shapes: [B, T, K] -> [B, T, N].
  FakeBuilder eb;
  nvinfer1::DimsExprs in{};
  in.nbDims = 3;
  in.d[0] = eb.constant(2);
  in.d[1] = eb.constant(197);
  in.d[2] = eb.constant(70);
  nvinfer1::DimsExprs out{};
  const int32_t rc = build->getOutputShapes(&in, 1, nullptr, 0, &out, 1, eb);
  check("output_shape", rc == 0 && out.nbDims == 3 && out.d[1] == in.d[1] &&
                            static_cast<FakeExpr const*>(out.d[2])->value == node.n);

  // Workspace for the profile's largest shape.
  nvinfer1::DynamicPluginTensorDesc din = dyn(desc(DT::kHALF, {2, 197, 70}));
  nvinfer1::DynamicPluginTensorDesc dout = dyn(desc(DT::kHALF, {2, 197, 10}));
  const size_t ws = build->getWorkspaceSize(&din, 1, &dout, 1);
  check("workspace_covers_mma", ws >= qvit_workspace_size(2 * 197, node.k, 4, QVIT_KERNEL_MMA_SYNC));
  nvinfer1::PluginTensorDesc tin = desc(DT::kHALF, {2, 197, 70}), tout = desc(DT::kHALF, {2, 197, 10});
  std::vector<char> buf(1 << 16);
  const void* ins[1] = {buf.data()};
  void* outs[1] = {buf.data()};

  // Build phase: a build-phase plugin has no device weights until configurePlugin; onShapeChange
  // and enqueue never create them (they fail instead, allocating nothing).
  const int before = g_mallocs;
  g_in_hot_path = true;
  check("enqueue_before_weights_fails", run->enqueue(&tin, &tout, ins, outs, buf.data(), nullptr) != 0);
  check("shape_change_before_weights_fails", run->onShapeChange(&tin, 1, &tout, 1) != 0);
  g_in_hot_path = false;
  check("enqueue_before_shape_change_fails", g_mallocs == before);
  nvinfer1::IPluginV3* early_clone = plugin->clone();  // cloned before configurePlugin: shares the slot
  check("configure_creates_weights", build->configurePlugin(&din, 1, &dout, 1) == 0 && g_mallocs > before);
  const int build_allocs = g_mallocs;
  check("configure_twice_allocates_nothing", build->configurePlugin(&din, 1, &dout, 1) == 0 && g_mallocs == build_allocs);
  const int copies = g_memcpys;
  g_in_hot_path = true;
  check("on_shape_change", run->onShapeChange(&tin, 1, &tout, 1) == 0);
  g_calls.clear();
  check("enqueue", run->enqueue(&tin, &tout, ins, outs, buf.data(), nullptr) == 0);
  check_dispatch(node, "v3");
  nvinfer1::IPluginV3* clone = plugin->clone();
  auto* crun = static_cast<nvinfer1::IPluginV3OneRuntime*>(clone->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  g_calls.clear();
  check("clone_shares_device_weights", crun->onShapeChange(&tin, 1, &tout, 1) == 0 &&
                                           crun->enqueue(&tin, &tout, ins, outs, buf.data(), nullptr) == 0 &&
                                           g_calls.size() == 3);
  nvinfer1::PluginTensorDesc one = desc(DT::kFLOAT, {1, 70}), one_out = desc(DT::kFLOAT, {1, 10});
  g_calls.clear();
  check("m1_uses_gemv", run->onShapeChange(&one, 1, &one_out, 1) == 0 &&
                            run->enqueue(&one, &one_out, ins, outs, buf.data(), nullptr) == 0 && g_calls.size() == 3 &&
                            g_calls[0].kernel == QVIT_KERNEL_GEMV_DP4A);
  auto* erun = static_cast<nvinfer1::IPluginV3OneRuntime*>(early_clone->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  nvinfer1::IPluginV3* early_ctx = erun->attachToContext(nullptr);  // the early clone sees the same weights
  g_in_hot_path = false;
  check("early_clone_shares_device_weights", early_ctx != nullptr && g_mallocs == build_allocs);
  check("no_alloc_or_copy_in_shape_change_or_enqueue", g_hot_path_calls == 0 && g_mallocs == build_allocs &&
                                                           g_memcpys == copies);

  // Runtime phase (deserialization): the weights are created once in createPlugin(kRUNTIME);
  // every execution context's attachToContext clone shares them and allocates nothing.
  const int before_runtime = g_mallocs;
  nvinfer1::IPluginV3* engine_layer = creator->createPlugin("qkv", sfc, nvinfer1::TensorRTPhase::kRUNTIME);
  const int runtime_allocs = g_mallocs;
  check("deserialize_creates_weights_once", engine_layer != nullptr && runtime_allocs > before_runtime);
  auto* lrun = static_cast<nvinfer1::IPluginV3OneRuntime*>(engine_layer->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  std::vector<nvinfer1::IPluginV3*> contexts;
  for (int c = 0; c < 3; ++c) contexts.push_back(lrun->attachToContext(nullptr));
  bool ctx_ok = g_mallocs == runtime_allocs;
  g_in_hot_path = true;
  for (nvinfer1::IPluginV3* ctx : contexts) {
    auto* r = ctx != nullptr ? static_cast<nvinfer1::IPluginV3OneRuntime*>(ctx->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME)) : nullptr;
    g_calls.clear();
    ctx_ok = ctx_ok && r != nullptr && r->onShapeChange(&tin, 1, &tout, 1) == 0 &&
             r->enqueue(&tin, &tout, ins, outs, buf.data(), nullptr) == 0 && g_calls.size() == 3;
  }
  g_in_hot_path = false;
  check("contexts_share_engine_weights", ctx_ok && g_mallocs == runtime_allocs && g_hot_path_calls == 0);
  value("device_allocations_per_engine_layer", runtime_allocs - before_runtime);
  const size_t live_with_engine = g_live.size();
  for (nvinfer1::IPluginV3* ctx : contexts) delete ctx;
  delete engine_layer;
  check("weights_freed_with_last_owner", g_live.size() < live_with_engine);

  // The serialized fields carry a format version; a version this plugin cannot read is refused.
  const nvinfer1::PluginField* vf = nullptr;
  for (int i = 0; i < sfc->nbFields; ++i) {
    if (std::strcmp(sfc->fields[i].name, "qvit_fields_version") == 0) vf = &sfc->fields[i];
  }
  check("fields_carry_version", vf != nullptr && vf->type == nvinfer1::PluginFieldType::kINT32 &&
                                    *static_cast<const int32_t*>(vf->data) == 1);
  std::vector<nvinfer1::PluginField> vfields(sfc->fields, sfc->fields + sfc->nbFields);
  auto with_version = [&](const int32_t* v) {
    std::vector<nvinfer1::PluginField> f;
    for (const nvinfer1::PluginField& x : vfields) {
      if (std::strcmp(x.name, "qvit_fields_version") != 0) f.push_back(x);
    }
    if (v != nullptr) f.push_back({"qvit_fields_version", v, nvinfer1::PluginFieldType::kINT32, 1});
    nvinfer1::PluginFieldCollection c{static_cast<int32_t>(f.size()), f.data()};
    nvinfer1::IPluginV3* p = creator->createPlugin("qkv", &c, nvinfer1::TensorRTPhase::kRUNTIME);
    const bool made = p != nullptr;
    delete p;
    return made;
  };
  const int32_t v0 = 0, v1 = 1, v2 = 2;
  check("fields_version_checked", with_version(&v1) && !with_version(&v2) && !with_version(&v0));
  check("unversioned_fields_read_as_version_1", with_version(nullptr));

  // Hostile sizes: rejected before any size arithmetic or allocation (no overflow, no 8 GB bias).
  const int32_t huge = 2147483647, neg = -5;
  auto hostile = [&](int attr, const int32_t* v) {
    Node h(false);
    h.fields[static_cast<size_t>(attr)].data = v;
    nvinfer1::PluginFieldCollection c = h.collection();
    const int allocs = g_mallocs;
    nvinfer1::IPluginV3* p = creator->createPlugin("h", &c, nvinfer1::TensorRTPhase::kBUILD);
    const bool refused = p == nullptr && g_mallocs == allocs;
    delete p;
    return refused;
  };
  check("hostile_sizes_rejected", hostile(qvit::kAttrInFeatures, &huge) && hostile(qvit::kAttrOutFeatures, &huge) &&
                                      hostile(qvit::kAttrInFeatures, &neg) && hostile(qvit::kAttrOutFeatures, &neg));
  Node hb(false);
  hb.fields.erase(hb.fields.begin() + qvit::kAttrBias);  // bias defaults to out_features zeros...
  hb.fields[qvit::kAttrOutFeatures].data = &huge;         // ...which must not be sized by a hostile value
  nvinfer1::PluginFieldCollection hbc = hb.collection();
  check("hostile_out_features_without_bias_rejected",
        creator->createPlugin("h", &hbc, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
  Node hg(true);
  hg.group_size = huge;
  nvinfer1::PluginFieldCollection hgc = hg.collection();
  check("hostile_group_size_rejected", creator->createPlugin("h", &hgc, nvinfer1::TensorRTPhase::kBUILD) == nullptr);

  // A4 grid ([-8, 7]) on Orin: the INT4 tensor-core kernel on the nibble-order weights (built once
  // with the others); on Hopper (INT4 emulated) and for M <= 16 the int8 kernels.
  auto int4_dispatch = [&](int cc_major, int cc_minor, int m) {
    g_cc_major = cc_major;
    g_cc_minor = cc_minor;
    Node a4(true);
    a4.lo = -8;
    a4.hi = 7;
    a4.act_bits = 4;
    nvinfer1::PluginFieldCollection c = a4.collection();
    nvinfer1::IPluginV3* p = creator->createPlugin("a4", &c, nvinfer1::TensorRTPhase::kBUILD);
    auto* b = static_cast<nvinfer1::IPluginV3OneBuild*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
    auto* r = static_cast<nvinfer1::IPluginV3OneRuntime*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    nvinfer1::PluginTensorDesc i4 = desc(DT::kHALF, {m, 70}), o4 = desc(DT::kHALF, {m, 10});
    g_calls.clear();
    const bool ran = b->configurePlugin(&din, 1, &dout, 1) == 0 && r->onShapeChange(&i4, 1, &o4, 1) == 0 &&
                     r->enqueue(&i4, &o4, ins, outs, buf.data(), nullptr) == 0 && g_calls.size() == 3;
    std::vector<Call> calls = g_calls;
    delete p;
    g_cc_major = 8;
    g_cc_minor = 7;
    return ran ? calls : std::vector<Call>();
  };
  // auto keeps mma_sync until INT4 is measured on a GPU (QVIT_AUTO_INT4=0); QVIT_LOWBIT_PATH=a4 opts in
  const std::vector<Call> orin_auto = int4_dispatch(8, 7, 197);
  check("a4_grid_on_orin_auto_keeps_mma_sync", orin_auto.size() == 3 && orin_auto[0].kernel == QVIT_KERNEL_MMA_SYNC);
  setenv("QVIT_LOWBIT_PATH", "a4", 1);
  const std::vector<Call> orin_a4 = int4_dispatch(8, 7, 197);
  unsetenv("QVIT_LOWBIT_PATH");
  bool int4_ok = orin_a4.size() == 3;
  for (const Call& c : orin_a4) {
    int4_ok = int4_ok && c.kernel == QVIT_KERNEL_MMA_INT4 && c.ldw == qvit_nib_words(70, c.bits);
  }
  check("a4_path_on_orin_uses_int4_tensor_cores", int4_ok);
  const std::vector<Call> hopper = int4_dispatch(9, 0, 197);
  check("a4_grid_on_hopper_keeps_mma_sync", hopper.size() == 3 && hopper[0].kernel == QVIT_KERNEL_MMA_SYNC &&
                                                hopper[0].ldw == qvit_repacked_words(70, hopper[0].bits));
  const std::vector<Call> small = int4_dispatch(8, 7, 4);
  check("a4_grid_small_m_uses_gemv", small.size() == 3 && small[0].kernel == QVIT_KERNEL_GEMV_DP4A);

  delete early_ctx;
  delete early_clone;
  delete clone;
  delete again;
  delete alt_plugin;
  delete plugin;
  check("no_leaks", g_live.empty());
#else
// ------------------------------------------------------------------ IPluginV2DynamicExt

int main() {
  QVIT_TRT_SUPPRESS_DEPRECATION_BEGIN
  check("registered_one_creator", registry().creators.size() == 1);
  nvinfer1::IPluginCreator* creator = registry().creators.at(0);
  check("creator_identity", std::strcmp(creator->getPluginName(), "QvitLowBitLinear") == 0 &&
                                std::strcmp(creator->getPluginVersion(), "1") == 0);
  Node node(true);
  nvinfer1::PluginFieldCollection fc = node.collection();
  auto* plugin = static_cast<nvinfer1::IPluginV2DynamicExt*>(creator->createPlugin("qkv", &fc));
  check("create_from_parser_fields", plugin != nullptr);
  Node bad(true);
  bad.fields.erase(bad.fields.begin() + qvit::kAttrWeightPacked);
  nvinfer1::PluginFieldCollection bfc = bad.collection();
  check("missing_field_rejected", creator->createPlugin("x", &bfc) == nullptr);

  std::vector<char> blob(plugin->getSerializationSize());
  plugin->serialize(blob.data());
  auto* again = static_cast<nvinfer1::IPluginV2DynamicExt*>(creator->deserializePlugin("qkv", blob.data(), blob.size()));
  std::vector<char> blob2(again != nullptr ? again->getSerializationSize() : 0);
  if (again != nullptr) again->serialize(blob2.data());
  check("serialize_round_trip", again != nullptr && blob == blob2);
  check("truncated_blob_rejected", creator->deserializePlugin("qkv", blob.data(), blob.size() - 3) == nullptr);
  value("blob_bytes", static_cast<long long>(blob.size()));

  // A version-1 blob (uniform layer, written by the previous plugin) still deserializes.
  Node uni(false);
  nvinfer1::PluginFieldCollection ufc = uni.collection();
  auto* u = creator->createPlugin("fc", &ufc);
  std::vector<char> v2(u->getSerializationSize());
  u->serialize(v2.data());
  std::vector<char> v1(v2.begin(), v2.end() - 8);  // drop group_size + empty group_bits
  const uint32_t one = 1;
  std::memcpy(v1.data() + 4, &one, 4);
  auto* old = creator->deserializePlugin("fc", v1.data(), v1.size());
  check("version1_blob_accepted", old != nullptr);

  using DT = nvinfer1::DataType;
  auto combo = [&](DT in, DT out, nvinfer1::TensorFormat f) {
    nvinfer1::PluginTensorDesc io[2] = {desc(in, {2, 197, 70}, f), desc(out, {2, 197, 10})};
    return plugin->supportsFormatCombination(0, io, 1, 1) && plugin->supportsFormatCombination(1, io, 1, 1);
  };
  check("formats", combo(DT::kFLOAT, DT::kFLOAT, nvinfer1::TensorFormat::kLINEAR) &&
                       combo(DT::kHALF, DT::kHALF, nvinfer1::TensorFormat::kLINEAR) &&
                       !combo(DT::kHALF, DT::kFLOAT, nvinfer1::TensorFormat::kLINEAR) &&
                       !combo(DT::kINT8, DT::kFLOAT, nvinfer1::TensorFormat::kLINEAR) &&
                       !combo(DT::kFLOAT, DT::kFLOAT, nvinfer1::TensorFormat::kCHW4));
  const DT half = DT::kHALF;
  check("output_type_follows_input", plugin->getOutputDataType(0, &half, 1) == DT::kHALF);
  FakeBuilder eb;
  nvinfer1::DimsExprs in{};
  in.nbDims = 3;
  in.d[0] = eb.constant(2);
  in.d[1] = eb.constant(197);
  in.d[2] = eb.constant(70);
  nvinfer1::DimsExprs out = plugin->getOutputDimensions(0, &in, 1, eb);
  check("output_shape", out.nbDims == 3 && out.d[1] == in.d[1] && static_cast<FakeExpr const*>(out.d[2])->value == node.n);

  nvinfer1::PluginTensorDesc tin = desc(DT::kHALF, {2, 197, 70}), tout = desc(DT::kHALF, {2, 197, 10});
  check("workspace_covers_mma", plugin->getWorkspaceSize(&tin, 1, &tout, 1) >=
                                    qvit_workspace_size(2 * 197, node.k, 4, QVIT_KERNEL_MMA_SYNC));
  std::vector<char> buf(1 << 16);
  const void* ins[1] = {buf.data()};
  void* outs[1] = {buf.data()};
  const int before = g_mallocs;
  check("enqueue_before_initialize_fails", plugin->enqueue(&tin, &tout, ins, outs, buf.data(), nullptr) != 0 &&
                                               g_mallocs == before);
  check("initialize", plugin->initialize() == 0);
  g_calls.clear();
  check("enqueue", plugin->enqueue(&tin, &tout, ins, outs, buf.data(), nullptr) == 0);
  check_dispatch(node, "v2");
  nvinfer1::IPluginV2DynamicExt* clone = plugin->clone();
  g_calls.clear();
  const int allocs = g_mallocs;
  check("clone_shares_device_weights", clone->enqueue(&tin, &tout, ins, outs, buf.data(), nullptr) == 0 &&
                                           g_calls.size() == 3 && g_mallocs == allocs);
  nvinfer1::PluginTensorDesc one_in = desc(DT::kFLOAT, {1, 70}), one_out = desc(DT::kFLOAT, {1, 10});
  g_calls.clear();
  check("m1_uses_gemv", plugin->enqueue(&one_in, &one_out, ins, outs, buf.data(), nullptr) == 0 &&
                            g_calls.size() == 3 && g_calls[0].kernel == QVIT_KERNEL_GEMV_DP4A);
  clone->destroy();
  plugin->terminate();
  plugin->destroy();
  again->destroy();
  u->destroy();
  old->destroy();
  check("no_leaks", g_live.empty());
  QVIT_TRT_SUPPRESS_DEPRECATION_END
#endif
  std::printf("{");
  for (size_t i = 0; i < g_results.size(); ++i) {
    std::printf("%s\"%s\": %s", i ? ", " : "", g_results[i].first.c_str(), g_results[i].second.c_str());
  }
  std::printf("}\n");
  for (FakeExpr* e : g_exprs) delete e;
  return 0;
}
