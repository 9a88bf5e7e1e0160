"""``qvit <stage> [flags]``: one command for every stage of the pipeline.

Each stage keeps its own entry point (``python -m train``, ``python -m export``,
``python3 -m runtime.build``, ``runtime/bench.py``, ``runtime/demo.py``); ``qvit`` dispatches
to the same ``main`` and imports only the stage it runs, so ``qvit bench`` on a Jetson
never imports torch.  Python 3.6-compatible.
"""

import importlib
import sys

#: stage -> (module with main(argv, prog), one-line description)
STAGES = (
    ("train", "train.cli", "quantization-aware training (Q-ViT: LSQ/LSQ+, IRM, DGD, KD); torchrun for DDP"),
    ("softlabels", "train.softlabels", "multi-crop soft-label store of an FP teacher (VVTQ --multicrop-kd)"),
    ("study", "train.study", "the seeded, resumable IRM/DGD study (validation split, mean ± std over seeds)"),
    ("export", "export.cli", "checkpoint -> ONNX (qdq | lowbit | fp32) + sidecar, with the parity check"),
    ("build", "runtime.build", "ONNX -> TensorRT engine (cached), with the equivalent trtexec line"),
    ("bench", "runtime.bench", "img/s and latency on TensorRT, ONNX Runtime or torch"),
    ("demo", "runtime.demo", "camera / video / image-folder classification demo"),
    ("bench-qat", "experiments.bench_qat", "QAT step vs FP step of every method, eager vs fused (JSON + table)"),
)


def usage():
    lines = ["usage: qvit <stage> [flags]    (qvit <stage> --help for the stage's flags)", "", "stages:"]
    lines += ["  {:<10} {}".format(name, text) for name, _, text in STAGES]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    stages = dict((name, module) for name, module, _ in STAGES)
    if argv[0] not in stages:
        sys.stderr.write("error: unknown stage {!r}: use one of {} (qvit --help)\n".format(
            argv[0], ", ".join(stages)))
        return 2
    module = importlib.import_module(stages[argv[0]])
    return module.main(argv[1:], prog="qvit " + argv[0])


if __name__ == "__main__":
    sys.exit(main())
