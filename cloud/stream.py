"""``InferStream``: many requests over one bidirectional call, answered as they are ready.

One stream::

    reader (a task)   StreamRequest -> route_request -> the model's batcher (the same queue unary calls use)
                      at most ``window`` requests in flight: reading stops, HTTP/2 flow control
                      pushes back on the client
    per request       its batch done -> build_response -> StreamResponse{request_id, response}
                      any SplitInferError -> StreamResponse{request_id, error{code, message}}: the code
                      and details the unary call would have answered; the stream goes on
                      timeout_ms passed first -> error DEADLINE_EXCEEDED (dropped before compute if queued)
    writer (the handler)  yields answers in the order they are ready

No task and no timer per request: each request is a batcher future with a done-callback, and one
timer per stream fires at the earliest deadline of its open requests, so a stream costs little
more than the batch it feeds. The call itself ends with a status only for what concerns
the whole stream (a message that is not a StreamRequest: INVALID_ARGUMENT; authentication is
checked before the handler runs; the call's own deadline or the client cancelling).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import grpc

from splitinfer.protos import DeadlineExceeded, InvalidPacket, SplitInferError
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.errors import bounded, status_code_for, status_details

from .service import MAX_REQUEST_ID_CHARS, build_response, route_request

if TYPE_CHECKING:
    from .metrics import ServerMetrics
    from .server import ModelRouter

__all__ = ["DEFAULT_STREAM_WINDOW", "UndecodableStreamRequest", "parse_stream_request", "serve_stream"]

logger = logging.getLogger(__name__)

DEFAULT_STREAM_WINDOW = 64  # requests of one stream read ahead of their answers
_END = object()


class UndecodableStreamRequest:
    """What :func:`parse_stream_request` hands the handler for bytes that are not a StreamRequest."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def parse_stream_request(data: bytes) -> "pb.StreamRequest | UndecodableStreamRequest":
    """InferStream's request deserializer: never raises (grpc.aio would answer UNKNOWN)."""
    try:
        return pb.StreamRequest.FromString(data)
    except Exception as exc:  # DecodeError for malformed protobuf or invalid UTF-8
        return UndecodableStreamRequest(f"a stream message is not a valid splitinfer.v1.StreamRequest "
                                        f"({len(data)} bytes): {type(exc).__name__}: {exc}")


