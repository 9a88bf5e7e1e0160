"""ONNX (qdq or lowbit export) -> serialized TensorRT engine + sidecar, cached by build key.

    python3 -m runtime.build --onnx artifacts/deit_s_w4a4.qdq.onnx [--int8 --fp16] [--batch 1 --max-batch 8]
    python3 -m runtime.build --onnx artifacts/deit_s_w4a4.lowbit.onnx --plugins build/plugins/libqvit_plugins.so

Precision is decided from the graph and the GPU (see :func:`plan_precision`).  Weakly typed
(TensorRT 8.x, and 10.x by default): QDQ graphs build INT8 (+FP16 where allowed), LayerNorm pinned
FP32 by name; the lowbit format builds FP16 around the low-bit weight plugins -- the only fast
option on TX2, which has no fast INT8.  Strongly typed (a graph exported with ``--typing strong``,
and every graph on TensorRT 11, which has no precision flags): no flags, the graph's FP16 tensors,
FP32 LayerNorm/Softmax islands and Q/DQ decide.  The equivalent ``trtexec`` line is printed first
so results can be cross-checked with the usual tool.
Python 3.6-compatible (JetPack 4.6).
"""

import os
import shlex
import sys
import time

if not __package__:  # `python3 runtime/<script>.py`: one error line where qformat cannot be imported
    import script_guard  # noqa: F401

from qformat import LOWBIT_OP, formats, targets  # noqa: E402
from qformat.argtypes import check_le, nonneg_int, positive_int  # noqa: E402
from qformat.cli import parser  # noqa: E402
from qformat.errors import UserError, main_guard  # noqa: E402
from qformat.io import atomic_write, sha256_file, sidecar_path  # noqa: E402
from qformat.paths import check_out_dir, check_out_file  # noqa: E402
from runtime import engine_cache, model_meta, onnx_info, trt_compat  # noqa: E402
from runtime.device import gpu_info, gpu_label  # noqa: E402

PRECISIONS = ("auto", "fp32", "fp16", "int8", "best")
TX2_INT8_MSG = ("this GPU has no fast INT8 (platform_has_fast_int8 is false, e.g. TX2): a QDQ engine would run "
                "INT8 in slow emulation. Export the lowbit format instead (make export FORMAT=lowbit TARGET=tx2) "
                "for an FP16 engine with low-bit weight plugins, or pass --allow-slow-int8 to build it anyway")


class GraphKind:
    """What a graph asks of the builder: Q/DQ nodes, low-bit plugin nodes, INT4 weights, FP16 tensors (exported
    strongly typed), and whether its format is weight-only (:func:`qformat.formats.weight_only`)."""

    def __init__(self, has_qdq, is_lowbit=False, int4_weights=False, fp16=False, weight_only=False):
        self.has_qdq, self.is_lowbit, self.int4_weights = bool(has_qdq), bool(is_lowbit), bool(int4_weights)
        self.fp16, self.weight_only = bool(fp16), bool(weight_only)


class DevicePrecisions:
    """What this GPU and TensorRT build fast: INT8 (not TX2), FP16, and INT4 weights (TensorRT 10+)."""

    def __init__(self, fast_int8=True, fast_fp16=True, int4=True):
        self.fast_int8, self.fast_fp16, self.int4 = bool(fast_int8), bool(fast_fp16), bool(int4)


