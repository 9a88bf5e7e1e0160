"""Frame sources for the demo: camera index, V4L2 device, Jetson CSI (GStreamer), stream URL, video, image folder.

A camera that never opens is an error at once (wrong index, busy device); one that was
working and disappears (USB unplugged, nvargus daemon restarted) reconnects with
exponential back-off instead of ending the demo.  A missing file is named as missing; bad
frames and unreadable photos are reported, counted and skipped.  Every source yields
``(frame_bgr, tag)``.
Python 3.6-compatible; OpenCV imported lazily.
"""

import os
import time

from qformat.errors import UserError
from runtime.preprocess import require_cv2

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def csi_pipeline(sensor_id=0, width=1280, height=720, fps=30, flip=0):
    """GStreamer pipeline for a Jetson CSI camera (nvarguscamerasrc -> BGR appsink)."""
    return ("nvarguscamerasrc sensor-id={} ! video/x-raw(memory:NVMM),width={},height={},framerate={}/1 ! "
            "nvvidconv flip-method={} ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
            "appsink drop=true max-buffers=1".format(sensor_id, width, height, fps, flip))


def _bad(frame):
    return frame is None or getattr(frame, "size", 0) == 0 or getattr(frame, "ndim", 0) not in (2, 3)


class Source:
    """Counts what went wrong so the demo can summarise it."""

    kind = "?"

    def __init__(self, log=print):
        self.log = log
        self.bad_frames = 0
        self.reconnects = 0

    def __iter__(self):
        raise NotImplementedError

    def close(self):
        pass


class ImageFolder(Source):
    """Every image in a folder (sorted by name), or a single image file."""

    kind = "images"

    def __init__(self, path, loop=False, log=print):
        Source.__init__(self, log)
        if os.path.isdir(path):
            self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        else:
            self.files = [path]
        if not self.files:
            raise UserError("no images ({}) in {}".format(", ".join(IMAGE_EXTS), path))
        self.loop = loop
        self.desc = "{} image(s) in {}".format(len(self.files), path)

    def __iter__(self):
        cv2 = require_cv2()
        while True:
            for f in self.files:
                frame = cv2.imread(f, cv2.IMREAD_COLOR)
                if _bad(frame):
                    self.bad_frames += 1
                    self.log("warning: cannot read image {}: skipped".format(f))
                    continue
                yield frame, os.path.splitext(os.path.basename(f))[0]
            if not self.loop:
                return


class Capture(Source):
    """cv2.VideoCapture over a file (ends at EOF) or a live device (reconnects with back-off)."""

    def __init__(self, target, api=None, live=True, loop=False, max_retries=10, backoff=0.5, max_backoff=8.0,
                 desc=None, log=print, sleep=None):
        Source.__init__(self, log)
        self.target, self.api, self.live, self.loop = target, api, live, loop
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.sleep = sleep or time.sleep
        self.kind = "camera" if live else "video"
        self.desc = desc or str(target)
        self.cap = None

    def _open(self):
        cv2 = require_cv2()
        cap = cv2.VideoCapture(self.target, self.api) if self.api is not None else cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _reconnect(self, why):
        """Reopen with exponential back-off; UserError after ``max_retries`` failed attempts."""
        delay = self.backoff
        for attempt in range(1, self.max_retries + 1):
            self.log("warning: {} {} ({}); reconnecting in {:.1f} s [{}/{}]".format(
                self.kind, self.desc, why, delay, attempt, self.max_retries))
            if self.cap is not None:
                self.cap.release()
                self.cap = None
            self.sleep(delay)
            self.cap = self._open()
            if self.cap is not None:
                self.reconnects += 1
                self.log("{} {} reconnected".format(self.kind, self.desc))
                return
            delay = min(delay * 2, self.max_backoff)
        raise UserError("{} {} is gone after {} reconnect attempts: check the cable/device and --source".format(
            self.kind, self.desc, self.max_retries))

    def __iter__(self):
        self.cap = self._open()
        if self.cap is None:  # never opened: fail now; the back-off is for a camera that was working
            if not self.live:
                raise UserError("cannot open video {} (unsupported codec or not a video)".format(self.desc))
            raise UserError("cannot open {} {}: check that it is connected, not used by another program, and that "
                            "--source names it".format(self.kind, self.desc))
        n = 0
        misses = 0
        while True:
            ok, frame = self.cap.read()
            if not ok:
                if self.live:
                    self._reconnect("no frame")
                    continue
                if self.loop and n:
                    self.cap.release()
                    self.cap = self._open()
                    continue
                return
            if _bad(frame):
                self.bad_frames += 1
                misses += 1
                self.log("warning: bad frame from {} skipped".format(self.desc))
                if self.live and misses >= 5:
                    misses = 0
                    self._reconnect("bad frames")
                continue
            misses = 0
            n += 1
            yield frame, "frame_{:06d}".format(n)

    def close(self):
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def open_source(spec, loop=False, width=1280, height=720, fps=30, max_retries=10, log=print, sleep=None):
    """A :class:`Source` for ``spec``: ``0``, ``/dev/video0``, ``csi://0``, ``gst:<pipeline>``, URL, file, folder."""
    cv2 = require_cv2()
    spec = str(spec)
    live = dict(max_retries=max_retries, log=log, sleep=sleep)
    if spec.isdigit():
        return Capture(int(spec), desc="camera " + spec, **live)
    if spec.startswith("/dev/video"):
        return Capture(spec, api=cv2.CAP_V4L2, desc=spec, **live)
    if spec == "csi" or spec.startswith("csi://"):
        sensor = int(spec[len("csi://"):] or 0) if spec.startswith("csi://") else 0
        return Capture(csi_pipeline(sensor, width, height, fps), api=cv2.CAP_GSTREAMER, desc="CSI camera {}".format(
            sensor), **live)
    if spec.startswith("gst:") or " ! " in spec:
        return Capture(spec[4:] if spec.startswith("gst:") else spec, api=cv2.CAP_GSTREAMER, desc="GStreamer", **live)
    if "://" in spec:
        return Capture(spec, desc=spec, **live)
    if os.path.isdir(spec) or (os.path.isfile(spec) and spec.lower().endswith(IMAGE_EXTS)):
        return ImageFolder(spec, loop=loop, log=log)
    if os.path.isfile(spec):
        return Capture(spec, live=False, loop=loop, desc=spec, log=log)
    if os.path.splitext(spec)[1] or os.sep in spec:
        what = "image" if spec.lower().endswith(IMAGE_EXTS) else "video file or folder"
        raise UserError("--source {}: no such {} (check the path)".format(spec, what))
    raise UserError("--source {!r} is not a camera index, /dev/video*, csi://N, gst:<pipeline>, URL, video file "
                    "or image folder".format(spec))
