"""Dynamic batching of ragged token sets: one asyncio batcher per served model.

Every request carries a different number of tokens. The batcher pads the requests waiting for a
model into one (B, T, d) batch with a padding mask (``padding="pad"``), or runs one batch per
length bucket (``padding="bucket"``: token counts rounded up to a power of two). The server half
gives padded rows the same answer as unpadded ones, so both are exact.

When a batch is formed::

    a model instance is free and requests are queued
      max_queue_delay_ms == 0  -> take what is queued once the requests that arrived together are in
                                  (one event-loop turn), up to max_batch_size
      max_queue_delay_ms  > 0  -> wait until max_batch_size are queued or the oldest has waited that long
    requests whose client gave up (cancelled) or whose deadline has passed are dropped before compute

With ``max_batch_size=1`` the same code path computes one request at a time (batching off).
A full queue (``max_queue`` waiting requests) refuses new ones with Overloaded (RESOURCE_EXHAUSTED).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from splitinfer.protos import DeadlineExceeded, Overloaded, ServerInternalError, SplitInferError
from splitinfer.protos.codec import decode_batch
from splitinfer.protos import splitinfer_pb2 as pb

from .engine import ServerHalf
from .service import probabilities_from_logits

__all__ = ["PADDING_MODES", "BatchConfig", "pad_tokens", "length_buckets", "run_batch", "decode_and_run",
           "ModelBatcher"]

logger = logging.getLogger(__name__)

PADDING_MODES = ("pad", "bucket")


@dataclass(frozen=True)
class BatchConfig:
    """How requests for one model are batched.

    max_batch_size: most requests in one server-half run (1 = batching off). max_queue_delay_ms:
    longest a request waits for the batch to fill once an instance is free (0 = never wait).
    max_queue: most requests waiting per model; beyond it new ones are refused RESOURCE_EXHAUSTED.
    instances: batches of one model computed at the same time. padding: "pad" or "bucket".
    """

    max_batch_size: int = 16
    max_queue_delay_ms: float = 0.0
    max_queue: int = 512
    instances: int = 1
    padding: str = "pad"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "instances"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.max_queue_delay_ms <= 10_000.0:
            raise ValueError(f"max_queue_delay_ms must be in [0, 10000], got {self.max_queue_delay_ms}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")


def pad_tokens(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """B token sets float32 (K_i, d) -> tokens float32 (B, T, d) zero-padded, mask bool (B, T); T = max K_i."""
    lengths = [len(row) for row in rows]
    longest = max(lengths)
    tokens = np.zeros((len(rows), longest, rows[0].shape[1]), dtype=np.float32)  # (B, T, d)
    mask = np.zeros((len(rows), longest), dtype=np.bool_)  # (B, T)
    for i, (row, length) in enumerate(zip(rows, lengths)):
        tokens[i, :length] = row
        mask[i, :length] = True
    return tokens, mask


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Row indices grouped by token count rounded up to a power of two, shortest bucket first."""
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(1 << max(0, int(length) - 1).bit_length(), []).append(index)
    return [groups[key] for key in sorted(groups)]


def run_batch(model: ServerHalf, rows: Sequence[np.ndarray], padding: str = "pad") -> tuple[np.ndarray, float]:
    """Run the server half on B ragged token sets (K_i, d) -> (probabilities float32 (B, C), compute ms).

    A row whose logits are not finite comes back as NaN (see ``probabilities_from_logits``).
    """
    start = time.perf_counter()
    if padding == "pad" or len(rows) == 1:
        groups = [list(range(len(rows)))]
    else:
        groups = length_buckets([len(row) for row in rows])
    probabilities = np.empty((len(rows), model.output_width), dtype=np.float32)  # (B, C)
    for group in groups:
        tokens, mask = pad_tokens([rows[i] for i in group])  # (b, T, d), (b, T)
        logits = model.run(tokens, mask)  # (b, C)
        probabilities[group] = probabilities_from_logits(model, logits, rows=len(group))
    return probabilities, (time.perf_counter() - start) * 1e3


def decode_and_run(model: ServerHalf, packets: Sequence[pb.TokenPacket],
                   padding: str = "pad") -> tuple[list[np.ndarray | SplitInferError], float, float]:
    """Decode B token packets and run the valid ones as one batch (on a worker thread, off the event loop).

    Returns (one entry per packet: probabilities float32 (C,) or the InvalidPacket it raised,
    decode ms of the whole batch, compute ms of the whole batch).
    """
    start = time.perf_counter()
    decoded = decode_batch(list(packets), model.packet_limits)  # per packet: (K, d) float32 or InvalidPacket
    rows = [d for d in decoded if not isinstance(d, SplitInferError)]
    outcomes = [d if isinstance(d, SplitInferError) else None for d in decoded]
    decode_ms = (time.perf_counter() - start) * 1e3
    if not rows:
        return outcomes, decode_ms, 0.0
    probabilities, compute_ms = run_batch(model, rows, padding)  # (b, C)
    answers = iter(probabilities)
    return [next(answers) if outcome is None else outcome for outcome in outcomes], decode_ms, compute_ms