def plan_precision(requested, graph, device=None, allow_slow_int8=False, strongly_typed=False):
    """Decide builder flags: ``{"fp16", "int8", "int4", "typed", "label", "notes"}``; raise on impossible asks.
    ``graph``: a :class:`GraphKind`; ``device``: :class:`DevicePrecisions` (None: fast INT8, FP16 and INT4).
    A weight-only graph (integer weights through DQ, float activations) is labelled ``fp16+int4w`` (``+int8w`` for
    INT8 containers) -- INT8 stays enabled on weak typing, which builds any DQ only with it."""
    device = device or DevicePrecisions()
    has_qdq, is_lowbit, int4_weights = graph.has_qdq, graph.is_lowbit, graph.int4_weights
    weight_only, fast_int8, fast_fp16 = graph.weight_only, device.fast_int8, device.fast_fp16
    if int4_weights and not device.int4:
        raise UserError("this ONNX stores INT4 weights, which need TensorRT {}+: re-export for this device's "
                        "target (one without INT4: {}) or use a newer TensorRT".format(
                            targets.feature_release("int4"),
                            ", ".join(t.name for t in targets.TARGETS if t.tensorrt and not t.int4)))
    if strongly_typed:
        return _typed_plan(requested, has_qdq and not weight_only, int4_weights, graph.fp16, weight_only)
    notes = []
    if requested in ("fp32", "fp16") and has_qdq and not weight_only:
        raise UserError("the graph has Q/DQ nodes, which TensorRT only builds with INT8 enabled: use --int8 "
                        "(or export --format lowbit / fp32 for a {} engine)".format(requested.upper()))
    int8 = has_qdq or requested in ("int8", "best")
    if int8 and not fast_int8:
        if not allow_slow_int8:
            if has_qdq:
                raise UserError(TX2_INT8_MSG)
            notes.append("no fast INT8 on this GPU: building FP16 instead of INT8")
            int8 = False
        else:
            notes.append("WARNING: building INT8 on a GPU without fast INT8 (slow emulation), as asked")
    if requested == "fp32":
        fp16 = False
    elif requested == "fp16":
        fp16 = True
    else:  # auto / int8 / best: let TensorRT pick FP16 where it is faster and allowed
        fp16 = fast_fp16 or requested == "best"
    if is_lowbit and not fast_int8:
        notes.append("FP16 engine + low-bit weight plugins ({}): this GPU has no fast INT8".format(LOWBIT_OP))
    int4 = bool(int4_weights and device.int4)
    label = "int8" if int8 and not weight_only else ("fp16" if fp16 else "fp32")
    if weight_only:
        label += "+int4w" if int4 else "+int8w"
    elif int4:
        label += "+int4"
    return {"fp16": fp16, "int8": int8, "int4": int4, "typed": False, "label": label, "notes": notes}


def _typed_plan(requested, has_qdq, int4_weights, graph_fp16, weight_only=False):
    """Strongly typed: no flags; the label says what the graph's own types make of it."""
    base = "int8" if has_qdq else ("fp16" if graph_fp16 else "fp32")
    wants = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}.get(requested)
    if wants and wants != base:
        raise UserError("--{} cannot change a strongly typed network, whose precision is the graph's own ({}): "
                        "export the graph you want (--format fp32 --typing strong for FP16, --format qdq for "
                        "INT8)".format(requested, base.upper()))
    notes = ["strongly typed: no precision flags, every tensor keeps the type the ONNX gives it"]
    if not graph_fp16:
        notes.append("the graph's float tensors are FP32, so the engine computes FP32 outside Q/DQ; export with "
                     "--typing strong (e.g. --target trt11) for FP16 with FP32 LayerNorm/Softmax")
    label = base + ("+int4w" if int4_weights else "+int8w") if weight_only else base + ("+int4" if int4_weights else "")
    label += "-typed"
    return {"fp16": False, "int8": False, "int4": False, "typed": True, "label": label, "notes": notes}


def _shape_str(name, dims):
    return "{}:{}".format(name, "x".join(str(int(d)) for d in dims))


class EngineOptions:
    """The build flags besides precision that shape an engine: the batch profile, workspace (MiB), timing cache,
    plugin libraries, DLA core (with GPU fallback), and whether this TensorRT sets the workspace as a memory pool."""

    def __init__(self, batch=1, max_batch=1, workspace=1024, timing_cache=None, plugins=(), dla_core=None,
                 gpu_fallback=True, memory_pool_api=True):
        self.batch, self.max_batch, self.workspace = batch, max_batch, workspace
        self.timing_cache, self.plugins, self.dla_core = timing_cache, tuple(plugins), dla_core
        self.gpu_fallback, self.memory_pool_api = gpu_fallback, memory_pool_api

    @classmethod
    def from_args(cls, args, timing_cache=None, memory_pool_api=True):
        return cls(args.batch, args.max_batch, args.workspace, timing_cache, args.plugins, args.dla_core,
                   args.gpu_fallback, memory_pool_api)


