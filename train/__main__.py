"""``python -m train``: quantization-aware training of a ViT (see ``--help``; ``torchrun`` for DDP)."""

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
