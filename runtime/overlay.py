"""Draws the demo's top-k predictions, FPS and backend onto a frame.

Small inputs (Fashion-MNIST-sized frames) are enlarged first so the text stays legible
in screenshots and recorded videos.  Python 3.6-compatible; OpenCV imported lazily.
"""

import numpy as np

from runtime.preprocess import require_cv2

MIN_SIDE = 480


def display_frame(frame, min_side=MIN_SIDE):
    """BGR uint8 copy of ``frame``, enlarged so its short side is at least ``min_side``."""
    cv2 = require_cv2()
    img = np.asarray(frame)
    if img.ndim == 2 or img.shape[2] == 1:
        img = cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    img = np.ascontiguousarray(img, dtype=np.uint8)
    short = min(img.shape[:2])
    if short < min_side:
        f = float(min_side) / short
        interp = cv2.INTER_NEAREST if short * 4 <= min_side else cv2.INTER_LINEAR
        img = cv2.resize(img, (int(round(img.shape[1] * f)), int(round(img.shape[0] * f))), interpolation=interp)
    return img.copy()


def annotate(frame, top, fps=None, title=""):
    """Frame with a translucent panel: ``title``, FPS, and one bar per ``(name, prob)`` in ``top``."""
    cv2 = require_cv2()
    img = display_frame(frame)
    h, w = img.shape[:2]
    scale = max(0.5, min(1.2, w / 600.0))
    line = int(30 * scale) + 6
    rows = len(top) + 1
    panel_w = min(w - 10, int(440 * scale) + 20)
    panel_h = line * rows + 12
    roi = img[5:5 + panel_h, 5:5 + panel_w]
    roi[:] = (roi.astype(np.float32) * 0.35).astype(np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    head = title
    if fps is not None:
        head = "{}  {:.1f} FPS".format(title, fps) if title else "{:.1f} FPS".format(fps)
    cv2.putText(img, head, (12, 5 + line - 8), font, 0.6 * scale, (255, 255, 255), 1, cv2.LINE_AA)
    bar_w = panel_w - 24
    for i, (name, p) in enumerate(top):
        y = 5 + line * (i + 2) - 8
        x1 = 12 + int(bar_w * max(0.0, min(1.0, p)))
        color = (80, 200, 80) if i == 0 else (200, 160, 60)
        cv2.rectangle(img, (12, y - int(line * 0.7)), (max(13, x1), y + 4), color, -1)
        cv2.putText(img, "{} {:.1f}%".format(name, 100.0 * p), (16, y), font, 0.6 * scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return img
