"""Live classification demo: camera / CSI / video / image folder -> top-k overlay with FPS.

    python3 runtime/demo.py --onnx artifacts/vit_fmnist_w4a4.qdq.onnx --source 0
    python3 runtime/demo.py --engine model.engine --source csi://0            # Jetson CSI camera
    python3 runtime/demo.py --onnx m.onnx --source photos/ --headless --out annotated/
    python3 runtime/demo.py --onnx m.onnx --source clip.mp4 --headless --out clip_annotated.mp4

Preprocessing is the training transform from the sidecar (runtime/preprocess.py).
A lost camera reconnects with back-off (one that never opened fails at once), a bad
frame is skipped with a message (no good frame at all is an error), Ctrl-C
(or q/Esc in the window) ends with a summary.  Python 3.6-compatible.
"""

import os
import shutil
import sys
import tempfile
import time

if not __package__:  # `python3 runtime/<script>.py`: one error line where qformat cannot be imported
    import script_guard  # noqa: F401

import numpy as np  # noqa: E402

from qformat import io as qio  # noqa: E402
from qformat.argtypes import nonneg_int, positive_int  # noqa: E402
from qformat.cli import add_runtime_args, parser  # noqa: E402
from qformat.errors import OutputError, UserError, main_guard  # noqa: E402
from qformat.io import TEMP_SUFFIX, atomic_write, output_error, remove_stale_temps, temp_prefix  # noqa: E402
from qformat.lock import hold  # noqa: E402
from qformat.paths import check_out_dir, check_out_file  # noqa: E402
from runtime import model_meta  # noqa: E402
from runtime.backends import BACKENDS, open_backend  # noqa: E402
from runtime.overlay import annotate  # noqa: E402
from runtime.preprocess import NonFiniteInput, require_cv2, softmax, to_input, topk  # noqa: E402
from runtime.sources import open_source  # noqa: E402

VIDEO_EXTS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


def save_png(path, img):
    """Atomic PNG write (a killed demo never leaves a truncated screenshot)."""
    cv2 = require_cv2()
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise UserError("cannot encode PNG for {}".format(path))
    atomic_write(path, buf.tobytes())


