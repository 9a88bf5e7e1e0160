"""The built-in parity check: the converted PyTorch model vs the exported graph in ONNX Runtime.

Which graph tensors hold each site's activation codes comes from the format's emitter (its
*taps*); which integers PyTorch computes comes from the site's :class:`qformat.SiteSpec`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch

from qformat.errors import UserError

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class Parity:
    """Plain (PyTorch vs ORT logits) and tie-aligned numbers; see :func:`run_parity`."""

    n: int
    max_abs: float
    max_rel: float  # max |ort - torch| / max |torch|
    top1_agree: float
    atol: float
    rtol: float
    min_agree: float
    passed: bool
    aligned: bool = False  # float ties resolved as ORT did (quantized graphs)
    aligned_max_abs: float = 0.0
    aligned_max_rel: float = 0.0
    aligned_top1_agree: float = 1.0
    codes: int = 0  # activation codes compared
    ties: int = 0  # codes that differ at a float tie (|x/s - (c + 0.5)| <= TIE_EPS)
    mismatches: int = 0  # codes that differ anywhere else: a real export error

    def line(self) -> str:
        ok = "ok" if self.passed else "FAILED"
        tol = (f"atol {self.atol:g}, rtol {self.rtol:g} x max|logit|, min top-1 agreement {100 * self.min_agree:g}%")
        plain = (f"max abs {self.max_abs:.3g}, rel {self.max_rel:.3g}, top-1 agreement {100 * self.top1_agree:.2f}%")
        if not self.aligned:
            return f"parity on {self.n} images: {plain} ({tol}): {ok}"
        return (f"parity on {self.n} images: {plain}; {self.codes} activation codes: {self.mismatches} mismatches, "
                f"{self.ties} float ties; tie-aligned: max abs {self.aligned_max_abs:.3g}, "
                f"rel {self.aligned_max_rel:.3g}, top-1 agreement {100 * self.aligned_top1_agree:.2f}% ({tol}): {ok}")

    def to_dict(self) -> dict:
        return asdict(self)


def load_images(n: int, dep, calib_dir: str | None = None) -> torch.Tensor:
    """``n`` images preprocessed for the :class:`train.deploy.Deployable` ``dep``: Fashion-MNIST
    test (default) or the files of ``calib_dir``."""
    if not calib_dir:
        return dep.test_images(n)
    if not os.path.isdir(calib_dir):
        raise UserError(f"--calib-dir {calib_dir} is not a directory of images")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(calib_dir) for f in fs if f.lower().endswith(_IMAGE_EXT))
    if not files:
        raise UserError(f"--calib-dir {calib_dir} holds no images ({', '.join(_IMAGE_EXT)})")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UserError("--calib-dir needs Pillow (pip install pillow)") from None
    return dep.image_files(files, n, calib_dir)


def ort_session(model: onnx.ModelProto, threads: int | None = None):
    import onnxruntime as ort

    from qformat.ort import session_options

    so = session_options(ort, threads)
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise UserError(f"ONNX Runtime cannot load the exported graph: {str(e).splitlines()[0]}") from None


TIE_EPS = 2e-3  # in quantization steps: how close to a rounding boundary counts as a float tie


def _stats(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max()) or 1.0
    max_abs = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(got).all():
        max_abs = float("inf")
    agree = float(np.mean(ref.argmax(-1) == got.argmax(-1))) if ref.size else 1.0
    return max_abs, max_abs / scale, agree


def compare(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float, min_agree: float = 0.0) -> Parity:
    """Pass iff ``max|got - ref| <= atol + rtol * max|ref|`` and top-1 agreement >= ``min_agree``."""
    max_abs, rel, agree = _stats(ref, got)
    scale = float(np.abs(ref).max()) or 1.0
    passed = bool(max_abs <= atol + rtol * scale and agree >= min_agree)
    return Parity(int(ref.shape[0]), max_abs, rel, agree, atol, rtol, min_agree, passed)


def _with_outputs(graph: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    g = onnx.ModelProto()
    g.CopyFrom(graph)
    del g.graph.value_info[:]
    have = {o.name for o in g.graph.output}
    for t in names:
        if t not in have:
            g.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
            have.add(t)
    return g


class _Aligner:
    """Forward pre-hooks that hand each quantized site ORT's integer codes, counting differences.

    A code may differ from PyTorch's only where ``x / s`` sits on a rounding boundary to
    float precision (the kernels sum in different orders); anything else is a mismatch.
    Feeding ``codes * s`` into the site's quantizer (which maps it to itself) keeps both runs on
    the same discrete path, so one tie does not cascade through a deep low-bit network and the
    logits can be compared tightly.
    """

    def __init__(self, model: torch.nn.Module, sites: list, taps: dict[str, tuple[str, str]]) -> None:
        self.sites = [(s, model.get_submodule(s.name)) for s in sites if s.name in taps]
        self.taps = taps
        self.outs: dict[str, np.ndarray] = {}
        self.codes = self.ties = self.mismatches = 0

    def _ort_codes(self, site, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, like: torch.Tensor):
        tensor, kind = self.taps[site.name]
        t = torch.from_numpy(np.asarray(self.outs[tensor], dtype=np.float32))
        if kind == "x":  # a lowbit node's float input: quantize exactly as the node does (per-tensor)
            t = torch.clamp(torch.round(t / s), lo, hi)
        if tuple(t.shape) != tuple(like.shape) and t.dim() >= 2 and t.transpose(-1, -2).shape == like.shape:
            t = t.transpose(-1, -2)  # K^T: the graph quantizes after the transpose
        return t.reshape(like.shape)

    def hook(self, site):
        spec = site.input
        s = torch.from_numpy(spec.scale_view().astype(np.float32))
        lo, hi = (torch.from_numpy(np.asarray(v, np.float32)) for v in spec.bounds())

        def fn(_mod, args):
            xi = args[0]
            v = xi / s
            ct = torch.clamp(torch.round(v), lo, hi)
            co = self._ort_codes(site, s, lo, hi, ct)
            diff = ct != co
            tie = diff & ((ct - co).abs() == 1) & ((v - (torch.minimum(ct, co) + 0.5)).abs() <= TIE_EPS)
            self.codes += ct.numel()
            self.ties += int(tie.sum())
            self.mismatches += int((diff & ~tie).sum())
            return (co * s,) + tuple(args[1:])
        return fn


def run_parity(reference, model: onnx.ModelProto, x: torch.Tensor, atol: float, rtol: float,
               min_agree: float = 0.0, batch: int | None = None, taps: dict | None = None,
               sites: list | None = None) -> Parity:
    """``reference(x) -> logits`` (torch) vs ONNX Runtime on the same images, in batches.

    With ``taps`` (the emitter's: site name -> graph tensor) and ``sites`` (their SiteSpecs), and
    ``reference`` the converted model, the check is two-fold: every activation code of the graph
    equals PyTorch's except at float ties, and with ties resolved as ORT resolved them the logits
    agree within ``atol + rtol * max|logit|`` and top-1 agreement >= ``min_agree``.  The plain
    (unaligned) numbers are reported too.
    """
    taps = taps if taps and sites and isinstance(reference, torch.nn.Module) else {}
    align = bool(taps)
    tap_names = sorted({t for t, _ in taps.values()})
    sess = ort_session(_with_outputs(model, tap_names) if align else model)
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    if batch is None:
        batch = 16 if int(np.prod(x.shape[1:])) <= 3 * 64 * 64 else 2
    aligner = _Aligner(reference, sites, taps) if align else None
    refs, gots, aligned = [], [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch]
            res = sess.run(None, {in_name: xb.numpy()})
            gots.append(res[0])
            refs.append(reference(xb).float().cpu().numpy())
            if aligner is not None:
                aligner.outs = dict(zip(out_names, res))
                hooks = [m.register_forward_pre_hook(aligner.hook(site)) for site, m in aligner.sites]
                try:
                    aligned.append(reference(xb).float().cpu().numpy())
                finally:
                    for h in hooks:
                        h.remove()
                aligner.outs = {}
    ref, got = np.concatenate(refs), np.concatenate(gots)
    par = compare(ref, got, atol, rtol, min_agree)
    if aligner is None:
        return par
    al = np.concatenate(aligned)
    a_abs, a_rel, a_agree = _stats(al, got)
    scale = float(np.abs(al).max()) or 1.0
    par.aligned, par.aligned_max_abs, par.aligned_max_rel, par.aligned_top1_agree = True, a_abs, a_rel, a_agree
    par.codes, par.ties, par.mismatches = aligner.codes, aligner.ties, aligner.mismatches
    par.passed = bool(aligner.mismatches == 0 and a_abs <= atol + rtol * scale and a_agree >= min_agree)
    return par
