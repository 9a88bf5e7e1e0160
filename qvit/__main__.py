"""``python -m qvit``: the same as the ``qvit`` command."""

import sys

from qvit.cli import main

if __name__ == "__main__":
    sys.exit(main())
