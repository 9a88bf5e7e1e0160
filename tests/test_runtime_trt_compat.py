"""Version gates of runtime/trt_compat.py against fake ``tensorrt`` modules (8.2, 8.5, 8.6, 10.3, 10.13, 11.1).

The fakes expose exactly the Python names NVIDIA's bindings of each release have
(tests/trt_api_names.txt, generated from the release branches' binding sources): no
``set_memory_pool_limit`` on 8.2, no ``build_engine`` on 10, no ``BuilderFlag.FP16`` or
``ILayer.precision`` on 11 -- so calling the wrong path fails here rather than on a Jetson.
``make_fake_trt`` is reused by the builder, bench and engine tests.
"""

import functools
import types

import numpy as np
import pytest
import trt_names

from qformat import LOWBIT_OP
from qformat.errors import UserError
from runtime import trt_compat
from runtime.build import DevicePrecisions, GraphKind, plan_precision
from runtime.trt_compat import TrtCaps, parse_version

VERSIONS = ("8.2.1", "8.5.2", "8.6.1", "10.3.0", "10.13.0", "11.1.0")


def make_fake_trt(version, fast_int8=True, dla_cores=0, input_shape=(-1, 3, 32, 32), registered=(),
                  layers=("blocks.0.norm1/LayerNormalization", "blocks.0.attn.qkv/MatMul")):
    """A stand-in ``tensorrt`` module of ``version``; calls land in ``trt.calls``.

    The classes implement the union of the releases' APIs and are made strict by
    :mod:`trt_names`: runtime code sees only the names NVIDIA's bindings of that release have
    (tests/trt_api_names.txt), so calling the wrong path fails here rather than on a Jetson.
    """
    release = trt_names.release_of(version)
    trt = trt_names.StrictModule("tensorrt")
    trt._release = release
    trt.__version__ = version
    trt.calls = []
    trt.registered = set(registered)
    calls = trt.calls
    strict = functools.partial(trt_names.strict_class, release)
    enum = functools.partial(trt_names.strict_enum, release)

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

        def __init__(self, severity=2):
            self.severity = severity

    trt.Logger = strict("Logger", Logger)
    trt.NetworkDefinitionCreationFlag = enum("NetworkDefinitionCreationFlag", EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    trt.BuilderFlag = enum("BuilderFlag", FP16="FP16", INT8="INT8", INT4="INT4", GPU_FALLBACK="GPU_FALLBACK",
                           PREFER_PRECISION_CONSTRAINTS="PREFER_PRECISION_CONSTRAINTS", STRICT_TYPES="STRICT_TYPES")
    trt.MemoryPoolType = enum("MemoryPoolType", WORKSPACE="WORKSPACE")
    trt.DeviceType = enum("DeviceType", GPU="GPU", DLA="DLA")
    trt.TensorIOMode = enum("TensorIOMode", INPUT="INPUT", OUTPUT="OUTPUT")
    trt.float32 = "FLOAT"
    trt.nptype = lambda dt: np.float32

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"TC" + self.data[:0]

    TimingCache = strict("ITimingCache", TimingCache)

    class Config:
        def __init__(self):
            self.flags = []
            self.cache = None
            self.max_workspace_size = 0
            self.default_device_type = "GPU"
            self.DLA_core = -1

        def set_flag(self, f):
            self.flags.append(f)
            calls.append(("set_flag", f))

        def add_optimization_profile(self, p):
            calls.append(("profile", p.shapes))

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

        def set_memory_pool_limit(self, pool, nbytes):
            calls.append(("set_memory_pool_limit", pool, nbytes))

    Config = strict("IBuilderConfig", Config)

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    Tensor = strict("ITensor", Tensor)

    class Layer:
        def __init__(self, name):
            self.name, self.precision, self.num_outputs, self.out = name, None, 1, {}

        def set_output_type(self, j, t):
            self.out[j] = t
            calls.append(("pin", self.name, t))

    Layer = strict("ILayer", Layer)

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.num_inputs = 1
            self.layers = [Layer(n) for n in layers]
            self.num_layers = len(self.layers)

        def get_input(self, i):
            return Tensor("input", list(input_shape))

        def get_layer(self, i):
            return self.layers[i]

    Network = strict("INetworkDefinition", Network)

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, list(lo), list(opt), list(hi))

    Profile = strict("IOptimizationProfile", Profile)

    class Builder:
        num_DLA_cores = dla_cores
        platform_has_fast_int8 = fast_int8
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network", tuple(config.flags)))
            return b"FAKE-ENGINE-" + version.encode()

        def build_engine(self, network, config):  # exists on 8.x, must not be used there
            raise AssertionError("build_engine called on TensorRT {}".format(version))

    trt.Builder = strict("Builder", Builder)

    class Error:
        def __init__(self, text):
            self.text = text

        def __str__(self):
            return self.text

    Error = strict("ParserError", Error)

    class OnnxParser:
        def __init__(self, network, logger):
            self.errors = []

        def _check(self, data):
            if LOWBIT_OP.encode() in data and LOWBIT_OP not in trt.registered:
                self.errors.append(Error("No importer registered for op: " + LOWBIT_OP))
            return not self.errors

        def parse(self, data, path=None):
            calls.append(("parse", len(data), LOWBIT_OP.encode() + b"\x12" in data))
            trt.parsed_bytes = data
            return self._check(data)

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            with open(path, "rb") as f:
                return self._check(f.read())

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    trt.OnnxParser = strict("OnnxParser", OnnxParser)

    class Registry:
        def get_creator(self, name, ver, ns=""):
            return object() if name in trt.registered else None

        def get_plugin_creator(self, name, ver, ns=""):
            return object() if name in trt.registered else None

    Registry = strict("IPluginRegistry", Registry)
    trt.get_plugin_registry = lambda: Registry()
    trt.init_libnvinfer_plugins = lambda logger, ns: calls.append(("init_libnvinfer_plugins", ns))

    class Engine:
        device_memory_size = 1 << 20
        device_memory_size_v2 = 1 << 20
        num_io_tensors = 2
        num_bindings = 2

        def get_tensor_name(self, i):
            return ["input", "logits"][i]

        def get_tensor_mode(self, name):
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_shape(self, name):
            return (-1, 3, 32, 32) if name == "input" else (-1, 10)

        def get_tensor_dtype(self, name):
            return "FLOAT"

        def get_tensor_profile_shape(self, name, p):
            return [(1, 3, 32, 32), (1, 3, 32, 32), (8, 3, 32, 32)]

        def get_binding_name(self, i):
            return ["input", "logits"][i]

        def binding_is_input(self, i):
            return i == 0

        def get_binding_shape(self, i):
            return (-1, 3, 32, 32) if i == 0 else (-1, 10)

        def get_binding_dtype(self, i):
            return "FLOAT"

        def get_profile_shape(self, p, i):
            return [(1, 3, 32, 32), (1, 3, 32, 32), (4, 3, 32, 32)]

        def create_execution_context(self):
            return Context()

    Engine = strict("ICudaEngine", Engine)
    trt.Engine = Engine  # for the tests (not a TensorRT name: runtime code never reads it)

    class Context:
        def __init__(self):
            self.log = []

        def _rec(self, name, *a):
            self.log.append((name,) + a)
            return True

        def set_input_shape(self, name, shape):
            return self._rec("set_input_shape", name, shape)

        def set_binding_shape(self, i, shape):
            return self._rec("set_binding_shape", i, shape)

        def get_tensor_shape(self, name):
            return (2, 10)

        def get_binding_shape(self, i):
            return (2, 10)

        def set_tensor_address(self, name, ptr):
            return self._rec("set_tensor_address", name, ptr)

        def execute_async_v3(self, stream):
            return self._rec("execute_async_v3", stream)

        def execute_async_v2(self, bindings, stream):
            return self._rec("execute_async_v2", bindings, stream)

    Context = strict("IExecutionContext", Context)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data.startswith(b"FAKE-ENGINE") else None

    trt.Runtime = strict("Runtime", Runtime)
    return trt


