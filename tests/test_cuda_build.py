"""Compile-only checks of runtime/cuda: nvcc per arch, g++ host code, plugin vs a TensorRT API shim.

Why: this CI has nvcc but neither a GPU nor TensorRT, so the kernels, the plugin and the
C++ mirror of the qformat contract are checked by compiling (and, for host-only code, running)
them.  Each .cu is compiled once per arch per session (session fixtures).
"""

import ctypes
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import trt_names

import qformat
from runtime.torchtools import gemm_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "runtime", "cuda")
SHIM_DIR = os.path.join(ROOT, "tests", "trt_api_subset")
KERNELS_CU = os.path.join(CUDA_DIR, "lowbit_gemm.cu")
HOST_CPP = os.path.join(CUDA_DIR, "lowbit_host.cpp")
PLUGIN_CPP = os.path.join(CUDA_DIR, "qvit_lowbit_plugin.cpp")
GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="needs g++")


def _run(cmd, cwd=None):
    """Run a compiler; fail with its output (not a bare CalledProcessError)."""
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        pytest.fail("command failed ({}):\n{}\n{}".format(p.returncode, " ".join(cmd), p.stdout[-6000:]))
    return p.stdout


def _cuda_include():
    nvcc = shutil.which("nvcc")
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if nvcc:
        cands.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime_api.h")):
            return os.path.join(c, "include")
    return None


def _nvcc_archs():
    out = subprocess.run(["nvcc", "--list-gpu-arch"], stdout=subprocess.PIPE, text=True).stdout
    return set(re.findall(r"compute_(\d+)", out))


# ----------------------------------------------------------------------------- host-only (g++)

@pytest.fixture(scope="session")
def format_dump(tmp_path_factory):
    """Every constant of qvit_lowbit_format.h / lowbit_host.h, printed by a compiled program."""
    if GXX is None:
        pytest.skip("needs g++")
    d = tmp_path_factory.mktemp("fmt")
    src = d / "dump.cpp"
    src.write_text(r"""
#include <cstdio>
#include "qvit_lowbit_format.h"
#include "lowbit_host.h"
using namespace qvit;
int main() {
  std::printf("{\"format_version\": %d, \"word_bits\": %d, \"min_bits\": %d, \"max_bits\": %d,",
              kFormatVersion, kWordBits, kMinPackedBits, kMaxPackedBits);
  std::printf("\"op\": \"%s\", \"domain\": \"%s\", \"opset\": %d, \"version\": \"%s\", \"namespace\": \"%s\",",
              kLowbitOp, kLowbitDomain, kLowbitOpset, kLowbitPluginVersion, kLowbitPluginNamespace);
  std::printf("\"attrs\": [");
  for (int i = 0; i < kNumLowbitAttrs; ++i) std::printf("%s\"%s\"", i ? ", " : "", lowbit_attr_name(i));
  std::printf("], \"per_word\": {");
  for (int b = 2; b <= 4; ++b) std::printf("%s\"%d\": [%d, %u, %u, %d, %d]", b > 2 ? ", " : "", b,
      values_per_word(b), code_of_zero(b), zero_word(b), qmin(b), qmax(b));
  std::printf("}, \"repack\": [%d, %d, {\"2\": %d, \"3\": %d, \"4\": %d}],", kRepackRowAlign, kRepackKAlign,
              repack_word_align(2), repack_word_align(3), repack_word_align(4));
  std::printf("\"dtypes\": [%d, %d, %d, %d], \"paths\": [%d, %d, %d],", QVIT_DTYPE_F32, QVIT_DTYPE_F16,
              QVIT_DTYPE_I8, QVIT_DTYPE_I32, QVIT_PATH_AUTO, QVIT_PATH_A8, QVIT_PATH_A16);
  std::printf("\"path_a4\": %d,", QVIT_PATH_A4);
  std::printf("\"kernels\": {");
  for (int k = 1; k < QVIT_NUM_KERNELS; ++k) std::printf("%s\"%s\": %d", k > 1 ? ", " : "", qvit_kernel_name(k), k);
  std::printf("}}\n");
  return 0;
}
""")
    exe = str(d / "dump")
    _run([GXX, "-std=c++14", "-Wall", "-Wextra", "-Werror", "-I", CUDA_DIR, str(src), HOST_CPP, "-o", exe])
    return json.loads(_run([exe]))


