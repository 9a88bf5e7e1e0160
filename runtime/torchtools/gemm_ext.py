"""PyTorch front-end of the packed 2/3/4-bit GEMM kernels (runtime/cuda), built JIT on first use.

Why: the same CUDA kernels as the TensorRT plugin, testable and benchmarkable without TensorRT,
and swappable for a ``nn.Linear`` in bench's torch backend (:class:`LowBitLinearCUDA`).

Semantics are exactly the ``QvitLowBitLinear`` node (:func:`qformat.lowbit_linear_reference`)::

    xq = clip(round_half_even(x / act_scale), act_lo, act_hi)   (int8 x: already codes, only clipped)
    y  = (xq @ unpack(packed).T) * (act_scale * weight_scale) + bias

Weights stay in the qformat packed layout; :func:`prepare` / :func:`repack` only pad them once
(rows to 64, words per row to cover ``round_up(K, 64)`` values and a multiple of 4) with
code-of-zero words -- the same padding as ``qvit_repack_weights`` in runtime/cuda/lowbit_host.cpp.
Everything except the kernel launch (argument checks, repack) runs on the CPU.
"""

import os
import threading
from typing import Any, Dict, Optional

import numpy as np

import qformat
from qformat.errors import UserError

try:  # torch is optional at import time so the numpy helpers work everywhere
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - the project pins torch
    torch = None
    nn = None

#: Element type codes (runtime/cuda/lowbit_host.h QVIT_DTYPE_*).
DTYPE_F32, DTYPE_F16, DTYPE_I8, DTYPE_I32 = 0, 1, 2, 3
#: Math paths (QVIT_PATH_*).
PATHS = {"auto": 0, "a8": 1, "a16": 2, "a4": 3}
#: Kernels (QVIT_KERNEL_*).
KERNELS = {"a16_gemv": 1, "a16_tiled": 2, "a8_mma": 3, "a8_dp4a": 4, "a8_int": 5, "gemv_dp4a": 6, "mma_sync": 7,
           "mma_int4": 8, "gemv_ring": 9}
#: Kernels that read the nibble-order weight layout (int4_emu.repack_nib) instead of the expand order.
NIB_KERNELS = frozenset({"mma_int4"})
KERNEL_NAMES = {v: k for k, v in KERNELS.items()}
#: Repack padding (qvit_lowbit_format.h kRepackRowAlign / kRepackKAlign / repack_word_align).
REPACK_ROW_ALIGN = 64
REPACK_K_ALIGN = 64
REPACK_WORD_ALIGN = {2: 4, 3: 16, 4: 8}

CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda")
EXT_SOURCES = ("torch_ext.cpp", "lowbit_gemm.cu", "lowbit_host.cpp")
EXT_NAME = "qvit_lowbit_ext"


class LowBitArgumentError(UserError, ValueError):
    """Bad arguments to the low-bit GEMM (shapes, bits, act grid, path)."""


# ----------------------------------------------------------------------------- numpy side

def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def zero_word(bits: int) -> int:
    """A qformat word whose every slot holds the code of q = 0 (the format's padding word)."""
    per = qformat.values_per_word(bits)
    code0 = -qformat.qrange(bits, signed=True)[0]
    word = 0
    for i in range(per):
        word |= code0 << (bits * i)
    return word


def repacked_rows(n: int) -> int:
    """Rows of the repacked matrix: N padded to a multiple of the 64-row tile."""
    return _round_up(int(n), REPACK_ROW_ALIGN)


def repacked_words(k: int, bits: int) -> int:
    """Words per repacked row: cover round_up(K, 64) values, then a multiple of the per-width word alignment."""
    return _round_up(qformat.packed_words(_round_up(int(k), REPACK_K_ALIGN), bits), REPACK_WORD_ALIGN[bits])


