"""The batching engine: coalesces every caller's events into `SendStreamRequest.events` messages on one
`SendStream`, matches acks to callers, retries what can be retried until each event's deadline, moves to a new
stream (or connection) when one ends, and bounds what is in flight (events and bytes)."""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import grpc
import grpc.aio

from ._channel import CallMetadata
from ._proto import gateway_pb2, gateway_pb2_grpc
from .errors import (
    DeadlineExceeded,
    Draining,
    EventTooLarge,
    GatewayError,
    GatewayUnavailable,
    Overloaded,
    ProducerClosed,
    Unauthenticated,
    for_one_event,
    from_call,
    from_rpc_error,
    from_status,
)
from .events import Receipt

log = logging.getLogger("eventhub_gateway")

# Stream endings after which a new stream is opened at once: the gateway acknowledged everything it read.
_CLEAN_ENDINGS = frozenset({"STREAM_IDLE", "CONNECTION_AGED", "DRAINING"})
# Statuses of a stream that the gRPC library made rather than the gateway and that mean it broke: sent again.
_BROKEN_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED})
# A protobuf event's envelope inside a SendStreamRequest, beyond its body (tags, lengths, small fields).
_EVENT_OVERHEAD_BYTES = 16


@dataclass(frozen=True)
class Settings:
    """The engine's knobs (see `GatewayProducer` for what each means)."""

    event_hub: str
    max_batch_events: int
    max_batch_bytes: int
    linger: float
    max_in_flight_events: int
    max_in_flight_bytes: int
    send_timeout: float
    pool_get_timeout: float
    retry_backoff: float
    retry_backoff_max: float


def _stub_for(channel: grpc.aio.Channel) -> Any:
    """The generated (untyped) stub over `channel`."""
    return gateway_pb2_grpc.EventHubGatewayStub(channel)  # type: ignore[no-untyped-call]


class Item:
    """One event on its way: the encoded event, its caller's future, its deadline and where it is now."""

    __slots__ = ("event", "size", "future", "deadline", "own_timeout", "attempts", "order", "stream", "sequence",
                 "trace", "finished", "in_doubt")

    def __init__(self, event: gateway_pb2.Event, future: asyncio.Future[Receipt], deadline: float, order: int,
                 trace: Optional[list[tuple[str, str]]], own_timeout: bool) -> None:
        self.event = event
        self.size = event.ByteSize() + _EVENT_OVERHEAD_BYTES
        self.future = future
        self.deadline = deadline
        self.own_timeout = own_timeout  # a timeout of the call's, not the producer's send_timeout
        self.attempts = 0
        self.order = order
        self.stream: Optional[_Stream] = None  # the stream it was written to and awaits an ack on
        self.sequence = 0
        self.trace = trace  # the caller's trace context: sent alone, with it as call metadata
        # Counted out of the window. The future can be done before (a cancelled caller), so it does not tell.
        self.finished = False
        # An earlier attempt's outcome is unknown (OUTCOME_UNKNOWN, or a stream that broke under it): a later
        # "not published" is then no longer true of the event.
        self.in_doubt = False


class _Stream:
    """One SendStream call and the events written to it that await their acks, by sequence."""

    __slots__ = ("call", "unacked", "ended", "half_closed", "accepted", "error")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.unacked: dict[int, Item] = {}
        self.ended = False
        self.half_closed = False
        # The gateway answered the call's headers: events are written only then (see _open_stream).
        self.accepted = False
        self.error: Optional[GatewayError] = None  # how it ended


