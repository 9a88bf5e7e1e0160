"""One inference interface over TensorRT engines, ONNX Runtime and the trained torch checkpoint.

bench and demo time and feed all three the same way (``prepare(batch)`` then ``run(x)``
on a preprocessed ``[N, C, H, W]`` float32 array -> logits), so their numbers compare.
tensorrt/pycuda, onnxruntime and torch are imported only by the backend that needs them:
the Jetson image has no torch.  Python 3.6-compatible.
"""

import os
import resource

import numpy as np

from qformat.errors import UserError
from qformat.io import sha256_file, sidecar_path
from runtime import engine_cache, model_meta, trt_compat
from runtime.device import gpu_info
from runtime.preprocess import check_input

BACKENDS = ("trt", "ort", "torch")


class BatchUnsupported(Exception):
    """The model/engine cannot run this batch size (fixed batch, profile limit)."""


def host_peak_rss_mb():
    """Peak resident memory of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Backend:
    name = "?"
    meta = None  # type: dict
    path = ""
    precision = "fp32"

    def max_batch(self):
        """Largest batch accepted, or None when any batch works."""
        return None

    def prepare(self, batch):
        mb = self.max_batch()
        if mb is not None and batch > mb:
            raise BatchUnsupported("{} accepts batch <= {}".format(self.name, mb))
        if getattr(self, "fixed_batch", None) and batch != self.fixed_batch:
            raise BatchUnsupported("{} has a fixed batch of {}".format(os.path.basename(self.path), self.fixed_batch))

    def run(self, x):
        """Logits for a preprocessed ``[N, C, H, W]`` batch. Refuses (UserError) a batch of the wrong shape
        or one with NaN/Inf frames (:class:`runtime.preprocess.NonFiniteInput`), at the cost of one sum."""
        return self._run(check_input(x, self.meta, self.path))

    def _run(self, x):
        raise NotImplementedError

    def memory(self):
        return {"host_peak_rss_mb": round(host_peak_rss_mb(), 1)}

    def close(self):
        pass


def ort_session_options(ort, threads=0):
    """The one ONNX Runtime set-up every stage uses (bench, demo, the exporter's parity check).

    ORT rewrites DQ(weights) -> MatMul whose activation is not a DQ output (per-channel input
    scales) into MatMulNBits, which by default re-quantizes the activations to int8 on the fly
    (accuracy level 4): not the trained arithmetic.  Level 1 keeps the fp32 compute.
    """
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return opts


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
        opts = ort_session_options(ort, threads)
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


class TorchBackend(Backend):
    """The trained (converted) checkpoint in torch: the accuracy reference, and --lowbit-cuda kernels."""

    name = "torch"

    def __init__(self, checkpoint, lowbit_cuda=False, device=None):
        try:
            import torch
        except ImportError:
            raise UserError("the torch backend needs torch (not on Jetson images: use --backend trt)") from None
        try:
            from train.checkpoint import load_converted
        except ImportError as e:
            raise UserError("cannot import train.checkpoint.load_converted ({}): the trainer package is "
                            "missing or too old".format(e)) from None
        if not os.path.isfile(checkpoint):
            raise UserError("checkpoint not found: {} (train one with `make train`)".format(checkpoint))
        self.torch = torch
        self.path = checkpoint
        model, meta = load_converted(checkpoint)
        meta = dict(meta)
        for k, v in (("model", os.path.basename(checkpoint)), ("format", "torch"), ("target", "torch"),
                     ("bits", {}), ("input_name", "input"), ("output_name", "logits")):
            meta.setdefault(k, v)
        self.meta = model_meta.validate(meta, checkpoint + " metadata")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if lowbit_cuda:
            try:
                from runtime.torchtools import gemm_ext
            except ImportError as e:
                raise UserError("--lowbit-cuda needs runtime/torchtools/gemm_ext.py and its CUDA extension ({})".format(
                    e)) from None
            if not hasattr(gemm_ext, "swap_linears"):
                raise UserError("runtime.torchtools.gemm_ext has no swap_linears(): update the kernels package")
            bits = meta.get("bits") or {}
            wbits = bits.get("weight", 4) if isinstance(bits, dict) else 4
            model = gemm_ext.swap_linears(model, bits=wbits) or model
        self.model = model.eval().to(self.device)
        self.precision = "lowbit-cuda" if lowbit_cuda else "torch-fakequant"

    def _run(self, x):
        torch = self.torch
        with torch.inference_mode():
            y = self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
            if isinstance(y, (tuple, list)):
                y = y[0]
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            return y.float().cpu().numpy()

    def memory(self):
        m = Backend.memory(self)
        if self.device.startswith("cuda"):
            m["device_peak_mb"] = round(self.torch.cuda.max_memory_allocated() / 1e6, 1)
        return m


def open_backend(kind, path, threads=0, providers=None, plugins=None, cuda_graph=True, lowbit_cuda=False,
                 verbose=False, log=print):
    """Backend ``kind`` for ``path`` (ONNX for ort, engine for trt, checkpoint for torch)."""
    if kind == "ort":
        return OrtBackend(path, threads=threads, providers=providers)
    if kind == "trt":
        return TrtBackend(path, plugins=plugins, cuda_graph=cuda_graph, verbose=verbose, log=log)
    if kind == "torch":
        return TorchBackend(path, lowbit_cuda=lowbit_cuda)
    raise UserError("unknown backend {!r}: use one of {}".format(kind, ", ".join(BACKENDS)))