def trtexec_command(onnx, engine, plan, opts=None, input_name=None, dims=None):
    """The ``trtexec`` line that builds the same engine (for cross-checking), shell-quoted.  ``opts``: the
    :class:`EngineOptions` (None: the defaults); ``dims``: the input's dims (``-1`` batch: a shape profile)."""
    o = opts or EngineOptions()
    batch, max_batch, workspace, timing_cache = o.batch, o.max_batch, o.workspace, o.timing_cache
    plugins, dla_core, gpu_fallback, memory_pool_api = o.plugins, o.dla_core, o.gpu_fallback, o.memory_pool_api
    cmd = ["trtexec", "--onnx=" + onnx, "--saveEngine=" + engine]
    if plan.get("typed"):
        cmd.append("--stronglyTyped")  # and no --fp16/--int8/--int4: the plan has none
    if plan.get("fp16"):
        cmd.append("--fp16")
    if plan.get("int8"):
        cmd.append("--int8")
    if plan.get("int4"):
        cmd.append("--int4")
    if input_name and dims and int(dims[0]) == -1:
        rest = [int(d) for d in dims[1:]]
        cmd += ["--minShapes=" + _shape_str(input_name, [1] + rest),
                "--optShapes=" + _shape_str(input_name, [batch] + rest),
                "--maxShapes=" + _shape_str(input_name, [max_batch] + rest)]
    cmd.append("--memPoolSize=workspace:{}M".format(workspace) if memory_pool_api
               else "--workspace={}".format(workspace))
    if timing_cache:
        cmd.append("--timingCacheFile=" + timing_cache)
    for p in plugins:
        cmd.append("--plugins=" + p)
    if dla_core is not None:
        cmd.append("--useDLACore={}".format(dla_core))
        if gpu_fallback:
            cmd.append("--allowGPUFallback")
    return " ".join(shlex.quote(c) for c in cmd)


def parse_args(argv=None, prog="python3 -m runtime.build"):
    p = parser(prog, __doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True, help="exported model (its sidecar <stem>.json must be beside it)")
    p.add_argument("--saveEngine", "--engine", dest="engine", default=None,
                   help="engine path (default: <onnx stem>.<precision>.b<batch>.<key>.engine, the cache)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: INT8 for QDQ graphs, FP16 otherwise / on GPUs without fast INT8")
    p.add_argument("--fp16", action="store_const", const="fp16", dest="precision_flag", help="= --precision fp16")
    p.add_argument("--int8", action="store_const", const="int8", dest="precision_flag", help="= --precision int8")
    p.add_argument("--best", action="store_const", const="best", dest="precision_flag", help="= --precision best")
    p.add_argument("--batch", type=positive_int, default=1, help="optimal batch of the profile (default 1)")
    p.add_argument("--max-batch", "--maxBatch", type=positive_int, default=None, dest="max_batch",
                   help="largest batch the engine accepts (dynamic-batch ONNX only; default = --batch)")
    p.add_argument("--workspace", type=positive_int, default=1024, help="builder workspace limit in MiB (default 1024)")
    p.add_argument("--timingCacheFile", dest="timing_cache", default=None,
                   help="timing cache to read/update (default: timing.<trt>.<gpu>.cache beside the engine)")
    p.add_argument("--no-timing-cache", action="store_true", help="do not read or write a timing cache")
    p.add_argument("--plugins", action="append", default=[],
                   help="plugin library to load (repeatable; default: $QVIT_PLUGINS, colon-separated)")
    p.add_argument("--useDLACore", dest="dla_core", type=nonneg_int, default=None, help="DLA core (Jetson Orin/Xavier)")
    p.add_argument("--no-gpu-fallback", dest="gpu_fallback", action="store_false",
                   help="fail instead of running DLA-unsupported layers on the GPU")
    p.add_argument("--strongly-typed", "--stronglyTyped", dest="strongly_typed", action="store_true",
                   help="keep the ONNX's tensor types, no precision flags (TensorRT {}+; automatic for graphs "
                        "exported with --typing strong and on TensorRT 11)".format(
                       targets.feature_release("strongly_typed")))
    p.add_argument("--allow-slow-int8", action="store_true", help="build INT8 even where it is not fast (TX2)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cached engine matches")
    p.add_argument("--print-only", action="store_true",
                   help="print the plan and the trtexec command, build nothing (needs no TensorRT)")
    p.add_argument("--verbose", action="store_true", help="TensorRT verbose log")
    args = p.parse_args(argv)
    if not args.plugins and os.environ.get("QVIT_PLUGINS"):  # set by the Docker images
        args.plugins = [p for p in os.environ["QVIT_PLUGINS"].split(":") if p]
    if args.precision_flag:
        args.precision = args.precision_flag
    if args.max_batch is None:
        args.max_batch = args.batch
    check_le(args.batch, args.max_batch, "--batch", "--max-batch")
    return args


