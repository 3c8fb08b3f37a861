"""Backbone runtimes: the same EfficientNet-Lite0 passes on eager torch, ONNX Runtime or OpenVINO.

The extractor asks the backbone for a few taps (the local-feature layer and the head) of
preprocessed images of any size. :class:`BackboneRunner` answers with the runtime chosen in
the config:

``"torch"``
    eager PyTorch (channels_last, BatchNorm folded): the reference.
``"onnxruntime"`` / ``"openvino"``
    the model traced once to ONNX from the loaded weights (no download) with dynamic batch,
    height and width — one graph serves every image size, because the TensorFlow "SAME"
    padding of the stride-2 convolutions is written as ``n % 2`` arithmetic that the tracer
    records (``backbone._SamePadConv2d``) — and run by that runtime on CPU.

The ONNX file is cached under ``cache_dir`` by a digest of the weights, taps and versions, so a
restarted replica only pays the runtime's own compilation. Requests for taps outside the
exported set fall back to eager torch (same numbers, eager speed). A second graph that stops at
the first tap (the local-feature layer) serves passes that need nothing else — a query's local
pyramid levels —: it skips the last blocks and the head, ~20 % of a pass (BENCHMARKS.md).

Descriptors match eager torch to float rounding (tests/unit/test_extract_runtime.py states the
tolerance); BENCHMARKS.md "Extraction speed (issue 14)" has the measured speeds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from services.extractor.backbone import EfficientNetLite0

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
ONNX_OPSET = 17
_FORMAT = "loupe-backbone-onnx-1"  # bump when the export changes


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/loupe/backbones`` (``~/.cache/loupe/backbones``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "loupe", "backbones")


class _Taps(nn.Module):
    """``(B, 3, H, W) -> tuple of tap maps``, the graph that is exported."""

    def __init__(self, model: EfficientNetLite0, taps: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.taps = list(taps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.model.forward_taps(x, self.taps)
        return tuple(maps[t] for t in self.taps)


def _digest(model: EfficientNetLite0, taps: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(f"{_FORMAT}|{torch.__version__}|{ONNX_OPSET}|{','.join(taps)}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def export_onnx(model: EfficientNetLite0, taps: Sequence[str], path: str) -> None:
    """Trace ``model`` to an ONNX file at ``path`` with outputs ``taps`` and dynamic B, H, W.

    Parameters
    ----------
    model : EfficientNetLite0
        Frozen backbone (BatchNorm folded or not).
    taps : sequence of str
        Output taps, in order (see ``EfficientNetLite0.tap_spec``).
    path : str
        Destination; written to a temporary file first, then renamed (atomic).
    """
    example = torch.zeros(1, 3, 96, 128)
    dyn = {"image": {0: "batch", 2: "height", 3: "width"}}
    dyn.update({t: {0: "batch", 2: f"{t}_h", 3: f"{t}_w"} for t in taps})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            torch.onnx.export(
                _Taps(model, taps), (example,), tmp, dynamo=False, input_names=["image"], output_names=list(taps),
                opset_version=ONNX_OPSET, dynamic_axes=dyn,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class BackboneRunner:
    """Backbone facade with ``forward_taps`` on the chosen runtime (see the module docstring).

    Parameters
    ----------
    model : EfficientNetLite0
        The loaded, frozen backbone (eager reference and fallback).
    taps : sequence of str
        Taps every accelerated pass returns (e.g. ``["block10", "head"]``).
    runtime : str
        One of ``RUNTIMES``.
    threads : int
        Intra-op threads of the runtime (>= 1).
    cache_dir : str
        Where the exported ONNX file is kept ("" = :func:`default_cache_dir`; an unwritable
        directory falls back to a temporary one).

    Attributes
    ----------
    export_s, compile_s : float
        Seconds spent exporting (0 when the cached files were used) and loading/compiling.
    """

    def __init__(self, model: EfficientNetLite0, taps: Sequence[str], runtime: str = "torch", threads: int = 1, cache_dir: str = "") -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"extractor.runtime must be one of {RUNTIMES}, got {runtime!r}")
        if threads < 1:
            raise ValueError(f"extractor threads must be >= 1, got {threads}")
        self.model = model
        self.taps = list(dict.fromkeys(taps))
        self.runtime = runtime
        self.threads = threads
        self.export_s = 0.0
        self.compile_s = 0.0
        self._lock = threading.Lock()
        # tap set -> compiled graph returning exactly those taps (in ``self.taps`` order): all of
        # them, and the first alone when there are more
        self._runs: dict[tuple[str, ...], Callable[[np.ndarray], list[np.ndarray]]] = {}
        if runtime != "torch":
            load = _load_onnxruntime if runtime == "onnxruntime" else _load_openvino
            for outputs in [tuple(self.taps)] + ([tuple(self.taps[:1])] if len(self.taps) > 1 else []):
                path = self._onnx_file(cache_dir, outputs)
                t0 = time.perf_counter()
                self._runs[outputs] = load(path, threads)
                dt = time.perf_counter() - t0
                self.compile_s += dt
                log.info("backbone runtime %s, taps %s: compile %.1f s (%s)", runtime, ",".join(outputs), dt, path)

    def _onnx_file(self, cache_dir: str, taps: Sequence[str]) -> str:
        name = f"efficientnet-lite0-{_digest(self.model, taps)}.onnx"
        for directory in (cache_dir or default_cache_dir(), os.path.join(tempfile.gettempdir(), "loupe-backbones")):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
            try:
                t0 = time.perf_counter()
                export_onnx(self.model, taps, path)
                self.export_s += time.perf_counter() - t0
                return path
            except OSError as exc:
                log.warning("runtime cache %s not writable (%s); trying a temporary directory", directory, exc)
        raise OSError(f"extractor.runtime_cache_dir: cannot write the exported backbone {name}")

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def forward_taps(self, x: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` preprocessed images → ``{tap: (B, C, h, w)}``, as the model's."""
        if not self._runs or not set(taps) <= set(self.taps):
            with torch.inference_mode():
                return self.model.forward_taps(x, taps)
        outputs = tuple(t for t in self.taps if t in taps)
        if outputs not in self._runs:
            outputs = tuple(self.taps)
        arr = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)  # NCHW, as exported
        with self._lock:
            outs = self._runs[outputs](arr)
        maps = {t: torch.from_numpy(o) for t, o in zip(outputs, outs)}
        return {t: maps[t] for t in taps}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last conv map, as ``EfficientNetLite0.forward_features``."""
        return self.forward_taps(x, ["head"])["head"]


def _load_onnxruntime(path: str, threads: int):  # noqa: ANN202 - returns a closure
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # replicas share cores with the broker/shards
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return lambda arr: sess.run(None, {"image": arr})


def _load_openvino(path: str, threads: int):  # noqa: ANN202 - returns a closure
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(path), "CPU",
        {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
         "INFERENCE_PRECISION_HINT": "f32"},
    )
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def run(arr: np.ndarray) -> list[np.ndarray]:
        res = request.infer({0: arr}, share_inputs=False, share_outputs=False)
        return [res[o] for o in outputs]

    return run