@pytest.mark.parametrize("version,pool,io,flag,int4,typed,weak", [
    ("8.2.1", False, False, True, False, False, True),
    ("8.5.2", True, True, True, False, False, True),
    ("8.6.1", True, True, True, False, False, True),
    ("10.3.0", True, True, False, True, True, True),
    ("10.13.0", True, True, False, True, True, True),  # Jetson Thor, JetPack 7.0
    ("11.1.0", True, True, False, True, True, False),
])
def test_caps_from_version(version, pool, io, flag, int4, typed, weak):
    caps = TrtCaps(version).check_supported()
    assert (caps.memory_pool_api, caps.tensor_io_api, caps.explicit_batch_flag, caps.int4, caps.strongly_typed,
            caps.weak_typing) == (pool, io, flag, int4, typed, weak)
    assert caps.build_serialized
    assert version in caps.describe()


def test_old_version_is_refused():
    with pytest.raises(UserError, match="too old"):
        TrtCaps("7.1.3").check_supported()


def test_parse_version():
    assert parse_version("10.3.0.26") == (10, 3, 0)
    assert parse_version("8.6.1.post1") == (8, 6, 1)
    assert parse_version("9") == (9, 0, 0)


@pytest.mark.parametrize("version", VERSIONS)
def test_builder_helpers_take_the_versions_path(version):
    trt = make_fake_trt(version)
    caps = trt_compat.caps_of(trt)
    builder = trt.Builder(trt.Logger())
    config = builder.create_builder_config()
    trt_compat.set_workspace(trt, config, caps, 256)
    if caps.memory_pool_api:
        assert ("set_memory_pool_limit", "WORKSPACE", 256 << 20) in trt.calls
    else:
        assert config.max_workspace_size == 256 << 20
    assert trt_compat.platform_fast_int8(builder, caps) is True
    if caps.strongly_typed:
        assert trt_compat.create_network(trt, builder, caps, strongly_typed=True).flags == 2
    else:
        with pytest.raises(UserError, match="9.1"):
            trt_compat.create_network(trt, builder, caps, strongly_typed=True)
    if not caps.weak_typing:  # TensorRT 11: no precision flags, no pins, no weakly typed network
        with pytest.raises(UserError, match="only strongly typed"):
            trt_compat.create_network(trt, builder, caps)
        with pytest.raises(UserError, match="no precision builder flags"):
            trt_compat.set_precision(trt, config, caps, fp16=True)
        with pytest.raises(UserError, match="cannot pin"):
            trt_compat.pin_fp32_layers(trt, trt_compat.create_network(trt, builder, caps, True), config, caps,
                                       ["blocks.0.norm1"])
        assert trt_compat.set_precision(trt, config, caps) == [] and config.flags == []
        return
    net = trt_compat.create_network(trt, builder, caps)
    assert net.flags == (1 if caps.explicit_batch_flag else 0)
    assert trt_compat.set_precision(trt, config, caps, fp16=True, int8=True) == ["fp16", "int8"]
    assert trt_compat.build_serialized(trt, builder, net, config, caps).startswith(b"FAKE-ENGINE")
    if caps.int4:
        trt_compat.set_precision(trt, config, caps, int4=True)
        assert "INT4" in config.flags
    else:
        with pytest.raises(UserError, match="INT4 needs TensorRT 10"):
            trt_compat.set_precision(trt, config, caps, int4=True)
    assert trt_compat.pin_fp32_layers(trt, net, config, caps, ["blocks.0.norm1/LayerNormalization"]) == 1
    assert config.flags[-1] == "PREFER_PRECISION_CONSTRAINTS"
    assert ("pin", "blocks.0.norm1/LayerNormalization", "FLOAT") in trt.calls