def _parse_onnx(trt, network, logger, path, strip_local_fn):
    parser = trt.OnnxParser(network, logger)
    if strip_local_fn:
        ok = parser.parse(onnx_info.without_local_lowbit_function(path), path)
    elif hasattr(parser, "parse_from_file"):
        ok = parser.parse_from_file(path)
    else:
        with open(path, "rb") as f:
            ok = parser.parse(f.read(), path)
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        text = " | ".join(errors) or "unknown parser error"
        if LOWBIT_OP in text or "plugin" in text.lower():
            raise UserError("TensorRT cannot import {} ({}): {}".format(LOWBIT_OP, text, trt_compat.PLUGIN_HINT))
        raise UserError("TensorRT's ONNX parser rejected {}: {}".format(path, text))
    return parser


class _Graph(GraphKind):
    """What the builder reads from the ONNX file and its sidecar before any TensorRT call."""

    def __init__(self, args):
        self.meta = model_meta.load_onnx_meta(args.onnx)
        self.info = info = onnx_info.inspect(args.onnx)
        #: exported strongly typed (FP16 tensors, FP32 LayerNorm/Softmax through Casts): build it typed
        self.typed = self.meta.get("typing") == "strong"
        GraphKind.__init__(self, info["ops"] & set(onnx_info.QDQ_OPS),
                           self.meta.get("format") == "lowbit" or LOWBIT_OP in info["ops"], info.get("int4_weights"),
                           self.typed or info.get("fp16"), formats.weight_only(self.meta.get("format")))
        self.dims = dims = model_meta.onnx_input_dims(self.meta, self.info, args.onnx)
        if not args.print_only:
            if args.engine:
                check_out_file(args.engine, "--saveEngine")
            else:
                check_out_dir(os.path.dirname(os.path.abspath(args.onnx)), "the engine cache beside --onnx")
        if dims and dims[0] != -1 and (args.batch != dims[0] or args.max_batch != dims[0]):
            raise UserError("{} has a fixed batch of {}: use --batch {} or re-export with a dynamic batch axis".format(
                args.onnx, dims[0], dims[0]))

    def typed_build(self, args, caps=None):
        """Strongly typed when the graph is, when asked, and always where weak typing is gone (TensorRT 11)."""
        return bool(self.typed or args.strongly_typed or (caps is not None and not caps.weak_typing))

    def plan(self, args, fast_int8=True, fast_fp16=True, int4_supported=True, caps=None):
        return plan_precision(args.precision, self, DevicePrecisions(fast_int8, fast_fp16, int4_supported),
                              args.allow_slow_int8, self.typed_build(args, caps))

    def trtexec(self, args, engine, plan, timing_cache, memory_pool_api=True):
        return trtexec_command(args.onnx, engine, plan, EngineOptions.from_args(args, timing_cache, memory_pool_api),
                               self.meta["input_name"], self.dims)


