"""Dynamic batching of ragged token sets: one asyncio batcher per served model.

Every request carries a different number of tokens. The batcher pads the requests waiting for a
model into one (B, T, d) batch with a padding mask (``padding="pad"``), or runs one batch per
length bucket (``padding="bucket"``: token counts rounded up to a power of two). The server half
gives padded rows the same answer as unpadded ones, so both are exact.

When a batch is formed::

    fewer than one prepared batch per instance waits for compute and requests are queued
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
from splitinfer.protos.codec import UnpackedPacket, decode_batch, unpack_packet
from splitinfer.protos import splitinfer_pb2 as pb

from .engine import ServerHalf
from .service import probabilities_from_logits

__all__ = ["PADDING_MODES", "BatchConfig", "pad_tokens", "length_buckets", "padded_groups", "run_batch", "decode_and_run",
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


def padded_groups(rows: Sequence[np.ndarray], padding: str = "pad") -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """B ragged token sets (K_i, d) -> the server-half inputs: per group (row indices, tokens (b, T, d),
    mask (b, T)); one group with ``padding="pad"``, one per length bucket with ``"bucket"``."""
    if padding == "pad" or len(rows) == 1:
        groups = [list(range(len(rows)))]
    else:
        groups = length_buckets([len(row) for row in rows])
    return [(group, *pad_tokens([rows[i] for i in group])) for group in groups]


def run_batch(model: ServerHalf, rows: Sequence[np.ndarray], padding: str = "pad") -> tuple[np.ndarray, float]:
    """Run the server half on B ragged token sets (K_i, d) -> (probabilities float32 (B, C), compute ms).

    A row whose logits are not finite comes back as NaN (see ``probabilities_from_logits``).
    """
    start = time.perf_counter()
    probabilities = np.empty((len(rows), model.output_width), dtype=np.float32)  # (B, C)
    for group, tokens, mask in padded_groups(rows, padding):
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
    """One queued request: its unpacked token packet, the future its handler awaits, its deadline."""

    __slots__ = ("packet", "future", "deadline", "enqueued_at")

    def __init__(self, packet: UnpackedPacket, future: asyncio.Future, deadline: float | None, now: float) -> None:
        self.packet = packet
        self.future = future
        self.deadline = deadline
        self.enqueued_at = now


class _Prepared:
    """A batch ready for the server half: its requests, its inputs per group, its decode time."""

    __slots__ = ("batch", "groups", "decode_ms", "logits", "compute_ms", "error")

    def __init__(self, batch: list[_Pending], groups: list, decode_ms: float) -> None:
        self.batch, self.groups, self.decode_ms = batch, groups, decode_ms
        self.logits: list[np.ndarray] = []
        self.compute_ms = 0.0
        self.error: BaseException | None = None


BatchObserver = Callable[[ServerHalf, int, float], None]  # (model, batch size, compute seconds)


class ModelBatcher:
    """Queues requests for one model and runs them through the server half in batches.

    ``submit`` returns a future resolving to (probabilities float32 (C,), decode ms, compute ms),
    the times being its share of its batch's; an invalid packet fails its own request only.
    Call ``start`` inside the event loop; ``close`` stops taking requests, finishes the queued ones
    and waits for the workers. ``on_batch(model, size, compute_s)`` is called after each batch.

    The work is split so that the server half never waits for the event loop::

        event loop   submit: the packet's fields checked -> queue
                     while the previous batch computes, the next is taken from the queue and
                     prepared (decompressed in one zstd call, values checked, padded): at most
                     one prepared batch waits per instance
        worker       ONNX Runtime's run on prepared batches back to back (without the GIL)
        event loop   softmax, answers set, the next batch prepared

    A worker thread (from ``executor``) keeps computing while prepared batches are there; after
    ``DRAIN_BATCHES`` it hands the thread back, so models that share the executor take turns.
    """

    DRAIN_BATCHES = 8

    def __init__(self, model: ServerHalf, config: BatchConfig, executor: Executor,
                 on_batch: BatchObserver | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        self.config = config
        self._executor = executor
        self._on_batch = on_batch
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._ready: deque[_Prepared] = deque()  # prepared, not yet taken by a worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick_pending = False
        self._fill_timer: asyncio.TimerHandle | None = None
        self._workers = 0  # worker threads computing this model's batches
        self._closing = False
        self._idle = asyncio.Event()
        self.computing = 0  # requests in prepared or computing batches
        self.dropped = 0  # requests dropped before compute: deadline passed or client gone

    @property
    def queue_depth(self) -> int:
        """Requests waiting: queued, or in a prepared batch not yet computing."""
        return len(self._queue) + sum(len(prepared.batch) for prepared in list(self._ready))

    @property
    def in_flight(self) -> int:
        """Requests queued or being computed."""
        return len(self._queue) + self.computing

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def submit(self, packet: pb.TokenPacket, deadline: float | None = None) -> asyncio.Future:
        """Queue a token packet; ``deadline`` is a ``clock()`` time after which the request is dropped.

        The packet's fields are checked here (a few µs of plain Python): an invalid one raises
        InvalidPacket at once, for this request alone. Raises Overloaded when the queue is full or
        the batcher is closing.
        """
        if self._closing:
            raise Overloaded(f"model {self.model.name!r} is being unloaded; retry")
        waiting = self.queue_depth
        if waiting >= self.config.max_queue:
            raise Overloaded(f"model {self.model.name!r}: {waiting} requests already queued "
                             f"(limit {self.config.max_queue}); retry later")
        unpacked = unpack_packet(packet, self.model.packet_limits)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        self._queue.append(_Pending(unpacked, future, deadline, self._clock()))
        self._schedule_kick()
        return future

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the workers."""
        self._closing = True
        if self._loop is not None:
            self._kick()
            while self._queue or self._ready or self._workers:
                self._idle.clear()
                await self._idle.wait()
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(Overloaded(f"model {self.model.name!r} was unloaded"))
        self._queue.clear()

    # --- on the event loop ----------------------------------------------------------------------

    def _schedule_kick(self) -> None:
        """Prepare batches at the end of this loop turn, once the requests that arrived together are in."""
        if not self._kick_pending:
            self._kick_pending = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        """Prepare the next batches while fewer than one per instance wait, and start workers for them."""
        self._kick_pending = False
        limit = self.config.max_batch_size
        delay_s = self.config.max_queue_delay_ms / 1e3
        while self._queue and len(self._ready) < self.config.instances:
            if delay_s > 0 and len(self._queue) < limit and not self._closing:
                fill_by = self._queue[0].enqueued_at + delay_s
                if self._clock() < fill_by:  # wait for the batch to fill, or for its oldest request's delay
                    if self._fill_timer is None:
                        self._fill_timer = self._loop.call_later(fill_by - self._clock(), self._fill_timeout)
                    break
            batch = self._take(limit)
            if batch:
                self._prepare(batch)
        while self._ready and self._workers < self.config.instances:
            try:
                running = self._loop.run_in_executor(self._executor, self._drain)
            except RuntimeError as exc:  # the executor was shut down: nothing will compute these
                while self._ready:
                    prepared = self._ready.popleft()
                    self.computing -= len(prepared.batch)
                    self._fail(prepared.batch, Overloaded(f"model {self.model.name!r}: the server is stopping ({exc})"))
                break
            self._workers += 1
            running.add_done_callback(self._worker_done)
        if not (self._queue or self._ready or self._workers):
            self._idle.set()

    def _fill_timeout(self) -> None:
        self._fill_timer = None
        self._kick()

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

    def _prepare(self, batch: list[_Pending]) -> None:
        """Check the batch's values and pad it; a packet whose values are invalid fails its own request."""
        start = time.perf_counter()
        kept, rows = [], []
        for pending, outcome in zip(batch, decode_batch([p.packet for p in batch], self.model.packet_limits)):
            if isinstance(outcome, SplitInferError):
                pending.future.set_exception(outcome)
            else:
                kept.append(pending)
                rows.append(outcome)  # (K, d)
        if not kept:
            return
        try:
            groups = padded_groups(rows, self.config.padding)
        except Exception as exc:
            self._fail(kept, exc)
            return
        self.computing += len(kept)
        self._ready.append(_Prepared(kept, groups, (time.perf_counter() - start) * 1e3))

    def _fail(self, batch: list[_Pending], exc: BaseException) -> None:
        if not isinstance(exc, SplitInferError):
            logger.error("model %s: a batch of %d failed", self.model.name, len(batch), exc_info=exc)
            exc = ServerInternalError(f"model {self.model.name!r}: the server half failed")
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    def _resolve(self, prepared: _Prepared) -> None:
        """A computed batch: softmax per group, then each request's answer."""
        batch = prepared.batch
        self.computing -= len(batch)
        if prepared.error is not None:
            self._fail(batch, prepared.error)
            return
        try:
            answers = [None] * len(batch)
            for (group, _tokens, _mask), logits in zip(prepared.groups, prepared.logits):
                probabilities = probabilities_from_logits(self.model, logits, rows=len(group))  # (b, C)
                for row, index in enumerate(group):
                    answers[index] = probabilities[row]
        except Exception as exc:
            self._fail(batch, exc)
            return
        share_ms = prepared.decode_ms / len(batch)
        for pending, answer in zip(batch, answers):
            if not pending.future.done():
                pending.future.set_result((answer, share_ms, prepared.compute_ms))
        if self._on_batch is not None:
            self._on_batch(self.model, len(batch), prepared.compute_ms / 1e3)

    def _worker_done(self, future: asyncio.Future) -> None:
        self._workers -= 1
        if future.exception() is not None:  # _drain fails batches, not itself: this is a bug
            logger.error("model %s: a batch worker failed", self.model.name, exc_info=future.exception())
        self._kick()

    # --- on a worker thread ---------------------------------------------------------------------

    def _drain(self) -> None:
        """Compute prepared batches back to back; each answer goes back to the loop once per batch."""
        loop = self._loop
        for _ in range(self.DRAIN_BATCHES):
            try:
                prepared = self._ready.popleft()
            except IndexError:
                return
            loop.call_soon_threadsafe(self._kick)  # prepare the next batch while this one computes
            start = time.perf_counter()
            try:
                prepared.logits = [self.model.run(tokens, mask) for _group, tokens, mask in prepared.groups]
            except Exception as exc:  # a failed batch fails its requests, never the batcher
                prepared.error = exc
            prepared.compute_ms = (time.perf_counter() - start) * 1e3
            loop.call_soon_threadsafe(self._resolve, prepared)
