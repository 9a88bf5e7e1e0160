"""Every TensorRT API difference (8.2 on JetPack 4.6 .. 10.x) in one place.

The builder and the TensorRT backend never test ``trt.__version__`` themselves: they ask
:class:`TrtCaps` (decided from the version string alone, so it is unit-tested with fake
modules) and call the helpers here.  What a version can *build* (the oldest supported
release, INT4, strongly typed networks, which target rows it serves) comes from the target
table, :mod:`qformat.targets`; this module only knows how each release spells its API.
Python 3.6-compatible (TX2 runs it).
"""

import ctypes
import os

from qformat import targets
from qformat.errors import UserError

MIN_VERSION = targets.TRT_MIN
PLUGIN_HINT = "build it with `make plugins` and pass --plugins build/plugins/libqvit_plugins.so"


def _release(version):
    return "{}.{}".format(*version)


def import_trt():
    """``import tensorrt`` or a one-line error saying how to get it."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise UserError(
            "the TensorRT Python bindings are not importable ({}): on a Jetson use JetPack's "
            "python3-libnvinfer (or docker/Dockerfile.jetson), on x86 `pip install tensorrt` or "
            "docker/Dockerfile.x86; or run the printed trtexec command".format(e)) from None
    return trt


def parse_version(text):
    # type: (str) -> tuple
    """``"8.6.1.post1"`` -> ``(8, 6, 1)``; missing parts are 0."""
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


class TrtCaps:
    """What a TensorRT version can do, decided from its version string only."""

    def __init__(self, version):
        # type: (str) -> None
        self.version_str = str(version)
        v = parse_version(version)
        self.version = v
        #: config.set_memory_pool_limit (8.4+) instead of config.max_workspace_size
        self.memory_pool_api = v >= (8, 4)
        #: builder.build_serialized_network (8.0+) instead of build_engine (removed in 10)
        self.build_serialized = v >= (8, 0)
        #: EXPLICIT_BATCH must be passed to create_network before 10 (deprecated, implicit in 10)
        self.explicit_batch_flag = v < (10, 0)
        #: name-based I/O (num_io_tensors, set_tensor_address, execute_async_v3): 8.5+
        self.tensor_io_api = v >= (8, 5)
        #: INT4 weights (DQ with INT4 initializers, BuilderFlag.INT4 for plugins)
        self.int4 = targets.trt_has("int4", v)
        #: NetworkDefinitionCreationFlag.STRONGLY_TYPED
        self.strongly_typed = targets.trt_has("strongly_typed", v)
        #: registry.get_creator (10+) instead of get_plugin_creator
        self.registry_get_creator = v >= (10, 0)
        #: builder.platform_has_fast_int8 still meaningful (deprecated in 10)
        self.platform_queries = v < (10, 0)

    def check_supported(self):
        if self.version[:2] < MIN_VERSION:
            raise UserError("TensorRT {} is too old: qvit-edge needs {}.{}+ (JetPack 4.6 or newer)".format(
                self.version_str, MIN_VERSION[0], MIN_VERSION[1]))
        return self

    def check_target(self, name, log=print):
        """Refuse a graph exported for a target this TensorRT cannot build; note a mismatch it may build."""
        try:
            tgt = targets.get_target(name)
        except UserError:
            log("note: the sidecar names an unknown target {!r}; building anyway".format(name))
            return
        mine = ", ".join(t.name for t in targets.for_trt_version(self.version)) or "none"
        if not tgt.tensorrt:
            log("note: exported for {} (--target {}); TensorRT may reject what only it runs (UINT8, INT4): "
                "re-export with --target {} for TensorRT {}".format(tgt.runtime, tgt.name, mine, self.version_str))
        elif self.version[:2] < tgt.trt[0]:
            raise UserError("exported for --target {} ({}), which needs TensorRT {}; this is {}: re-export with "
                            "--target {}".format(tgt.name, tgt.runtime, tgt.trt_range(), self.version_str, mine))
        elif self.version[:2] > tgt.trt[1]:
            log("note: exported for --target {} ({}); this TensorRT {} is newer (targets: {})".format(
                tgt.name, tgt.runtime, self.version_str, mine))

    def describe(self):
        """One line for logs: which code paths this version takes."""
        return "TensorRT {}: workspace={} build={} io={} explicit_batch_flag={} int4={} strongly_typed={}".format(
            self.version_str,
            "set_memory_pool_limit" if self.memory_pool_api else "max_workspace_size",
            "build_serialized_network" if self.build_serialized else "build_engine",
            "tensor names" if self.tensor_io_api else "bindings",
            self.explicit_batch_flag, self.int4, self.strongly_typed)


def caps_of(trt):
    """:class:`TrtCaps` of an imported (or fake) ``tensorrt`` module, checked supported."""
    return TrtCaps(getattr(trt, "__version__", "0")).check_supported()


def make_logger(trt, verbose=False):
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


# ----------------------------------------------------------------------------- builder side

def create_network(trt, builder, caps, strongly_typed=False):
    """An explicit-batch network definition (flag only where the version needs it)."""
    flags = 0
    if caps.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        if not caps.strongly_typed:
            raise UserError("--strongly-typed needs TensorRT {}+, this is {}".format(
                _release(targets.TRT_FEATURES["strongly_typed"]), caps.version_str))
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def set_workspace(trt, config, caps, mib):
    """Limit the builder's scratch memory to ``mib`` MiB."""
    nbytes = int(mib) << 20
    if caps.memory_pool_api:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, nbytes)
    else:
        config.max_workspace_size = nbytes


