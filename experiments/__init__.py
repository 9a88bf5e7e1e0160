"""Experiment drivers: the seeded, resumable study (budget, tuning, final table), the ablations, the deployer
figure, the ONNX Runtime comparison.

They sit on top of the stages (``train``, ``export``, ``runtime``) and use them as libraries or run their
command lines; no stage imports this package (``tests/test_layering.py`` checks both, subprocess calls
included).  Each driver is a ``qvit`` subcommand (``qvit --help``).
"""
