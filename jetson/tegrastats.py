"""``python3 -m jetson.tegrastats --seconds 10``: mean board power over a window.

The parsing and the logger are the runtime's (:mod:`runtime.power`, which bench uses);
this is their command line on the board.  Python 3.6-compatible.
"""

import sys

from runtime.power import main

if __name__ == "__main__":
    sys.exit(main())
