"""Which L4T / JetPack a Jetson runs, from /etc/nv_tegra_release or the nvidia-l4t-core package.

The TensorRT version, the Python of its bindings and the matching container base all
follow from the L4T release, so setup.sh and the Docker instructions key off this.
Python 3.6-compatible.

    python3 -m jetson.l4t            # prints e.g. "L4T 32.7.1 = JetPack 4.6.1 (TensorRT 8.2, ...)"
"""

import json
import re
import subprocess
import sys

from qformat import targets
from qformat.argtypes import ArgumentParser

RELEASE_FILE = "/etc/nv_tegra_release"

#: L4T release -> JetPack release (NVIDIA's JetPack archive).
JETPACK = {
    "32.6.1": "4.6", "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4", "32.7.5": "4.6.5",
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3", "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
    "38.2.0": "7.0",
}


def parse_release(text):
    """``# R32 (release), REVISION: 7.1, GCID: ..., BOARD: t186ref, ...`` -> ``{"l4t": "32.7.1", "board": ...}``."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    if not m:
        return None
    board = re.search(r"BOARD:\s*([^,\s]+)", text)
    return {"l4t": "{}.{}.{}".format(m.group(1), m.group(2), m.group(3)),
            "board": board.group(1) if board else None}


def parse_dpkg_version(text):
    """``36.3.0-20240506102626`` (nvidia-l4t-core) -> ``36.3.0``."""
    m = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", text or "")
    return "{}.{}.{}".format(*m.groups()) if m else None


def describe(l4t):
    """JetPack, TensorRT, Python, docker base and export target for an L4T version string
    (the stack comes from the target table, qformat.targets)."""
    major = l4t.split(".")[0]
    tgt = targets.for_l4t(l4t)
    jp = JETPACK.get(l4t)
    if jp is None and tgt is not None:
        jp = next((v.split(".")[0] + ".x" for k, v in sorted(JETPACK.items()) if k.split(".")[0] == major), None)
    return {"l4t": l4t, "jetpack": jp, "tensorrt": tgt.trt_range() if tgt else None,
            "python": tgt.python if tgt else None, "docker_base": tgt.docker_base if tgt else None,
            "target": tgt.name if tgt else None}


def detect(release_file=RELEASE_FILE, run=subprocess.check_output):
    """Detection result dict, or None when this is not a Jetson."""
    try:
        with open(release_file) as f:
            rel = parse_release(f.read())
    except OSError:
        rel = None
    source = RELEASE_FILE
    if rel is None:
        try:
            out = run(["dpkg-query", "--showformat=${Version}", "--show", "nvidia-l4t-core"],
                      stderr=subprocess.DEVNULL)
            version = parse_dpkg_version(out.decode() if isinstance(out, bytes) else out)
        except (OSError, subprocess.CalledProcessError):
            version = None
        if version is None:
            return None
        rel, source = {"l4t": version, "board": None}, "dpkg nvidia-l4t-core"
    info = describe(rel["l4t"])
    info.update({"board": rel["board"], "source": source})
    return info


def main(argv=None, prog="python3 -m jetson.l4t"):
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the detected release as one JSON object")
    args = p.parse_args(argv)
    info = detect()
    if info is None:
        sys.stderr.write("error: not a Jetson (no {} and no nvidia-l4t-core package)\n".format(RELEASE_FILE))
        return 2
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        if info["target"] is None:
            print("L4T {l4t} = JetPack {jetpack}: no target row for this release (qformat/targets.py); the builder "
                  "checks the installed TensorRT itself; from {source}".format(**info))
        else:
            print("L4T {l4t} = JetPack {jetpack} (TensorRT {tensorrt}, Python {python}); export --target {target}; "
                  "docker base {docker_base}; from {source}".format(**info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
