"""Board power from ``tegrastats`` during a benchmark -> watts and joules per image.

Jetsons have no NVML power query; tegrastats prints the INA3221 rails once per interval.
Formats differ by generation, so parsing is tested on sample lines:

* TX2 / JetPack 4.x: ``VDD_IN 1829/1829`` (mW, instant/average, no unit)
* Nano / Xavier NX (JetPack 4.x): ``POM_5V_IN 2578/2578``
* Orin / JetPack 5-6: ``VDD_IN 4946mW/4946mW`` (Orin NX/Nano);
  AGX Orin has no input rail: ``VDD_GPU_SOC 2394mW/2394mW VDD_CPU_CV 399mW/399mW VIN_SYS_5V0 2623mW/2623mW``

The board input (VDD_IN, POM_5V_IN) is used when present; otherwise the sum of the
rails (labelled as such -- it misses regulator losses).  Part of the runtime's device core
(bench logs power with it); ``python3 -m jetson.tegrastats`` is its command line.
Python 3.6-compatible.

    python3 -m jetson.tegrastats --seconds 10      # log and print mean power
"""

import re
import shutil
import subprocess
import threading
import time

from qformat.argtypes import ArgumentParser, positive_float, positive_int
from qformat.errors import UserError, main_guard

RAIL_RE = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_rails(line):
    """``{rail: instant_mW}`` of one tegrastats line (non-power ``a/b`` fields like RAM are skipped)."""
    rails = {}
    for name, cur, _avg in RAIL_RE.findall(line):
        if name in ("RAM", "SWAP", "IRAM", "LFB"):
            continue
        rails[name] = int(cur)
    return rails


def board_power_mw(line):
    """``(milliwatts, source)`` of one line, or ``(None, None)`` when it has no power rails."""
    rails = parse_rails(line)
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name], name
    if rails:
        return sum(rails.values()), "sum(" + "+".join(sorted(rails)) + ")"
    return None, None


def summarize(lines):
    """Mean/max board power over tegrastats lines: ``{"mean_w", "max_w", "samples", "source"}``."""
    values, source = [], None
    for line in lines:
        mw, src = board_power_mw(line)
        if mw is not None:
            values.append(mw)
            source = src
    if not values:
        return {"mean_w": None, "max_w": None, "samples": 0, "source": None}
    return {"mean_w": sum(values) / 1000.0 / len(values), "max_w": max(values) / 1000.0,
            "samples": len(values), "source": source}


class PowerLogger:
    """Runs ``tegrastats --interval <ms>`` between :meth:`start` and :meth:`stop`."""

    def __init__(self, interval_ms=100, exe=None):
        self.exe = exe or shutil.which("tegrastats")
        if not self.exe:
            raise OSError("tegrastats not found on PATH")
        self.interval_ms = int(interval_ms)
        self.proc = None
        self.lines = []
        self.thread = None

    def start(self):
        self.lines = []
        self.proc = subprocess.Popen([self.exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, universal_newlines=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self):
        """Stop logging; the power summary of the logged window."""
        if self.proc is None:
            return summarize([])
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(timeout=2)
        self.proc = None
        out = summarize(self.lines)
        out["interval_ms"] = self.interval_ms
        return out


def parse_nvpmodel(text):
    """``nvpmodel -q`` output -> ``{"name": "MAXN", "id": 0}``."""
    name, mode_id = None, None
    for line in text.splitlines():
        line = line.strip()
        if line.lower().startswith("nv power mode:"):
            name = line.split(":", 1)[1].strip()
        elif line.isdigit():
            mode_id = int(line)
    return {"name": name, "id": mode_id}


def nvpmodel_mode():
    """The current power mode, or None where nvpmodel is absent."""
    exe = shutil.which("nvpmodel")
    if not exe:
        return None
    try:
        out = subprocess.check_output([exe, "-q"], stderr=subprocess.STDOUT, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvpmodel(out.decode("utf-8", "replace"))


@main_guard
def main(argv=None, prog="python3 -m jetson.tegrastats"):
    p = ArgumentParser(prog=prog, description="mean board power over a window")
    p.add_argument("--seconds", type=positive_float, default=10.0)
    p.add_argument("--interval", type=positive_int, default=100, help="tegrastats interval in ms")
    args = p.parse_args(argv)
    try:
        logger = PowerLogger(args.interval)
    except OSError as e:
        raise UserError("{} (run this on a Jetson)".format(e)) from None
    logger.start()
    time.sleep(args.seconds)
    s = logger.stop()
    print("power: mean {} W, max {} W over {} samples ({}); nvpmodel {}".format(
        s["mean_w"], s["max_w"], s["samples"], s["source"], nvpmodel_mode()))


if __name__ == "__main__":
    main()
