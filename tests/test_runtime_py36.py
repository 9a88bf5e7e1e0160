"""The device side stays Python 3.6-compatible (JetPack 4.6's TensorRT bindings are for 3.6).

The device side is every module a Jetson runs: ``qformat/``, the runtime's device core
(``runtime/*.py``), ``jetson/``, the ``qvit`` command, and the ORT comparison (``experiments/ort_compare.py``).
"""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_FILES = sorted([os.path.relpath(p, ROOT) for d in ("qformat", "runtime", "jetson", "qvit")
                       for p in glob.glob(os.path.join(ROOT, d, "*.py"))]
                      + ["experiments/ort_compare.py"])  # an experiment that also runs on a device's CPU


@pytest.mark.skipif(shutil.which("vermin") is None, reason="vermin not installed")
def test_vermin_python36():
    assert len(DEVICE_FILES) > 20
    r = subprocess.run(["vermin", "-t=3.6-", "--no-tips", "--violations", "--eval-annotations"] + DEVICE_FILES,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_py37_plus_idioms():
    """What vermin can miss: postponed annotations, dataclasses, builtin generics in comments are fine."""
    for f in DEVICE_FILES:
        text = open(os.path.join(ROOT, f)).read()
        assert "from __future__ import annotations" not in text, f
        assert "import dataclasses" not in text and "from dataclasses" not in text, f
        assert "capture_output=" not in text and "text=True" not in text, f  # subprocess 3.7+