def test_format_header_matches_qformat(format_dump):
    """The C++ constants are qformat's: layout, node/plugin identity, attribute names and order."""
    f = format_dump
    assert f["format_version"] == qformat.FORMAT_VERSION
    assert f["word_bits"] == qformat.WORD_BITS
    assert list(range(f["min_bits"], f["max_bits"] + 1)) == list(qformat.PACKED_BITS)
    assert f["op"] == qformat.LOWBIT_OP
    assert f["domain"] == qformat.LOWBIT_DOMAIN
    assert f["opset"] == qformat.LOWBIT_OPSET
    assert f["version"] == qformat.LOWBIT_PLUGIN_VERSION
    assert f["namespace"] == qformat.LOWBIT_PLUGIN_NAMESPACE
    assert tuple(f["attrs"]) == qformat.LOWBIT_ATTRS
    for b in qformat.PACKED_BITS:
        per, code0, zword, qmin, qmax = f["per_word"][str(b)]
        assert per == qformat.values_per_word(b)
        assert (qmin, qmax) == qformat.qrange(b, signed=True)
        assert code0 == -qmin  # offset binary: code = q + 2^(b-1)
        assert zword == int(qformat.pack(np.zeros((1, per), np.int8), b)[0, 0]) == gemm_ext.zero_word(b)


def test_python_codes_match_host_header(format_dump):
    """gemm_ext's kernel/dtype/path codes and repack alignment equal lowbit_host.h / the format header."""
    f = format_dump
    assert f["kernels"] == gemm_ext.KERNELS
    assert f["dtypes"] == [gemm_ext.DTYPE_F32, gemm_ext.DTYPE_F16, gemm_ext.DTYPE_I8, gemm_ext.DTYPE_I32]
    assert f["paths"] == [gemm_ext.PATHS["auto"], gemm_ext.PATHS["a8"], gemm_ext.PATHS["a16"]]
    assert f["path_a4"] == gemm_ext.PATHS["a4"]
    assert f["repack"][:2] == [gemm_ext.REPACK_ROW_ALIGN, gemm_ext.REPACK_K_ALIGN]
    assert {int(b): a for b, a in f["repack"][2].items()} == gemm_ext.REPACK_WORD_ALIGN


@pytest.fixture(scope="session")
def layout_check(tmp_path_factory):
    """The kernels' in-word layout run on the host: slot_word / slot_code / expand_word / expand_pair3."""
    if GXX is None:
        pytest.skip("needs g++")
    d = tmp_path_factory.mktemp("layout")
    src = d / "layout.cpp"
    src.write_text(r"""
#include <cstdio>
#include "qvit_lowbit_format.h"
using namespace qvit;
static uint32_t lcg(uint32_t& s) { s = s * 1664525u + 1013904223u; return s >> 8; }
int main() {
  uint32_t seed = 12345u;
  int bad_slot = 0, bad_expand = 0, bad_pair = 0, words = 0;
  std::printf("{\"samples\": [");
  for (int bits = 2; bits <= 4; ++bits) {
    const int per = values_per_word(bits);
    for (int it = 0; it < 2000; ++it, ++words) {
      uint32_t c0[16], c1[16];
      for (int j = 0; j < per; ++j) { c0[j] = lcg(seed) % (1u << bits); c1[j] = lcg(seed) % (1u << bits); }
      const uint32_t w0 = slot_word(c0, bits), w1 = slot_word(c1, bits);
      for (int j = 0; j < per; ++j) bad_slot += slot_code(w0, bits, j) != c0[j];
      uint32_t e[4];
      expand_word(w0, bits, e);
      for (int t = 0; t < 4 * expand_words(bits); ++t) {
        const uint32_t byte = (e[t / 4] >> (8 * (t % 4))) & 0xffu;
        const uint32_t want = (bits == 3 && t >= 10) ? 0u : c0[t];
        bad_expand += byte != want;
      }
      if (bits == 3) {
        uint32_t out[5];
        expand_pair3(w0, w1, out);
        for (int t = 0; t < 20; ++t) {
          const uint32_t byte = (out[t / 4] >> (8 * (t % 4))) & 0xffu;
          bad_pair += byte != (t < 10 ? c0[t] : c1[t - 10]);
        }
      }
      if (it < 3) {
        std::printf("%s{\"bits\": %d, \"word\": %u, \"codes\": [", (bits > 2 || it) ? ", " : "", bits, w0);
        for (int j = 0; j < per; ++j) std::printf("%s%u", j ? ", " : "", c0[j]);
        std::printf("]}");
      }
    }
  }
  std::printf("], \"words\": %d, \"bad_slot\": %d, \"bad_expand\": %d, \"bad_pair\": %d,", words, bad_slot,
              bad_expand, bad_pair);
  std::printf(" \"zero\": [%u, %u, %u]}\n", repacked_zero_word(2), repacked_zero_word(3), repacked_zero_word(4));
  return 0;
}
""")
    exe = str(d / "layout")
    _run([GXX, "-std=c++14", "-Wall", "-Wextra", "-Werror", "-I", CUDA_DIR, str(src), "-o", exe])
    return json.loads(_run([exe]))


