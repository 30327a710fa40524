"""Transport security and authentication: TLS / mutual TLS credentials and a bearer-token interceptor.

TLS: the server presents ``cert`` + ``key`` (PEM files). Mutual TLS: with ``client_ca`` the server
also demands a client certificate signed by that CA and refuses the handshake without one.

Bearer tokens: every call must carry the metadata ``authorization: Bearer <token>`` with one of
the configured tokens, else it is answered UNAUTHENTICATED before any handler runs. The standard
health service stays open by default, so load balancers and orchestrators can probe without a
secret. Tokens are compared in constant time; a token file holds one token per line (``#``
comments allowed) so a token can be rotated by listing old and new for a while.
"""
from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["HEALTH_SERVICE", "TlsFileError", "TlsConfig", "read_tokens", "BearerTokenInterceptor"]

logger = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
_AUTH_KEY = "authorization"
_SCHEME = "bearer "


class TlsFileError(ValueError):
    """A TLS file is missing, unreadable, not PEM of the right kind, or the key does not fit the certificate."""


def _no_passphrase() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on a terminal (gRPC cannot use one)


def check_tls_files(cert: Path, key: Path, client_ca: Path | None = None) -> None:
    """Parse the PEM files as a TLS server would; TlsFileError naming the file at fault.

    gRPC only finds out when it binds the port, and then reports "Failed to bind".
    """
    for what, path in (("certificate", cert), ("key", key), ("client CA", client_ca)):
        if path is not None and not path.is_file():
            raise TlsFileError(f"TLS {what} file {path} not found")
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(cert))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsFileError(f"TLS certificate file {cert} holds no readable PEM certificate: {exc}") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = str(exc)
        if "KEY_VALUES_MISMATCH" in reason or "key values mismatch" in reason:
            raise TlsFileError(f"TLS key file {key} does not match the certificate in {cert}") from exc
        raise TlsFileError(f"TLS key file {key} holds no readable, unencrypted PEM private key: {exc}") from exc
    if client_ca is not None:
        try:
            ssl.create_default_context().load_verify_locations(cafile=str(client_ca))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise TlsFileError(f"TLS client CA file {client_ca} holds no readable PEM certificate: {exc}") from exc


@dataclass(frozen=True)
class TlsConfig:
    """PEM paths: the server's certificate chain and key; ``client_ca`` (optional) turns on mutual TLS.

    The files are checked when the config is made (:class:`TlsFileError` names the file at fault).
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            value = getattr(self, name)
            if value is None:
                continue
            object.__setattr__(self, name, Path(value))
        check_tls_files(self.cert, self.key, self.client_ca)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; TlsFileError when a file is unreadable or malformed."""
        check_tls_files(self.cert, self.key, self.client_ca)  # they may have changed since
        try:
            key, cert = self.key.read_bytes(), self.cert.read_bytes()
            client_ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        except OSError as exc:
            raise TlsFileError(f"cannot read TLS files: {exc}") from exc
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)


def read_tokens(path: str | Path) -> tuple[str, ...]:
    """Tokens from a file, one per line; blank lines and ``#`` comments skipped. ValueError if none."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the token file {path}: {exc}") from exc
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not tokens:
        raise ValueError(f"the token file {path} holds no token")
    return tokens


def _check_tokens(tokens: Iterable[str]) -> tuple[bytes, ...]:
    out = []
    for token in tokens:
        if not isinstance(token, str) or not token or token != token.strip() or any(c.isspace() for c in token):
            raise ValueError("a bearer token must be a non-empty string without whitespace")
        out.append(token.encode())
    if not out:
        raise ValueError("give at least one bearer token")
    return tuple(out)


def _bearer(metadata) -> bytes | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == _AUTH_KEY:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if value[:len(_SCHEME)].lower() == _SCHEME:
                return value[len(_SCHEME):].strip().encode()
            return None
    return None


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    async def deny(_request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong bearer token: send the metadata 'authorization: Bearer <token>'")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless the call carries a known bearer token.

    ``open_services``: full service names callable without a token (default: the health service).
    ``on_refused``: called once per refused call (metrics). ``set_tokens`` swaps the accepted set.
    """

    def __init__(self, tokens: Iterable[str], open_services: Iterable[str] = (HEALTH_SERVICE,),
                 on_refused: Callable[[], None] | None = None) -> None:
        self._tokens = _check_tokens(tokens)
        self._open_prefixes = tuple(f"/{service}/" for service in open_services)
        self._on_refused = on_refused

    def set_tokens(self, tokens: Iterable[str]) -> None:
        self._tokens = _check_tokens(tokens)

    def authorized(self, metadata) -> bool:
        sent = _bearer(metadata)
        if sent is None:
            return False
        found = False
        for token in self._tokens:  # compare with every token: the time does not depend on which matched
            found |= hmac.compare_digest(sent, token)
        return found

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(self._open_prefixes):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        if self._on_refused is not None:
            self._on_refused()
        logger.info("refused %s: missing or wrong bearer token", method, extra={"method": method,
                                                                                 "code": "UNAUTHENTICATED"})
        return _denying(handler)
