"""One inference interface over TensorRT engines, ONNX Runtime and the trained torch checkpoint.

bench and demo time and feed all three the same way (``prepare(batch)`` then ``run(x)``
on a preprocessed ``[N, C, H, W]`` float32 array -> logits), so their numbers compare.
tensorrt/pycuda and onnxruntime are imported only by the backend that needs them; the torch
backend lives apart (:mod:`runtime.torchtools.backend`) and loads only for ``--backend torch``:
the Jetson image has no torch.  Python 3.6-compatible.
"""

import importlib.util
import os

import numpy as np

from qformat import files
from qformat.errors import UserError
from qformat.io import sha256_file, sidecar_path
from qformat.ort import session_options
from runtime import engine_cache, model_meta, trt_compat
from runtime.backend_api import BACKENDS, Backend, BatchUnsupported, host_peak_rss_mb  # noqa: F401 (re-exported)
from runtime.device import gpu_info


class OrtBackend(Backend):
    """ONNX Runtime on the exported graph (CPU by default; the reference for the other two)."""

    name = "ort"

    def __init__(self, onnx_path, threads=0, providers=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the ort backend needs onnxruntime: pip install onnxruntime") from None
        self.path = onnx_path
        self.meta = model_meta.load_onnx_meta(onnx_path)
        opts = session_options(ort, threads)
        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        bad = [p for p in providers if p not in available]
        if bad:
            raise UserError("ONNX Runtime provider(s) {} not available here (have: {})".format(
                ", ".join(bad), ", ".join(available)))
        try:
            self.session = ort.InferenceSession(onnx_path, opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise UserError("ONNX Runtime cannot load {}: {}".format(onnx_path, str(e).splitlines()[0])) from None
        inputs = self.session.get_inputs()
        names = [i.name for i in inputs]
        if self.meta["input_name"] not in names:
            raise UserError("sidecar input_name {!r} is not an input of {} (inputs: {}); re-export".format(
                self.meta["input_name"], onnx_path, names))
        self.input_name = self.meta["input_name"]
        outs = [o.name for o in self.session.get_outputs()]
        self.output_name = self.meta["output_name"] if self.meta["output_name"] in outs else outs[0]
        inp = inputs[names.index(self.input_name)]
        model_meta.check_input_shape(self.meta, list(inp.shape), onnx_path, sidecar_path(onnx_path))
        if inp.type != "tensor(float)":
            raise UserError("{} takes {} input, the runtime feeds float32 images: re-export the model".format(
                onnx_path, inp.type))
        dim0 = inp.shape[0]
        self.fixed_batch = dim0 if isinstance(dim0, int) and dim0 > 0 else None
        self.precision = str(self.meta.get("format", "fp32"))
        self.providers = providers

    def _run(self, x):
        return self.session.run([self.output_name], {self.input_name: x})[0]


class TrtBackend(Backend):
    """A serialized TensorRT engine; checks its sidecar first so a foreign engine says 'rebuild'."""

    name = "trt"

    def __init__(self, engine_path, plugins=None, cuda_graph=True, verbose=False, log=print):
        from runtime.cuda_mem import open_cuda

        self.path = engine_path
        self.meta = engine_cache.read_engine_meta(engine_path)
        model_meta.validate(self.meta, engine_path + ".json")
        self.trt = trt = trt_compat.import_trt()
        self.caps = caps = trt_compat.caps_of(trt)
        self.logger = trt_compat.make_logger(trt, verbose)
        if not plugins:  # the libraries the engine was built with, where they still are
            plugins = [p["path"] for p in self.meta.get("plugins") or [] if os.path.isfile(p["path"])]
            if self.meta.get("plugins") and not plugins:
                raise UserError("engine {} needs plugin library {}: {}".format(
                    engine_path, self.meta["plugins"][0]["path"], trt_compat.PLUGIN_HINT))
        trt_compat.load_plugins(trt, self.logger, plugins)
        engine_cache.check_compatible(engine_path, self.meta, caps.version_str, gpu_info(),
                                      [sha256_file(p) for p in plugins])
        engine_cache.check_engine_file(engine_path, self.meta)
        self.cuda = open_cuda()
        self.free0, self.total = self.cuda.mem_info()
        with open(engine_path, "rb") as f:
            runtime = trt.Runtime(self.logger)
            self.engine = runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError("TensorRT could not deserialize {}: rebuild it here with `python3 -m runtime.build "
                            "--onnx {}`".format(engine_path, self.meta.get("onnx_path", "<model>.onnx")))
        self.io = trt_compat.engine_io(trt, self.engine, caps)
        self.inp = [t for t in self.io if t["is_input"]][0]
        model_meta.check_input_shape(self.meta, list(self.inp["shape"]), engine_path, engine_path + ".json")
        self.context = self.engine.create_execution_context()
        self.outs = [t for t in self.io if not t["is_input"]]
        self.out = [t for t in self.outs if t["name"] == self.meta["output_name"]] or self.outs[:1]
        self.out = self.out[0]
        self._max_batch = trt_compat.profile_max_batch(self.engine, caps, self.io)
        self.use_graph = cuda_graph
        self.precision = self.meta.get("precision", "?")
        self.stream = self.cuda.stream()
        self.batch = None
        self.launch = None
        self.log = log

    def max_batch(self):
        return self._max_batch

    def prepare(self, batch):
        Backend.prepare(self, batch)
        if batch == self.batch:
            return
        shape = (batch,) + tuple(self.inp["shape"][1:])
        if self.inp["shape"][0] == -1:
            trt_compat.set_input_shape(self.context, self.caps, self.inp, shape)
        elif batch != self.inp["shape"][0]:
            raise BatchUnsupported("engine batch is fixed at {}".format(self.inp["shape"][0]))
        self.host, ptrs = {}, {}
        for t in self.io:
            s = shape if t["is_input"] else trt_compat.output_shape(self.context, self.caps, t)
            self.host[t["name"]] = self.cuda.pinned(s, t["dtype"])
            ptrs[t["name"]] = self.cuda.alloc(self.host[t["name"]].nbytes)
        self.ptrs = ptrs
        self.bindings = trt_compat.bind_addresses(self.context, self.caps, self.io, ptrs)
        self.batch = batch
        h = self.cuda.handle(self.stream)
        enqueue = lambda: trt_compat.execute_async(self.context, self.caps, self.bindings, h)  # noqa: E731
        enqueue()  # first enqueue after a shape change initialises state; never captured
        self.cuda.sync(self.stream)
        self.launch = enqueue
        if self.use_graph:
            try:
                graph = self.cuda.capture(self.stream, enqueue)
            except Exception as e:  # noqa: BLE001 - plugins or old drivers may refuse capture
                graph = None
                self.log("note: CUDA graph capture failed ({}); timing plain enqueues".format(e))
            if graph is not None:
                self.launch = graph
            else:
                self.use_graph = False

    def _run(self, x):
        hin = self.host[self.inp["name"]]
        np.copyto(hin, x.astype(hin.dtype, copy=False))
        self.cuda.h2d(self.ptrs[self.inp["name"]], hin, self.stream)
        self.launch()
        hout = self.host[self.out["name"]]
        self.cuda.d2h(hout, self.ptrs[self.out["name"]], self.stream)
        self.cuda.sync(self.stream)
        return np.array(hout, dtype=np.float32)

    def memory(self):
        free, total = self.cuda.mem_info()
        m = Backend.memory(self)
        m.update({"device_used_mb": round((self.free0 - free) / 1e6, 1),
                  "engine_activation_mb": round(trt_compat.device_memory_size(self.engine) / 1e6, 1),
                  "device_total_mb": round(total / 1e6, 1), "cuda_graph": bool(self.use_graph)})
        return m

    def close(self):
        self.cuda.close()


def _torch_backend():
    try:
        from runtime.torchtools.backend import TorchBackend
    except ImportError as e:  # torch (or the trainer package) is absent, as on a Jetson
        raise UserError("the torch backend needs torch and the train package ({}); on a Jetson use "
                        "--backend trt or ort".format(e)) from None
    return TorchBackend


#: One class per backend; the torch one is imported only when asked for.
_CLASSES = {"ort": lambda: OrtBackend, "trt": lambda: TrtBackend, "torch": _torch_backend}


#: the file each backend runs (qformat.files checks its kind before the backend's library loads it); a
#: checkpoint (also given as a stem or its .json) is checked by the train side's loader, behind the torch import
_FILE_KIND = {"ort": files.ONNX, "trt": files.ENGINE}


def _check_file(kind, path):
    """One line for a file of the wrong kind; an ONNX given to the trt backend says what trt runs."""
    if kind == "trt" and os.path.isfile(path) and files.kind_of(path) == files.ONNX:
        have = "is installed" if importlib.util.find_spec("tensorrt") is not None else "is missing here"
        raise UserError("--backend trt runs a TensorRT engine and {} is an ONNX model (TensorRT {}): build an "
                        "engine with python3 -m runtime.build --onnx {} and pass --engine, or use --backend "
                        "ort".format(path, have, path))
    if kind in _FILE_KIND:
        files.require(path, _FILE_KIND[kind])


def open_backend(kind, path, threads=0, providers=None, plugins=None, cuda_graph=True, lowbit_cuda=False,
                 verbose=False, log=print):
    """Backend ``kind`` for ``path`` (ONNX for ort, engine for trt, checkpoint for torch)."""
    if kind not in _CLASSES:
        raise UserError("unknown backend {!r}: use one of {}".format(kind, ", ".join(BACKENDS)))
    _check_file(kind, path)
    cls = _CLASSES[kind]()
    if kind == "ort":
        return cls(path, threads=threads, providers=providers)
    if kind == "trt":
        return cls(path, plugins=plugins, cuda_graph=cuda_graph, verbose=verbose, log=log)
    return cls(path, lowbit_cuda=lowbit_cuda)
