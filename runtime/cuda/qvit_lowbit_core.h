// qvit_lowbit_core.h -- everything the QvitLowBitLinear plugin does that does not depend on TensorRT.
//
// Both TensorRT front-ends (IPluginV2DynamicExt for TensorRT 8.x: qvit_lowbit_plugin.cpp;
// IPluginV3 for TensorRT >= 10: qvit_lowbit_plugin_v3.cpp) are thin adapters over this:
//   * LowBitLinearParams: the node's attributes (uniform or per-row-group weight bits), validated;
//   * parse_fields / to_fields: node attributes <-> a neutral field list (what the ONNX parser hands
//     a creator, and what a V3 plugin serializes);
//   * serialize / deserialize: the V2 engine blob (versioned);
//   * the shape and type rules, the workspace size;
//   * build_segments: the one-time repack per bit width (host only);
//   * LowBitLinearRunner (qvit_lowbit_device.cpp): device weights and the enqueue dispatch.
// The host parts need neither CUDA nor TensorRT, so tests/test_cuda_build.py compiles and RUNS them.
// C++14.
#ifndef QVIT_LOWBIT_CORE_H
#define QVIT_LOWBIT_CORE_H

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace qvit {

// Largest in_features / out_features / group_size a node may declare.  Checked before any size
// arithmetic (hostile or corrupted fields near INT32_MAX would overflow `int` products and make
// the bias default / repack allocate gigabytes); far above any ViT / LLM projection width.
constexpr int32_t kMaxLowbitFeatures = 1 << 20;

// Format version of the IPluginV3 serialized fields (the V2 blob has its own, kSerialVersion in
// qvit_lowbit_core.cpp): written as the int32 field kFieldsVersionName by getFieldsToSerialize.
// 1: the node attributes as exported (uniform or mixed widths).  Serialized fields without the
// version field come from the plugin before it was added and are read as version 1.
constexpr int32_t kFieldsVersion = 1;
constexpr const char* kFieldsVersionName = "qvit_fields_version";

// The node's attributes.  Uniform layers: group_size == 0, weight_packed [N, packed_words(K, bits)].
// Mixed widths (qformat FORMAT_VERSION 2): row r has group_bits[r / group_size] bits and
// weight_packed holds the rows concatenated at their own widths; `bits` is the widest.
struct LowBitLinearParams {
  int32_t bits = 0;
  int32_t in_features = 0;
  int32_t out_features = 0;
  int32_t act_lo = -128;
  int32_t act_hi = 127;
  int32_t act_bits = 8;
  float act_scale = 1.0f;
  int32_t group_size = 0;
  std::vector<int32_t> group_bits;
  std::vector<uint32_t> weight_packed;
  std::vector<float> weight_scale;  // [out_features]
  std::vector<float> bias;          // [out_features]

  bool mixed() const { return group_size > 0; }
  int row_bits(int row) const { return mixed() ? group_bits[static_cast<size_t>(row / group_size)] : bits; }
  // Words weight_packed must hold.
  size_t expected_words() const;
  // Empty when consistent, else what is wrong (one line).
  std::string validate() const;
};

// A node attribute as the ONNX parser / TensorRT hand it over (PluginField without the TensorRT types).
enum class FieldKind : int32_t { kInt32, kInt64, kFloat16, kFloat32, kFloat64, kChar, kOther };

struct FieldRef {
  const char* name;
  FieldKind kind;
  const void* data;
  int32_t length;
};

// Fields -> params; throws std::invalid_argument naming the field.  Unknown fields are ignored,
// plugin_version / plugin_namespace are informational, bias defaults to zeros.
LowBitLinearParams parse_fields(const FieldRef* fields, int32_t count);
// Params -> fields pointing into `p` (valid while `p` lives): what a V3 plugin serializes.
std::vector<FieldRef> to_fields(const LowBitLinearParams& p);
// The kind of each attribute a creator announces (getFieldNames).
FieldKind attr_kind(int attr);
// Serialized V3 fields (TensorRTPhase::kRUNTIME): the format version checked first (throws
// std::invalid_argument for a version this plugin cannot read), then parse_fields.
LowBitLinearParams parse_serialized_fields(const FieldRef* fields, int32_t count);

// V2 engine blob: magic, version, fields.  deserialize_params throws std::runtime_error on anything wrong;
// it reads version 1 blobs (uniform layers) too.
std::vector<char> serialize_params(const LowBitLinearParams& p);
LowBitLinearParams deserialize_params(const void* data, size_t length);

// Type and shape rules (QVIT_DTYPE_* codes; -1 = not supported).
bool supports_io_type(int pos, int dtype, int input_dtype);
int output_dtype(int input_dtype);
// Workspace bytes for up to max_m rows, whichever kernel enqueue may pick.
size_t workspace_bytes(const LowBitLinearParams& p, int64_t max_m);

// One bit width's rows: repacked words [repacked_rows(rows), repacked_words(K, bits)] and, for a
// mixed layer, each row's output column.
struct HostSegment {
  int bits = 0;
  int rows = 0;
  std::vector<uint32_t> words;
  std::vector<uint32_t> nib_words;  // [repacked_rows(rows), qvit_nib_words(K, bits)] when built with int4
  std::vector<int32_t> col_map;     // empty for a uniform layer
};
// int4: also the nibble-order layout of the INT4 tensor-core kernel (only worth its memory when the
// act grid fits s4 on sm_80+: int4_worthwhile).
std::vector<HostSegment> build_segments(const LowBitLinearParams& p, bool int4 = false);
bool int4_worthwhile(const LowBitLinearParams& p, int cc_major);

// Device weights (immutable, shared by a plugin's clones) and the enqueue dispatch (CUDA runtime).
class LowBitLinearRunner {
 public:
  // Repack + upload; nullptr and a message in *error on failure.
  static std::shared_ptr<LowBitLinearRunner> create(const LowBitLinearParams& p, std::string* error);
  ~LowBitLinearRunner();
  LowBitLinearRunner(const LowBitLinearRunner&) = delete;
  LowBitLinearRunner& operator=(const LowBitLinearRunner&) = delete;

  // y[m, N] = node(x[m, K]); one launch per width.  0 on success, else -1 and *error.
  int enqueue(const LowBitLinearParams& p, int64_t m, const void* x, int x_dtype, void* y, int y_dtype,
              void* workspace, size_t workspace_size, void* stream, int path, std::string* error) const;

 private:
  struct Segment {
    int bits = 0;
    int rows = 0;
    int ldw = 0;
    uint32_t* w = nullptr;
    int ldw_nib = 0;
    uint32_t* w_nib = nullptr;  // nibble order (mma_int4), or null
    int32_t* col_map = nullptr;
  };
  LowBitLinearRunner() = default;
  std::vector<Segment> segments_;
  float* weight_scale_ = nullptr;
  float* bias_ = nullptr;
  int cc_major_ = 0;
  int cc_minor_ = 0;
};

// QVIT_LOWBIT_PATH=auto|a8|a16|a4 (bench / debugging); unknown values fall back to auto with a warning.
int path_from_env();

}  // namespace qvit

#endif  // QVIT_LOWBIT_CORE_H