class Output:
    """Headless sink: an annotated video (``.mp4``/``.avi``/``.mkv``) or a folder of PNGs.

    Both grow under a temporary sibling name and replace ``path`` as a whole in :meth:`close`, after
    a check: a failed or interrupted run leaves the previous video or folder as it was.
    """

    def __init__(self, path, fps=15.0):
        self.path = path
        self.fps = fps
        self.ext = os.path.splitext(path)[1].lower()
        self.writer = None
        self.size = None
        self.count = 0
        self.failed = False
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise output_error(path, e) from None
        remove_stale_temps(parent)
        self.tmp_dir = None
        if self.ext not in VIDEO_EXTS:  # the new PNG folder, swapped in by close()
            self.tmp_dir = self._mkdtemp(parent)

    def _mkdtemp(self, parent):
        try:
            return tempfile.mkdtemp(prefix=temp_prefix(self.path), suffix=TEMP_SUFFIX, dir=parent)
        except OSError as e:
            raise output_error(self.path, e) from None

    def write(self, img, tag):
        try:
            self._write(img, tag)
        except BaseException:
            self.failed = True  # an output that failed is never committed over the previous one
            raise

    def _write(self, img, tag):
        cv2 = require_cv2()
        self.count += 1
        if self.ext not in VIDEO_EXTS:
            save_png(os.path.join(self.tmp_dir, "{}.png".format(tag)), img)
            return
        if self.writer is None:
            d = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise output_error(self.path, e) from None
            # the video grows in a temp folder with a bounded name (a 250-byte --out still fits) under a short
            # name whose extension tells OpenCV the container; close() renames it into place
            self.tmp_dir = self._mkdtemp(d)
            self.tmp = os.path.join(self.tmp_dir, "video" + self.ext)
            self.size = (img.shape[1], img.shape[0])
            self.writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*VIDEO_EXTS[self.ext]), self.fps,
                                          self.size)
            if not self.writer.isOpened():
                self.writer = None
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
                raise UserError("OpenCV cannot write {} video here: use --out <folder> for PNGs".format(self.ext))
        if (img.shape[1], img.shape[0]) != self.size:
            img = cv2.resize(img, self.size)
        self.writer.write(img)

    def close(self, commit=True):
        """Replace ``path`` with what was written (``commit``), or drop it and keep the previous one."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        if self.tmp_dir is None:
            return
        try:
            if commit and self.count and not self.failed:
                if self.ext in VIDEO_EXTS:
                    self._verify_video()
                    qio.commit_path(self.tmp, self.path, "video")  # the finished file appears in one step
                else:
                    qio.commit_path(self.tmp_dir, self.path, "folder")
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    def _verify_video(self):
        """The writer's file must exist, be non-empty and decode a frame (a full disk leaves an empty or
        unplayable file while OpenCV reports nothing), and be on disk before it replaces the old video."""
        cv2 = require_cv2()
        size = os.path.getsize(self.tmp) if os.path.isfile(self.tmp) else 0
        cap = cv2.VideoCapture(self.tmp) if size else None
        ok = cap is not None and cap.isOpened() and cap.read()[0]
        if cap is not None:
            cap.release()
        if not ok:
            raise OutputError("cannot write {}: the video writer produced {} for {} frame(s) (disk full?); {}".format(
                self.path, "an unreadable {}-byte file".format(size) if size else "no data", self.count,
                "the previous video is unchanged" if os.path.lexists(self.path) else "nothing was written"))
        try:
            qio.fsync_path(self.tmp)
        except OSError as e:
            raise qio.kept_error(self.path, e, "video") from None


def parse_args(argv=None, prog="python3 runtime/demo.py"):
    p = parser(prog, __doc__.split("\n\n")[0])
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--onnx", help="exported ONNX (ort backend)")
    m.add_argument("--engine", help="TensorRT engine built by runtime.build (trt backend)")
    m.add_argument("--checkpoint", help="trained checkpoint (torch backend)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: from the file kind")
    p.add_argument("--source", default="0",
                   help="camera index, /dev/videoN, csi://N (Jetson), gst:<pipeline>, URL, video file or image folder")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--headless", action="store_true", help="no window: write annotated frames to --out")
    p.add_argument("--out", default=None, help="headless output: video file (.mp4/.avi/.mkv) or folder of PNGs")
    p.add_argument("--force", action="store_true",
                   help="replace an existing PNG folder --out as a whole (it is refused otherwise)")
    p.add_argument("--screenshot", default=None, help="also save the first annotated frame as this PNG")
    p.add_argument("--max-frames", type=nonneg_int, default=0, help="stop after N frames (0 = until the source ends)")
    p.add_argument("--loop", action="store_true", help="restart a video / image folder at its end")
    p.add_argument("--width", type=positive_int, default=1280, help="CSI capture width")
    p.add_argument("--height", type=positive_int, default=720, help="CSI capture height")
    p.add_argument("--fps", type=positive_int, default=30, help="CSI capture rate, and the output video's rate")
    p.add_argument("--retries", type=nonneg_int, default=10, help="reconnect attempts for a lost camera")
    add_runtime_args(p, threads=True)
    args = p.parse_args(argv)
    if args.headless and not args.out and not args.screenshot:
        p.error("--headless needs --out (video file or folder) or --screenshot")
    if args.backend is None:
        args.backend = "trt" if args.engine else ("torch" if args.checkpoint else "ort")
    args.model = args.onnx or args.engine or args.checkpoint
    return args


def check_outputs(args):
    """--out (video file or PNG folder) and --screenshot, checked before the model and source open."""
    if args.headless and args.out:
        if os.path.splitext(args.out)[1].lower() in VIDEO_EXTS:
            check_out_file(args.out, "--out")
        else:
            check_out_dir(args.out, "--out", files=["{}.png".format("f" * 64)])
            if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
                raise UserError("--out {} already holds files: --force replaces the whole folder with this run's "
                                "frames, or pick a new folder".format(args.out))
    if args.screenshot:
        check_out_file(args.screenshot, "--screenshot")


def _open_window(cv2, name):
    try:
        cv2.namedWindow(name, cv2.WINDOW_NORMAL)
    except cv2.error:
        raise UserError("no display (or a headless OpenCV build): run with --headless --out <folder|video.mp4>"
                        ) from None


def _classify(backend, frame, tag, meta, source, log):
    """``(class probabilities, inference ms)`` of one frame, or None for a frame that cannot be
    classified (counted in ``source.bad_frames`` and named in a warning)."""
    try:
        x = to_input(frame, meta)[None]
    except ValueError as e:
        source.bad_frames += 1
        log("warning: bad frame {} skipped ({})".format(tag, e))
        return None
    t0 = time.perf_counter()
    try:
        probs = softmax(backend.run(x))[0]
    except NonFiniteInput:
        source.bad_frames += 1
        log("warning: frame {} holds NaN/Inf after preprocessing: skipped".format(tag))
        return None
    return probs, (time.perf_counter() - t0) * 1e3


def run(args, log=print):
    """The demo loop; returns the summary dict (also printed as one line)."""
    cv2 = require_cv2()
    check_outputs(args)
    backend = open_backend(args.backend, args.model, threads=args.threads, plugins=args.plugins, log=log)
    meta = backend.meta
    title = "{} [{}]".format(model_meta.label(meta, args.model), backend.name)
    source = open_source(args.source, loop=args.loop, width=args.width, height=args.height, fps=args.fps,
                         max_retries=args.retries, log=log)
    if args.headless and args.out:  # after the model and source opened: a refused command leaves nothing behind
        try:
            hold(args.out, "--out", inside=False)  # one writer per output; the lock file sits beside it
        except UserError:
            source.close()
            backend.close()
            raise
    out = Output(args.out, fps=args.fps) if (args.headless and args.out) else None
    window = "qvit-edge demo"
    if not args.headless:
        _open_window(cv2, window)
    frames, infer_ms, fps, interrupted = 0, [], None, False
    last = time.perf_counter()
    t_start = last
    shot_saved = False
    try:
        backend.prepare(1)
        for frame, tag in source:
            got = _classify(backend, frame, tag, meta, source, log)
            if got is None:
                continue
            probs, ms = got
            infer_ms.append(ms)
            now = time.perf_counter()
            inst = 1.0 / max(now - last, 1e-6)
            fps = inst if fps is None else 0.9 * fps + 0.1 * inst
            last = now
            top = topk(probs, meta.get("class_names"), args.topk)
            img = annotate(frame, top, fps, title)
            if args.screenshot and not shot_saved:
                save_png(args.screenshot, img)
                shot_saved = True
            if out is not None:
                out.write(img, tag)
            if not args.headless:
                cv2.imshow(window, img)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
            frames += 1
            if frames == 1 or frames % 100 == 0:
                log("{} {}: {} {:.1f}%".format(source.kind, tag, top[0][0], 100 * top[0][1]))
            if args.max_frames and frames >= args.max_frames:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if out is not None:
            out.close()  # what was recorded replaces the previous output (a lost camera keeps its frames)
        source.close()
        backend.close()
        if not args.headless:
            cv2.destroyAllWindows()
    return _summary(args, source, frames, time.perf_counter() - t_start, infer_ms, interrupted,
                    args.screenshot if shot_saved else None, out is not None, log)


def _summary(args, source, frames, seconds, infer_ms, interrupted, screenshot, wrote, log):
    """The demo's result dict, also printed as one line."""
    if frames == 0 and not interrupted:  # e.g. a folder of only corrupt images: a failure, not a result
        raise UserError("no frame from {} could be classified ({} unreadable or bad): check --source".format(
            args.source, source.bad_frames))
    summary = {"frames": frames, "seconds": seconds, "fps": frames / seconds if seconds > 0 else 0.0,
               "infer_ms_p50": float(np.percentile(infer_ms, 50)) if infer_ms else None,
               "bad_frames": source.bad_frames, "reconnects": source.reconnects, "interrupted": interrupted,
               "out": args.out, "screenshot": screenshot}
    log("demo: {} frames in {:.1f} s ({:.1f} FPS, inference p50 {} ms), {} bad frame(s), {} reconnect(s){}{}".format(
        frames, seconds, summary["fps"],
        "{:.2f}".format(summary["infer_ms_p50"]) if infer_ms else "n/a", source.bad_frames, source.reconnects,
        " -> " + args.out if wrote else "", " (interrupted)" if interrupted else ""))
    return summary


@main_guard
def main(argv=None, prog="python3 runtime/demo.py"):
    run(parse_args(argv, prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
