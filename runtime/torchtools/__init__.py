"""Torch-side tools of the runtime: the PyTorch CUDA extension of the packed low-bit kernels
(:mod:`gemm_ext`), the GEMM bench (:mod:`bench_gemm`) and the one-command GPU check
(:mod:`gpu_check`).

They need PyTorch and are loaded only for ``--backend torch`` or by the GPU tools; the device
core of ``runtime`` (build, bench, demo, sources, preprocess, engine cache) never imports them,
so it runs on a Jetson without torch.
"""
