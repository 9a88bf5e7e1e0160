"""ONNX export of converted Q-ViT models: ``qdq`` (standard Q/DQ), ``lowbit`` (packed custom op), ``fp32``.

Entry point: ``python -m export`` (:mod:`export.cli`); library use: :func:`export.exporter.export`
and :func:`export.exporter.build_graph`.  Every export runs the parity check of
:mod:`export.parity` against the PyTorch model.
"""
