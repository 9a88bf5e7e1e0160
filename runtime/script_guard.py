"""The one import guard of the runtime's scripts when run as files (``python3 runtime/bench.py``).

Run so, Python searches ``runtime/`` for imports instead of the repository root, and without an install
or PYTHONPATH the first ``qformat`` import would end in a traceback.  Each script imports this module
first when it has no package (``if not __package__: import script_guard``), and gets one line that names
the fix instead (exit 2).  ``qvit <command>`` and ``python3 -m runtime.<script>`` never need it.
Python 3.6-compatible.
"""

import sys

try:
    import qformat  # noqa: F401
except ImportError:
    sys.stderr.write("error: cannot import qformat: pip install -e . in the repository (then use `qvit`), or "
                     "export PYTHONPATH=<repository root>\n")
    sys.exit(2)
