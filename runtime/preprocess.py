"""Camera/photo frame -> network input, exactly the training transform read from the sidecar.

Training sees pixels resized to ``input_size``, grayscale when ``C == 1``, scaled to
[0, 1] and normalised with the sidecar's ``mean``/``std``; a model with a timm ``pretrained_cfg``
(sidecar ``crop_pct`` < 1, ``interpolation``) is evaluated as timm does: the short side resized to
size / crop_pct, then the centre crop.  Doing anything else on the device silently costs accuracy,
so this is the only place that converts frames.
OpenCV is imported lazily (bench needs none of it).  Python 3.6-compatible.
"""

import numpy as np

from qformat.errors import UserError


class NonFiniteInput(UserError):
    """Input frames holding NaN or Inf: refused, because the quantized graphs would turn them into a
    confident class (QuantizeLinear maps NaN to a code) while the FP32 graph returns NaN."""

    def __init__(self, frames, where):
        shown = ", ".join(str(i) for i in frames[:8]) + (" ..." if len(frames) > 8 else "")
        UserError.__init__(self, "{} frame(s) of the input batch for {} hold NaN or Inf (frame {}): "
                                 "check the preprocessing; refused rather than classified".format(
                                     len(frames), where, shown))
        self.frames = list(frames)


def nonfinite_frames(x):
    """Indices of the frames (first axis) of ``x`` that hold NaN or Inf.

    Cheap when there are none, which is the normal case: one pass summing the batch (NaN and
    Inf survive a sum); only a non-finite sum pays for the per-element test.
    """
    x = np.asarray(x)
    with np.errstate(all="ignore"):
        if x.size == 0 or np.isfinite(x.sum()):
            return []
    bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    return [int(i) for i in np.flatnonzero(bad)]


def check_input(x, meta, where):
    """A float32 ``[N, C, H, W]`` batch matching ``meta["input_size"]`` with finite values, or UserError."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    want = tuple(int(v) for v in meta["input_size"])
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise UserError("input batch of shape {} does not fit {}: it takes [N, {}]".format(
            list(x.shape), where, ", ".join(str(v) for v in want)))
    if x.shape[0] == 0:
        raise UserError("empty input batch (0 images) for {}: give at least one image".format(where))
    bad = nonfinite_frames(x)
    if bad:
        raise NonFiniteInput(bad, where)
    return x


def require_cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("OpenCV is needed for images/cameras: pip install opencv-python-headless "
                        "(Jetson: apt-get install python3-opencv)") from None
    return cv2


def to_input(frame_bgr, meta):
    """uint8 BGR (or gray) ``HxW[xC]`` frame -> float32 ``[C, H, W]`` normalised tensor."""
    cv2 = require_cv2()
    c, h, w = [int(v) for v in meta["input_size"]]
    img = np.asarray(frame_bgr)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError("bad frame shape {}".format(img.shape))
    if img.dtype != np.uint8:
        if img.dtype.kind == "f" and nonfinite_frames(img[None]):
            raise ValueError("frame holds NaN or Inf values")
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    cubic = meta.get("interpolation") == "bicubic"
    if c == 1:
        # same ITU-R 601 weights as PIL's convert("L") used by torchvision's Grayscale
        gray = img[:, :, 0] if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        chw = _resize(cv2, _crop(cv2, gray, w, h, meta, cubic), w, h, cubic)[None, :, :]
    else:
        rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        chw = _resize(cv2, _crop(cv2, rgb, w, h, meta, cubic), w, h, cubic).transpose(2, 0, 1)
    x = chw.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _resize(cv2, img, w, h, cubic=False):
    if img.shape[1] == w and img.shape[0] == h:
        return img
    # INTER_AREA when shrinking ~ torchvision's antialiased resize; bilinear / bicubic when enlarging
    shrink = img.shape[1] > w or img.shape[0] > h
    up = cv2.INTER_CUBIC if cubic else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else up)


def _crop(cv2, img, w, h, meta, cubic):
    """timm's evaluation crop: short side to ``size / crop_pct``, then the centre ``w x h`` (``crop_pct`` 1:
    none, the frame is resized to ``w x h`` as a whole, as before)."""
    pct = float(meta.get("crop_pct", 1.0))
    if pct >= 1.0:
        return img
    short = int(np.floor(min(h, w) / pct))  # torchvision Resize(int): the long side is truncated
    ih, iw = img.shape[:2]
    rh, rw = (short, int(short * iw / ih)) if ih <= iw else (int(short * ih / iw), short)
    img = _resize(cv2, img, rw, rh, cubic)
    top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
    return img[top:top + h, left:left + w]


def batch_of(frames, meta):
    """Stack several frames into ``[N, C, H, W]``."""
    return np.stack([to_input(f, meta) for f in frames])


def softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def topk(probs, class_names, k=5):
    """``[(name, prob), ...]`` best first for one probability vector."""
    p = np.asarray(probs).reshape(-1)
    k = max(1, min(int(k), p.size))
    idx = np.argsort(-p, kind="stable")[:k]
    names = list(class_names or [])
    return [(names[i] if i < len(names) else "class {}".format(i), float(p[i])) for i in idx]
