"""The README's "Adding things" section names files and objects that exist: every backticked path is a file of
the repository and every backticked dotted name of one of its packages imports and resolves."""

import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("qformat", "train", "export", "runtime", "jetson", "experiments", "qvit")


def _section():
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("**Adding things.**")
    return text[start:text.index("\n## ", start)]


def _resolve(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_adding_things_names_what_exists():
    names = re.findall(r"`([^`\s]+)`", _section())
    paths = [n for n in names if re.fullmatch(r"\w+/[\w/]*\.(py|h|txt)", n)]  # bare names: relative to a folder
    dotted = [n.replace("/", ".") for n in names
              if re.fullmatch(r"[\w/]+(\.\w+)+", n) and n not in paths and n.split("/")[0].split(".")[0] in PACKAGES]
    assert len(paths) >= 5 and len(dotted) >= 5, (paths, dotted)
    assert [p for p in paths if not os.path.exists(os.path.join(ROOT, p))] == []
    for name in dotted:
        _resolve(name)  # raises if the module or the attribute is gone
