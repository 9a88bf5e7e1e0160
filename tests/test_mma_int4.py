"""The INT4 tensor-core path checked without a GPU: fragment layout, nibble-order repack, exactness.

Why: ``mma.sync.m16n8k64.s4.u4`` is exact only if every lane loads the elements the hardware
expects.  The kernel's index math (runtime/cuda/qvit_mma_int4.h) is compiled with g++ and
dumped; it must equal an independent transcription of the PTX ISA fragment tables
(runtime/torchtools/int4_emu.ptx_tables), and a lane-by-lane emulation of the kernel built from
the dumped mapping must equal the plain integer matmul.  The C++ and numpy nibble-order repacks
must agree word for word.
"""

import ctypes
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import qformat
from runtime.torchtools import int4_emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "runtime", "cuda")
GXX = shutil.which("g++")

DUMP_SRC = r"""
#include <cstdio>
#include "qvit_mma_int4.h"
using namespace qvit;
static uint32_t lcg(uint32_t& s) { s = s * 1664525u + 1013904223u; return s; }
static void pr(bool comma, int a, int b) { std::printf("%s[%d, %d]", comma ? ", " : "", a, b); }
int main() {
  int r, c;
  std::printf("{\"a\": [");
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 32; ++i) { int4_frag_a(lane, i, &r, &c); pr(lane || i, r, c); }
  std::printf("], \"b\": [");
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 16; ++i) { int4_frag_b(lane, i, &r, &c); pr(lane || i, r, c); }
  std::printf("], \"c\": [");
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) { int4_frag_c(lane, i, &r, &c); pr(lane || i, r, c); }
  std::printf("], \"widen\": [");
  uint32_t seed = 7u;
  for (int bits = 2; bits <= 4; ++bits) {
    for (int t = 0; t < 20; ++t) {
      uint32_t w[16];
      for (int j = 0; j < nib_block_words(bits); ++j) w[j] = lcg(seed);
      std::printf("%s{\"bits\": %d, \"words\": [", bits > 2 || t ? ", " : "", bits);
      for (int j = 0; j < nib_block_words(bits); ++j) std::printf("%s%u", j ? ", " : "", w[j]);
      std::printf("], \"u4\": [");
      for (int q = 0; q < 16; ++q) std::printf("%s%u", q ? ", " : "", nib_widen(w, bits, q));
      std::printf("]}");
    }
  }
  std::printf("]}\n");
  return 0;
}
"""


def _run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        pytest.fail("command failed:\n{}\n{}".format(" ".join(cmd), p.stdout[-4000:]))
    return p.stdout


@pytest.fixture(scope="module")
def kernel_dump(tmp_path_factory):
    """The kernel's fragment mapping and nib_widen, printed by the compiled header."""
    if GXX is None:
        pytest.skip("needs g++")
    d = tmp_path_factory.mktemp("int4")
    (d / "dump.cpp").write_text(DUMP_SRC)
    _run([GXX, "-std=c++14", "-Wall", "-Wextra", "-Werror", "-I", CUDA_DIR, str(d / "dump.cpp"), "-o", str(d / "dump")])
    raw = json.loads(_run([str(d / "dump")]))
    tables = {"a": np.array(raw["a"]).reshape(32, 32, 2), "b": np.array(raw["b"]).reshape(32, 16, 2),
              "c": np.array(raw["c"]).reshape(32, 4, 2)}
    return {"tables": tables, "widen": raw["widen"]}


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    if GXX is None:
        pytest.skip("needs g++")
    so = str(tmp_path_factory.mktemp("int4host") / "libhost.so")
    _run([GXX, "-std=c++14", "-O1", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I", CUDA_DIR,
          os.path.join(CUDA_DIR, "lowbit_host.cpp"), "-o", so])
    lib = ctypes.CDLL(so)
    lib.qvit_repack_weights_nib.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.qvit_workspace_size.restype = ctypes.c_size_t
    lib.qvit_kernel_name.restype = ctypes.c_char_p
    return lib


def test_kernel_mapping_is_the_ptx_layout(kernel_dump):
    """int4_frag_a/b/c (what the kernel indexes with) == the PTX ISA m16n8k64 .s4/.u4/.s32 tables."""
    ptx = int4_emu.ptx_tables()
    for key in ("a", "b", "c"):
        np.testing.assert_array_equal(kernel_dump["tables"][key], ptx[key], err_msg=key)


