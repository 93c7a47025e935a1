"""The public producers: `GatewayProducer` (asyncio) and `GatewayProducerSync` (threads), shaped like the pooled
`ManagedAzureEventhubProducer` they replace."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Coroutine, Iterable, Mapping, Optional, TypeVar, Union

import grpc

from ._channel import (
    CallMetadata,
    Metadata,
    TokenFile,
    TokenSource,
    channel_credentials,
    current_trace_context,
    open_channel,
)
from ._engine import Engine, Settings
from .errors import GatewayError, GatewayUnavailable, ProducerClosed
from .events import Data, Event, Receipt, Result, encode

T = TypeVar("T")

# The pooled producer's settings that now belong to the gateway (its [producer] section), with where they went.
_GATEWAY_SETTINGS = {
    "eventhub_namespace": "the gateway's [event_hubs] namespace",
    "credential_factory": "the gateway's Event Hubs credentials ([event_hubs] auth)",
    "client_limit": "the gateway's [producer] client_limit",
    "max_size": "the gateway's [producer] max_size",
    "max_idle_seconds": "the gateway's [producer] max_idle_seconds",
    "max_lifespan_seconds": "the gateway's [producer] max_lifespan_seconds",
}


class GatewayProducer:
    """Publishes events through an eventhub-gateway, batching every concurrent `send_event` into messages of
    one `SendStream`.

    `target` is the gateway's `host:port`; `eventhub_name` the hub (None: the gateway's default hub).
    TLS: `credentials` (`grpc.ssl_channel_credentials(...)`) or PEM paths `ca_file` (and `cert_file` with
    `key_file` for a client certificate); plaintext without either. `token` (a string, or a callable, plain or
    async, asked at each new call) or `token_file` (re-read when it changes) is sent as `authorization:
    Bearer`; `client_id` as `x-client-id`; `metadata` as extra pairs on every call.

    Batching: a message carries at most `max_batch_events` events and `max_batch_bytes` bytes; while earlier
    messages await their acks, a new one waits up to `linger_ms` to fill. At most `max_in_flight_events` events
    and `max_in_flight_bytes` bytes are handed in and not yet answered; `send_event` then waits for room, at most
    `pool_get_timeout` seconds (then `Overloaded`).

    Deadlines and retries: each event has `send_timeout` seconds (or the call's `timeout`). Retryable
    failures and broken streams are retried with backoff (`retry_backoff`, doubling up to `retry_backoff_max`,
    at least the gateway's `RetryInfo`) until then; events that were on a broken stream are sent again (at
    least once: each carries a `message_id`, made up when the caller gives none, so consumers can spot
    duplicates).

    From the pooled producer: `ready_message` is sent once, when the producer starts;
    `pool_connection_create_timeout` bounds the wait for the first connection; `pool_get_timeout` is the wait
    for room above. Its pool settings (`client_limit`, `max_size`, `max_idle_seconds`, `max_lifespan_seconds`)
    and Event Hubs credentials are the gateway's configuration and are refused here with a message that says so.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        eventhub_name: Optional[str] = None,
        *,
        credentials: Optional[grpc.ChannelCredentials] = None,
        ca_file: Optional[str] = None,
        cert_file: Optional[str] = None,
        key_file: Optional[str] = None,
        token: Optional[TokenSource] = None,
        token_file: Optional[str] = None,
        client_id: Optional[str] = None,
        metadata: Optional[Metadata] = None,
        channel_options: Optional[Metadata] = None,
        max_batch_events: int = 500,
        max_batch_bytes: int = 4 * 1024 * 1024,
        linger_ms: float = 2.0,
        max_in_flight_events: int = 10_000,
        max_in_flight_bytes: int = 64 * 1024 * 1024,
        send_timeout: float = 60.0,
        retry_backoff: float = 0.05,
        retry_backoff_max: float = 5.0,
        propagate_trace: bool = True,
        ready_message: Optional[Data] = None,
        pool_connection_create_timeout: float = 30.0,
        pool_get_timeout: float = 60.0,
        **gateway_settings: Any,
    ) -> None:
        for name in gateway_settings:
            if name in _GATEWAY_SETTINGS:
                raise TypeError(f"{name} is not a client setting: it is {_GATEWAY_SETTINGS[name]}")
            raise TypeError(f"GatewayProducer() got an unexpected keyword argument {name!r}")
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        _require_positive(max_batch_events=max_batch_events, max_batch_bytes=max_batch_bytes,
                          max_in_flight_events=max_in_flight_events, max_in_flight_bytes=max_in_flight_bytes,
                          send_timeout=send_timeout, pool_get_timeout=pool_get_timeout,
                          pool_connection_create_timeout=pool_connection_create_timeout,
                          retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max)
        if linger_ms < 0:
            raise ValueError(f"linger_ms must be 0 or more, not {linger_ms}")
        self.target = target
        self.eventhub_name = eventhub_name
        self._credentials = channel_credentials(credentials, ca_file, cert_file, key_file)
        self._channel_options = list(channel_options or [])
        self._metadata = CallMetadata(client_id, TokenFile(token_file) if token_file else token, metadata)
        self._settings = Settings(
            event_hub=eventhub_name or "",
            max_batch_events=max_batch_events,
            max_batch_bytes=max_batch_bytes,
            linger=linger_ms / 1000.0,
            max_in_flight_events=max_in_flight_events,
            max_in_flight_bytes=max_in_flight_bytes,
            send_timeout=send_timeout,
            pool_get_timeout=pool_get_timeout,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
        )
        self._propagate_trace = propagate_trace
        self._ready_message = ready_message
        self._connect_timeout = pool_connection_create_timeout
        self._engine: Optional[Engine] = None
        self._starting: Optional[asyncio.Lock] = None
        self._closed = False
        # Message ids made up for events without one: unique per producer (random prefix) and cheap per event.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = 0

    async def __aenter__(self) -> "GatewayProducer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Connects (within pool_connection_create_timeout) and sends `ready_message` once; `send_event` does
        this itself on first use."""
        await self._started()

    async def _started(self) -> Engine:
        if self._engine is not None:
            return self._engine
        if self._closed:
            raise ProducerClosed("the producer is closed")
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._engine is not None:
                return self._engine
            engine = Engine(self._settings, self._open_channel, self._metadata)
            try:
                await asyncio.wait_for(engine.channel_ready(), self._connect_timeout)
            except asyncio.TimeoutError:
                await engine.close(0)
                raise GatewayUnavailable(
                    f"no connection to the gateway at {self.target} within pool_connection_create_timeout "
                    f"({self._connect_timeout:g} s)", code=grpc.StatusCode.UNAVAILABLE) from None
            self._engine = engine
        if self._ready_message is not None:
            ready, self._ready_message = self._ready_message, None
            await self.send_event(ready)
        return engine

    def _open_channel(self) -> grpc.aio.Channel:
        return open_channel(self.target, self._credentials, self._channel_options)

    def _message_id(self) -> str:
        self._id_counter += 1
        return f"{self._id_prefix}-{self._id_counter}"

    async def send_event(
        self,
        data: Data,
        partition_key: Optional[str] = None,
        partition_id: Optional[str] = None,
        *,
        properties: Optional[Mapping[str, str]] = None,
        content_type: Optional[str] = None,
        message_id: Optional[str] = None,
        correlation_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Receipt:
        """Publishes one event and returns once Event Hubs accepted it, or raises the `GatewayError` it failed
        with. A dict is sent as its exact JSON (`application/json`). ValueError or TypeError, before anything is
        sent, for arguments that cannot be sent (both partition_key and partition_id, say)."""
        engine = self._engine or await self._started()
        event = encode(data, partition_key, partition_id, properties, content_type,
                       message_id or self._message_id(), correlation_id)
        item = engine.new_item(event, timeout, current_trace_context() if self._propagate_trace else None)
        if not engine.try_admit(item):
            await engine.admit_when_room(item)
        return await item.future

    async def send_events(self, events: Iterable[Union[Event, Data]], *,
                          timeout: Optional[float] = None) -> list[Result]:
        """Publishes several events (each an `Event`, or data alone) and returns one `Result` per event, in order,
        once all have their outcome. Every event is checked before any is sent (ValueError, TypeError)."""
        engine = self._engine or await self._started()
        encoded = []
        for index, entry in enumerate(events):
            if not isinstance(entry, Event):
                entry = Event(entry)
            try:
                encoded.append(encode(entry.data, entry.partition_key, entry.partition_id, entry.properties,
                                      entry.content_type, entry.message_id or self._message_id(),
                                      entry.correlation_id))
            except (ValueError, TypeError) as error:
                raise type(error)(f"events[{index}]: {error}") from None
        trace = current_trace_context() if self._propagate_trace else None
        futures = []
        for event in encoded:
            try:
                item = engine.new_item(event, timeout, trace)
            except GatewayError as error:
                futures.append(_failed(error))
                continue
            if not engine.try_admit(item):
                try:
                    await engine.admit_when_room(item)
                except GatewayError as error:
                    futures.append(_failed(error))
                    continue
            futures.append(item.future)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        results = []
        for outcome in outcomes:
            if isinstance(outcome, Receipt):
                results.append(Result(receipt=outcome))
            elif isinstance(outcome, GatewayError):
                results.append(Result(error=outcome))
            else:  # a cancellation, say: not an outcome of the event
                raise outcome
        return results

    async def flush(self) -> None:
        """Waits until every event handed in so far has its outcome."""
        if self._engine is not None:
            await self._engine.flush()

    async def close(self, timeout: Optional[float] = None) -> None:
        """Sends what is queued and waits for every outcome (at most `timeout`, default send_timeout), then
        closes the connection. Events still without an outcome then fail with ProducerClosed."""
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close(self._settings.send_timeout if timeout is None else timeout)


def _failed(error: GatewayError) -> asyncio.Future[Receipt]:
    future: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be more than 0, not {value}")


class GatewayProducerSync:
    """`GatewayProducer` for threads (Flask, Django, scripts): the same arguments and methods, blocking. One
    background thread runs the asyncio engine; every method may be called from any thread at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="eventhub-gateway", daemon=True)
        self._thread.start()
        try:
            self._producer = self._run(self._make(args, kwargs))
        except BaseException:
            self._stop_loop()
            raise

    async def _make(self, args: Any, kwargs: Any) -> GatewayProducer:
        return GatewayProducer(*args, **kwargs)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> "GatewayProducerSync":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def start(self) -> None:
        """See `GatewayProducer.start`."""
        self._run(self._producer.start())

    def send_event(self, data: Data, partition_key: Optional[str] = None, partition_id: Optional[str] = None,
                   **options: Any) -> Receipt:
        """See `GatewayProducer.send_event`."""
        return self._run(self._producer.send_event(data, partition_key, partition_id, **options))

    def send_events(self, events: Iterable[Union[Event, Data]], **options: Any) -> list[Result]:
        """See `GatewayProducer.send_events`."""
        return self._run(self._producer.send_events(list(events), **options))

    def flush(self) -> None:
        """See `GatewayProducer.flush`."""
        self._run(self._producer.flush())

    def close(self, timeout: Optional[float] = None) -> None:
        """See `GatewayProducer.close`; also ends the background thread."""
        if not self._loop.is_running():
            return
        try:
            self._run(self._producer.close(timeout))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
