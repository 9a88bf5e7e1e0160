"""``python -m export`` entry point."""

import sys

from export.cli import main

if __name__ == "__main__":
    sys.exit(main())