class Engine:
    """Runs on one event loop; every method is called from it."""

    def __init__(self, settings: Settings, channel_factory: Callable[[], grpc.aio.Channel],
                 metadata: CallMetadata) -> None:
        self.settings = settings
        self._channel_factory = channel_factory
        self._metadata = metadata
        self._loop = asyncio.get_running_loop()
        self._channel = channel_factory()
        self._stub = _stub_for(self._channel)
        self._retired_channels: list[grpc.aio.Channel] = []
        self._pending: deque[Item] = deque()
        self._hurry: Optional[asyncio.Future[None]] = None  # set while the writer lingers
        self._wake = asyncio.Event()
        self._stream: Optional[_Stream] = None
        self._readers: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._sequence = 1
        self._order = 0
        self._failures = 0  # streams in a row that broke before any ack: the next open waits a backoff
        self._renew_channel = False
        self._in_flight_events = 0
        self._in_flight_bytes = 0
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._outstanding: set[asyncio.Future[Receipt]] = set()
        # Deadlines: events with the producer's send_timeout arrive in deadline order (a deque); those with a
        # timeout of their own go to a heap. Both are swept by one timer.
        self._by_arrival: deque[Item] = deque()
        self._compact_at = 4 * settings.max_in_flight_events
        self._by_deadline: list[tuple[float, int, Item]] = []
        self._closing = False
        self._closed = False
        self._writer = self._loop.create_task(self._write_loop())
        self._sweeper = self._loop.create_task(self._sweep_loop())

    async def channel_ready(self) -> None:
        """Waits until the channel has a connection to the gateway."""
        await self._channel.channel_ready()

    # -- admission ------------------------------------------------------------------------------------------

    def new_item(self, event: gateway_pb2.Event, timeout: Optional[float],
                 trace: Optional[list[tuple[str, str]]]) -> Item:
        """An item for `event`, or EventTooLarge when it could never fit in one message to the gateway."""
        if self._closing:
            raise ProducerClosed("the producer is closed")
        deadline = self._loop.time() + (self.settings.send_timeout if timeout is None else timeout)
        self._order += 1
        item = Item(event, self._loop.create_future(), deadline, self._order, trace, timeout is not None)
        if item.size > self.settings.max_batch_bytes:
            raise EventTooLarge(
                f"the encoded event is {item.size} bytes, over max_batch_bytes ({self.settings.max_batch_bytes})",
                code=grpc.StatusCode.INVALID_ARGUMENT, fields=[("event", "over max_batch_bytes")],
            )
        return item

    def try_admit(self, item: Item) -> bool:
        """Admits `item` if the in-flight window takes it now (an event larger than the byte window goes alone)
        and nobody waits before it; else `admit_when_room` is the way in."""
        if self._room_waiters or not self._window_takes(item):
            return False
        self._admit(item)
        return True

    async def admit_when_room(self, item: Item) -> None:
        """Admits `item` once the window has room for it; an item whose wait fails (Overloaded, ProducerClosed,
        its caller cancelled) is forgotten."""
        try:
            await self._wait_for_room(item)
        except BaseException:
            item.finished = True
            item.future.cancel()
            raise
        self._admit(item)

    def _window_takes(self, item: Item) -> bool:
        if self._in_flight_events >= self.settings.max_in_flight_events:
            return False
        return self._in_flight_bytes == 0 or self._in_flight_bytes + item.size <= self.settings.max_in_flight_bytes

    async def _wait_for_room(self, item: Item) -> None:
        """Waits, first come first served, for the window to take `item`: at most pool_get_timeout and never
        past the event's deadline, then Overloaded."""
        limit = max(min(self.settings.pool_get_timeout, item.deadline - self._loop.time()), 0.0)
        end = self._loop.time() + limit
        waiter = self._loop.create_future()
        self._room_waiters.append(waiter)
        try:
            while not (self._room_waiters[0] is waiter and self._window_takes(item)):
                remaining = end - self._loop.time()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(waiter, remaining)
                except asyncio.TimeoutError:
                    raise Overloaded(
                        f"this client's in-flight window ({self.settings.max_in_flight_events} events, "
                        f"{self.settings.max_in_flight_bytes} bytes) stayed full for {limit:.3g} s "
                        "(pool_get_timeout, or the event's deadline)",
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ) from None
                if self._closing:
                    raise ProducerClosed("the producer is closed")
                renewed = self._loop.create_future()
                self._room_waiters[self._room_waiters.index(waiter)] = renewed
                waiter = renewed
        finally:
            try:
                self._room_waiters.remove(waiter)
            except ValueError:
                pass
            self._wake_room_waiter()

    def _admit(self, item: Item) -> None:
        """Counts `item` in the window, watches its deadline and queues it for the writer."""
        self._in_flight_events += 1
        self._in_flight_bytes += item.size
        self._outstanding.add(item.future)
        if item.own_timeout:
            heapq.heappush(self._by_deadline, (item.deadline, item.order, item))
        else:
            # Admitted first come, first served, so these deadlines never decrease.
            self._by_arrival.append(item)
            if len(self._by_arrival) > self._compact_at:
                # Finished events behind a slow one at the front: dropped, so the deque stays bounded.
                self._by_arrival = deque(i for i in self._by_arrival if not i.finished)
                self._compact_at = max(4 * self.settings.max_in_flight_events, 2 * len(self._by_arrival))
        self._dispatch(item)

    def _dispatch(self, item: Item) -> None:
        if item.trace is not None:
            self._spawn(self._send_alone(item))
            return
        self._pending.append(item)
        if not self._wake.is_set():
            self._wake.set()
        if self._hurry is not None and self._batch_full():
            self._hurry_up()

    def _hurry_up(self) -> None:
        """Ends the writer's linger: the message is full, or nothing it could wait behind is left."""
        if self._hurry is not None and not self._hurry.done():
            self._hurry.set_result(None)

    def _wake_room_waiter(self) -> None:
        if self._room_waiters and not self._room_waiters[0].done():
            self._room_waiters[0].set_result(None)

    # -- outcomes -------------------------------------------------------------------------------------------

    def _release(self, item: Item) -> None:
        """Counts a finished event out of the window (once), whether its caller still waits or not."""
        if item.finished:
            return
        item.finished = True
        self._in_flight_events -= 1
        self._in_flight_bytes -= item.size
        self._outstanding.discard(item.future)
        item.stream = None
        if self._room_waiters:
            self._wake_room_waiter()

    def _succeed(self, item: Item, partition_id: str) -> None:
        if not item.future.done():
            item.future.set_result(
                Receipt(self.settings.event_hub, partition_id, item.event.message_id, item.attempts))
        self._release(item)

    def _fail(self, item: Item, error: GatewayError) -> None:
        if item.in_doubt and isinstance(error, DeadlineExceeded) and error.published is False:
            error.published = None  # this attempt was not sent, an earlier one may have been published
        if not item.future.done():
            item.future.set_exception(error)
        self._release(item)

    def _retry_or_fail(self, item: Item, error: GatewayError) -> None:
        """Sends `item` again after a backoff if its error is retryable and its deadline allows, else fails it."""
        if item.finished:
            return
        item.stream = None
        if error.reason == "OUTCOME_UNKNOWN":
            item.in_doubt = True
        if not error.retryable or self._closing:
            self._fail(item, error)
            return
        delay = max(error.retry_after or 0.0, self._backoff(item.attempts))
        if self._loop.time() + delay >= item.deadline:
            self._fail(item, error)
            return
        self._loop.call_later(delay, self._resend, item)

    def _backoff(self, failures: int) -> float:
        """The pause after `failures` failures in a row: doubling from retry_backoff up to retry_backoff_max,
        jittered over its upper half."""
        ceiling = min(self.settings.retry_backoff * (2 ** min(failures - 1, 16)), self.settings.retry_backoff_max)
        return random.uniform(ceiling / 2, ceiling)

    def _resend(self, item: Item) -> None:
        if item.future.done():
            self._release(item)  # its caller went away: not sent again
        elif not item.finished:
            self._dispatch(item)

    def _expire(self, item: Item) -> None:
        stream = item.stream
        if stream is not None:
            stream.unacked.pop(item.sequence, None)
            error = DeadlineExceeded(
                "the event's deadline passed while it awaited its outcome: it may have been published",
                published=None,
            )
        elif item.in_doubt:
            error = DeadlineExceeded(
                "the event's deadline passed before it could be sent again; an earlier attempt's outcome is "
                "unknown: it may have been published", published=None)
        else:
            error = DeadlineExceeded("the event's deadline passed before it was sent: it was not published",
                                     published=False)
        self._fail(item, error)

    async def _sweep_loop(self) -> None:
        interval = min(0.05, self.settings.send_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = self._loop.time()
            arrivals = self._by_arrival
            while arrivals and (arrivals[0].finished or arrivals[0].deadline <= now):
                item = arrivals.popleft()
                if not item.finished:
                    self._expire(item)
            heap = self._by_deadline
            while heap and (heap[0][2].finished or heap[0][0] <= now):
                item = heapq.heappop(heap)[2]
                if not item.finished:
                    self._expire(item)

    # -- the stream -----------------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        settings = self.settings
        pending = self._pending
        while True:
            if not pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            stream = self._stream
            if stream is None or stream.ended:
                try:
                    stream = await self._open_stream()
                except GatewayError as error:
                    self._refused(error)
                    continue
            if settings.linger > 0 and stream.unacked and not self._batch_full():
                # The gateway is busy with earlier messages anyway: let more events join this one, until the
                # linger ends, the message is full or every earlier event is answered (then it goes at once).
                self._hurry = self._loop.create_future()
                try:
                    await asyncio.wait_for(self._hurry, settings.linger)
                except asyncio.TimeoutError:
                    pass
                self._hurry = None
                if stream.ended:
                    continue
            first = self._sequence
            request = gateway_pb2.SendStreamRequest(event_hub=settings.event_hub, sequence=first)
            batch: list[Item] = []
            size = 0
            while pending and len(batch) < settings.max_batch_events:
                item = pending[0]
                if item.future.done():  # expired, or its caller went away: not sent
                    pending.popleft()
                    self._release(item)
                    continue
                if batch and size + item.size > settings.max_batch_bytes:
                    break
                pending.popleft()
                batch.append(item)
                size += item.size
            if not batch:
                continue
            request.events.extend([item.event for item in batch])
            unacked = stream.unacked
            for sequence, item in enumerate(batch, first):
                item.sequence = sequence
                item.stream = stream
                item.attempts += 1
                unacked[sequence] = item
            self._sequence = first + len(batch)
            try:
                await stream.call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                pass  # the call ended: its reader sends again what it carried

    def _batch_full(self) -> bool:
        return len(self._pending) >= self.settings.max_batch_events

    def _refused(self, error: GatewayError) -> None:
        """No stream could be opened (the gateway refused the call, or the token source failed): nothing was
        written, so each waiting event stays for the next stream, or fails with `error` when it is not
        retryable or its deadline leaves no room for the error's retry delay."""
        now = self._loop.time()
        kept: deque[Item] = deque()
        for item in self._pending:
            if item.finished:
                continue
            if error.retryable and not self._closing and now + (error.retry_after or 0.0) < item.deadline:
                kept.append(item)
            else:
                self._fail(item, error)
        self._pending.clear()
        self._pending.extend(kept)

    async def _open_stream(self) -> _Stream:
        if self._failures:
            await asyncio.sleep(self._backoff(self._failures))
        if self._renew_channel:
            self._renew_channel = False
            self._spawn(self._retire(self._channel))
            self._channel = self._channel_factory()
            self._stub = _stub_for(self._channel)
        metadata = await self._metadata.get()
        call = self._stub.SendStream(metadata=metadata, wait_for_ready=True)
        stream = _Stream(call)
        self._stream = stream
        reader = self._loop.create_task(self._read_loop(stream))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        # Nothing is written before the gateway answers the call's headers. A call it refuses (DRAINING,
        # OVERLOADED, UNAUTHENTICATED) then carries no event, so its events were certainly not sent; and its
        # status survives: a write racing a refusal makes grpc.aio replace the status with INTERNAL. While
        # the gateway cannot be reached, events wait here (not on the wire) until their deadline.
        await call.initial_metadata()
        if call.done():
            await asyncio.wait({reader})
            raise stream.error or GatewayUnavailable("the gateway ended the stream at once",
                                                     code=grpc.StatusCode.UNAVAILABLE)
        stream.accepted = True
        return stream

    async def _read_loop(self, stream: _Stream) -> None:
        error: Optional[GatewayError] = None
        call = stream.call
        acked_any = False
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                unacked = stream.unacked
                for ack in response.acks:
                    item = unacked.pop(ack.sequence, None)
                    if item is None:
                        continue
                    acked_any = True
                    status = ack.status
                    if status.code == 0:
                        self._succeed(item, ack.partition_id)
                    else:
                        self._retry_or_fail(item, for_one_event(from_status(status)))
                if not unacked:
                    self._hurry_up()
            code = await call.code()
            if code != grpc.StatusCode.OK:
                error = from_call(code, await call.details(), await call.trailing_metadata())
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
        except asyncio.CancelledError:
            error = ProducerClosed("the producer is closed")
            raise
        finally:
            self._stream_ended(stream, error, acked_any)

    def _stream_ended(self, stream: _Stream, error: Optional[GatewayError], acked_any: bool) -> None:
        stream.ended = True
        if self._stream is stream:
            self._stream = None
        leftover = sorted(stream.unacked.values(), key=lambda item: item.order)
        stream.unacked.clear()
        reason = error.reason if error is not None else None
        if type(error) is GatewayError and reason is None and error.code in _BROKEN_CODES:
            # Not the gateway's status but the gRPC library's: the connection broke, or grpc.aio replaced the
            # gateway's status with INTERNAL after a write raced the stream's end. Sent again, like any break.
            error = GatewayUnavailable(f"the stream to the gateway broke: {error.message}", code=error.code)
        # The gateway acknowledges every event it read before its own status; without one, any event written
        # may have been published.
        in_doubt = reason is None
        if error is None and not stream.half_closed:
            error = GatewayUnavailable("the gateway ended the stream", code=grpc.StatusCode.OK)
        stream.error = error
        # A call refused at once counts as a failure even when its reason is a clean ending (DRAINING): the
        # next one waits a backoff instead of spinning on a gateway that refuses every call.
        if error is not None and (reason not in _CLEAN_ENDINGS or not stream.accepted):
            self._failures = 0 if acked_any else self._failures + 1
            log.info("stream to the gateway ended: %r; %d events to send again", error, len(leftover))
        else:
            self._failures = 0
        if isinstance(error, Draining):
            self._renew_channel = True
        if error is None:
            error = GatewayUnavailable("the stream ended before this event's ack", code=grpc.StatusCode.UNKNOWN)
        # Unacknowledged events go first, in the order they were sent, ahead of what waits to be sent.
        now = self._loop.time()
        for item in reversed(leftover):
            if item.finished:
                continue
            item.stream = None
            item.in_doubt = item.in_doubt or in_doubt
            if error.retryable and not self._closing and now + (error.retry_after or 0.0) < item.deadline:
                if item.trace is not None:
                    self._dispatch(item)
                else:
                    self._pending.appendleft(item)
            else:
                self._fail(item, error)
        if self._pending and not self._wake.is_set():
            self._wake.set()

    async def _send_alone(self, item: Item) -> None:
        """Sends a traced event by itself with SendEvent, so its trace context travels as call metadata."""
        item.attempts += 1
        try:
            metadata = [*(await self._metadata.get()), *(item.trace or ())]
            timeout = max(item.deadline - self._loop.time(), 0.001)
            response = await self._stub.SendEvent(
                gateway_pb2.SendEventRequest(event_hub=self.settings.event_hub, event=item.event),
                metadata=metadata, timeout=timeout, wait_for_ready=True,
            )
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            if isinstance(error, Draining):
                self._renew_channel = True
            if error.reason is None:
                item.in_doubt = True  # gRPC's own status (a broken connection, its timer): no one knows
            self._retry_or_fail(item, error)
            return
        except Unauthenticated as error:  # the token source failed
            self._fail(item, error)
            return
        self._succeed(item, response.partition_id)

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        """Closes a draining gateway's channel once its calls ended (at most send_timeout); close() closes it if
        that is not over by then."""
        self._retired_channels.append(channel)
        await channel.close(self.settings.send_timeout)
        self._retired_channels.remove(channel)

    def _spawn(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # -- flush and close ------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Waits until every event handed in so far has its outcome."""
        waiting = list(self._outstanding)
        if waiting:
            await asyncio.wait(waiting)

    async def close(self, timeout: Optional[float]) -> None:
        """Waits (at most `timeout`) for every outstanding event, ends the stream and the channel; what is still
        outstanding then fails with ProducerClosed."""
        if self._closed:
            return
        self._closing = True
        end = self._loop.time() + (timeout if timeout is not None else float("inf"))
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except asyncio.TimeoutError:
            pass
        self._writer.cancel()
        stream = self._stream
        if stream is not None and not stream.ended:
            stream.half_closed = True
            if not stream.accepted:
                stream.call.cancel()  # never answered (no gateway there): nothing on it to wait for
            else:
                # Bounded: a half-close waits for the connection, which may never come back.
                try:
                    await asyncio.wait_for(stream.call.done_writing(), max(end - self._loop.time(), 0.1))
                except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError, asyncio.TimeoutError):
                    stream.call.cancel()
        readers = list(self._readers)
        if readers:
            await asyncio.wait(readers, timeout=5)
        self._sweeper.cancel()
        for task in [*readers, *self._side_tasks]:
            task.cancel()
        # Every admitted event still without an outcome: queued, awaiting its ack, or waiting to be retried.
        for waiter in list(self._outstanding):
            if not waiter.done():
                waiter.set_exception(ProducerClosed("the producer closed before this event's outcome"))
        self._outstanding.clear()
        for room in self._room_waiters:
            if not room.done():
                room.set_result(None)
        for channel in [self._channel, *self._retired_channels]:
            await channel.close(None)
        self._closed = True
