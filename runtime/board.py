"""Whether a Jetson is in a state where a benchmark means anything: power mode, locked clocks, temperatures.

``qvit doctor`` (jetson/doctor.py) prints this state with the command that fixes each problem;
``bench`` records it in its JSON (``host.board_state``) and warns in one line when a result was
taken with unlocked clocks, below the top power mode, or hot enough to throttle.  The parsers read
the text of ``nvpmodel -q``, ``/etc/nvpmodel.conf``, ``jetson_clocks --show`` and ``tegrastats``
(JetPack 4.6 .. 7 formats; tests/fixtures/jetson/).  Facts come through a :class:`Host`: the
machine itself, or a folder of recorded outputs.  Python 3.6-compatible.
"""

import glob
import os
import re
import shutil
import subprocess

from runtime.power import parse_nvpmodel

#: silicon above this is close to the Jetsons' throttle points (in the 90s C): results may be throttled
HOT_C = 85.0
#: sensors that are not silicon temperatures (TX2 / Nano's PMIC reads a constant 100 C)
IGNORED_SENSORS = ("PMIC",)
#: readings that mean "sensor off" (an unused CV cluster reports -256 C)
_VALID_C = (-40.0, 150.0)
#: what each recorded command is, by key (a fixture folder holds commands/<key>.txt)
COMMANDS = {
    "nvpmodel": ["nvpmodel", "-q"],
    "jetson_clocks": ["jetson_clocks", "--show"],
    "tegrastats": ["tegrastats", "--interval", "100"],
    "nvcc": ["nvcc", "--version"],
    "cuobjdump": ["cuobjdump", "--list-elf", "--list-ptx"],
}
_FREQ = re.compile(r"^\s*(GPU|EMC|cpu\d+)\b.*?MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_MODE = re.compile(r"POWER_MODEL\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([\w.-]+)")


class Host:
    """Where the facts come from: this machine (``root="/"``), or a folder that mirrors its files
    (``etc/nv_tegra_release``, ``proc/device-tree/model``, ...) with ``commands/<key>.txt``."""

    def __init__(self, root="/", recorded=False):
        self.root, self.recorded = root, recorded

    def path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def read(self, path):
        try:
            with open(self.path(path), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return None

    def command(self, key, extra=()):
        """The output of :data:`COMMANDS` ``[key]`` (+ ``extra`` args), or None when it is absent or fails."""
        if self.recorded:
            return self.read("commands/{}.txt".format(key))
        argv = COMMANDS[key] + list(extra)
        if shutil.which(argv[0]) is None:
            return None
        if key == "tegrastats":
            return _first_line(argv)
        try:
            out = subprocess.check_output(argv, stderr=subprocess.STDOUT, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.decode("utf-8", "replace")

    def which(self, name):
        if self.recorded:
            return name if self.read("commands/{}.txt".format(name)) is not None else None
        return shutil.which(name)


def _first_line(argv, timeout=5.0):
    """First line of a command that runs until stopped (tegrastats)."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
    except OSError:
        return None
    try:
        return proc.stdout.readline() or None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_jetson_clocks(text):
    """``jetson_clocks --show`` -> ``{"units": {name: [min, max, cur]}, "locked": bool, "gpu_throttled": bool}``;
    locked = every online CPU and the GPU run with MinFreq == MaxFreq (what ``jetson_clocks`` sets)."""
    units = {}
    for line in (text or "").splitlines():
        m = _FREQ.search(line)
        if m and "Online=0" not in line:
            units[m.group(1)] = [int(v) for v in m.groups()[1:]]
    if "GPU" not in units:
        return None
    pinned = [u for u in units if u != "EMC"]
    locked = all(units[u][0] == units[u][1] for u in pinned)
    gpu = units["GPU"]
    return {"units": units, "locked": locked, "gpu_throttled": locked and gpu[2] < gpu[1]}


def parse_temps(line):
    """``{sensor: C}`` of one tegrastats line (``GPU@31.5C``, ``gpu@45.9C``), sensors off and PMIC left out."""
    out = {}
    for name, value in _TEMP.findall(line or ""):
        c = float(value)
        if _VALID_C[0] < c < _VALID_C[1] and not any(s in name.upper() for s in IGNORED_SENSORS):
            out[name] = c
    return out


def thermal_zones(host):
    """``{zone type: C}`` from /sys/class/thermal (millidegrees), sensors off and PMIC left out."""
    out = {}
    for zone in sorted(glob.glob(host.path("sys/class/thermal/thermal_zone*"))):
        rel = os.path.relpath(zone, host.root)
        kind, temp = host.read(rel + "/type"), host.read(rel + "/temp")
        try:
            c = int(temp.strip()) / 1000.0
        except (AttributeError, ValueError):
            continue
        name = kind.strip() if kind else os.path.basename(zone)
        if _VALID_C[0] < c < _VALID_C[1] and not any(s in name.upper() for s in IGNORED_SENSORS):
            out[name] = c
    return out


def power_modes(conf_text):
    """``{id: name}`` of the modes in /etc/nvpmodel.conf."""
    return dict((int(i), name) for i, name in _MODE.findall(conf_text or ""))


def top_mode(modes):
    """``(id, name)`` of the unconstrained mode: the one named MAXN* (MAXN, MAXN_SUPER), else None."""
    for i in sorted(modes):
        if modes[i].upper().startswith("MAXN"):
            return i, modes[i]
    return None


def state(host=None):
    """Power mode, clocks and temperatures of a Jetson (each None where it cannot be read)."""
    host = host or Host()
    mode_text = host.command("nvpmodel")
    mode = parse_nvpmodel(mode_text) if mode_text else None
    if mode is not None:
        top = top_mode(power_modes(host.read("etc/nvpmodel.conf")))
        mode["top"] = list(top) if top else None
    temps = thermal_zones(host) or parse_temps(host.command("tegrastats"))
    return {"nvpmodel": mode, "clocks": parse_jetson_clocks(host.command("jetson_clocks")), "temps_c": temps,
            "max_temp_c": max(temps.values()) if temps else None}


def problems(st, unknown=True):
    """``[(what is wrong, the command that fixes it)]`` of a :func:`state`; ``unknown``: also what could not be
    read (inside a container, or without root)."""
    out = []
    mode = st.get("nvpmodel")
    if mode is None:
        if unknown:
            out.append(("power mode unknown: nvpmodel is not available here (a container?)",
                        "sudo nvpmodel -q   # on the Jetson itself"))
    elif mode.get("top") and mode.get("id") != mode["top"][0]:
        out.append(("power mode {} ({}) is not the top mode {}".format(mode.get("name"), mode.get("id"),
                                                                        mode["top"][1]),
                    "sudo nvpmodel -m {}".format(mode["top"][0])))
    elif not mode.get("top") and not str(mode.get("name") or "").upper().startswith("MAXN"):
        out.append(("power mode {} may not be the top one".format(mode.get("name")),
                    "sudo nvpmodel -m 0   # MAXN on most boards; nvpmodel -p --verbose lists them"))
    clocks = st.get("clocks")
    if clocks is None:
        if unknown:
            out.append(("clock state unknown: jetson_clocks --show needs root on the Jetson itself",
                        "sudo jetson_clocks --show"))
    elif not clocks["locked"]:
        out.append(("clocks are not locked: CPU/GPU frequencies scale with load", "sudo jetson_clocks"))
    elif clocks["gpu_throttled"]:
        out.append(("GPU runs below its locked maximum (thermal or power throttling)", "sudo jetson_clocks --fan"))
    hot = st.get("max_temp_c")
    if hot is not None and hot >= HOT_C:
        name = max(st["temps_c"], key=st["temps_c"].get)
        out.append(("{} at {:.1f} C: at or above {:.0f} C the clocks may throttle".format(name, hot, HOT_C),
                    "sudo jetson_clocks --fan"))
    return out


def bench_warning(st):
    """One line when a benchmark was taken unlocked, below the top power mode or throttled, else None (also
    when the state could not be read: it is recorded as null)."""
    if not st:
        return None
    found = problems(st, unknown=False)
    if not found:
        return None
    return "warning: this result may not be repeatable: {} (fix: {}; `qvit doctor` shows the board)".format(
        "; ".join(p for p, _ in found), "; ".join(sorted(set(f.split("   #")[0] for _, f in found))))
