"""Experiments on top of the pipeline: the seeded studies and their figures (they drive ``python -m train``)."""
