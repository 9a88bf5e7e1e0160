"""``qvit <command> [flags]``: one door to every stage, experiment and tool of the pipeline.

Each command is the ``main(argv, prog)`` of one module; ``qvit`` imports only the module it runs,
so ``qvit bench`` on a Jetson never imports torch.  ``python -m <module>`` still runs the same
``main``.  Python 3.6-compatible.
"""

import importlib
import inspect
import sys

#: the pipeline's stages: command -> (module with main(argv, prog), one-line description)
STAGES = (
    ("train", "train.cli", "quantization-aware training (Q-ViT: LSQ/LSQ+, IRM, DGD, KD); torchrun for DDP"),
    ("softlabels", "train.softlabels", "multi-crop soft-label store of an FP teacher (VVTQ --multicrop-kd)"),
    ("export", "export.cli", "checkpoint -> ONNX (qdq | lowbit | fp32 | woq) + sidecar, with the parity check"),
    ("build", "runtime.build", "ONNX -> TensorRT engine (cached), with the equivalent trtexec line"),
    ("bench", "runtime.bench", "img/s and latency on TensorRT, ONNX Runtime or torch"),
    ("demo", "runtime.demo", "camera / video / image-folder classification demo"),
)
#: experiments (package ``experiments``): drivers that run the stages and write tables and figures
EXPERIMENTS = (
    ("study", "experiments.study", "the seeded, resumable study: budget, tuning, final table (paired seeds)"),
    ("ablation", "experiments.ablation", "Q-ViT ablation: FP / baseline / +IRM / +DGD / +IRM+DGD at 4/3/2 bits"),
    ("mp-ablation", "experiments.mp_ablation", "learned head-wise bits vs uniform at BitOPs budgets"),
    ("vvtq-ablation", "experiments.vvtq_ablation", "VVTQ's ablation (each part removed) next to Q-ViT"),
    ("deploy-figure", "experiments.deploy_figure", "accuracy vs size and ORT CPU img/s of the study's models"),
    ("bench-ort", "experiments.bench_ort", "export every format for ONNX Runtime, then compare with ORT's quantizers"),
    ("ort-compare", "experiments.ort_compare", "ORT CPU speed of given graphs vs FP32 and ORT's own quantizers"),
    ("bench-qat", "experiments.bench_qat", "QAT step vs FP step of every method, eager vs fused (JSON + table)"),
)
#: device and development tools
TOOLS = (
    ("doctor", "jetson.doctor", "what this machine / Jetson can run, and the command that fixes each problem"),
    ("matrix", "jetson.bench_matrix", "on a Jetson: build and bench a (model x bits) matrix into one table"),
    ("power", "runtime.power", "mean board power over a window (tegrastats)"),
    ("l4t", "jetson.l4t", "which L4T / JetPack / TensorRT this Jetson runs (--json)"),
    ("roofline", "runtime.roofline", "PROJECTION: roofline img/s bounds of DeiT on TX2 and Orin"),
    ("bench-gemm", "runtime.torchtools.bench_gemm", "packed low-bit GEMM kernels vs cuBLAS (CUDA GPU)"),
    ("gpu-check", "runtime.torchtools.gpu_check", "one command on a GPU: build, exactness tests, sanitizer, bench"),
)
SECTIONS = (("stages", STAGES), ("experiments", EXPERIMENTS), ("tools", TOOLS))
COMMANDS = STAGES + EXPERIMENTS + TOOLS


def usage():
    lines = ["usage: qvit <command> [flags]    (qvit <command> --help for its flags)"]
    for title, rows in SECTIONS:
        lines += ["", title + ":"] + ["  {:<14} {}".format(name, text) for name, _, text in rows]
    return "\n".join(lines) + "\n"


def _call(main, argv, prog):
    """``main(argv, prog=prog)``; a tool whose main takes no ``prog`` gets ``argv`` alone."""
    try:
        takes_prog = "prog" in inspect.signature(main).parameters
    except (TypeError, ValueError):
        takes_prog = False
    return main(argv, prog=prog) if takes_prog else main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    modules = dict((name, module) for name, module, _ in COMMANDS)
    if argv[0] not in modules:
        sys.stderr.write("error: unknown command {!r}: use one of {} (qvit --help)\n".format(
            argv[0], ", ".join(modules)))
        return 2
    try:
        module = importlib.import_module(modules[argv[0]])
    except ImportError as e:  # e.g. `qvit train` in the device image, which has neither torch nor train/
        sys.stderr.write("error: qvit {} cannot run here: {} ({}); install the package with its dependencies "
                         "(pip install -e .) or run it where they are\n".format(
                             argv[0], "no module {!r}".format(e.name) if e.name else e, modules[argv[0]]))
        return 2
    return _call(module.main, argv[1:], "qvit " + argv[0])


if __name__ == "__main__":
    sys.exit(main())