def test_expand_order_roundtrips_on_the_host(layout_check):
    """Every code comes back from its slot, and one shift + AND gives consecutive codes as int8x4 bytes."""
    assert layout_check["words"] == 6000
    assert layout_check["bad_slot"] == 0
    assert layout_check["bad_expand"] == 0
    assert layout_check["bad_pair"] == 0


def test_expand_order_matches_numpy(layout_check):
    """gemm_ext's numpy repack places codes exactly where the C++ slot_word does."""
    for s in layout_check["samples"]:
        codes = np.array(s["codes"], dtype=np.uint32)[None, :]
        assert int(gemm_ext._to_slots(codes, s["bits"])[0]) == s["word"]
    for b, z in zip((2, 3, 4), layout_check["zero"]):
        code0 = np.full((1, qformat.values_per_word(b)), -qformat.qrange(b)[0], np.uint32)
        assert int(gemm_ext._to_slots(code0, b)[0]) == z


@pytest.fixture(scope="session")
def host_lib(tmp_path_factory):
    """lowbit_host.cpp as a shared library (ctypes): the C++ repack / kernel choice, run on the CPU."""
    if GXX is None:
        pytest.skip("needs g++")
    so = str(tmp_path_factory.mktemp("host") / "libqvit_host.so")
    _run([GXX, "-std=c++14", "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I", CUDA_DIR, HOST_CPP,
          "-o", so])
    lib = ctypes.CDLL(so)
    lib.qvit_repack_weights.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.qvit_workspace_size.restype = ctypes.c_size_t
    lib.qvit_workspace_size.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.qvit_kernel_name.restype = ctypes.c_char_p
    return lib


@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("n,k", [(1, 1), (3, 10), (37, 45), (64, 64), (65, 391), (130, 1536)])
def test_cpp_repack_equals_numpy(host_lib, bits, n, k):
    """The plugin's one-time repack (C++) and gemm_ext.repack (numpy) produce identical words."""
    rng = np.random.default_rng(n * 1000 + k + bits)
    lo, hi = qformat.qrange(bits)
    packed = qformat.pack(rng.integers(lo, hi + 1, size=(n, k)), bits)
    want = gemm_ext.repack(packed, bits, k)
    assert host_lib.qvit_repacked_rows(n) == want.shape[0]
    assert host_lib.qvit_repacked_words(k, bits) == want.shape[1]
    got = np.zeros_like(want)
    assert host_lib.qvit_repack_weights(packed.ctypes.data, n, k, bits, got.ctypes.data) == 0
    np.testing.assert_array_equal(got, want)


def test_cpp_repack_rejects_bad_args(host_lib):
    buf = np.zeros((64, 64), np.uint32)
    assert host_lib.qvit_repack_weights(buf.ctypes.data, 1, 8, 5, buf.ctypes.data) == -1
    assert host_lib.qvit_repack_weights(buf.ctypes.data, 0, 8, 4, buf.ctypes.data) == -1
    assert host_lib.qvit_repacked_words(8, 8) == 0


@pytest.mark.parametrize("m,x_dtype,path,cc,want", [
    (1, "f16", "auto", (6, 2), "a16_gemv"),      # TX2 GP10B: no fast int8 -> fp32-FMA GEMV
    (16, "f16", "auto", (5, 3), "a16_gemv"),     # Nano
    (1, "f16", "auto", (8, 7), "gemv_dp4a"),     # batch-1 latency path: dp4a GEMV on Orin
    (16, "f16", "auto", (9, 0), "gemv_dp4a"),
    (1, "i8", "auto", (6, 1), "gemv_dp4a"),
    (197, "f16", "auto", (6, 2), "a16_tiled"),   # TX2
    (197, "f16", "auto", (5, 3), "a16_tiled"),   # Nano
    (197, "f16", "auto", (6, 1), "a8_dp4a"),     # Pascal dGPU
    (197, "f32", "auto", (7, 2), "a8_mma"),      # Xavier: WMMA int8
    (6304, "f16", "auto", (7, 5), "a8_mma"),     # Turing
    (6304, "f16", "auto", (8, 7), "mma_sync"),   # Orin: mma.sync m16n8k32
    (6304, "f16", "auto", (9, 0), "mma_sync"),   # Hopper
    (6304, "f16", "auto", (11, 0), "mma_sync"),  # Jetson Thor (Blackwell, sm_110 on CUDA 13)
    (1, "f16", "auto", (11, 0), "gemv_dp4a"),
    (17, "f16", "auto", (8, 0), "mma_sync"),
    (197, "f16", "a8", (6, 2), "a8_int"),        # forced A8 on TX2: generic int32, not dp4a
    (197, "f16", "a8", (7, 0), "a8_dp4a"),
    (1, "f16", "a8", (8, 7), "gemv_dp4a"),
    (1, "f16", "a8", (6, 2), "a8_int"),
    (197, "f16", "a16", (8, 7), "a16_tiled"),
    (17, "f16", "a16", (8, 7), "a16_tiled"),
    (16, "f16", "a16", (9, 0), "a16_gemv"),
    (197, "i8", "auto", (8, 7), "mma_sync"),
])
def test_kernel_selection(host_lib, m, x_dtype, path, cc, want):
    code = {"f32": 0, "f16": 1, "i8": 2}[x_dtype]
    kid = host_lib.qvit_select_kernel(m, 384, 384, 4, code, gemm_ext.PATHS[path], cc[0], cc[1])
    assert host_lib.qvit_kernel_name(kid).decode() == want