def test_ptx_tables_cover_each_element_once():
    ptx = int4_emu.ptx_tables()
    for key, shape in (("a", (16, 64)), ("b", (64, 8)), ("c", (16, 8))):
        cells = {tuple(x) for x in ptx[key].reshape(-1, 2)}
        assert len(cells) == shape[0] * shape[1] == ptx[key].shape[0] * ptx[key].shape[1]
        assert max(r for r, _ in cells) == shape[0] - 1 and max(c for _, c in cells) == shape[1] - 1
    # the kernel loads A and B as whole 32-bit words: nibbles 8r .. 8r+7 of a lane are consecutive in K
    for key in ("a", "b"):
        kdim = 1 if key == "a" else 0
        t = ptx[key].reshape(32, -1, 8, 2)
        assert (np.diff(t[..., kdim], axis=-1) == 1).all() and (t[..., 0, kdim] % 8 == 0).all()


def test_nib_widen_cpp_equals_numpy(kernel_dump):
    for case in kernel_dump["widen"]:
        words = np.array(case["words"], np.uint32)
        got = [int(int4_emu.nib_widen(words, case["bits"], q)) for q in range(16)]
        assert got == case["u4"], case["bits"]


@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("n,k", [(1, 1), (13, 200), (64, 128), (70, 391)])
def test_cpp_nib_repack_equals_numpy(host_lib, bits, n, k):
    rng = np.random.default_rng(bits * 100 + n + k)
    lo, hi = qformat.qrange(bits)
    packed = qformat.pack(rng.integers(lo, hi + 1, size=(n, k)), bits)
    want = int4_emu.repack_nib(packed, bits, k)
    assert host_lib.qvit_repacked_rows(n) == want.shape[0]
    assert host_lib.qvit_nib_words(k, bits) == want.shape[1]
    got = np.zeros_like(want)
    assert host_lib.qvit_repack_weights_nib(packed.ctypes.data, n, k, bits, got.ctypes.data) == 0
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
def test_nib_repack_widens_to_the_codes(bits):
    """Every 8-element u4 register of the nibble-order layout holds exactly the offset-binary codes."""
    rng = np.random.default_rng(bits)
    lo, hi = qformat.qrange(bits)
    q = rng.integers(lo, hi + 1, size=(3, 256))
    w = int4_emu.repack_nib(qformat.pack(q, bits), bits, 256)
    bw = int4_emu.NIB_BLOCK_WORDS[bits]
    for blk in range(2):
        for qi in range(16):
            u4 = int4_emu.nib_widen(w[:3, blk * bw:(blk + 1) * bw], bits, qi)
            nib = (u4[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
            np.testing.assert_array_equal(nib, q[:, blk * 128 + qi * 8: blk * 128 + qi * 8 + 8] - lo)


@pytest.mark.parametrize("bits", qformat.PACKED_BITS)
@pytest.mark.parametrize("m,n,k,act", [(20, 13, 200, (-8, 7)), (16, 8, 64, (-8, 7)), (5, 9, 130, (-3, 3))])
def test_emulated_kernel_equals_integer_matmul(kernel_dump, bits, m, n, k, act):
    """The kernel's loads (its own mapping) through the hardware's semantics (PTX tables) == xq @ q.T."""
    rng = np.random.default_rng(m * n + k + bits)
    lo, hi = qformat.qrange(bits)
    q = rng.integers(lo, hi + 1, size=(n, k))
    xq = rng.integers(act[0], act[1] + 1, size=(m, k))
    w_nib = int4_emu.repack_nib(qformat.pack(q, bits), bits, k)
    got = int4_emu.emulate_gemm(xq, w_nib, bits, kernel_dump["tables"], int4_emu.ptx_tables())
    np.testing.assert_array_equal(got[:, :n], xq @ q.T)


def test_emulation_catches_a_wrong_mapping(kernel_dump):
    """The check can fail: a kernel that swapped the two A row halves would not equal the matmul."""
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(8, 64))
    xq = rng.integers(-8, 8, size=(16, 64))
    bad = {k: v.copy() for k, v in kernel_dump["tables"].items()}
    bad["a"][:, :, 0] = (bad["a"][:, :, 0] + 8) % 16
    w_nib = int4_emu.repack_nib(qformat.pack(q, 4), 4, 64)
    got = int4_emu.emulate_gemm(xq, w_nib, 4, bad, int4_emu.ptx_tables())
    assert not np.array_equal(got[:, :8], xq @ q.T)


def test_int4_kernel_selection_and_workspace(host_lib):
    """auto keeps mma_sync until INT4 is measured on a GPU (QVIT_AUTO_INT4=0); a4 forces INT4 on sm_80+ when
    the act grid fits s4, never for a wider grid nor below sm_80; workspace = s4 codes + row sums."""
    sel = host_lib.qvit_select_kernel_act
    name = lambda kid: host_lib.qvit_kernel_name(kid).decode()  # noqa: E731
    assert name(sel(197, 384, 384, 4, 1, 0, 8, 7, -8, 7)) == "mma_sync"
    assert name(sel(197, 384, 384, 4, 1, 3, 8, 7, -8, 7)) == "mma_int4"
    assert name(sel(197, 384, 384, 2, 1, 3, 8, 0, -2, 1)) == "mma_int4"
    assert name(sel(197, 384, 384, 4, 1, 0, 9, 0, -8, 7)) == "mma_sync"
    assert name(sel(197, 384, 384, 4, 1, 0, 8, 7, -128, 127)) == "mma_sync"
    assert name(sel(1, 384, 384, 4, 1, 0, 8, 7, -8, 7)) == "gemv_dp4a"
    assert name(sel(1, 384, 384, 4, 1, 3, 9, 0, -8, 7)) == "mma_int4"
    assert sel(197, 384, 384, 4, 1, 3, 7, 5, -8, 7) == 0
    assert sel(197, 384, 384, 4, 1, 3, 11, 0, -8, 7) == 0  # Thor: the INT4 kernel is not built for sm_100+
    assert sel(197, 384, 384, 4, 1, 3, 9, 0, -9, 7) == 0
    kid = sel(197, 384, 384, 4, 1, 3, 9, 0, -8, 7)
    assert host_lib.qvit_workspace_size(197, 390, 4, kid) == -(-197 * 256 // 256) * 256 + -(-197 * 4 // 256) * 256
    assert host_lib.qvit_weight_words(390, 3, kid) == 4 * 12 and host_lib.qvit_weight_words(390, 4, 7) == 56


RING_SRC = r"""
#include <cstdio>
#include <vector>
#include "qvit_gemv_ring.h"
using namespace qvit;
int main() {
  // (n rows, vecs per row, grid warps): tails, fewer rows than warps, many rows per warp
  const int cases[][3] = {{1, 1, 16}, {37, 5, 16}, {8192, 256, 2112}, {130, 33, 64}, {5, 64, 8}, {1536, 24, 2112}};
  int bad = 0, stores = 0, rows_total = 0;
  for (const auto& c : cases) {
    const int n = c[0], vecs = c[1], nwarps = c[2];
    std::vector<int> seen(static_cast<size_t>(n) * vecs, 0);
    const int per_row = ring_steps_per_row(vecs);
    for (int gw = 0; gw < nwarps; ++gw) {
      const int steps = ring_rows(n, gw, nwarps) * per_row;
      for (int s = 0; s < steps; ++s) stores += ring_row_done(s, per_row);  // one reduction + store per row
      for (int s = 0; s < steps + 8; ++s) {  // + the ring's prefetch past the end (must read nothing)
        for (int lane = 0; lane < 32; ++lane) {
          const RingPos p = ring_step(s, steps, per_row, vecs, gw, nwarps, lane);
          if (p.valid) {
            const bool inside = p.row >= 0 && p.row < n && p.vec >= 0 && p.vec < vecs;
            if (inside) ++seen[static_cast<size_t>(p.row) * vecs + p.vec]; else ++bad;
          }
        }
      }
    }
    for (int v : seen) bad += v != 1;
    rows_total += n;
  }
  std::printf("{\"bad\": %d, \"stores\": %d, \"rows\": %d}\n", bad, stores, rows_total);
  return 0;
}
"""


def test_gemv_ring_reads_every_weight_vector_exactly_once(tmp_path):
    """gemv_ring's work assignment (qvit_gemv_ring.h, what the kernel calls): across all warps and lanes,
    every (row, 16-byte vector) is read exactly once, the prefetch past a warp's last step reads nothing."""
    if GXX is None:
        pytest.skip("needs g++")
    (tmp_path / "ring.cpp").write_text(RING_SRC)
    _run([GXX, "-std=c++14", "-O1", "-Wall", "-Wextra", "-Werror", "-I", CUDA_DIR, str(tmp_path / "ring.cpp"), "-o",
          str(tmp_path / "ring")])
    res = json.loads(_run([str(tmp_path / "ring")]))
    assert res["bad"] == 0 and res["stores"] == res["rows"]


def test_gemv_ring_kernel_uses_the_tested_assignment():
    """The kernel's inline work assignment is, expression for expression, the one tested above."""
    with open(os.path.join(CUDA_DIR, "lowbit_gemm.cu")) as f:
        kernel = f.read()
    kernel = kernel[kernel.index("gemv_ring_kernel("):]
    with open(os.path.join(CUDA_DIR, "qvit_gemv_ring.h")) as f:
        header = f.read()
    for expr in ("(vecs + 31) / 32", "(n - 1 - gwarp) / nwarps + 1", "gwarp + (s / per_row) * nwarps",
                 "lane + 32 * (s % per_row)", "s % per_row == per_row - 1"):
        assert expr in header, expr
        assert expr.replace("(n - 1", "(epi.n - 1") in kernel, expr
    assert "s < steps && vec < vecs" in kernel and "s < steps && vec < vecs" in header
