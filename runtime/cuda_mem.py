"""Device buffers, streams and CUDA graphs through pycuda or cuda-python, whichever is installed.

JetPack 4.6 (Python 3.6) has pycuda; newer containers ship cuda-python wheels.  The
TensorRT backend needs only alloc/copy/stream/graph, so both hide behind :class:`CudaApi`.
Python 3.6-compatible.
"""

import ctypes

import numpy as np

from qformat.errors import UserError
from runtime.device import cudart_module


class CudaApi:
    """Minimal CUDA surface: ``alloc``, ``pinned``, ``h2d``/``d2h`` (async), streams, graphs, mem info."""

    name = "?"

    def check(self, result):
        return result


class PycudaApi(CudaApi):
    name = "pycuda"

    def __init__(self):
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        # the primary context is the one TensorRT's runtime-API calls use
        self.ctx = cuda.Device(0).retain_primary_context()
        self.ctx.push()
        self._keep = []

    def alloc(self, nbytes):
        buf = self.cuda.mem_alloc(max(1, int(nbytes)))
        self._keep.append(buf)
        return int(buf)

    def pinned(self, shape, dtype):
        return self.cuda.pagelocked_empty(tuple(shape), dtype)

    def stream(self):
        s = self.cuda.Stream()
        self._keep.append(s)
        return s

    def handle(self, stream):
        return int(stream.handle)

    def h2d(self, ptr, host, stream):
        self.cuda.memcpy_htod_async(ptr, host, stream)

    def d2h(self, host, ptr, stream):
        self.cuda.memcpy_dtoh_async(host, ptr, stream)

    def sync(self, stream):
        stream.synchronize()

    def mem_info(self):
        free, total = self.cuda.mem_get_info()
        return int(free), int(total)

    def capture(self, stream, fn):
        """Record ``fn()`` (enqueues on ``stream``) into a CUDA graph; returns a launcher or None."""
        if not hasattr(stream, "begin_capture"):
            return None
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
        gexec = graph.instance() if hasattr(graph, "instance") else graph.instantiate()
        self._keep.extend([graph, gexec])
        return lambda: gexec.launch(stream)

    def close(self):
        self._keep = []
        try:
            self.ctx.pop()
        except Exception:  # noqa: BLE001 - context already gone at interpreter exit
            pass


class CudaPythonApi(CudaApi):
    name = "cuda-python"

    def __init__(self):
        self.rt = cudart_module()
        self._ptrs = []
        self._host = []

    def check(self, result):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise RuntimeError("CUDA error {}".format(err))
        if isinstance(result, tuple):
            return result[1] if len(result) == 2 else result[1:]
        return None

    def alloc(self, nbytes):
        ptr = self.check(self.rt.cudaMalloc(max(1, int(nbytes))))
        self._ptrs.append(ptr)
        return int(ptr)

    def pinned(self, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        hptr = self.check(self.rt.cudaMallocHost(max(1, nbytes)))
        self._host.append(hptr)
        buf = (ctypes.c_byte * max(1, nbytes)).from_address(int(hptr))
        return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def stream(self):
        return self.check(self.rt.cudaStreamCreate())

    def handle(self, stream):
        return int(stream)

    def h2d(self, ptr, host, stream):
        self.check(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def d2h(self, host, ptr, stream):
        self.check(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def sync(self, stream):
        self.check(self.rt.cudaStreamSynchronize(stream))

    def mem_info(self):
        free, total = self.check(self.rt.cudaMemGetInfo())
        return int(free), int(total)

    def capture(self, stream, fn):
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode))
        fn()
        graph = self.check(self.rt.cudaStreamEndCapture(stream))
        gexec = self.check(self.rt.cudaGraphInstantiate(graph, 0))
        return lambda: self.check(self.rt.cudaGraphLaunch(gexec, stream))

    def close(self):
        for p in self._ptrs:
            self.rt.cudaFree(p)
        for h in self._host:
            self.rt.cudaFreeHost(h)
        self._ptrs, self._host = [], []


def open_cuda():
    """The first CUDA binding that imports, or a UserError saying what to install."""
    errors = []
    for cls in (PycudaApi, CudaPythonApi):
        try:
            return cls()
        except ImportError as e:
            errors.append("{}: {}".format(cls.name, e))
    raise UserError("the TensorRT backend needs pycuda or cuda-python ({}): pip install pycuda "
                    "(JetPack 4.6: pip3 install pycuda==2021.1) or pip install cuda-python".format("; ".join(errors)))