class _Pending:
    """One queued request: its token packet, the future its handler awaits, its deadline."""

    __slots__ = ("packet", "future", "deadline", "enqueued_at")

    def __init__(self, packet: pb.TokenPacket, future: asyncio.Future, deadline: float | None, now: float) -> None:
        self.packet = packet
        self.future = future
        self.deadline = deadline
        self.enqueued_at = now


BatchObserver = Callable[[ServerHalf, int, float], None]  # (model, batch size, compute seconds)


class ModelBatcher:
    """Queues requests for one model; decodes and runs them in batches on ``executor`` threads.

    ``submit`` returns a future resolving to (probabilities float32 (C,), decode ms, compute ms),
    the times being its share of its batch's; an invalid packet fails its own request only.
    Call ``start`` inside the event loop; ``close`` stops taking requests, finishes the queued ones
    and waits for the workers. ``on_batch(model, size, compute_s)`` is called after each batch.
    """

    def __init__(self, model: ServerHalf, config: BatchConfig, executor: Executor,
                 on_batch: BatchObserver | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        self.config = config
        self._executor = executor
        self._on_batch = on_batch
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._workers: list[asyncio.Task] = []
        self.computing = 0  # requests in batches being computed
        self.dropped = 0  # requests dropped before compute: deadline passed or client gone

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests queued or being computed."""
        return len(self._queue) + self.computing

    def start(self) -> None:
        if not self._workers:
            self._workers = [asyncio.create_task(self._work(), name=f"batcher-{self.model.name}-{i}")
                             for i in range(self.config.instances)]

    def submit(self, packet: pb.TokenPacket, deadline: float | None = None) -> asyncio.Future:
        """Queue a token packet; ``deadline`` is a ``clock()`` time after which the request is dropped.

        Raises Overloaded when the queue is full or the batcher is closing.
        """
        if self._closing:
            raise Overloaded(f"model {self.model.name!r} is being unloaded; retry")
        if len(self._queue) >= self.config.max_queue:
            raise Overloaded(f"model {self.model.name!r}: {len(self._queue)} requests already queued "
                             f"(limit {self.config.max_queue}); retry later")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(packet, future, deadline, self._clock()))
        if not self._arrived.is_set():
            self._arrived.set()
        return future

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the workers."""
        self._closing = True
        self._arrived.set()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(Overloaded(f"model {self.model.name!r} was unloaded"))
        self._queue.clear()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            self.computing += len(batch)
            try:
                outcomes, decode_ms, compute_ms = await loop.run_in_executor(
                    self._executor, decode_and_run, self.model, [p.packet for p in batch], self.config.padding)
            except Exception as exc:  # a failed batch fails its requests, never the batcher
                if not isinstance(exc, SplitInferError):
                    logger.exception("model %s: a batch of %d failed", self.model.name, len(batch))
                    exc = ServerInternalError(f"model {self.model.name!r}: the server half failed")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            finally:
                self.computing -= len(batch)
            share_ms = decode_ms / len(batch)
            for pending, outcome in zip(batch, outcomes):
                if pending.future.done():
                    continue
                if isinstance(outcome, Exception):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result((outcome, share_ms, compute_ms))
            if self._on_batch is not None:
                self._on_batch(self.model, len(batch), compute_ms / 1e3)

    async def _next_batch(self) -> list[_Pending] | None:
        """The next batch to compute, or None once closing and the queue is empty."""
        limit = self.config.max_batch_size
        delay_s = self.config.max_queue_delay_ms / 1e3
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
            if len(self._queue) < limit:
                await asyncio.sleep(0)  # let handlers woken by the same network events queue their requests first
            if delay_s > 0:
                fill_by = self._queue[0].enqueued_at + delay_s
                while len(self._queue) < limit and not self._closing:
                    remaining = fill_by - self._clock()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            batch = self._take(limit)
            if batch:
                return batch

    def _take(self, limit: int) -> list[_Pending]:
        now = self._clock()
        batch: list[_Pending] = []
        queue = self._queue
        while queue and len(batch) < limit:
            pending = queue.popleft()
            if pending.future.done():  # the handler was cancelled: the client gave up
                self.dropped += 1
            elif pending.deadline is not None and now >= pending.deadline:
                self.dropped += 1
                pending.future.set_exception(DeadlineExceeded(
                    f"the deadline passed after {1e3 * (now - pending.enqueued_at):.1f} ms in the queue; "
                    "dropped before compute"))
            else:
                batch.append(pending)
        return batch