def _wake(waiter: "asyncio.Future | None") -> None:
    """Resume the side waiting on ``waiter`` (the reader or the writer), if it still waits."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _Request:
    """One request of a stream between reading it and answering it."""

    __slots__ = ("message", "received_at", "model", "future", "deadline", "answered")

    def __init__(self, message: pb.StreamRequest, received_at: float) -> None:
        self.message = message
        self.received_at = received_at
        self.model = None
        self.future: asyncio.Future | None = None
        self.deadline: float | None = None  # loop.time() after which it is answered DEADLINE_EXCEEDED
        self.answered = False


class _Stream:
    def __init__(self, router: ModelRouter, metrics: ServerMetrics, max_tokens: int | None, window: int,
                 context: grpc.aio.ServicerContext) -> None:
        self._router = router
        self._metrics = metrics
        self._max_tokens = max_tokens
        self._context = context
        # Plain counters, a deque and one waiter future per side instead of asyncio.Semaphore,
        # Queue and Event: these run once or twice per request, and the asyncio primitives'
        # bookkeeping is a measurable share of the event loop's time at thousands of requests/s.
        self._window = window  # requests that may still be read ahead of their answers
        self._answers: deque = deque()
        self._answer_waiter: asyncio.Future | None = None  # the writer, waiting for an answer
        self._room_waiter: asyncio.Future | None = None  # the reader, waiting for the window or the last answer
        self._open: set[_Request] = set()
        self._sweep: asyncio.TimerHandle | None = None  # expires the open requests whose deadline passed
        self._sweep_at = 0.0
        self._loop = asyncio.get_running_loop()

    async def read(self, messages) -> None:
        """Read requests until the client half-closes; then wait for their answers and end the stream."""
        try:
            async for message in messages:
                if isinstance(message, UndecodableStreamRequest):
                    self._put(InvalidPacket(message.reason))
                    return
                while self._window <= 0:
                    await self._wait_for_room()
                self._window -= 1
                self._start(message)
            while self._open:
                await self._wait_for_room()
        finally:
            self._put(_END)

    def _wait_for_room(self) -> asyncio.Future:
        self._room_waiter = self._loop.create_future()
        return self._room_waiter

    def _put(self, item) -> None:
        """An answer (or _END, or a stream-level error) for the writer."""
        self._answers.append(item)
        _wake(self._answer_waiter)

    def _start(self, message: pb.StreamRequest) -> None:
        now = time.perf_counter()
        entry = _Request(message, now)
        request = message.request
        try:
            model = route_request(self._router.lookup, request, self._max_tokens)
        except Exception as exc:
            self._answer_error(entry, exc)
            return
        entry.model = model
        self._metrics.request_received(model.name, request.packet.num_tokens, request.ByteSize(),
                                       audit=request.purpose == pb.PURPOSE_AUDIT, drift_alarm=request.drift_alarm)
        remaining = self._context.time_remaining()
        if message.timeout_ms:
            remaining = message.timeout_ms / 1e3 if remaining is None else min(remaining, message.timeout_ms / 1e3)
        try:
            entry.future = self._router.batcher_for(model).submit(request.packet,
                                                                  None if remaining is None else now + remaining)
        except Exception as exc:
            self._answer_error(entry, exc)
            return
        self._open.add(entry)
        entry.future.add_done_callback(lambda future, entry=entry: self._finish(entry, future))
        if remaining is not None:
            entry.deadline = self._loop.time() + max(0.0, remaining)
            if self._sweep is None or entry.deadline < self._sweep_at:
                self._schedule_sweep(entry.deadline)

    def _schedule_sweep(self, at: float) -> None:
        """One timer per stream, at the earliest deadline of its open requests (not one per request)."""
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep, self._sweep_at = self._loop.call_at(at, self._sweep_deadlines), at

    def _sweep_deadlines(self) -> None:
        self._sweep = None
        now = self._loop.time()
        earliest = None
        for entry in list(self._open):
            if entry.deadline is None:
                continue
            if entry.deadline <= now:
                self._expire(entry)
            elif earliest is None or entry.deadline < earliest:
                earliest = entry.deadline
        if earliest is not None:
            self._schedule_sweep(earliest)

    def _finish(self, entry: _Request, future: asyncio.Future) -> None:
        if entry.answered:
            return
        if future.cancelled():
            self._answer_error(entry, DeadlineExceeded("the request's deadline passed"))
            return
        exc = future.exception()
        if exc is not None:
            self._answer_error(entry, exc)
            return
        probabilities, decode_ms, compute_ms = future.result()
        request = entry.message.request
        answer = pb.StreamResponse(request_id=request.request_id)
        try:
            build_response(request, entry.model, probabilities, decode_ms=decode_ms, compute_ms=compute_ms,
                           received_at=entry.received_at, into=answer.response)
        except Exception as exc:
            self._answer_error(entry, exc)
            return
        self._metrics.request_done(entry.model.name, "OK", time.perf_counter() - entry.received_at)
        self._done(entry)
        self._put(answer)

    def _expire(self, entry: _Request) -> None:
        if not entry.answered:
            timeout_ms = entry.message.timeout_ms
            self._answer_error(entry, DeadlineExceeded(
                f"the deadline ({timeout_ms} ms) passed before the answer" if timeout_ms else
                "the stream's deadline passed before the answer"))
            if entry.future is not None:
                entry.future.cancel()  # a request still queued is dropped before compute

    def _answer_error(self, entry: _Request, exc: BaseException) -> None:
        request = entry.message.request
        code, message = status_code_for(exc), status_details(exc)
        if isinstance(exc, SplitInferError):
            logger.info("InferStream request refused: %s %s", code.name, message, extra={
                "model": bounded(request.model, 64), "request_id": request.request_id[:MAX_REQUEST_ID_CHARS],
                "code": code.name})
        else:
            logger.error("InferStream model=%r request_id=%r: unexpected error", request.model[:64],
                         request.request_id[:MAX_REQUEST_ID_CHARS], exc_info=exc)
        label = entry.model.name if entry.model is not None else self._router.label(request.model)
        self._metrics.request_done(label, code.name, time.perf_counter() - entry.received_at)
        self._done(entry)
        self._put(pb.StreamResponse(request_id=request.request_id,
                                    error=pb.ErrorStatus(code=code.value[0], message=message)))

    def _done(self, entry: _Request) -> None:
        entry.answered = True
        self._open.discard(entry)
        self._window += 1
        _wake(self._room_waiter)

    def cancel(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for entry in list(self._open):
            entry.answered = True
            if entry.future is not None:
                entry.future.cancel()
        self._open.clear()

    async def answers(self):
        answers = self._answers
        while True:
            while not answers:
                self._answer_waiter = self._loop.create_future()
                await self._answer_waiter
            item = answers.popleft()
            if item is _END:
                return
            if isinstance(item, SplitInferError):
                await self._context.abort(status_code_for(item), status_details(item))
            yield item


async def serve_stream(router: ModelRouter, metrics: ServerMetrics, max_tokens: int | None, messages,
                       context: grpc.aio.ServicerContext, window: int = DEFAULT_STREAM_WINDOW):
    """The InferStream handler's body: an async generator of StreamResponse for ``messages``."""
    stream = _Stream(router, metrics, max_tokens, window, context)
    reader = asyncio.ensure_future(stream.read(messages))
    try:
        async for answer in stream.answers():
            yield answer
    finally:
        reader.cancel()
        stream.cancel()