def test_kernel_selection_rejects_bad_args(host_lib):
    assert host_lib.qvit_select_kernel(1, 384, 384, 5, 1, 0, 8, 7) == 0   # bits
    assert host_lib.qvit_select_kernel(1, 0, 384, 4, 1, 0, 8, 7) == 0     # n
    assert host_lib.qvit_select_kernel(1, 384, 384, 4, 3, 0, 8, 7) == 0   # int32 input
    assert host_lib.qvit_select_kernel(1, 384, 384, 4, 1, 9, 8, 7) == 0   # path
    assert host_lib.qvit_kernel_name(0).decode() == "invalid"


@pytest.mark.parametrize("kernel,cc_ok,cc_not", [
    ("mma_sync", (8, 0), (7, 5)), ("mma_sync", (8, 7), (7, 2)), ("a8_mma", (7, 2), (7, 0)),
    ("a8_dp4a", (6, 1), (5, 3)), ("gemv_dp4a", (7, 0), (5, 3)), ("a16_tiled", (5, 3), (4, 0)),
    ("mma_int4", (8, 7), (7, 5)), ("mma_int4", (9, 0), (11, 0)), ("gemv_ring", (8, 0), (7, 5)),
])
def test_kernel_supported_per_arch(host_lib, kernel, cc_ok, cc_not):
    """lowbit_gemm refuses a kernel forced onto a device without its instructions (cudaErrorNotSupported,
    nothing launched) instead of a device-side __trap()."""
    kid = gemm_ext.KERNELS[kernel]
    assert host_lib.qvit_kernel_supported(kid, *cc_ok) == 1
    assert host_lib.qvit_kernel_supported(kid, *cc_not) == 0
    assert host_lib.qvit_kernel_supported(0, 9, 0) == 0


def test_lowbit_gemm_checks_arch_and_pair_alignment():
    """The launcher asks the device's compute capability before launching, and the paired epilogue
    stores check y's own alignment, not only the row stride."""
    with open(KERNELS_CU) as f:
        src = f.read()
    body = src[src.index("cudaError_t lowbit_gemm("):]
    assert "qvit_kernel_supported(kernel, cc_major, cc_minor)" in body and "cudaErrorNotSupported" in body
    assert "reinterpret_cast<uintptr_t>(a.y) & (pair_bytes - 1)" in src and "epi.pairs && col + 1 < epi.n" in src


