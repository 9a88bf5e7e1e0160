"""What every command line shares: a parser whose errors are one ``error:`` line, and the
argument groups that more than one stage takes (``qvit train`` / ``export`` share the model and
quantization flags; ``qvit bench`` / ``demo`` / ``build`` share the runtime flags).

Python 3.6-compatible and light: the device-side commands import it on a Jetson.
"""

import argparse
import json
import os

from .argtypes import ArgumentParser as Parser
from .argtypes import bits_int, nonneg_int
from .errors import UserError


def parser(prog, description, defaults_help=False):
    fmt = argparse.ArgumentDefaultsHelpFormatter if defaults_help else argparse.HelpFormatter
    return Parser(prog=prog, description=description, formatter_class=fmt)


def add_model_args(group, model_default=None, model_help="registry name (python -m train --list-models)"):
    """``--model`` and ``--bits`` (train: the run; export: a fresh model, or checked against the checkpoint)."""
    group.add_argument("--model", default=model_default, help=model_help)
    group.add_argument("--bits", type=bits_int, default=None, help="weight and activation bits (2..8)")


def add_override_arg(group):
    group.add_argument("--quant-override", dest="quant_override", default=None, metavar="FILE.json|JSON",
                       help="per-module overrides by wildcard pattern, e.g. "
                            "'{\"blocks.*.attn.qkv\": {\"w_bits\": 3}, \"blocks.0.*\": {\"a_bits\": 8}}' "
                            "(a JSON file or inline JSON)")


def read_overrides(value):
    """``--quant-override`` value -> ``{pattern: {key: value}}`` (inline JSON or a JSON file).

    Only the shape is checked here; the keys and bit-widths are checked by the quantization config.
    """
    if value is None:
        return None
    text = value.strip()
    if not text.startswith("{"):
        if not os.path.isfile(value):
            raise UserError("--quant-override {}: no such file (give a JSON file or inline JSON like "
                            "'{{\"blocks.*.attn.qkv\": {{\"w_bits\": 3}}}}')".format(value))
        with open(value, "r", encoding="utf-8") as f:
            text = f.read()
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise UserError("--quant-override is not valid JSON ({})".format(e)) from None
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise UserError("--quant-override must be a JSON object {\"<module pattern>\": {\"<key>\": <value>}}")
    return obj


def add_runtime_args(group, threads=True, providers=False):
    """The backend flags bench, demo and build share."""
    group.add_argument("--plugins", action="append", default=[], help="trt: plugin library to load (repeatable)")
    if threads:
        group.add_argument("--threads", type=nonneg_int, default=0, help="ort: intra-op threads (0 = ORT default)")
    if providers:
        group.add_argument("--providers", nargs="+", default=None, help="ort: execution providers (default CPU)")