@pytest.mark.parametrize("version", VERSIONS)
def test_runtime_io_helpers(version):
    trt = make_fake_trt(version)
    caps = trt_compat.caps_of(trt)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"FAKE-ENGINE")
    io = trt_compat.engine_io(trt, engine, caps)
    assert [(t["name"], t["is_input"]) for t in io] == [("input", True), ("logits", False)]
    assert trt_compat.profile_max_batch(engine, caps, io) == (8 if caps.tensor_io_api else 4)
    assert trt_compat.device_memory_size(engine) == 1 << 20
    ctx = engine.create_execution_context()
    trt_compat.set_input_shape(ctx, caps, io[0], (2, 3, 32, 32))
    assert trt_compat.output_shape(ctx, caps, io[1]) == (2, 10)
    bindings = trt_compat.bind_addresses(ctx, caps, io, {"input": 100, "logits": 200})
    trt_compat.execute_async(ctx, caps, bindings, 7)
    names = [c[0] for c in ctx.log]
    if caps.tensor_io_api:
        assert names == ["set_input_shape", "set_tensor_address", "set_tensor_address", "execute_async_v3"]
    else:
        assert bindings == [100, 200]
        assert names == ["set_binding_shape", "execute_async_v2"]


@pytest.mark.parametrize("version", VERSIONS)
def test_plugin_registry_lookup(version):
    trt = make_fake_trt(version, registered=[LOWBIT_OP])
    caps = trt_compat.caps_of(trt)
    assert trt_compat.has_plugin_creator(trt, caps, LOWBIT_OP)
    assert not trt_compat.has_plugin_creator(trt, caps, "Nope")


def test_missing_plugin_library_names_make_plugins(tmp_path):
    trt = make_fake_trt("10.3.0")
    with pytest.raises(UserError, match="make plugins"):
        trt_compat.load_plugins(trt, trt.Logger(), [str(tmp_path / "libqvit_plugins.so")])


def test_dla_needs_a_dla():
    trt = make_fake_trt("8.6.1", dla_cores=0)
    b = trt.Builder(trt.Logger())
    with pytest.raises(UserError, match="no DLA"):
        trt_compat.configure_dla(trt, b, b.create_builder_config(), 0)
    trt = make_fake_trt("8.6.1", dla_cores=2)
    b = trt.Builder(trt.Logger())
    cfg = b.create_builder_config()
    trt_compat.configure_dla(trt, b, cfg, 1)
    assert cfg.default_device_type == "DLA" and cfg.DLA_core == 1 and "GPU_FALLBACK" in cfg.flags


