"""runtime/demo.py on the ORT backend: real photos (skimage), a generated video, camera loss, Ctrl-C, preprocess."""

import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from conftest import make_toy_model

from qformat.errors import UserError
from runtime import demo, sources
from runtime.preprocess import to_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("astronaut", "coffee", "chelsea", "camera")  # bundled with scikit-image (camera is grayscale)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_toy_model(tmp_path_factory.mktemp("m"), "toy_w4a4.qdq")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    import skimage.data

    d = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(d / (name + ".png")), img)
    (d / "zz_corrupt.jpg").write_bytes(b"definitely not a jpeg")
    return d


def _args(model, *extra):
    return demo.parse_args(["--onnx", model, "--headless"] + list(extra))


def test_image_folder_real_photos(model, photo_dir, tmp_path):
    out = tmp_path / "annotated"
    shot = tmp_path / "shot.png"
    logs = []
    s = demo.run(_args(model, "--source", str(photo_dir), "--out", str(out), "--screenshot", str(shot)),
                 log=logs.append)
    assert s["frames"] == len(PHOTOS) and s["bad_frames"] == 1 and not s["interrupted"]
    assert sorted(os.listdir(out)) == sorted(n + ".png" for n in PHOTOS)
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (512, 512)  # astronaut, first by name
    assert any("zz_corrupt.jpg" in line and "skipped" in line for line in logs)
    assert logs[-1].startswith("demo: 4 frames")


def test_generated_video_to_annotated_mp4(model, tmp_path):
    src = str(tmp_path / "clip.avi")
    w = cv2.VideoWriter(src, cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for i in range(12):
        f = np.full((64, 96, 3), 30, np.uint8)
        cv2.circle(f, (8 * i, 32), 10, (0, 200, 255), -1)
        w.write(f)
    w.release()
    out = str(tmp_path / "annotated.mp4")
    s = demo.run(_args(model, "--source", src, "--out", out), log=lambda *a: None)
    assert s["frames"] == 12 and os.path.isfile(out)
    cap = cv2.VideoCapture(out)
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 12
    assert not [f for f in os.listdir(tmp_path) if ".part" in f]  # temp file renamed into place


class FakeCamera:
    """cv2.VideoCapture stand-in: a camera that drops out after 3 frames and fails the first reopen."""

    opens = 0

    def __init__(self, *a):
        FakeCamera.opens += 1
        self.n = 0
        self.ok = FakeCamera.opens != 2  # the first reconnect attempt fails

    def isOpened(self):
        return self.ok

    def read(self):
        self.n += 1
        if FakeCamera.opens == 1 and self.n > 3:
            return False, None  # unplugged
        if self.n == 2:
            return True, np.zeros((0, 0, 3), np.uint8)  # a bad frame
        return True, np.full((48, 64, 3), 100 + self.n, np.uint8)

    def release(self):
        pass


def test_lost_camera_reconnects_with_backoff(model, monkeypatch, tmp_path):
    FakeCamera.opens = 0
    sleeps = []
    monkeypatch.setattr(cv2, "VideoCapture", FakeCamera)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    logs = []
    s = demo.run(_args(model, "--source", "0", "--out", str(tmp_path / "o"), "--max-frames", "5"), log=logs.append)
    assert s["frames"] == 5 and s["reconnects"] == 1 and s["bad_frames"] >= 2
    assert sleeps == [0.5, 1.0]  # exponential back-off
    assert any("reconnecting in 0.5 s" in line for line in logs) and any("reconnected" in line for line in logs)


def test_camera_that_never_opened_fails_fast(model, monkeypatch, tmp_path):
    class Dead(FakeCamera):
        def isOpened(self):
            return False

    sleeps = []
    monkeypatch.setattr(cv2, "VideoCapture", Dead)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with pytest.raises(UserError, match="cannot open camera /dev/video7: check that it is connected"):
        demo.run(_args(model, "--source", "/dev/video7", "--out", str(tmp_path / "x"), "--retries", "3"),
                 log=lambda *a: None)
    assert sleeps == []  # no back-off for a camera that was never there


def test_camera_lost_for_good_is_a_clear_error(model, monkeypatch, tmp_path):
    class Unplugged(FakeCamera):
        def isOpened(self):
            return FakeCamera.opens == 1  # works once, never comes back

        def read(self):
            return False, None

    FakeCamera.opens = 0
    sleeps = []
    monkeypatch.setattr(cv2, "VideoCapture", Unplugged)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    with pytest.raises(UserError, match="gone after 3 reconnect attempts"):
        demo.run(_args(model, "--source", "/dev/video7", "--out", str(tmp_path / "x"), "--retries", "3"),
                 log=lambda *a: None)
    assert sleeps == [0.5, 1.0, 2.0]


def test_missing_video_file_is_named(model, tmp_path):
    for name, what in (("clip.mp4", "no such video file"), ("shots/", "no such video file or folder"),
                       ("x.png", "no such image")):
        with pytest.raises(UserError, match=what):
            sources.open_source(str(tmp_path / name))


def test_folder_of_only_corrupt_images_fails(model, tmp_path):
    src = tmp_path / "broken"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "b.png").write_bytes(b"")
    logs = []
    with pytest.raises(UserError, match="no frame from .* could be classified \\(2 unreadable"):
        demo.run(_args(model, "--source", str(src), "--out", str(tmp_path / "o")), log=logs.append)
    assert sum("cannot read image" in line for line in logs) == 2
    assert not os.path.exists(tmp_path / "o")  # nothing classified: no output folder appears