def build_serialized(trt, builder, network, config, caps):
    """Serialized engine bytes, or a UserError (the TensorRT log above says why)."""
    if caps.build_serialized:
        blob = builder.build_serialized_network(network, config)
    else:  # pragma: no cover - TensorRT 7 only; kept so the gate is explicit
        engine = builder.build_engine(network, config)
        blob = engine.serialize() if engine is not None else None
    if blob is None:
        raise UserError("TensorRT failed to build the engine (see its log above); rerun with --verbose")
    return bytes(blob)


def platform_fast_int8(builder, caps):
    # type: (object, TrtCaps) -> bool
    """False on TX2 (sm_62): INT8 there runs in slow emulation."""
    if not caps.platform_queries and not hasattr(builder, "platform_has_fast_int8"):
        return True  # TensorRT 10 dropped the query; every GPU it supports has fast INT8
    return bool(getattr(builder, "platform_has_fast_int8", True))


def platform_fast_fp16(builder, caps):
    # type: (object, TrtCaps) -> bool
    if not caps.platform_queries and not hasattr(builder, "platform_has_fast_fp16"):
        return True
    return bool(getattr(builder, "platform_has_fast_fp16", True))


def set_precision(trt, config, caps, fp16=False, int8=False, int4=False):
    """Set builder precision flags; returns the list of flags set (for the engine sidecar)."""
    flags = []
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        flags.append("fp16")
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
        flags.append("int8")
    if int4:
        if not caps.int4:
            raise UserError("INT4 needs TensorRT {}+, this is {}: build with --int8 or --fp16".format(
                _release(targets.TRT_FEATURES["int4"]), caps.version_str))
        flag = getattr(trt.BuilderFlag, "INT4", None)
        if flag is not None:  # plugin INT4 I/O; INT4 DQ weights need no flag
            config.set_flag(flag)
        flags.append("int4")
    return flags


def pin_fp32_layers(trt, network, config, names):
    """Keep the layers the exporter marked ``fp32_layers`` (LayerNorm / IRM statistics) in FP32.

    In an FP16 engine a LayerNorm's variance overflows (TX2's TensorRT 8.2 has no fused
    LayerNormalization op to do it safely).  The ONNX parser names a layer after its node,
    sometimes with a suffix, so names match by prefix.  PREFER_PRECISION_CONSTRAINTS (8.2+)
    lets TensorRT fall back rather than fail; older builds only know STRICT_TYPES.
    Returns the number of layers pinned.
    """
    wanted = tuple(str(n) for n in names if n)
    if not wanted:
        return 0
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not any(layer.name == n or layer.name.startswith(n + " ") or layer.name.startswith(n + "_")
                   for n in wanted):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    if pinned:
        flag = getattr(trt.BuilderFlag, "PREFER_PRECISION_CONSTRAINTS", None) or \
            getattr(trt.BuilderFlag, "STRICT_TYPES", None)
        if flag is not None:
            config.set_flag(flag)
    return pinned


