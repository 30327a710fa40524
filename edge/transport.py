"""How the edge reaches the server half: a ``Transport`` protocol and its gRPC implementation.

``EdgeRunner`` takes any object with ``infer(request) -> response``, so tests and other carriers
(a queue, a batching proxy) plug in without the network. ``GrpcTransport`` puts a deadline on every
call, sets message size limits explicitly (the same ones the server uses), optionally retries
``UNAVAILABLE`` only, and raises the project's exceptions, never a raw ``grpc.RpcError``.

Scale-out: given several server addresses, one channel spreads calls over all of them with gRPC's
``round_robin`` policy; a server that goes away is skipped, and a call it fails with UNAVAILABLE
is retried on another (within the same deadline). TLS, mutual TLS and a bearer token are options.

Reconnection: while a server is away, calls fail fast (UNAVAILABLE) and the edge answers degraded;
gRPC tries to reconnect after an exponential backoff. Its default backoff grows to 120 s, so after
a 30 s outage the edge kept answering degraded for about 10 s (up to 15 s) after the server was
back; here it starts at 0.1 s and stops growing at ``max_reconnect_backoff_s`` (1 s, so at most
about 1.2 s with gRPC's 20% jitter; ``benchmarks/reconnect.py`` measures it).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import grpc

from splitinfer.protos import DEFAULT_MAX_MESSAGE_BYTES
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos import splitinfer_pb2_grpc
from splitinfer.protos.errors import ServerUnavailable, SplitInferError, from_rpc_error

from .streaming import DuplicateRequestId, InferStreamCall

__all__ = ["DEFAULT_MAX_RECONNECT_BACKOFF_S", "Transport", "GrpcTransport", "channel_target", "reconnect_options",
           "split_targets"]

logger = logging.getLogger(__name__)

SERVICE_NAME = "splitinfer.v1.SplitInference"
DEFAULT_MAX_RECONNECT_BACKOFF_S = 1.0
_INITIAL_RECONNECT_BACKOFF_S = 0.1


class _UseUnary(Exception):
    """This request goes as a unary call (the server has no InferStream, or its request_id cannot be matched)."""


@runtime_checkable
class Transport(Protocol):
    """Carries one InferRequest to the server half and returns its InferResponse.

    Raises a :class:`~splitinfer.protos.errors.SplitInferError` on failure (the runner answers
    locally, marked degraded, on any exception).
    """

    def infer(self, request: pb.InferRequest) -> pb.InferResponse: ...


class GrpcTransport:
    """A gRPC channel to ``splitinfer.v1.SplitInference`` on one server or spread over several.

    target: "host:port", a gRPC target URI, a comma-separated list, or a sequence of "host:port"
    (several -> one round-robin channel over all of them; see :func:`channel_target`). timeout_s:
    deadline of each call, seconds. max_message_bytes: send and receive limit, bytes.
    credentials: TLS channel credentials (``grpc.ssl_channel_credentials(...)``, with a client
    certificate for mutual TLS); None for a plaintext channel. tls_server_name: the name the
    server certificate is checked against when it differs from the target's host (always needed
    when several IP addresses share one certificate issued for a name). auth_token: sent as
    ``authorization: Bearer <token>`` with every call. max_attempts: 1 = no retry; 2..5 = retry
    calls that fail with UNAVAILABLE, within the same deadline (None: 1 for one server, 3 for
    several). wait_for_ready: queue calls while the channel connects instead of failing fast (the
    deadline still bounds them). max_reconnect_backoff_s: longest wait between two connection
    attempts while the server is away, seconds (None: gRPC's defaults, 1 s growing to 120 s).
    streaming: carry requests over one long-lived ``InferStream`` call (less per-call cost when a
    device sends many inputs, from one thread or several at once) instead of one ``Infer`` call
    each; a server without InferStream (UNIMPLEMENTED) gets unary calls from then on, and so does a
    request with an empty or duplicate request_id. A stream that breaks (UNAVAILABLE) sends the
    request it was carrying as a unary call (retried on another server as above) and is reopened
    on the next call.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        timeout_s: float = 1.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        max_attempts: int | None = None,
        wait_for_ready: bool = False,
        auth_token: str | None = None,
        tls_server_name: str | None = None,
        max_reconnect_backoff_s: float | None = DEFAULT_MAX_RECONNECT_BACKOFF_S,
        streaming: bool = False,
    ) -> None:
        targets = split_targets(target)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be a positive integer, got {max_message_bytes!r}")
        if max_attempts is None:
            max_attempts = 1 if len(targets) == 1 else 3
        if not 1 <= max_attempts <= 5:
            raise ValueError(f"max_attempts must be in [1, 5], got {max_attempts}")
        if auth_token is not None and (not auth_token.strip() or any(c.isspace() for c in auth_token.strip())):
            raise ValueError("auth_token must be a non-empty string without whitespace")
        if max_reconnect_backoff_s is not None and not 0.01 <= max_reconnect_backoff_s <= 300:
            raise ValueError(f"max_reconnect_backoff_s must be in [0.01, 300] or None, got {max_reconnect_backoff_s}")
        self.targets = tuple(targets)
        self.target = channel_target(targets)
        self.timeout_s = float(timeout_s)
        self.max_message_bytes = max_message_bytes
        self.max_attempts = max_attempts
        self.wait_for_ready = wait_for_ready
        self._metadata = (("authorization", f"Bearer {auth_token.strip()}"),) if auth_token else None
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.service_config", _service_config(max_attempts, round_robin=len(targets) > 1)),
        ]
        if max_attempts == 1:
            options.append(("grpc.enable_retries", 0))
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        options.extend(reconnect_options(max_reconnect_backoff_s))
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        self._stub = splitinfer_pb2_grpc.SplitInferenceStub(self._channel)
        self._closed = False
        self.streaming = streaming
        # one stream per server address: round_robin places each new call on the next server
        self._streams: list[InferStreamCall | None] = [None] * len(self.targets)
        self._next_stream = 0
        self._stream_lock = threading.Lock()

    def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        """One call with a deadline of ``timeout_s``; raises the matching SplitInferError on failure."""
        if self._closed:
            raise ServerUnavailable(f"transport to {self.target} is closed")
        if self.streaming and request.request_id:
            try:
                return self._infer_streamed(request)
            except _UseUnary:
                pass
        try:
            return self._stub.Infer(request, timeout=self.timeout_s, wait_for_ready=self.wait_for_ready,
                                    metadata=self._metadata)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            logger.debug("Infer %s to %s failed: %s", request.request_id, self.target, error)
            raise error from exc

    def _infer_streamed(self, request: pb.InferRequest) -> pb.InferResponse:
        """``request`` over the shared InferStream call; _UseUnary when it has to go unary instead."""
        with self._stream_lock:
            slot = self._next_stream
            self._next_stream = (slot + 1) % len(self._streams)
            stream = self._streams[slot]
            if stream is None or not stream.alive:
                stream = self._streams[slot] = InferStreamCall(self._stub, self._metadata, self.wait_for_ready)
        try:
            return stream.infer(request, self.timeout_s)
        except DuplicateRequestId:
            raise _UseUnary from None
        except SplitInferError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                logger.info("%s has no InferStream: unary Infer calls from now on", self.target)
                self.streaming = False
                raise _UseUnary from None
            if exc.code == grpc.StatusCode.UNAVAILABLE and not stream.alive:
                raise _UseUnary from None  # the stream broke: this request goes unary (with its retry policy)
            raise

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._stream_lock:
                streams, self._streams = self._streams, [None] * len(self._streams)
            for stream in streams:
                if stream is not None:
                    stream.close()
            self._channel.close()

    def __enter__(self) -> "GrpcTransport":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GrpcTransport({self.target!r}, timeout_s={self.timeout_s}, max_attempts={self.max_attempts})"