def _print_plan(args, g, log):
    """The plan without TensorRT, under the rules the real build applies: the sidecar's target decides fast INT8
    (TX2: none), its notes are printed, a non-TensorRT target and a lowbit graph without --plugins are named."""
    tgt = _sidecar_target(g)
    fast_int8 = tgt.fast_int8 if tgt is not None else True
    plan = g.plan(args, fast_int8=fast_int8)
    log("plan (assuming {}{}): {}".format(
        "the {} GPU of --target {}".format("fast INT8/FP16" if fast_int8 else "FP16-only", tgt.name)
        if tgt is not None and tgt.tensorrt else "a GPU with fast INT8/FP16",
        "" if plan["typed"] else ", TensorRT < 11", plan["label"]))
    for note in plan["notes"]:
        log("note: " + note)
    if tgt is not None and not tgt.tensorrt:
        log("note: exported for {} (--target {}); TensorRT may reject what only it runs (UINT8, INT4): re-export "
            "with a TensorRT --target (--list-targets)".format(tgt.runtime, tgt.name))
    if g.is_lowbit and not args.plugins:
        log("note: {} uses the {} custom op: the build needs its plugin ({})".format(args.onnx, LOWBIT_OP,
                                                                                      trt_compat.PLUGIN_HINT))
    log(g.trtexec(args, args.engine or "model.engine", plan, args.timing_cache))


def _sidecar_target(g):
    """The export target named by the graph's sidecar (None when absent or unknown)."""
    try:
        return targets.get_target(g.meta.get("target"))
    except UserError:
        return None


def _open_trt(args, g, log):
    """(tensorrt, caps, logger) with the plugins loaded; refuses targets and graphs this TensorRT cannot build."""
    try:
        trt = trt_compat.import_trt()
    except UserError:
        _print_plan(args, g, log)  # still useful: the same build with the trtexec binary
        raise
    caps = trt_compat.caps_of(trt)
    log(caps.describe())
    caps.check_target(g.meta.get("target"), log)
    logger = trt_compat.make_logger(trt, args.verbose)
    trt_compat.load_plugins(trt, logger, args.plugins)
    if g.is_lowbit and not trt_compat.has_plugin_creator(trt, caps, LOWBIT_OP):
        raise UserError("{} uses the {} custom op but its TensorRT plugin is not loaded: {}".format(
            args.onnx, LOWBIT_OP, trt_compat.PLUGIN_HINT))
    return trt, caps, logger


def _cache_paths(args, caps, gpu, plan):
    """(cache key, engine path, timing-cache path, plugin records, ONNX sha256)."""
    plugins = [{"path": os.path.abspath(p), "sha256": sha256_file(p)} for p in args.plugins]
    onnx_sha = sha256_file(args.onnx)
    key = engine_cache.cache_key(onnx_sha, caps.version_str, gpu.get("name"), gpu.get("compute_capability"),
                                 plan["label"], args.batch, args.max_batch, [p["sha256"] for p in plugins],
                                 {"dla": args.dla_core, "typed": plan["typed"]})
    engine_path = args.engine or engine_cache.default_engine_path(args.onnx, plan["label"], args.batch, key)
    timing_cache = None if args.no_timing_cache else (args.timing_cache or os.path.join(
        os.path.dirname(os.path.abspath(engine_path)), "timing.{}.{}.cache".format(
            caps.version_str, gpu.get("compute_capability"))))
    return key, engine_path, timing_cache, plugins, onnx_sha


def _network(trt, builder, logger, caps, plan, args, g, log):
    network = trt_compat.create_network(trt, builder, caps, plan["typed"])
    info = g.info
    _parse_onnx(trt, network, logger, args.onnx, g.is_lowbit and info["has_local_lowbit_fn"] and info["exact"])
    if g.is_lowbit and info["has_local_lowbit_fn"] and not info["exact"]:
        log("note: the onnx package is absent, so the {} reference function stays in the graph; if the "
            "engine is slow, `pip install onnx` so the builder can drop it in favour of the plugin".format(LOWBIT_OP))
    return network