def configure_dla(trt, builder, config, core, gpu_fallback=True):
    """Run layers on DLA core ``core`` (Orin), falling back to the GPU for the rest."""
    n = int(getattr(builder, "num_DLA_cores", 0))
    if n <= 0:
        raise UserError("--useDLACore {} asked but this device has no DLA (only Jetson Xavier/Orin do)".format(core))
    if not 0 <= core < n:
        raise UserError("--useDLACore {} out of range: this device has {} DLA core(s)".format(core, n))
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = int(core)
    if gpu_fallback:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)


def load_timing_cache(config, path):
    """Attach a timing cache (read from ``path`` if it exists) so rebuilds skip kernel timing."""
    data = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)
    return cache


def timing_cache_bytes(config):
    cache = config.get_timing_cache()
    return bytes(cache.serialize()) if cache is not None else b""


# ----------------------------------------------------------------------------- plugins

def load_plugins(trt, logger, paths):
    """dlopen each plugin library (RTLD_GLOBAL) and register TensorRT's own plugins."""
    for path in paths or ():
        if not os.path.isfile(path):
            raise UserError("plugin library {} not found: {}".format(path, PLUGIN_HINT))
        try:
            ctypes.CDLL(os.path.abspath(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        except OSError as e:
            raise UserError("cannot load plugin library {} ({}): rebuild it for this TensorRT with "
                            "`make plugins`".format(path, e)) from None
    trt.init_libnvinfer_plugins(logger, "")


def has_plugin_creator(trt, caps, name, version="1", namespace=""):
    """Whether a plugin creator ``name``/``version`` is registered."""
    registry = trt.get_plugin_registry()
    if caps.registry_get_creator and hasattr(registry, "get_creator"):
        return registry.get_creator(name, version, namespace) is not None
    if hasattr(registry, "get_plugin_creator"):
        return registry.get_plugin_creator(name, version, namespace) is not None
    return any(getattr(c, "name", None) == name for c in getattr(registry, "plugin_creator_list", ()))


# ----------------------------------------------------------------------------- runtime side

def engine_io(trt, engine, caps):
    """I/O tensors as dicts ``{name, index, is_input, shape, dtype}`` for either API."""
    out = []
    if caps.tensor_io_api:
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            out.append({
                "name": name, "index": i,
                "is_input": engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                "shape": tuple(engine.get_tensor_shape(name)),
                "dtype": trt.nptype(engine.get_tensor_dtype(name)),
            })
    else:
        for i in range(engine.num_bindings):
            out.append({
                "name": engine.get_binding_name(i), "index": i,
                "is_input": bool(engine.binding_is_input(i)),
                "shape": tuple(engine.get_binding_shape(i)),
                "dtype": trt.nptype(engine.get_binding_dtype(i)),
            })
    return out


def profile_max_batch(engine, caps, io):
    """Largest batch the engine's optimization profile 0 accepts (static engines: their batch)."""
    inp = [t for t in io if t["is_input"]][0]
    if inp["shape"][0] != -1:
        return int(inp["shape"][0])
    if caps.tensor_io_api:
        _, _, hi = engine.get_tensor_profile_shape(inp["name"], 0)
    else:
        _, _, hi = engine.get_profile_shape(0, inp["index"])
    return int(hi[0])


def set_input_shape(context, caps, tensor, shape):
    if caps.tensor_io_api:
        context.set_input_shape(tensor["name"], tuple(shape))
    else:
        context.set_binding_shape(tensor["index"], tuple(shape))


def output_shape(context, caps, tensor):
    if caps.tensor_io_api:
        return tuple(context.get_tensor_shape(tensor["name"]))
    return tuple(context.get_binding_shape(tensor["index"]))


def bind_addresses(context, caps, io, ptrs):
    """Tell the context where each tensor lives; returns the bindings list for the 8.x API."""
    if caps.tensor_io_api:
        for t in io:
            context.set_tensor_address(t["name"], int(ptrs[t["name"]]))
        return None
    return [int(ptrs[t["name"]]) for t in sorted(io, key=lambda t: t["index"])]


def execute_async(context, caps, bindings, stream_handle):
    if caps.tensor_io_api:
        ok = context.execute_async_v3(stream_handle)
    else:
        ok = context.execute_async_v2(bindings, stream_handle)
    if ok is False:
        raise RuntimeError("TensorRT enqueue failed (see the TensorRT log)")


def device_memory_size(engine):
    """Activation memory the engine needs (bytes); 0 when the version does not say."""
    for attr in ("device_memory_size_v2", "device_memory_size"):
        if hasattr(engine, attr):
            return int(getattr(engine, attr))
    return 0
