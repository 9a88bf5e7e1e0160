"""``qvit``: the one command of qvit-edge (``qvit train|export|build|bench|demo``)."""