def test_nan_frame_is_a_bad_frame_not_a_class():
    from runtime.preprocess import nonfinite_frames

    meta = {"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5]}
    frame = np.full((16, 16, 3), 100.0, np.float32)
    assert to_input(frame, meta).shape == (1, 8, 8)
    frame[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        to_input(frame, meta)
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[2, 0, 1, 1] = np.inf
    x[3, 0, 0, 0] = -np.inf
    assert nonfinite_frames(x) == [2, 3] and nonfinite_frames(x[:2]) == []
    assert nonfinite_frames(np.full((2, 3), 3e38, np.float32)) == []  # a sum that overflows is not NaN input


def test_ctrl_c_exits_with_summary(model, photo_dir, monkeypatch, tmp_path):
    real = sources.open_source

    class Interrupting:
        def __init__(self, inner):
            self.inner, self.kind, self.bad_frames, self.reconnects = inner, "images", 0, 0

        def __iter__(self):
            for i, item in enumerate(self.inner):
                if i == 2:
                    raise KeyboardInterrupt
                yield item

        def close(self):
            pass

    monkeypatch.setattr(demo, "open_source", lambda *a, **k: Interrupting(real(*a, **k)))
    logs = []
    out = str(tmp_path / "v.avi")
    s = demo.run(_args(model, "--source", str(photo_dir), "--out", out, "--loop"), log=logs.append)
    assert s["interrupted"] and s["frames"] == 2 and os.path.isfile(out)
    assert "(interrupted)" in logs[-1]


def test_preprocessing_matches_training_transform():
    meta = {"input_size": [1, 28, 28], "mean": [0.25], "std": [0.5]}
    frame = np.zeros((56, 84, 3), np.uint8)
    frame[:] = (10, 20, 30)  # BGR
    x = to_input(frame, meta)
    gray = round(0.299 * 30 + 0.587 * 20 + 0.114 * 10)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert np.allclose(x, (gray / 255.0 - 0.25) / 0.5, atol=1e-6)
    meta = {"input_size": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    x = to_input(frame, meta)
    assert x.shape == (3, 16, 16)
    assert np.allclose(x[:, 0, 0], (np.array([30, 20, 10]) / 255.0 - 0.5) / 0.2, atol=1e-6)  # RGB order
    with pytest.raises(ValueError):
        to_input(np.zeros((0, 5, 3), np.uint8), meta)


def test_source_specs_and_bad_source(tmp_path):
    assert "nvarguscamerasrc sensor-id=1" in sources.csi_pipeline(1)
    src = sources.open_source("csi://1")
    assert src.api == cv2.CAP_GSTREAMER and "sensor-id=1" in src.target
    assert sources.open_source("/dev/video0").api == cv2.CAP_V4L2
    assert sources.open_source("2").target == 2
    with pytest.raises(UserError, match="not a camera index"):
        sources.open_source("webcam")
    r = subprocess.run([sys.executable, "runtime/demo.py", "--onnx", "x.onnx", "--headless"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--headless needs --out" in r.stderr