def test_workspace_size(host_lib):
    a8 = gemm_ext.KERNELS["a8_mma"]
    assert host_lib.qvit_workspace_size(197, 384, 4, a8) == 296 * 256  # 197 * 384 = 75648 -> multiple of 256
    assert host_lib.qvit_workspace_size(3, 45, 4, a8) == 256  # 3 * 64 = 192 -> 256
    assert host_lib.qvit_workspace_size(197, 384, 4, gemm_ext.KERNELS["a16_gemv"]) == 0
    assert host_lib.qvit_workspace_size(197, 384, 4, gemm_ext.KERNELS["gemv_dp4a"]) == 0
    assert host_lib.qvit_workspace_size(0, 384, 4, a8) == 0
    mma = gemm_ext.KERNELS["mma_sync"]
    for bits in qformat.PACKED_BITS:  # int8 codes [m, repacked K] + int32 row sums, each rounded to 256 bytes
        kk = gemm_ext.repacked_words(390, bits) * qformat.values_per_word(bits)
        want = -(-197 * kk // 256) * 256 + -(-197 * 4 // 256) * 256
        assert host_lib.qvit_workspace_size(197, 390, bits, mma) == want
    assert host_lib.qvit_workspace_size(197, 384, 5, mma) == 0


@needs_gxx
def test_host_cpp_syntax():
    _run([GXX, "-std=c++14", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I", CUDA_DIR, HOST_CPP])


PLUGIN_SOURCES = ["qvit_lowbit_plugin.cpp", "qvit_lowbit_plugin_v3.cpp", "qvit_lowbit_core.cpp",
                  "qvit_lowbit_device.cpp", "lowbit_host.cpp"]


@needs_gxx
@pytest.mark.parametrize("trt_major", [8, 10])
def test_plugin_front_end_runs_on_the_host(tmp_path, trt_major):
    """The plugin front-end of each TensorRT generation (8: IPluginV2DynamicExt, 10+: IPluginV3), built
    against the API shim with a fake registry / CUDA runtime / recording lowbit_gemm, and RUN: creator
    fields as the ONNX parser types them, serialization round trip, formats, shapes, clone, and the
    enqueue dispatch of a mixed-width layer (one launch per width, col_map rows)."""
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("needs the CUDA toolkit headers (cuda_runtime_api.h)")
    exe = str(tmp_path / "plugin_host_test")
    _run([GXX, "-std=c++14", "-Wall", "-Wextra", "-Werror", "-DQVIT_SHIM_TRT_MAJOR={}".format(trt_major),
          "-I", SHIM_DIR, "-I", CUDA_DIR, "-isystem", cuda_inc, os.path.join(ROOT, "tests", "plugin_host_test.cpp")]
         + [os.path.join(CUDA_DIR, f) for f in PLUGIN_SOURCES] + ["-o", exe])
    p = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    failed = [k for k, v in res.items() if v is False]
    assert not failed, "failed checks: {}\n{}".format(failed, p.stderr)
    for key in ("serialize_round_trip", "formats", "output_shape", "enqueue", "clone_shares_device_weights",
                "v{}_dispatch_mixed_m197".format(3 if trt_major >= 10 else 2), "no_leaks", "registered_one_creator"):
        assert res[key] is True, key
    if trt_major >= 10:
        assert res["create_from_int64_float64_fields"] and res["enqueue_before_shape_change_fails"]
        # the lifecycle TensorRT can capture: weights once per engine layer, nothing allocated or
        # copied in onShapeChange / enqueue, clones and contexts share; versioned, bounded fields
        for key in ("configure_creates_weights", "no_alloc_or_copy_in_shape_change_or_enqueue",
                    "early_clone_shares_device_weights", "deserialize_creates_weights_once",
                    "contexts_share_engine_weights", "weights_freed_with_last_owner", "fields_carry_version",
                    "fields_version_checked", "unversioned_fields_read_as_version_1", "hostile_sizes_rejected",
                    "hostile_out_features_without_bias_rejected", "hostile_group_size_rejected",
                    "a4_grid_on_orin_auto_keeps_mma_sync", "a4_path_on_orin_uses_int4_tensor_cores",
                    "a4_grid_on_hopper_keeps_mma_sync",
                    "a4_grid_small_m_uses_gemv"):
            assert res[key] is True, key
        # every attribute but the informational plugin_version / plugin_namespace, + the format version
        assert res["serialized_fields"] == len(qformat.LOWBIT_ATTRS) - 2 + 1
    else:
        assert res["version1_blob_accepted"] and res["enqueue_before_initialize_fails"]


def _real_trt_includes():
    """Real TensorRT include dirs to check the plugin against: QVIT_TRT_INCLUDE_DIRS (os.pathsep-separated,
    e.g. headers extracted from the NVIDIA/TensorRT release branches) and a system TensorRT."""
    dirs = [d for d in os.environ.get("QVIT_TRT_INCLUDE_DIRS", "").split(os.pathsep) if d]
    dirs += [os.path.join(os.environ.get("TENSORRT_ROOT", ""), "include"), "/usr/include/x86_64-linux-gnu",
             "/usr/include/aarch64-linux-gnu"]
    return [d for d in dirs if d and os.path.isfile(os.path.join(d, "NvInfer.h"))]


@needs_gxx
def test_plugin_compiles_against_real_tensorrt_headers():
    """Both front-ends, -Werror, against every real TensorRT header set available (8.2 .. 11.x on a
    developer machine; CI has none and skips)."""
    cuda_inc = _cuda_include()
    dirs = _real_trt_includes()
    if cuda_inc is None or not dirs:
        pytest.skip("no real TensorRT headers (set QVIT_TRT_INCLUDE_DIRS); the shim tests above still run")
    for inc in dirs:
        for src in ("qvit_lowbit_plugin.cpp", "qvit_lowbit_plugin_v3.cpp"):
            _run([GXX, "-std=c++14", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-isystem", inc, "-I", CUDA_DIR,
                  "-isystem", cuda_inc, os.path.join(CUDA_DIR, src)])


#: a clone of NVIDIA/TensorRT (release/X.Y branches hold include/NvInfer*.h); the releases are the API table's
TRT_REPO = os.environ.get("QVIT_TRT_REPO", "/work/.mirror/NVIDIA+TensorRT/repo")


@needs_gxx
@pytest.mark.parametrize("release", trt_names.RELEASES)
def test_plugin_compiles_against_each_release_headers(tmp_path, release):
    """Both front-ends, -Werror, against the headers of every release in tests/trt_api_names.txt (8.2 .. 11.x,
    Thor's 10.13 included), taken from the release/X.Y branch of an NVIDIA/TensorRT clone (QVIT_TRT_REPO)."""
    cuda_inc = _cuda_include()
    if cuda_inc is None or not os.path.isdir(TRT_REPO):
        pytest.skip("needs the CUDA headers and a clone of NVIDIA/TensorRT (set QVIT_TRT_REPO)")
    ref = "release/" + release
    if subprocess.run(["git", "-C", TRT_REPO, "rev-parse", "--verify", "-q", ref], capture_output=True).returncode:
        pytest.skip("{} has no branch {} (fetch it)".format(TRT_REPO, ref))
    archive = subprocess.run(["git", "-C", TRT_REPO, "archive", ref, "include"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    inc = str(tmp_path / "include")
    version = open(os.path.join(inc, "NvInferVersion.h")).read()
    assert re.search(r"(TRT|NV_TENSORRT)_MINOR\w*\s+{}\b".format(release.split(".")[1]), version), release
    for src in ("qvit_lowbit_plugin.cpp", "qvit_lowbit_plugin_v3.cpp"):
        _run([GXX, "-std=c++14", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-isystem", inc, "-I", CUDA_DIR,
              "-isystem", cuda_inc, os.path.join(CUDA_DIR, src)])


def test_shim_is_labelled_and_unused_by_real_build():
    with open(os.path.join(SHIM_DIR, "NvInfer.h")) as f:
        assert "COMPILE-CHECK SHIM" in f.read(400)
    with open(os.path.join(CUDA_DIR, "CMakeLists.txt")) as f:
        assert "trt_api_subset" not in f.read()


# ----------------------------------------------------------------------------- nvcc

NVCC_ARCHS = ("75", "87", "90", "110")  # Turing (no INT4 mma), Orin (native INT4), Hopper (INT4 emulated), Thor


@pytest.fixture(scope="session", params=NVCC_ARCHS)
def nvcc_build(request, tmp_path_factory):
    """lowbit_gemm.cu compiled once per arch (object + kept PTX)."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    arch = request.param
    d = tmp_path_factory.mktemp("sm" + arch)
    out = _run(["nvcc", "-std=c++14", "-O3", "-c", "-arch=sm_" + arch, "-Werror", "all-warnings", "-keep",
                "--keep-dir", str(d), "-Xptxas", "-v", "-o", str(d / "lowbit_gemm.o"), KERNELS_CU])
    ptx = (d / "lowbit_gemm.ptx").read_text()
    return {"arch": arch, "ptxas": out, "ptx": ptx, "obj": d / "lowbit_gemm.o"}


@pytest.mark.nvcc
def test_kernels_compile(nvcc_build):
    assert nvcc_build["obj"].stat().st_size > 0
    assert "spill stores" in nvcc_build["ptxas"]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", nvcc_build["ptxas"])]
    assert max(spills) == 0, "register spills in some kernel"


@pytest.mark.nvcc
def test_int8_tensor_core_and_dp4a_emitted(nvcc_build):
    """Every arch gets the WMMA int8 and dp4a paths; sm_80+ also the mma.sync m16n8k32 pipeline
    (ldmatrix + cp.async).  dp4a is checked here: CUDA 13 has no sm_61."""
    ptx = nvcc_build["ptx"]
    assert "wmma.mma.sync.aligned.row.col.m16n16k16.s32.s8.s8.s32" in ptx
    assert "dp4a.s32.s32" in ptx
    has_mma = "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32" in ptx
    assert has_mma == (int(nvcc_build["arch"]) >= 80)
    if has_mma:
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in ptx and "cp.async.cg.shared.global" in ptx
    int4 = 80 <= int(nvcc_build["arch"]) < 100  # the INT4 path: sm_80..90 (not built for Blackwell / Thor)
    assert ("mma.sync.aligned.m16n8k64.row.col.s32.s4.u4.s32" in ptx) == int4


def _sass_tools():
    """cuobjdump (+ the nvdisasm it runs for -sass): on PATH, or from the pip packages nvidia-cuda-cuobjdump /
    nvidia-cuda-nvdisasm (the dev extra).  (path, env) or a skip with the reason."""
    dirs = [os.path.dirname(p) for p in (shutil.which("cuobjdump"),) if p]
    try:
        import nvidia

        dirs += [os.path.join(d, sub, "bin") for d in nvidia.__path__ for sub in ("cu13", "cu12", "cuda_cuobjdump")]
    except ImportError:
        pass
    for d in dirs:
        exe = os.path.join(d, "cuobjdump")
        if os.path.isfile(exe):
            env = dict(os.environ, PATH=os.pathsep.join([d] + os.environ.get("PATH", "").split(os.pathsep)))
            if shutil.which("nvdisasm", path=env["PATH"]) is None:
                pytest.skip("cuobjdump found but not nvdisasm (pip install nvidia-cuda-nvdisasm)")
            return exe, env
    pytest.skip("needs cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, or a CUDA toolkit)")


def _sass_ops(obj):
    """{kernel function name: Counter of SASS opcodes} of an object file (cuobjdump -sass)."""
    import collections

    exe, env = _sass_tools()
    p = subprocess.run([exe, "-sass", str(obj)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert p.returncode == 0, p.stdout[-2000:]
    out = {}
    for chunk in re.split(r"\n\s*Function : ", p.stdout)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", chunk)
        out[name] = collections.Counter(ops)
    return out


@pytest.mark.nvcc
def test_int4_kernel_sass(nvcc_build):
    """sm_87 (Orin; also sm_80/86/89): every m16n8k64 s4.u4 of mma_int4 is ONE native IMMA.16864.S4.U4
    (2 k64 steps x 2 x 4 warp fragments = 16 per kernel), no int8 IMMA or emulation call in it.  sm_90
    (Hopper) documents the emulated form: no IMMA.16864; each mma becomes a CALL into a routine that
    unpacks to int8 and issues IMMA.16832.S8.U8 (exact, not fast).  sm_75 and sm_100+ (Thor): no INT4 path."""
    arch = int(nvcc_build["arch"])
    kernels = {name: ops for name, ops in _sass_ops(nvcc_build["obj"]).items() if "mma_int4_kernel" in name}
    assert len(kernels) == 3  # BITS = 2, 3, 4
    for name, ops in kernels.items():
        imma = {op: n for op, n in ops.items() if op.startswith("IMMA")}
        if arch in (80, 86, 87, 89):
            assert imma == {"IMMA.16864.S4.U4": 16}, (name, imma)
            assert ops["CALL.REL.NOINC"] <= 1, (name, ops["CALL.REL.NOINC"])  # not one per mma
        elif arch >= 100:
            assert not imma, (name, imma)  # not built for Blackwell / Thor: lowbit_gemm refuses it there
        elif arch >= 90:
            assert "IMMA.16864.S4.U4" not in imma and imma.get("IMMA.16832.S8.U8", 0) > 0, (name, imma)
            assert ops["CALL.REL.NOINC"] >= 16, (name, ops["CALL.REL.NOINC"])  # one emulation call per mma
        else:
            assert not imma, (name, imma)  # __trap() body: lowbit_gemm refuses the kernel below sm_80


@pytest.mark.nvcc
def test_gemv_ring_has_no_barrier(nvcc_build):
    """gemv_ring (sm_80+): the weight stream goes through cp.async (LDGSTS) and the kernel has no block
    barrier anywhere (each lane consumes only the ring slots it filled)."""
    if int(nvcc_build["arch"]) < 80:
        pytest.skip("gemv_ring is an sm_80+ kernel")
    kernels = {n: ops for n, ops in _sass_ops(nvcc_build["obj"]).items() if "gemv_ring_kernel" in n}
    assert len(kernels) == 9  # BITS 2/3/4 x MT 1/2/4
    for name, ops in kernels.items():
        assert not [op for op in ops if op.startswith("BAR")], name
        assert any(op.startswith("LDGSTS") for op in ops) and any(op.startswith("IDP") for op in ops), name


@pytest.mark.nvcc
def test_sm61_dp4a_path_compiles(tmp_path):
    if "61" not in _nvcc_archs():
        pytest.skip("this nvcc cannot target sm_61 (CUDA >= 13); dp4a PTX is checked in the sm_75/87 builds")
    _run(["nvcc", "-std=c++14", "-c", "-arch=sm_61", "-o", str(tmp_path / "g61.o"), KERNELS_CU])


def _strip_arch_guarded(src):
    """Source with the `#if defined(QVIT_DEVICE_HAS_*)` branches removed (their #else kept)."""
    out, stack = [], []
    for line in src.splitlines():
        s = line.strip()
        if s.startswith("#if"):
            guarded = "QVIT_DEVICE_HAS_" in s or "__CUDA_ARCH__" in s
            stack.append(guarded)
            continue
        if s.startswith("#else") or s.startswith("#elif"):
            stack[-1] = False
            continue
        if s.startswith("#endif"):
            stack.pop()
            continue
        if not any(stack):
            out.append(line)
    return "\n".join(out)


def test_a16_path_has_no_sm70_only_code_outside_guards():
    """sm_62 (TX2) can't be compiled by CUDA 13: make sure only arch-guarded code uses sm_61+/sm_70+ features."""
    with open(KERNELS_CU) as f:
        src = f.read()
    code = re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", src), flags=re.S)
    free = _strip_arch_guarded(code)
    for token in ("wmma::", "nvcuda", "__dp4a", "mma.sync", "ldmatrix", "cp.async", "__reduce_", "__match_any",
                  "__nanosleep", "__hmul2", "__hfma2", "asm(", "asm volatile"):
        assert token not in free, "{} outside an arch guard".format(token)
    assert "wmma::mma_sync" in src and "__dp4a" in src  # the guarded paths exist


@pytest.mark.nvcc
def test_cmake_configures_kernels_only(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake")
    out = _run(["cmake", "-S", CUDA_DIR, "-B", str(tmp_path / "b"), "-DQVIT_KERNELS_ONLY=ON",
                "-DQVIT_CUDA_ARCHS=87"])
    assert "archs 87" in out
    out = _run(["cmake", "-S", CUDA_DIR, "-B", str(tmp_path / "d"), "-DQVIT_KERNELS_ONLY=ON"])
    if "CUDA 13" in out:  # images for H100/H200, Orin and Thor, PTX of the newest arch (JIT on later GPUs)
        assert "archs 75;80;86;87;89;90;100;110;120" in out
        flags = (tmp_path / "d" / "CMakeFiles" / "qvit_lowbit_kernels.dir" / "flags.make").read_text()
        assert "arch=compute_120,code=[sm_120,compute_120]" in flags and "code=sm_87" in flags
        assert "arch=compute_110,code=sm_110" in flags and "code=sm_90" in flags
    p = subprocess.run(["cmake", "-S", CUDA_DIR, "-B", str(tmp_path / "t"), "-DTENSORRT_ROOT=" + str(tmp_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not _real_trt_includes():
        assert p.returncode != 0 and "QVIT_KERNELS_ONLY" in p.stdout


@pytest.mark.nvcc
@pytest.mark.slow
def test_torch_extension_binding_syntax():
    """torch_ext.cpp compiles against the installed torch headers (g++ -fsyntax-only, ~20 s), and gemm_ext
    calls only what it binds."""
    pytest.importorskip("torch")
    from torch.utils import cpp_extension

    cuda_inc = _cuda_include()
    if GXX is None or cuda_inc is None:
        pytest.skip("needs g++ and the CUDA headers")
    import sysconfig

    incs = cpp_extension.include_paths()
    all_h = os.path.join(incs[0], "torch", "csrc", "api", "include", "torch", "all.h")
    std = "-std=c++20" if os.path.isfile(all_h) and "C++20" in open(all_h).read() else "-std=c++17"
    cmd = [GXX, std, "-fsyntax-only", "-DTORCH_EXTENSION_NAME=qvit_lowbit_ext", "-I", CUDA_DIR, "-I", cuda_inc,
           "-I", sysconfig.get_paths()["include"]]
    for i in incs:
        cmd += ["-I", i]
    _run(cmd + [os.path.join(CUDA_DIR, "torch_ext.cpp")])  # fails the test with the compiler's output
    # the Python side calls exactly the functions the binding defines
    src = open(os.path.join(CUDA_DIR, "torch_ext.cpp")).read()
    defined = set(re.findall(r'm\.def\("(\w+)"', src))
    called = set(re.findall(r"\bext\.(\w+)\(", open(gemm_ext.__file__).read()))
    assert called and called <= defined, (called, defined)
