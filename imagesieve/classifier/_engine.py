"""Batched ONNX Runtime inference with decoding overlapped in a thread pool. No torch here."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagesieve.classifier._quality import QualityMetrics, measure_quality
from imagesieve.classifier._signature import image_signature
from imagesieve.data import ImageLoadError, ImageSource, load_image, read_image_bytes, source_name
from imagesieve.models import BackboneConfig

__all__ = ["INFER_BATCH", "EngineItem", "EngineResult", "Progress", "ScoringEngine", "SkipContent"]

log = logging.getLogger(__name__)

#: An input: a path, bytes or file object, or a (name, source) pair naming bytes or uploads;
#: a source that is an ImageLoadError (e.g. a failed download) comes back as that error.
EngineItem = ImageSource | tuple[str, ImageSource | ImageLoadError]
#: skip(sha256) -> True: the content is already scored; it is hashed but not decoded.
SkipContent = Callable[[str], bool]
_END = object()

#: progress(stage, done, total): called as work advances; total is 0 when unknown.
Progress = Callable[[str, int, int], None]
#: Images per ONNX call by default (bench/bench_scoring.py: 0.85x the bare forward pass at 32,
#: 0.76x at 8). A server scores with smaller batches: ONNX Runtime's memory arena keeps the
#: largest activations of every concurrent call for good (~700 MB more at 32 than at 8 there).
INFER_BATCH = 32
#: Bytes of inputs already in memory (uploads, downloads) that may wait to be decoded at once;
#: past it the stream is not read further until some are decoded (one item always goes).
PREFETCH_BYTES = 256 * 2**20


@dataclass
class EngineResult:
    """One input's outcome: model outputs, a load error, or ``skipped`` (already scored).

    ``outputs`` holds one row per ONNX output name; ``skipped`` is set when the run's skip
    predicate accepted the content's hash.
    """

    source: str
    width: int = 0
    height: int = 0
    sha256: str = ""
    outputs: dict[str, np.ndarray] | None = None
    error: ImageLoadError | None = None
    skipped: bool = False
    quality: QualityMetrics | None = None
    signature: np.ndarray | None = None  # (SIGNATURE_BYTES,) int8: near-duplicate check


def _split_item(item: EngineItem) -> tuple[str, ImageSource]:
    if isinstance(item, tuple):
        return item
    return source_name(item), item


class ScoringEngine:
    """Runs an ONNX model over a stream of images, batch by batch, never holding the stream.

    Decoding and preprocessing run in ``workers`` threads (PIL and numpy release the GIL).
    Inference runs as ``streams`` concurrent single-threaded ``session.run`` calls on
    successive batches rather than one call split across cores: no per-operator barrier for a
    busy decode thread to stall, so decoding hides behind compute (measured in bench/).
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        config: BackboneConfig,
        *,
        batch_size: int = INFER_BATCH,
        workers: int | None = None,
        streams: int | None = None,
        quality: bool = True,
        signature: bool = False,
    ):
        import onnxruntime as ort

        self.config = config
        self.quality = quality  # measure each image's photo quality on its decoded pixels
        self.signature = signature  # a pixel signature of the crop, for near-duplicates
        self.batch_size = batch_size
        cpus = os.cpu_count() or 1
        self.workers = workers or cpus
        self.streams = streams or cpus
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1  # parallelism comes from concurrent streams
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        ort.disable_telemetry_events()  # on by default: it queues events with a device id
        self.session = ort.InferenceSession(
            str(Path(onnx_path)), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(n, s, s, 3) uint8 pixels -> {output name: (n, ...) array}."""
        x = np.ascontiguousarray(x, dtype=np.uint8)
        return dict(
            zip(
                self.output_names,
                self.session.run(self.output_names, {self.input_name: x}),
                strict=True,
            )
        )

    def prepare(
        self, item: EngineItem, skip: SkipContent | None = None
    ) -> tuple[EngineResult, np.ndarray | None]:
        """Hash, decode and preprocess one input: its result so far and its pixels (None if not to run)."""
        name, source = _split_item(item)
        if isinstance(source, ImageLoadError):
            return EngineResult(source=name, error=source), None
        try:
            digest = None
            if skip is not None:
                source = read_image_bytes(source, name)
                digest = hashlib.sha256(source).hexdigest()
                if skip(digest):
                    return EngineResult(source=name, sha256=digest, skipped=True), None
            decoded = load_image(source, min_side=self.config.resize_side, name=name, sha256=digest)
            crop = self.config.resize_and_crop(decoded.image)
            x = np.asarray(crop, dtype=np.uint8)  # what config.preprocess gives
        except ImageLoadError as e:
            # kept while the batch waits: without the failed decode's frames
            return EngineResult(source=name, error=e.detached()), None
        except Exception as e:  # a decoder bug must not kill the batch: record it per item
            log.exception("unexpected error preparing %s", name)
            error = ImageLoadError(name, "error", f"{type(e).__name__}: {e}")
            return EngineResult(source=name, error=error), None
        result = EngineResult(name, decoded.width, decoded.height, decoded.sha256)
        if self.quality:
            result.quality = measure_quality(x, decoded.width, decoded.height)
        if self.signature:
            result.signature = image_signature(crop)
        return result, x

    def run(
        self, items: Iterable[EngineItem], skip: SkipContent | None = None
    ) -> Iterator[list[EngineResult]]:
        """Yield results batch by batch, in input order; failed items carry ``error``.

        Items whose content ``skip(sha256)`` accepts come back ``skipped``, never decoded.
        """
        prefetch = self.batch_size * (self.streams + 1) + self.workers
        it = iter(items)
        with (
            ThreadPoolExecutor(self.workers, thread_name_prefix="imagesieve-decode") as decode,
            ThreadPoolExecutor(self.streams, thread_name_prefix="imagesieve-infer") as infer,
        ):
            pending: deque[tuple[Future, int]] = deque()
            running: deque[Future] = deque()
            held = 0  # bytes of in-memory inputs waiting in ``pending``

            def fill() -> None:
                nonlocal held
                while len(pending) < prefetch and (not pending or held < PREFETCH_BYTES):
                    item = next(it, _END)
                    if item is _END:
                        return
                    source = _split_item(item)[1]
                    size = len(source) if isinstance(source, bytes) else 0
                    held += size
                    pending.append((decode.submit(self.prepare, item, skip), size))

            def take() -> EngineResult:
                nonlocal held
                future, size = pending.popleft()
                held -= size
                return future.result()

            fill()
            while pending:
                batch = [take() for _ in range(min(self.batch_size, len(pending)))]
                fill()  # queue the next images before the forward pass so decoding overlaps it
                running.append(infer.submit(self.forward_prepared, batch))
                if len(running) >= self.streams:
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()

    def forward_prepared(
        self, batch: list[tuple[EngineResult, np.ndarray | None]]
    ) -> list[EngineResult]:
        """One forward pass over prepared inputs; fills each runnable result's ``outputs``."""
        ok = [(r, x) for r, x in batch if x is not None]
        if ok:
            out = self.forward(np.stack([x for _, x in ok]))
            for i, (r, _) in enumerate(ok):
                r.outputs = {k: v[i] for k, v in out.items()}
        return [r for r, _ in batch]