def reconnect_options(max_backoff_s: float | None) -> list[tuple[str, int]]:
    """Channel options for the reconnect backoff: 0.1 s growing (x1.6, +-20% jitter) to ``max_backoff_s``.

    None: none (gRPC's defaults). The connection attempt's own timeout (``grpc.min_reconnect_backoff_ms``,
    20 s) is left alone, so a slow link still gets to finish its handshake.
    """
    if max_backoff_s is None:
        return []
    max_ms = round(max_backoff_s * 1e3)
    return [("grpc.initial_reconnect_backoff_ms", min(round(_INITIAL_RECONNECT_BACKOFF_S * 1e3), max_ms)),
            ("grpc.max_reconnect_backoff_ms", max_ms)]


def split_targets(target: str | Sequence[str]) -> list[str]:
    """"a:1,b:2" or ["a:1", "b:2,c:3"] -> ["a:1", "b:2", "c:3"]; ValueError when empty."""
    items = [target] if isinstance(target, str) else list(target)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"a server target must be a string, got {item!r}")
        if "://" in item or item.startswith(("ipv4:", "ipv6:", "unix:")):
            out.append(item.strip())  # a gRPC target URI is passed through whole
        else:
            out.extend(part.strip() for part in item.split(",") if part.strip())
    if not out or any(not t for t in out):
        raise ValueError(f"target must be a non-empty 'host:port' or a list of them, got {target!r}")
    return out


def channel_target(targets: Sequence[str]) -> str:
    """The gRPC target for one channel to all ``targets``.

    One target is used as given (a ``dns:///name:port`` target with several address records is
    spread by round_robin too). Several "host:port" become one ``ipv4:``/``ipv6:`` address list;
    host names are resolved now, all their addresses included. ValueError on a bad address or on
    a mix of IPv4 and IPv6.
    """
    if len(targets) == 1:
        return targets[0]
    addresses: list[tuple[int, str, int]] = []
    for target in targets:
        host, port = _host_port(target)
        try:
            ip = ipaddress.ip_address(host)
            addresses.append((ip.version, str(ip), port))
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ValueError(f"cannot resolve server {target!r}: {exc}") from exc
            for info in infos:
                ip = ipaddress.ip_address(info[4][0])
                addresses.append((ip.version, str(ip), port))
    versions = {v for v, _, _ in addresses}
    if len(versions) > 1:
        raise ValueError(f"servers {list(targets)} mix IPv4 and IPv6 addresses; use one family")
    seen: dict[str, None] = {}
    for version, ip, port in addresses:
        seen[f"{ip}:{port}" if version == 4 else f"[{ip}]:{port}"] = None
    return f"ipv{versions.pop()}:" + ",".join(seen)


def _host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server {target!r} must be HOST:PORT when several servers are given")
    return host.strip("[]"), int(port)


def _service_config(max_attempts: int, round_robin: bool) -> str:
    """gRPC service config: round_robin over the addresses, and retries of UNAVAILABLE only."""
    config: dict = {}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if max_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)
