"""The connection to the gateway: the gRPC channel (plaintext or TLS), the call metadata (client id, bearer
token from a string, a callable or a file re-read when it changes, extra pairs) and the caller's trace context."""

from __future__ import annotations

import inspect
import os
from typing import Any, Awaitable, Callable, Optional, Sequence, Union

import grpc
import grpc.aio

from .errors import Unauthenticated

TokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]]]
Metadata = Sequence[tuple[str, str]]


def _load_opentelemetry() -> tuple[Any, Any]:
    """opentelemetry-api's trace module and W3C inject, when it is installed (it is optional)."""
    try:
        from opentelemetry import trace
        from opentelemetry.propagate import inject
    except ImportError:
        return None, None
    return trace, inject


_otel_trace, _otel_inject = _load_opentelemetry()

# Channel options: keepalive pings find a dead gateway connection while a stream waits for acks.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def channel_credentials(
    credentials: Optional[grpc.ChannelCredentials],
    ca_file: Optional[str],
    cert_file: Optional[str],
    key_file: Optional[str],
) -> Optional[grpc.ChannelCredentials]:
    """TLS credentials from an object or from PEM files; None means plaintext."""
    if credentials is not None:
        if ca_file or cert_file or key_file:
            raise ValueError("give either credentials or ca_file/cert_file/key_file, not both")
        return credentials
    if bool(cert_file) != bool(key_file):
        raise ValueError("cert_file and key_file go together (a client certificate and its key)")
    if not (ca_file or cert_file):
        return None

    def read(path: Optional[str]) -> Optional[bytes]:
        if not path:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file), private_key=read(key_file), certificate_chain=read(cert_file)
    )


def open_channel(
    target: str, credentials: Optional[grpc.ChannelCredentials], options: Optional[Metadata]
) -> grpc.aio.Channel:
    """A new asyncio channel (its own HTTP/2 connection) to the gateway."""
    merged = list(_CHANNEL_OPTIONS) + list(options or [])
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=merged)
    return grpc.aio.secure_channel(target, credentials, options=merged)


class TokenFile:
    """A bearer token kept in a file (a Kubernetes projected service account token): read again whenever the
    file's modification time or size changes, so a rotated token is used from the next call on."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: Optional[tuple[int, int]] = None
        self._token = ""

    def __call__(self) -> str:
        info = os.stat(self.path)
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            with open(self.path, encoding="utf-8") as file:
                self._token = file.read().strip()
            self._stamp = stamp
        return self._token


class CallMetadata:
    """The metadata every call carries: `x-client-id`, `authorization: Bearer` and the caller's extra pairs."""

    def __init__(self, client_id: Optional[str], token: Optional[TokenSource], extra: Optional[Metadata]) -> None:
        self._fixed = [(key.lower(), value) for key, value in (extra or [])]
        if client_id:
            self._fixed.append(("x-client-id", client_id))
        self._token = token

    async def get(self) -> list[tuple[str, str]]:
        """The metadata for a new call (a token callable is asked each time); Unauthenticated when the token
        source fails."""
        if self._token is None:
            return list(self._fixed)
        try:
            token = self._token() if callable(self._token) else self._token
            if inspect.isawaitable(token):
                token = await token
        except Exception as error:  # noqa: BLE001 - the token source is the caller's code
            raise Unauthenticated(f"the token source failed: {error!r}"[:512],
                                  code=grpc.StatusCode.UNAUTHENTICATED) from error
        if not isinstance(token, str) or not token:
            raise Unauthenticated("the token source failed: it gave no token",
                                  code=grpc.StatusCode.UNAUTHENTICATED)
        return [*self._fixed, ("authorization", f"Bearer {token}")]


def current_trace_context() -> Optional[list[tuple[str, str]]]:
    """`traceparent` (and `tracestate`) of the current OpenTelemetry span when there is a valid one, else None
    (also when opentelemetry-api is not installed)."""
    if _otel_trace is None or _otel_inject is None:
        return None
    if not _otel_trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _otel_inject(carrier)
    pairs = [(key, value) for key, value in carrier.items() if key in ("traceparent", "tracestate")]
    return pairs or None
