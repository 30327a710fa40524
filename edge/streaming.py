"""One ``InferStream`` call carrying many requests, each answered by request_id (used by ``GrpcTransport``).

    stream = InferStreamCall(stub, metadata=None, wait_for_ready=False)
    response = stream.infer(request, timeout_s=1.0)     # from any number of threads at once
    stream.close()

Requests go out as they are given (a request iterator fed by a queue); a reader thread hands each
answer to the caller waiting for its request_id. A request's own deadline travels with it
(``StreamRequest.timeout_ms``) and bounds the wait here too. When the call ends (the server went
away, or has no InferStream: UNIMPLEMENTED) every waiting caller gets the call's error and the
stream is dead: ``GrpcTransport`` opens a new one, or falls back to unary calls.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.errors import DeadlineExceeded, ServerUnavailable, SplitInferError, from_rpc_error, from_status

__all__ = ["InferStreamCall", "DuplicateRequestId"]

logger = logging.getLogger(__name__)

_CLOSE = object()


class DuplicateRequestId(ValueError):
    """A request_id already waiting for its answer on this stream (answers could not be told apart)."""


class InferStreamCall:
    """A bidirectional ``InferStream`` call shared by every thread that sends on it."""

    def __init__(self, stub, metadata=None, wait_for_ready: bool = False) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._error: SplitInferError | None = None
        self._call = stub.InferStream(self._requests(), metadata=metadata, wait_for_ready=wait_for_ready)
        self._reader = threading.Thread(target=self._read, name="splitinfer-infer-stream", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._error is None

    @property
    def error(self) -> SplitInferError | None:
        """Why the call ended (None while it is open)."""
        return self._error

    def _requests(self):
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            yield item

    def _read(self) -> None:
        error: SplitInferError
        try:
            for answer in self._call:
                with self._lock:
                    future = self._pending.pop(answer.request_id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
            error = ServerUnavailable("UNAVAILABLE: the server ended the stream")
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        except Exception as exc:  # a broken channel must never leave callers waiting
            error = ServerUnavailable(f"UNAVAILABLE: the stream failed: {exc}")
        with self._lock:
            self._error = error
            waiting, self._pending = list(self._pending.values()), {}
        for future in waiting:
            if not future.done():
                future.set_exception(error)
        logger.debug("InferStream ended: %s", error)

    def infer(self, request: pb.InferRequest, timeout_s: float) -> pb.InferResponse:
        """Send ``request`` and wait for its answer, at most ``timeout_s`` seconds.

        Raises the SplitInferError of its status (the same as the unary call's), the stream's own
        error once it has ended, or DuplicateRequestId (nothing sent).
        """
        future: Future = Future()
        key = request.request_id
        with self._lock:
            if self._error is not None:
                raise self._error
            if key in self._pending:
                raise DuplicateRequestId(f"request_id {key[:64]!r} is already waiting on this stream")
            self._pending[key] = future
        self._queue.put(pb.StreamRequest(request=request, timeout_ms=max(1, round(timeout_s * 1e3))))
        try:
            answer = future.result(timeout_s)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(key, None)
            raise DeadlineExceeded(f"DEADLINE_EXCEEDED: no answer on the stream within {timeout_s} s") from None
        if answer.HasField("error"):
            raise from_status(answer.error.code, answer.error.message)
        return answer.response

    def close(self) -> None:
        """Half-close the call and stop waiting for it; waiting callers get UNAVAILABLE."""
        self._queue.put(_CLOSE)
        self._call.cancel()
        self._reader.join(timeout=5)