# ------------------------------------------------------------------ precision planning


QDQ, LOWBIT, TX2, ORIN = GraphKind(True), GraphKind(False, is_lowbit=True), DevicePrecisions(False), DevicePrecisions()


def test_qdq_on_tx2_refuses_slow_int8():
    with pytest.raises(UserError, match="no fast INT8.*lowbit"):
        plan_precision("auto", QDQ, TX2)
    plan = plan_precision("auto", QDQ, TX2, allow_slow_int8=True)
    assert plan["int8"] and any("slow" in n for n in plan["notes"])


def test_lowbit_on_tx2_is_fp16_with_plugins():
    plan = plan_precision("auto", LOWBIT, TX2)
    assert (plan["fp16"], plan["int8"], plan["label"]) == (True, False, "fp16")
    assert any("FP16 engine + low-bit weight plugins" in n for n in plan["notes"])
    # asking for INT8 on TX2 without Q/DQ falls back to FP16 and says so
    plan = plan_precision("int8", LOWBIT, TX2)
    assert not plan["int8"] and any("FP16 instead of INT8" in n for n in plan["notes"])


def test_qdq_on_orin_is_int8_fp16_and_int4_gated():
    plan = plan_precision("auto", QDQ, ORIN)
    assert (plan["int8"], plan["fp16"], plan["label"]) == (True, True, "int8")
    int4 = GraphKind(True, int4_weights=True)
    with pytest.raises(UserError, match="INT4 weights"):
        plan_precision("auto", int4, DevicePrecisions(int4=False))
    assert plan_precision("auto", int4, ORIN)["label"] == "int8+int4"
    with pytest.raises(UserError, match="--int8"):
        plan_precision("fp16", QDQ, ORIN)
    assert plan_precision("auto", GraphKind(False), ORIN, strongly_typed=True)["label"] == "fp32-typed"


def test_weight_only_graph_is_labelled_by_its_weights():
    woq = GraphKind(True, int4_weights=True, weight_only=True)
    assert plan_precision("auto", woq, ORIN)["label"] == "fp16+int4w"
    assert plan_precision("fp16", woq, ORIN)["label"] == "fp16+int4w"  # Q/DQ of weights alone: FP16 is fine


def test_pin_fp32_layers_matches_exporter_names_and_sets_constraint_flag():
    class Layer:
        def __init__(self, name):
            self.name, self.precision, self.num_outputs, self.out = name, None, 2, {}

        def set_output_type(self, j, t):
            self.out[j] = t

    layers = [Layer("blocks.0.norm1/ReduceMean"), Layer("blocks.0.norm1/ReduceMean_1"), Layer("blocks.0.attn.qkv"),
              Layer("blocks.0.norm1/Sqrt (Unnamed)")]
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    flags = []
    config = types.SimpleNamespace(set_flag=flags.append)
    for expect in ("PREFER_PRECISION_CONSTRAINTS", "STRICT_TYPES"):  # TensorRT 8.2+, older
        flags.clear()
        trt = types.SimpleNamespace(float32="f32", BuilderFlag=types.SimpleNamespace(**{expect: expect}))
        n = trt_compat.pin_fp32_layers(trt, network, config, TrtCaps("8.6.1"),
                                       ["blocks.0.norm1/ReduceMean", "blocks.0.norm1/Sqrt"])
        assert n == 3 and flags == [expect]
        assert layers[2].precision is None and layers[0].out == {0: "f32", 1: "f32"}
    assert trt_compat.pin_fp32_layers(trt, network, config, TrtCaps("8.6.1"), []) == 0


def test_fakes_are_as_strict_as_the_release():
    """Runtime code that takes another release's path meets the AttributeError the real module raises."""
    trt = make_fake_trt("10.3.0")
    config = trt.Builder(trt.Logger()).create_builder_config()
    with pytest.raises(AttributeError, match="TensorRT 10.3 has no IBuilderConfig.max_workspace_size"):
        trt_compat.set_workspace(trt, config, TrtCaps("8.2.1"), 64)  # 8.2's path on 10.3
    trt = make_fake_trt("11.1.0")
    with pytest.raises(AttributeError, match="TensorRT 11.1 has no BuilderFlag.FP16"):
        trt_compat.set_precision(trt, trt.Builder(trt.Logger()).create_builder_config(), TrtCaps("10.3.0"), True)
    assert trt.BuilderFlag.FP16 == "FP16"  # the tests themselves are not checked, only runtime/ code