def slot_bits(bits: int) -> list:
    """Bit positions, per element j of a word, of the kernels' "expand order" (qvit_lowbit_format.h).

    A shift and one AND then yield four consecutive codes as the four bytes of a 32-bit word.
    Each entry lists the word bits that hold element j's code, least significant first.
    """
    per = qformat.values_per_word(bits)
    if bits == 4:
        return [[4 * (2 * (j % 4) + j // 4) + i for i in range(4)] for j in range(per)]
    if bits == 2:
        return [[2 * (4 * (j % 4) + j // 4) + i for i in range(2)] for j in range(per)]
    out = [[8 * (j % 4) + 3 * (j // 4) + i for i in range(3)] for j in range(8)]
    return out + [[6, 7, 14], [15, 22, 23]]


def _to_slots(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint32 codes [..., per] -> repacked words [...] in expand order."""
    out = np.zeros(codes.shape[:-1], dtype=np.uint32)
    for j, positions in enumerate(slot_bits(bits)):
        for i, pos in enumerate(positions):
            out |= ((codes[..., j] >> np.uint32(i)) & np.uint32(1)) << np.uint32(pos)
    return out


def check_bits(bits: Any) -> int:
    """Weight bits as int, or raise naming the packed widths."""
    try:
        b = qformat.check_bits(bits, "bits")
        qformat.values_per_word(b)
    except qformat.FormatError as e:
        raise LowBitArgumentError(str(e)) from None
    return b


def check_act_params(act_scale: Any, act_lo: Any, act_hi: Any) -> None:
    """The activation grid must be a positive finite scale and an INT8 sub-range."""
    s = float(act_scale)
    if not (np.isfinite(s) and s > 0):
        raise LowBitArgumentError("act_scale must be a positive finite float, got {!r}".format(act_scale))
    lo, hi = int(act_lo), int(act_hi)
    if lo != act_lo or hi != act_hi:
        raise LowBitArgumentError("act_lo/act_hi must be integers, got {!r}/{!r}".format(act_lo, act_hi))
    if not -128 <= lo <= hi <= 127:
        raise LowBitArgumentError("[act_lo, act_hi] = [{}, {}] must lie within INT8 [-128, 127]".format(lo, hi))


def check_path(path: str) -> int:
    """Path name -> QVIT_PATH_* code."""
    if path not in PATHS:
        raise LowBitArgumentError("path must be one of {}, got {!r}".format("/".join(sorted(PATHS)), path))
    return PATHS[path]


def check_kernel(kernel: Optional[str]) -> Optional[int]:
    """Kernel name -> QVIT_KERNEL_* code (None = choose automatically)."""
    if kernel is None:
        return None
    if kernel not in KERNELS:
        raise LowBitArgumentError("kernel must be one of {}, got {!r}".format("/".join(sorted(KERNELS)), kernel))
    return KERNELS[kernel]


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if torch is not None and isinstance(a, torch.Tensor) else np.asarray(a)


def _as_packed(packed: Any, bits: int, in_features: int) -> np.ndarray:
    arr = np.ascontiguousarray(_numpy(packed))
    if arr.dtype not in (np.int32, np.uint32):
        raise LowBitArgumentError("packed weights must be int32/uint32 words, got {}".format(arr.dtype))
    if arr.ndim != 2:
        raise LowBitArgumentError("packed weights must be [N, words], got shape {}".format(arr.shape))
    words = qformat.packed_words(in_features, bits)
    if arr.shape[1] != words:
        raise LowBitArgumentError("packed weights have {} words per row; K={} at {} bits needs {}".format(
            arr.shape[1], in_features, bits, words))
    return arr.view(np.uint32)


def repack(packed: Any, bits: int, in_features: int) -> np.ndarray:
    """One-time kernel repack: ``uint32[N, W]`` -> ``uint32[repacked_rows(N), repacked_words(K)]``.

    Every code keeps its value and moves to its expand-order slot (:func:`slot_bits`); padding
    slots hold the code of zero.  ``qvit_repack_weights`` (runtime/cuda/lowbit_host.cpp) is the C++ twin.
    """
    b = check_bits(bits)
    k = int(in_features)
    if k <= 0:
        raise LowBitArgumentError("in_features must be positive, got {}".format(in_features))
    src = _as_packed(packed, b, k)
    n = src.shape[0]
    if n <= 0:
        raise LowBitArgumentError("packed weights have no rows")
    per = qformat.values_per_word(b)
    code0 = np.uint32(-qformat.qrange(b, signed=True)[0])
    codes = np.full((repacked_rows(n), repacked_words(k, b), per), code0, dtype=np.uint32)
    shifts = np.arange(per, dtype=np.uint32) * np.uint32(b)
    codes[:n, : src.shape[1]] = (src[:, :, None] >> shifts) & np.uint32((1 << b) - 1)
    return _to_slots(codes, b)


def _vector(v: Any, n: int, what: str, default: float = 0.0) -> np.ndarray:
    if v is None:
        return np.full((n,), default, dtype=np.float32)
    arr = np.asarray(_numpy(v), dtype=np.float32).reshape(-1)
    if arr.shape[0] != n:
        raise LowBitArgumentError("{} must have out_features={} values, got {}".format(what, n, arr.shape[0]))
    return np.ascontiguousarray(arr)


def split_rows(words: Any, row_bits: Any, in_features: int) -> Dict[int, tuple]:
    """A mixed-width weight (qformat v2: rows concatenated, row n at ``row_bits[n]`` bits) as
    ``{bits: (packed [n_b, packed_words(K, bits)], row indices)}`` -- one kernel segment per width."""
    flat = np.ascontiguousarray(_numpy(words)).reshape(-1)
    if flat.dtype not in (np.int32, np.uint32):
        raise LowBitArgumentError("packed weights must be int32/uint32 words, got {}".format(flat.dtype))
    flat = flat.view(np.uint32)
    rb = np.asarray(_numpy(row_bits), dtype=np.int64).reshape(-1)
    k = int(in_features)
    widths = np.array([qformat.packed_words(k, check_bits(int(b))) for b in rb], dtype=np.int64)
    if int(widths.sum()) != flat.shape[0]:
        raise LowBitArgumentError("mixed-width weights have {} words; rows at {} bits need {}".format(
            flat.shape[0], sorted(set(rb.tolist())), int(widths.sum())))
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    out = {}
    for b in sorted(set(rb.tolist())):
        idx = np.nonzero(rb == b)[0]
        w = qformat.packed_words(k, b)
        rows = flat[(starts[idx][:, None] + np.arange(w)[None, :])]
        out[int(b)] = (rows, idx.astype(np.int32))
    return out


# ----------------------------------------------------------------------------- extension

_EXT = None
_EXT_LOCK = threading.Lock()


def require_cuda() -> None:
    """Raise a one-line UserError when torch or a CUDA GPU is missing."""
    if torch is None:
        raise UserError("the low-bit GEMM extension needs PyTorch (pip install torch)")
    if not torch.cuda.is_available():
        raise UserError("the low-bit GEMM kernels need a CUDA GPU (torch.cuda.is_available() is False)")


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root that holds ``include/cuda_runtime_api.h``.

    ``CUDA_HOME``/``CUDA_PATH`` first, then nvcc's real location (a wrapper script in /usr/local/bin
    must not make it guess /usr/local), then the usual install prefixes.
    """
    import glob
    import shutil

    cands = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime_api.h")):
            return c
    return None


def load_extension(verbose: bool = False) -> Any:
    """Build (first call, cached by torch under ~/.cache/torch_extensions) and return the extension."""
    global _EXT
    require_cuda()
    with _EXT_LOCK:
        if _EXT is None:
            home = find_cuda_home()
            if home is None:
                raise UserError("the low-bit GEMM extension needs the CUDA toolkit (nvcc and include/"
                                "cuda_runtime_api.h): set CUDA_HOME")
            os.environ["CUDA_HOME"] = home
            from torch.utils import cpp_extension

            cpp_extension.CUDA_HOME = home  # read once at import time: keep it consistent
            _EXT = cpp_extension.load(
                name=EXT_NAME,
                sources=[os.path.join(CUDA_DIR, s) for s in EXT_SOURCES],
                extra_include_paths=[CUDA_DIR],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3"],
                verbose=verbose or bool(os.environ.get("QVIT_EXT_VERBOSE")),
            )
    return _EXT


_CC_CACHE = {}  # type: Dict[int, tuple]


def _capability(device: Any) -> tuple:
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    if idx not in _CC_CACHE:
        _CC_CACHE[idx] = torch.cuda.get_device_capability(idx)
    return _CC_CACHE[idx]


def _dtype_code(t: Any) -> int:
    codes = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16, torch.int8: DTYPE_I8}
    if t.dtype not in codes:
        raise LowBitArgumentError("x must be float32, float16 or int8 (act codes), got {}".format(t.dtype))
    return codes[t.dtype]


def select_kernel(m: int, n: int, k: int, bits: int, x_dtype: Any = None, path: str = "auto",
                  device: Any = "cuda", act_lo: int = -128, act_hi: int = 127) -> str:
    """Name of the kernel ``lowbit_linear`` runs for this problem on ``device`` (the act grid decides INT4)."""
    ext = load_extension()
    cc = _capability(device)
    code = DTYPE_F16 if x_dtype is None else _dtype_code(torch.empty(0, dtype=x_dtype))
    kid = ext.select_kernel(int(m), int(n), int(k), check_bits(bits), code, check_path(path), cc[0], cc[1],
                            int(act_lo), int(act_hi))
    if kid == 0:
        raise LowBitArgumentError("no kernel for m={} n={} k={} bits={} path={}".format(m, n, k, bits, path))
    return KERNEL_NAMES[kid]


class Segment:
    """The weight rows of one bit width: repacked words and the output column of each row."""

    def __init__(self, bits: int, w: Any, col_map: Any, rows: int, w_nib: Any = None) -> None:
        self.bits = bits
        self.w = w
        self.col_map = col_map  # None: rows are columns 0..rows-1 (uniform layer)
        self.rows = rows
        self.w_nib = w_nib  # nibble-order words for mma_int4 (prepare(..., int4=True)), else None

    def words_for(self, kernel_id: int) -> Any:
        """The weight layout ``kernel_id`` reads."""
        if KERNEL_NAMES.get(kernel_id) in NIB_KERNELS:
            if self.w_nib is None:
                raise LowBitArgumentError("the INT4 kernel needs weights prepared with int4=True")
            return self.w_nib
        return self.w


class PreparedWeights:
    """Repacked weights + scales + bias on one device: the one-time engine-build step."""

    def __init__(self, segments: list, weight_scale: Any, bias: Any, in_features: int, out_features: int) -> None:
        self.segments = segments
        self.weight_scale = weight_scale
        self.bias = bias
        self.in_features = in_features
        self.out_features = out_features

    @property
    def bits(self) -> int:
        """Weight bits (the widest, for a mixed-width layer)."""
        return max(s.bits for s in self.segments)


def prepare_numpy(packed: Any, weight_scale: Any, bias: Any, bits: int, in_features: int,
                  row_bits: Any = None, int4: bool = False) -> Dict[str, Any]:
    """Validated host arrays for the kernels (CPU only): segments of repacked words, float32 scale and bias.

    Uniform layers: ``packed`` is ``[N, packed_words(K, bits)]``.  Mixed widths: ``row_bits`` ([N]) gives
    each row's width and ``packed`` is the qformat v2 flat word list (rows concatenated at their widths).
    """
    k = int(in_features)
    if k <= 0:
        raise LowBitArgumentError("in_features must be positive, got {}".format(in_features))
    if row_bits is None:
        b = check_bits(bits)
        n = _as_packed(packed, b, k).shape[0]
        segments = [(b, repack(packed, b, k), None, n)]
    else:
        parts = split_rows(packed, row_bits, k)
        n = int(sum(len(idx) for _, idx in parts.values()))
        segments = [(b, repack(rows, b, k), idx, len(idx)) for b, (rows, idx) in parts.items()]
    if weight_scale is None:
        raise LowBitArgumentError("weight_scale is required (float32 [out_features])")
    ws = _vector(weight_scale, n, "weight_scale")
    if not np.all(np.isfinite(ws)):
        raise LowBitArgumentError("weight_scale must be finite")
    nib = None
    if int4:  # the INT4 kernel's layout too (same codes, nibble order; runtime/torchtools/int4_emu.py)
        from runtime.torchtools import int4_emu

        sources = {b: rows for b, (rows, _) in split_rows(packed, row_bits, k).items()} if row_bits is not None \
            else {segments[0][0]: _as_packed(packed, segments[0][0], k)}
        nib = [int4_emu.repack_nib(sources[b], b, k) for b, _, _, _ in segments]
    return {"segments": segments, "weight_scale": ws, "bias": _vector(bias, n, "bias"),
            "in_features": k, "out_features": n, "nib": nib}


def _upload(host: Dict[str, Any], device: Any) -> PreparedWeights:
    dev = torch.device(device)
    nib = host.get("nib") or [None] * len(host["segments"])
    segs = [Segment(b, torch.from_numpy(w.view(np.int32)).to(dev),
                    None if idx is None else torch.from_numpy(np.ascontiguousarray(idx, np.int32)).to(dev), rows,
                    None if wn is None else torch.from_numpy(wn.view(np.int32)).to(dev))
            for (b, w, idx, rows), wn in zip(host["segments"], nib)]
    return PreparedWeights(segs, torch.from_numpy(host["weight_scale"]).to(dev),
                           torch.from_numpy(host["bias"]).to(dev), host["in_features"], host["out_features"])


def prepare(packed: Any, weight_scale: Any, bias: Any, bits: int, in_features: int, device: Any = "cuda",
            row_bits: Any = None, int4: bool = False) -> PreparedWeights:
    """Repack once and upload; pass the result as ``packed`` to :func:`lowbit_linear` in loops.
    ``int4``: also the nibble-order layout of the INT4 tensor-core kernel (activations within [-8, 7])."""
    host = prepare_numpy(packed, weight_scale, bias, bits, in_features, row_bits, int4)
    require_cuda()
    return _upload(host, device)


def _run(x: Any, prep: PreparedWeights, act_scale: float, act_lo: int, act_hi: int, path: str,
         kernel: Optional[str], out_code: int, y: Any = None) -> Any:
    check_act_params(act_scale, act_lo, act_hi)
    path_code = check_path(path)
    kid = check_kernel(kernel)
    if torch is None or not isinstance(x, torch.Tensor):
        raise LowBitArgumentError("x must be a torch.Tensor")
    if x.dim() < 1 or x.shape[-1] != prep.in_features:
        raise LowBitArgumentError("x last dim must be in_features={}, got shape {}".format(
            prep.in_features, tuple(x.shape)))
    xcode = _dtype_code(x)
    require_cuda()
    if not x.is_cuda:
        raise LowBitArgumentError("x must be a CUDA tensor (got device {})".format(x.device))
    ext = load_extension()
    x2d = x.reshape(-1, prep.in_features).contiguous()
    out_dtype = {DTYPE_F32: torch.float32, DTYPE_F16: torch.float16, DTYPE_I32: torch.int32}[out_code]
    if y is None:
        y = torch.empty((x2d.shape[0], prep.out_features), dtype=out_dtype, device=x.device)
    cc = _capability(x.device)
    for seg in prep.segments:
        sid = kid
        if sid is None:
            sid = ext.select_kernel(x2d.shape[0], seg.rows, prep.in_features, seg.bits, xcode, path_code, cc[0], cc[1],
                                    int(act_lo), int(act_hi))
            if sid == 0:
                raise LowBitArgumentError("no kernel for this problem (bits={}, path={})".format(seg.bits, path))
            if KERNEL_NAMES[sid] in NIB_KERNELS and seg.w_nib is None:
                sid = ext.select_kernel(x2d.shape[0], seg.rows, prep.in_features, seg.bits, xcode, path_code,
                                        cc[0], cc[1], -128, 127)  # weights prepared without the INT4 layout
        ext.gemm_into(y, x2d, seg.words_for(sid), prep.weight_scale, prep.bias, seg.col_map, seg.bits, seg.rows,
                      float(act_scale), int(act_lo), int(act_hi), sid, None)
    return y.reshape(tuple(x.shape[:-1]) + (prep.out_features,))


def check_int4_grid(path: str, kernel: Optional[str], act_lo: int, act_hi: int) -> None:
    """The INT4 kernel multiplies signed 4-bit activation codes: a forced one needs [act_lo, act_hi] in [-8, 7]."""
    if (kernel in NIB_KERNELS or path == "a4") and not (-8 <= act_lo and act_hi <= 7):
        raise LowBitArgumentError("the INT4 path needs act_lo >= -8 and act_hi <= 7 (4-bit activations), got "
                                  "[{}, {}]: use path='auto' or 'a8'".format(act_lo, act_hi))


def _wants_int4(path: str, kernel: Optional[str], act_lo: int, act_hi: int) -> bool:
    """Whether a call may run the INT4 kernel (so raw packed weights get its layout too)."""
    return kernel in NIB_KERNELS or (kernel is None and path in ("auto", "a4") and -8 <= act_lo and act_hi <= 7)


def _prepared(x: Any, packed: Any, weight_scale: Any, bias: Any, bits: Any, row_bits: Any = None,
              int4: bool = False) -> PreparedWeights:
    if isinstance(packed, PreparedWeights):
        return packed
    if torch is None or not isinstance(x, torch.Tensor):
        raise LowBitArgumentError("x must be a torch.Tensor")
    host = prepare_numpy(packed, weight_scale, bias, bits, x.shape[-1], row_bits, int4)  # validates on the CPU
    require_cuda()
    return _upload(host, x.device)


def lowbit_linear(x: Any, packed: Any, weight_scale: Any, bias: Any, bits: Any, act_scale: float, act_lo: int,
                  act_hi: int, path: str = "auto", kernel: Optional[str] = None, out_dtype: Any = None,
                  row_bits: Any = None) -> Any:
    """``QvitLowBitLinear`` on a CUDA tensor ``x[..., K]`` -> ``[..., N]``.

    ``packed``: qformat words ``[N, ceil(K / per_word)]`` (repacked on every call -- use :func:`prepare`
    in loops), a mixed-width flat word list with ``row_bits``, or a :class:`PreparedWeights`.
    ``path``: "auto" | "a8" | "a16"; ``kernel`` forces one kernel by name (tests).  Output dtype:
    ``out_dtype`` or x's float dtype (float32 for int8 x).
    """
    check_path(path)
    check_kernel(kernel)
    check_act_params(act_scale, act_lo, act_hi)
    check_int4_grid(path, kernel, act_lo, act_hi)
    prep = _prepared(x, packed, weight_scale, bias, bits, row_bits, _wants_int4(path, kernel, act_lo, act_hi))
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype in (torch.float16, torch.float32) else torch.float32
    out_codes = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16}
    if out_dtype not in out_codes:
        raise LowBitArgumentError("out_dtype must be float32 or float16, got {}".format(out_dtype))
    return _run(x, prep, act_scale, act_lo, act_hi, path, kernel, out_codes[out_dtype])


def lowbit_linear_acc(x: Any, packed: Any, bits: Any, act_scale: float, act_lo: int, act_hi: int,
                      path: str = "auto", kernel: Optional[str] = None, row_bits: Any = None) -> Any:
    """Debug entry: the exact int32 accumulators ``xq @ q.T`` (``[..., N]``) of the chosen kernel."""
    check_path(path)
    check_kernel(kernel)
    check_act_params(act_scale, act_lo, act_hi)
    check_int4_grid(path, kernel, act_lo, act_hi)
    if isinstance(packed, PreparedWeights):
        prep = packed
    else:
        if row_bits is None:
            n = _as_packed(packed, check_bits(bits), x.shape[-1]).shape[0]
        else:
            n = int(np.asarray(_numpy(row_bits)).size)
        prep = _prepared(x, packed, np.ones(n, np.float32), None, bits, row_bits,
                         _wants_int4(path, kernel, act_lo, act_hi))
    return _run(x, prep, act_scale, act_lo, act_hi, path, kernel, DTYPE_I32)


# ----------------------------------------------------------------------------- fused producer

def layernorm_quantize_reference(x: Any, weight: Any, bias: Any, eps: float, act_scale: float, act_lo: int,
                                 act_hi: int) -> tuple:
    """numpy reference of the fused producer: (int8 codes of clip(rint(LayerNorm(x) / act_scale)), row sums)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = ((x - mean) / np.sqrt(var + eps) * np.asarray(weight, np.float64) + np.asarray(bias, np.float64))
    codes = np.clip(qformat.round_half_even((y / np.float64(act_scale)).astype(np.float32)), act_lo, act_hi)
    return codes.astype(np.int8), codes.astype(np.int64).sum(axis=-1)


def layernorm_quantize(x: Any, weight: Any, bias: Any, eps: float, act_scale: float, act_lo: int, act_hi: int) -> tuple:
    """LayerNorm and the next node's activation quantizer in ONE kernel: ``(codes int8 [..., K], row_sum int32 [...])``.

    The codes feed :func:`lowbit_linear` as an int8 ``x`` (already on the node's grid) -- no separate
    quantize kernel between the LayerNorm and the low-bit Linear.  K must be a multiple of 4.
    """
    check_act_params(act_scale, act_lo, act_hi)
    if torch is None or not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] % 4:
        raise LowBitArgumentError("x must be a torch.Tensor [..., K] with K a multiple of 4")
    if not (eps >= 0):
        raise LowBitArgumentError("eps must be >= 0, got {}".format(eps))
    require_cuda()
    if not x.is_cuda:
        raise LowBitArgumentError("x must be a CUDA tensor (got device {})".format(x.device))
    k = x.shape[-1]
    g = torch.as_tensor(weight, dtype=torch.float32, device=x.device).reshape(k).contiguous()
    b = torch.as_tensor(bias, dtype=torch.float32, device=x.device).reshape(k).contiguous()
    codes, sums = load_extension().layernorm_quantize(x.reshape(-1, k).contiguous(), g, b, float(eps),
                                                      float(act_scale), int(act_lo), int(act_hi))
    return codes.reshape(x.shape), sums.reshape(x.shape[:-1])


# ----------------------------------------------------------------------------- nn.Module

if nn is not None:

    class LowBitLinearCUDA(nn.Module):
        """A ``QvitLowBitLinear`` layer on the CUDA kernels; drop-in for ``nn.Linear`` at inference.

        Built from the node's attributes; weights are repacked once here and kept as buffers
        (so ``.to(device)`` moves them and ``state_dict`` carries them).  A mixed-width layer
        (``row_bits``) keeps one repacked matrix and one row -> column map per width.
        """

        def __init__(self, packed: Any, weight_scale: Any, bias: Any, bits: int, in_features: int,
                     act_scale: float, act_lo: int, act_hi: int, path: str = "auto",
                     kernel: Optional[str] = None, row_bits: Any = None) -> None:
            super().__init__()
            check_act_params(act_scale, act_lo, act_hi)
            check_path(path)
            check_kernel(kernel)
            check_int4_grid(path, kernel, act_lo, act_hi)
            host = prepare_numpy(packed, weight_scale, bias, bits, in_features, row_bits,
                                 _wants_int4(path, kernel, act_lo, act_hi))
            self.in_features = host["in_features"]
            self.out_features = host["out_features"]
            self.act_scale = float(act_scale)
            self.act_lo = int(act_lo)
            self.act_hi = int(act_hi)
            self.path = path
            self.kernel = kernel
            self.segment_bits = [b for b, _, _, _ in host["segments"]]
            self.mixed = row_bits is not None
            for i, (b, w, idx, _) in enumerate(host["segments"]):
                suffix = "_b{}".format(b) if self.mixed else ""
                self.register_buffer("weight_repacked" + suffix, torch.from_numpy(w.view(np.int32).copy()))
                if host["nib"] is not None:  # the INT4 kernel's nibble-order layout (4-bit activation grid)
                    self.register_buffer("weight_nib" + suffix, torch.from_numpy(host["nib"][i].view(np.int32).copy()))
                if idx is not None:
                    self.register_buffer("col_map" + suffix, torch.from_numpy(np.array(idx, np.int32)))
            self.register_buffer("weight_scale", torch.from_numpy(host["weight_scale"].copy()))
            self.register_buffer("bias", torch.from_numpy(host["bias"].copy()))

        @property
        def bits(self) -> int:
            return max(self.segment_bits)

        @classmethod
        def from_linear(cls, linear: Any, bits: int, act_scale: float, act_lo: int = -128, act_hi: int = 127,
                        path: str = "auto") -> "LowBitLinearCUDA":
            """Quantize an ``nn.Linear`` per output channel (max-abs scale) the qformat way (bench)."""
            b = check_bits(bits)
            w = linear.weight.detach().float().cpu().numpy()
            qmax = qformat.qrange(b, signed=True)[1]
            scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / qmax
            q = qformat.quantize_weight(w, scale, b)
            bias = None if linear.bias is None else linear.bias.detach().float().cpu().numpy()
            mod = cls(qformat.pack(q, b), scale.astype(np.float32), bias, b, w.shape[1], act_scale, act_lo, act_hi,
                      path=path)
            return mod.to(linear.weight.device)

        def prepared(self) -> PreparedWeights:
            segs = []
            for b in self.segment_bits:
                suffix = "_b{}".format(b) if self.mixed else ""
                w = getattr(self, "weight_repacked" + suffix)
                cmap = getattr(self, "col_map" + suffix, None)
                rows = self.out_features if cmap is None else int(cmap.numel())
                segs.append(Segment(b, w, cmap, rows, getattr(self, "weight_nib" + suffix, None)))
            return PreparedWeights(segs, self.weight_scale, self.bias, self.in_features, self.out_features)

        def forward(self, x: Any) -> Any:
            out = x.dtype if x.dtype in (torch.float16, torch.float32) else torch.float32
            return lowbit_linear(x, self.prepared(), None, None, self.bits, self.act_scale, self.act_lo,
                                 self.act_hi, path=self.path, kernel=self.kernel, out_dtype=out)

        def extra_repr(self) -> str:
            bits = "/".join(str(b) for b in self.segment_bits)
            return "in_features={}, out_features={}, bits={}, act=[{}, {}]*{:g}, path={}".format(
                self.in_features, self.out_features, bits, self.act_lo, self.act_hi, self.act_scale, self.path)


def swap_linears(module: Any, bits: int = 4, act_scale: Optional[float] = None, act_lo: int = -128,
                 act_hi: int = 127, path: str = "auto", specs: Any = None) -> Any:
    """Replace Linears under ``module`` by :class:`LowBitLinearCUDA` (in place; returns ``module``).

    A converted model: every linear :class:`qformat.SiteSpec` (``specs``, default the model's
    ``qvit_specs`` from ``train.qat.convert``) that has a packed form is swapped exactly from
    :func:`qformat.lowbit_attrs` -- the exporter's node attributes; 8-bit and float layers stay as
    they are; mixed-width layers keep one repacked matrix per width (segments).
    A plain float model: every ``nn.Linear`` is quantized per channel with ``bits`` and needs
    ``act_scale`` (the activation grid is not in a plain Linear).
    """
    if nn is None:
        raise UserError("swap_linears needs PyTorch")
    specs = specs if specs is not None else getattr(module, "qvit_specs", None)
    if specs is None and any(hasattr(m, "weight_int") for m in module.modules()):
        raise UserError("swap_linears: this converted model carries no qvit_specs; load it with "
                        "train.deploy.load_deployable and pass specs=")
    if specs is None and act_scale is None:
        raise UserError("swap_linears: the model is not a converted qvit-edge model; pass act_scale (and bits)")
    _swap(module, specs, bits, act_scale, act_lo, act_hi, path)
    return module


def _swap(module: Any, specs: Any, bits: int, act_scale: Optional[float], act_lo: int, act_hi: int,
          path: str) -> None:
    """With ``specs``: the layers they give a uniform packed form; without: every float nn.Linear."""
    if specs is None:
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, LowBitLinearCUDA.from_linear(child, bits, act_scale, act_lo, act_hi, path=path))
            else:
                _swap(child, None, bits, act_scale, act_lo, act_hi, path)
        return
    for site in specs:
        if site.op != "linear":
            continue
        try:
            a = qformat.lowbit_attrs(site)
        except qformat.FormatError:  # no packed form (8-bit head, per-channel input): stays in PyTorch
            continue
        rb = (qformat.row_bits(a["group_bits"], a["group_size"], a["out_features"]) if "group_bits" in a
              else None)  # mixed widths: one repacked matrix per width (segments)
        parent_name, _, child = site.name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        old = getattr(parent, child)
        new = LowBitLinearCUDA(a["weight_packed"].view(np.uint32), a["weight_scale"], a["bias"], a["bits"],
                               a["in_features"], a["act_scale"], a["act_lo"], a["act_hi"], path=path, row_bits=rb)
        device = next((t.device for t in old.buffers()), None)
        setattr(parent, child, new.to(device) if device is not None else new)