def _configure(trt, builder, caps, network, args, g, plan, timing_cache, log):
    """Builder config: batch profile, workspace, precision flags and FP32 pins (weak typing only), DLA, timing cache."""
    config = builder.create_builder_config()
    inp = network.get_input(0)
    shape = [int(d) for d in inp.shape]
    if shape[0] == -1:
        profile = builder.create_optimization_profile()
        rest = shape[1:]
        profile.set_shape(inp.name, [1] + rest, [args.batch] + rest, [args.max_batch] + rest)
        config.add_optimization_profile(profile)
    elif shape[0] != args.batch:
        raise UserError("{} has a fixed batch of {}: use --batch {}".format(args.onnx, shape[0], shape[0]))
    trt_compat.set_workspace(trt, config, caps, args.workspace)
    flags = ["strongly_typed"] if plan["typed"] else trt_compat.set_precision(
        trt, config, caps, plan["fp16"], plan["int8"], plan["int4"])
    if plan["fp16"] and not plan["typed"]:
        n = trt_compat.pin_fp32_layers(trt, network, config, caps, g.meta.get("fp32_layers") or [])
        if n:
            log("kept {} LayerNorm/IRM layers in FP32 (FP16 variance overflows)".format(n))
    if args.dla_core is not None:
        trt_compat.configure_dla(trt, builder, config, args.dla_core, args.gpu_fallback)
    if timing_cache:
        trt_compat.load_timing_cache(config, timing_cache)
    return config, shape, flags


def build(args, log=print):
    """Build (or reuse from the cache) the engine for ``args``; returns ``(engine_path, sidecar)``."""
    g = _Graph(args)
    if args.print_only:
        _print_plan(args, g, log)
        return None, None
    trt, caps, logger = _open_trt(args, g, log)
    gpu = gpu_info() or {"name": "unknown", "compute_capability": "?"}
    builder = trt.Builder(logger)
    plan = g.plan(args, trt_compat.platform_fast_int8(builder, caps), trt_compat.platform_fast_fp16(builder, caps),
                  caps.int4, caps)
    for note in plan["notes"]:
        log("note: " + note)
    key, engine_path, timing_cache, plugins, onnx_sha = _cache_paths(args, caps, gpu, plan)
    log(g.trtexec(args, engine_path, plan, timing_cache, caps.memory_pool_api))
    engine_flag = "--saveEngine" if args.engine else "the default engine path (name one with --saveEngine)"
    for path, flag in ((engine_path, engine_flag), (sidecar_path(engine_path), "the engine sidecar"),
                       (timing_cache, "--timingCacheFile")):
        if path:  # before minutes of building: the name must fit and the folder take it
            check_out_file(path, flag)
    if not args.force and engine_cache.cached_engine(engine_path, key):
        log("engine cache hit: {} (key {}; --force rebuilds)".format(engine_path, key))
        return engine_path, engine_cache.read_engine_meta(engine_path)
    network = _network(trt, builder, logger, caps, plan, args, g, log)
    config, shape, flags = _configure(trt, builder, caps, network, args, g, plan, timing_cache, log)
    log("building {} engine for {} on {} (minutes on a Jetson)...".format(plan["label"], args.onnx, gpu_label(gpu)))
    t0 = time.time()
    blob = trt_compat.build_serialized(trt, builder, network, config, caps)
    seconds = time.time() - t0
    if timing_cache:
        data = trt_compat.timing_cache_bytes(config)
        if data:
            atomic_write(timing_cache, data)
    sidecar = model_meta.preprocess_subset(g.meta)
    sidecar.update({
        "cache_key": key, "tensorrt_version": caps.version_str, "gpu_name": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"), "board": gpu.get("board"),
        "onnx_sha256": onnx_sha, "onnx_path": os.path.abspath(args.onnx), "plugins": plugins,
        "precision": plan["label"], "precision_flags": flags, "batch": args.batch,
        "max_batch": args.max_batch if shape[0] == -1 else shape[0], "dla_core": args.dla_core,
        "strongly_typed": plan["typed"], "workspace_mib": args.workspace,
        "build_seconds": round(seconds, 1), "notes": plan["notes"],
    })
    sidecar = engine_cache.write_engine(engine_path, blob, sidecar)
    log("engine: {} ({:.1f} MB, {}, batch {}..{}) built in {:.0f} s".format(
        engine_path, len(blob) / 1e6, plan["label"], 1 if shape[0] == -1 else shape[0], sidecar["max_batch"],
        seconds))
    return engine_path, sidecar


@main_guard
def main(argv=None, prog="python3 -m runtime.build"):
    build(parse_args(argv, prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
