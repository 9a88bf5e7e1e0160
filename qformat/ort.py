"""The one ONNX Runtime session set-up of every stage (the runtime's bench and demo, the exporter's
parity check), so ONNX Runtime computes what the trained model computes.  Python 3.6-compatible;
``onnxruntime`` is passed in, never imported here.
"""


def session_options(ort, threads=0):
    """``ort.SessionOptions`` for qvit-edge graphs.

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
