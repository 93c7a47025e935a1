#!/usr/bin/env python3
"""The Python contenders of the benchmark harness (issue 7), each run as a subprocess.

    contenders.py SCENARIO [options]

Scenarios:
  python-seed         the pattern the gateway replaces (the `ManagedAzureEventhubProducer` pool): the official
                      `azure-eventhub` SDK (sync `EventHubProducerClient`), one event per batch, from --callers
                      threads (100) over a `queue.Queue` pool of --clients clients (10); a caller takes a client,
                      sends, gives it back, so each connection has one send in flight.
  python-sdk-batched  what a careful Python user writes without the gateway: the official SDK with full batches
                      (`create_batch()`, `add()` until `ValueError`, `send_batch()`), from --senders threads (4),
                      each with its own client.
  python-gateway      a Python `grpcio` client streaming through the gateway: --streams (4) bidirectional
                      `SendStream` calls, each on its own channel (its own HTTP/2 connection), each fed by a
                      generator as fast as flow control allows, --events-per-message (100) events per message
                      (1: each in its own message); acks with status code 0 count as ok.
  python-client       the seed's pattern through this repository's client package (`clients/python`, import
                      `eventhub_gateway`, imported from the checkout ahead of any installed copy): --callers (100)
                      asyncio tasks in one process and one event loop, each awaiting its own
                      `GatewayProducer.send_event(body)`, one event per call, all through one producer (which
                      batches concurrent calls into SendStream messages). --gather N makes each caller await
                      `asyncio.gather` of N calls per round instead (the `EventAggregator` pattern).

Every scenario sends bodies of --size bytes (b"x" * size, as the Rust benches do) to --hub with no partition key
or id (the service or the gateway picks the partition), for --duration seconds or until --max-events events were
sent, then waits (at most --drain-timeout seconds) for the outcomes still outstanding, closes every client and
prints exactly one JSON line on stdout:

  {"scenario": ..., "events_ok": N, "events_failed": M, "seconds": T, "events_per_second": N / T,
   "latency_ms": {"p50": ..., "p99": ..., "p999": ...}}

- The clock starts once every client is connected (SDK: `create_batch()` on each client opens its connection and
  send link without sending anything; gRPC: every channel ready; python-client: `GatewayProducer.start()`, its
  channel ready) and stops when the last outcome arrived.
- An event is "sent" when it is handed over (passed to `send_batch`, added to a batch, yielded to the stream);
  each is then counted exactly once: ok, or failed (an SDK exception, a nack, no ack before the stream ended, or
  no outcome before --drain-timeout).
- Latency is per event, from its send start to its outcome (ok or failed), nearest-rank percentiles in ms, null
  when no event got an outcome. Send start: python-seed, before taking a client from the pool (what the caller of
  the pool waits); python-sdk-batched, when the event is added to its batch; python-gateway, when the generator
  yields it; python-client, before `send_event` is called (its outcome: when the call returns or raises).

Logs go to stderr. Exit status 0 when the run completed (failed events are counted, not fatal); 2 with a message
on stderr when it could not run at all (bad arguments, no connection, stubs not generated). SIGINT or SIGTERM
stops sending early and still reports.
"""

import argparse
import asyncio
import collections
import itertools
import json
import logging
import math
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array

REPO = pathlib.Path(__file__).resolve().parents[4]
PROTO_FILES = [
    "eventhub/gateway/v1/gateway.proto",
    "io_cloudevents/v1/cloudevents.proto",
    "google/rpc/status.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
]

log = logging.getLogger("contenders")
clock = time.perf_counter


class CannotRun(Exception):
    """The scenario could not run at all (exit status 2)."""


# ----------------------------------------------------------------------------------------------------------------
# Shared bookkeeping
# ----------------------------------------------------------------------------------------------------------------


class Run:
    """What every worker of a run shares: the start signal, the end of sending (deadline, --max-events, a
    signal), and the tickets that bound the number of events sent."""

    def __init__(self, args):
        self.duration = args.duration
        self.drain_timeout = args.drain_timeout
        self.max_events = args.max_events
        self.go = threading.Event()
        self.stop = threading.Event()
        self.started = None
        self.deadline = None
        # next() on an itertools.count is atomic in CPython: a lock-free ticket counter shared by the workers.
        self._tickets = itertools.count()

    def begin(self):
        self.started = clock()
        self.deadline = self.started + self.duration
        self.go.set()

    def sending(self, now):
        """Whether one more event may be sent at `now`; takes its ticket when --max-events bounds the run."""
        if now >= self.deadline or self.stop.is_set():
            return False
        if self.max_events is not None and next(self._tickets) >= self.max_events:
            self.stop.set()
            return False
        return True

    def drain_deadline(self):
        """When waiting for outstanding outcomes gives up."""
        return max(self.deadline, clock()) + self.drain_timeout


class Recorder:
    """One worker's counts and latencies (seconds), merged at the end: no lock on the hot path."""

    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.latencies = array("d")
        self.errors = collections.Counter()
        self.finished = None
        self.in_flight = 0  # events handed to a send that has not returned yet (SDK workers)

    def record(self, ok, latency, error=None):
        if ok:
            self.ok += 1
        else:
            self.failed += 1
            self.errors[error] += 1
        if latency is not None:
            self.latencies.append(latency)

    def record_many(self, ok, now, sent_at, error=None):
        """Outcomes of events sent at `sent_at` (a sequence of clock values), all known at `now`."""
        count = len(sent_at)
        if ok:
            self.ok += count
        else:
            self.failed += count
            self.errors[error] += count
        self.latencies.extend(now - t for t in sent_at)

    def unanswered(self, count, why):
        """Events sent that got no outcome: failed, with no latency."""
        if count > 0:
            self.failed += count
            self.errors[why] += count


def percentiles(latencies):
    """p50/p99/p999 in ms (nearest rank), each None without samples."""
    ordered = sorted(latencies)
    n = len(ordered)

    def rank(p):
        if n == 0:
            return None
        return round(ordered[min(n - 1, max(0, math.ceil(p * n) - 1))] * 1000.0, 3)

    return {"p50": rank(0.50), "p99": rank(0.99), "p999": rank(0.999)}


def report(scenario, run, recorders, ended):
    """The JSON result of a run (and a summary on stderr)."""
    ok = sum(r.ok for r in recorders)
    failed = sum(r.failed for r in recorders)
    seconds = max(ended - run.started, 1e-9) if run.started is not None else 0.0
    latencies = array("d")
    errors = collections.Counter()
    for r in recorders:
        latencies.extend(r.latencies)
        errors.update(r.errors)
    result = {
        "scenario": scenario,
        "events_ok": ok,
        "events_failed": failed,
        "seconds": round(seconds, 6),
        "events_per_second": round(ok / seconds, 3) if seconds > 0 else 0.0,
        "latency_ms": percentiles(latencies),
    }
    log.info("%s: %d ok, %d failed in %.3f s: %.1f events/s; latency ms %s", scenario, ok, failed, seconds,
             result["events_per_second"], result["latency_ms"])
    for error, count in errors.most_common(10):
        log.warning("%s: %d events failed: %s", scenario, count, error)
    return result


def wait_threads(threads, until):
    """Joins `threads` until the clock passes `until`; returns those still alive. Polls, so that signals are
    handled in the main thread meanwhile."""
    for thread in threads:
        while thread.is_alive():
            left = until - clock()
            if left <= 0:
                break
            thread.join(timeout=min(left, 0.2))
    return [t for t in threads if t.is_alive()]


def wait_started(threads, ready, count, timeout, what):
    """Waits (bounded) until `count` setup threads appended to `ready`; raises CannotRun otherwise."""
    until = clock() + timeout
    wait_threads(threads, until)
    if len(ready) < count:
        raise CannotRun(f"{what}: only {len(ready)} of {count} ready within {timeout} s")


def close_all(closers, timeout=10.0):
    """Calls every closer in parallel and waits at most `timeout` s for them all (a hung close must not hang the
    run; the threads are daemons)."""

    def close(closer):
        try:
            closer()
        except Exception as error:  # noqa: BLE001 - closing is best effort, and logged
            log.warning("closing failed: %r", error)

    threads = [threading.Thread(target=close, args=(c,), daemon=True) for c in closers]
    for t in threads:
        t.start()
    stuck = wait_threads(threads, clock() + timeout)
    if stuck:
        log.warning("%d clients did not close within %.0f s", len(stuck), timeout)


def describe(error):
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}"


# ----------------------------------------------------------------------------------------------------------------
# The official SDK (azure-eventhub)
# ----------------------------------------------------------------------------------------------------------------


def sdk_clients(args, count):
    """`count` sync producer clients, each connected (its send link attached) before the clock starts:
    `create_batch()` opens the connection and link to learn the link's max message size, and sends nothing."""
    from azure.eventhub import EventHubProducerClient

    clients = []
    try:
        for _ in range(count):
            clients.append(EventHubProducerClient.from_connection_string(args.emulator, eventhub_name=args.hub))
    except Exception as error:
        close_all([c.close for c in clients])
        raise CannotRun(f"cannot create the SDK clients: {describe(error)}") from error

    ready, failures = [], []

    def connect(client):
        try:
            client.create_batch()
            ready.append(client)
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(describe(error))

    started = clock()
    threads = [threading.Thread(target=connect, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        wait_started(threads, ready, count, args.setup_timeout, "SDK clients connected")
    except CannotRun as error:
        close_all([c.close for c in clients])
        raise CannotRun(f"{error}; {failures[0] if failures else 'no error raised'}") from None
    log.info("%d SDK clients connected in %.3f s", count, clock() - started)
    return clients


def run_sdk_workers(scenario, args, run, clients, workers):
    """Starts the worker threads (target, Recorder) pairs, starts the clock, waits for them (bounded), closes the
    clients and returns the JSON result."""
    threads = []
    recorders = []
    for target, recorder in workers:
        threads.append(threading.Thread(target=target, args=(recorder,), daemon=True))
        recorders.append(recorder)
    for t in threads:
        t.start()
    run.begin()
    wait_threads(threads, run.deadline)
    run.stop.set()
    # A send started just before the deadline may take its whole timeout (--drain-timeout): a little slack.
    stuck = wait_threads(threads, run.drain_deadline() + 5.0)
    ended = max([r.finished for r in recorders if r.finished is not None] + [run.started])
    if stuck:
        ended = clock()
        log.warning("%d of %d workers still waiting for an outcome after --drain-timeout %.0f s; their events "
                    "in flight are counted as failed", len(stuck), len(threads), args.drain_timeout)
        for thread, recorder in zip(threads, recorders):
            if thread.is_alive():
                recorder.unanswered(recorder.in_flight, "no outcome within --drain-timeout")
                recorder.in_flight = 0
    result = report(scenario, run, recorders, ended)
    answered = sorted(r.ok + r.failed for r in recorders)
    log.info("%s: events per worker: min %d, median %d, max %d (%d workers answered nothing)", scenario,
             answered[0], answered[len(answered) // 2], answered[-1], sum(1 for n in answered if n == 0))
    close_all([c.close for c in clients])
    return result


def python_seed(args, run, body):
    from azure.eventhub import EventData

    clients = sdk_clients(args, args.clients)
    pool = queue.Queue()
    for client in clients:
        pool.put(client)

    def caller(rec):
        run.go.wait()
        while True:
            started = clock()
            if not run.sending(started):
                break
            rec.in_flight = 1
            try:
                client = pool.get(timeout=args.drain_timeout)
            except queue.Empty:
                rec.record(False, clock() - started, "no pooled client within --drain-timeout")
                rec.in_flight = 0
                continue
            try:
                batch = client.create_batch()
                batch.add(EventData(body))
                client.send_batch(batch, timeout=args.drain_timeout)
                rec.record(True, clock() - started)
            except Exception as error:  # noqa: BLE001 - a failed event is counted, not fatal
                rec.record(False, clock() - started, describe(error))
            finally:
                rec.in_flight = 0
                pool.put(client)
        rec.finished = clock()

    workers = [(caller, Recorder()) for _ in range(args.callers)]
    return run_sdk_workers("python-seed", args, run, clients, workers)


def python_sdk_batched(args, run, body):
    from azure.eventhub import EventData

    clients = sdk_clients(args, args.senders)

    def sender(client, rec):
        run.go.wait()
        carried = None  # (EventData, added at): sent, but did not fit the previous batch
        while True:
            try:
                batch = client.create_batch()
            except Exception as error:  # noqa: BLE001 - counted below
                if carried is not None:
                    rec.record(False, clock() - carried[1], describe(error))
                log.warning("create_batch failed: %s", describe(error))
                if run.stop.is_set() or clock() >= run.deadline:
                    break
                time.sleep(0.1)
                carried = None
                continue
            sent_at = []
            if carried is not None:
                try:
                    batch.add(carried[0])
                    sent_at.append(carried[1])
                except ValueError as error:  # too large even for an empty batch
                    rec.record(False, clock() - carried[1], describe(error))
                carried = None
            while True:
                now = clock()
                if not run.sending(now):
                    break
                event = EventData(body)
                try:
                    batch.add(event)
                except ValueError:
                    carried = (event, now)
                    break
                sent_at.append(now)
            if not sent_at:
                break
            rec.in_flight = len(sent_at)
            try:
                client.send_batch(batch, timeout=args.drain_timeout)
                rec.record_many(True, clock(), sent_at)
            except Exception as error:  # noqa: BLE001 - failed events are counted, not fatal
                rec.record_many(False, clock(), sent_at, describe(error))
            rec.in_flight = 0
            if carried is None and (run.stop.is_set() or clock() >= run.deadline):
                break
        rec.finished = clock()

    workers = [((lambda rec, c=c: sender(c, rec)), Recorder()) for c in clients]
    return run_sdk_workers("python-sdk-batched", args, run, clients, workers)


# ----------------------------------------------------------------------------------------------------------------
# The gateway through grpcio
# ----------------------------------------------------------------------------------------------------------------


def generate_stubs(proto_root, out_dir):
    """`python -m grpc_tools.protoc` on the gateway's proto into `out_dir` (put on sys.path); returns the
    gateway_pb2 and gateway_pb2_grpc modules."""
    command = [
        sys.executable, "-m", "grpc_tools.protoc", "-I", str(proto_root),
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        *(str(proto_root / name) for name in PROTO_FILES),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CannotRun(f"protoc did not run: {error}") from error
    if result.returncode != 0:
        raise CannotRun(f"protoc failed ({result.returncode}): {result.stderr.strip()}")
    sys.path.insert(0, str(out_dir))
    from eventhub.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    return gateway_pb2, gateway_pb2_grpc


class Stream:
    """One SendStream call on its own channel: the generator feeding it and the thread reading its acks."""

    def __init__(self, grpc, pb, pb_grpc, address, args, run, body, index):
        self.grpc = grpc
        self.run = run
        self.recorder = Recorder()
        # A local subchannel pool gives every channel its own HTTP/2 connection (grpc-core would otherwise share
        # one subchannel between channels with the same target and arguments); no proxy from the environment.
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]
        )
        self.stub = pb_grpc.EventHubGatewayStub(self.channel)
        self.pb = pb
        self.hub = args.hub
        self.body = body
        self.index = index
        self.events_per_message = args.events_per_message
        # sent_at[sequence - 1]: the clock when the generator yielded that sequence; answered: one flag each.
        self.sent_at = array("d")
        self.answered = bytearray()
        self.call = None

    def requests(self):
        pb, hub, body, run = self.pb, self.hub, self.body, self.run
        sent_at, answered = self.sent_at, self.answered
        per_message = self.events_per_message
        event = pb.Event(binary=body)
        sequence = 0
        while True:
            now = clock()
            if not run.sending(now):
                return  # half-close: the gateway sends the remaining acks, then ends the call OK
            first = sequence + 1
            count = 1
            while count < per_message and run.sending(now):
                count += 1
            sequence += count
            for _ in range(count):
                sent_at.append(now)
                answered.append(0)
            if per_message == 1:
                yield pb.SendStreamRequest(event_hub=hub, sequence=first, event=event)
            else:
                yield pb.SendStreamRequest(event_hub=hub, sequence=first, events=[event] * count)

    def read(self, timeout):
        """The stream's reader thread: starts the call once the clock started, records every ack."""
        rec = self.recorder
        self.run.go.wait()
        sent_at, answered = self.sent_at, self.answered
        duplicates = unknown = 0
        try:
            self.call = self.stub.SendStream(
                self.requests(), timeout=timeout, metadata=[("x-client-id", "bench-python")]
            )
            for response in self.call:
                now = clock()
                for ack in response.acks:
                    index = ack.sequence - 1
                    if not 0 <= index < len(answered):
                        unknown += 1
                        continue
                    if answered[index]:
                        duplicates += 1
                        continue
                    answered[index] = 1
                    code = ack.status.code
                    if code == 0:
                        rec.record(True, now - sent_at[index])
                    else:
                        rec.record(False, now - sent_at[index], f"nack code {code}: {ack.status.message[:200]}")
        except self.grpc.RpcError as error:
            log.warning("stream %d ended with %s: %s", self.index, error.code(), error.details())
            self.call_error = f"stream ended with {error.code()} before its ack"
        except Exception as error:  # noqa: BLE001 - reported, the events without ack are counted below
            log.warning("stream %d failed: %s", self.index, describe(error))
            self.call_error = f"stream failed before its ack: {describe(error)}"
        else:
            self.call_error = "stream ended OK without this ack"
        finally:
            rec.finished = clock()
        if duplicates or unknown:
            log.warning("stream %d: %d duplicate acks, %d acks for unknown sequences", self.index, duplicates, unknown)

    def settle(self):
        """After the reader thread ended (or gave up): every event sent without an ack is failed."""
        missing = len(self.answered) - sum(self.answered)
        self.recorder.unanswered(missing, getattr(self, "call_error", "no ack within --drain-timeout"))


def python_gateway(args, run, body):
    try:
        import grpc
    except ImportError as error:
        raise CannotRun(f"grpcio is not installed: {error}") from error

    stub_dir = tempfile.mkdtemp(prefix="contenders-stubs-")
    streams = []
    try:
        pb, pb_grpc = generate_stubs(pathlib.Path(args.proto_dir), stub_dir)
        for index in range(args.streams):
            streams.append(Stream(grpc, pb, pb_grpc, args.gateway, args, run, body, index))
        started = clock()
        for stream in streams:
            left = max(0.1, args.setup_timeout - (clock() - started))
            try:
                grpc.channel_ready_future(stream.channel).result(timeout=left)
            except grpc.FutureTimeoutError:
                raise CannotRun(f"gateway {args.gateway} not reachable within {args.setup_timeout} s") from None
        log.info("%d channels to %s ready in %.3f s", len(streams), args.gateway, clock() - started)

        # The call's deadline bounds the whole stream: sending, then the drain.
        call_timeout = args.duration + args.drain_timeout
        threads = [threading.Thread(target=s.read, args=(call_timeout,), daemon=True) for s in streams]
        for t in threads:
            t.start()
        run.begin()
        wait_threads(threads, run.deadline)
        run.stop.set()
        stuck = wait_threads(threads, run.deadline + args.drain_timeout + 1.0)
        ended = max([s.recorder.finished for s in streams if s.recorder.finished is not None] + [run.started])
        if stuck:
            ended = clock()
            log.warning("%d of %d streams did not end within --drain-timeout %.0f s; cancelling them",
                        len(stuck), len(streams), args.drain_timeout)
            for s in streams:
                if s.call is not None:
                    s.call.cancel()
            wait_threads(stuck, clock() + 5.0)
        for s in streams:
            s.settle()
        return report("python-gateway", run, [s.recorder for s in streams], ended)
    finally:
        close_all([s.channel.close for s in streams])
        shutil.rmtree(stub_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The gateway through this repository's client package (clients/python)
# ----------------------------------------------------------------------------------------------------------------

CLIENT_SRC = REPO / "clients" / "python" / "src"


def import_client():
    """The checkout's own `eventhub_gateway` (clients/python/src), ahead of any installed copy, so the benchmark
    measures the package of this tree."""
    if CLIENT_SRC.is_dir():
        sys.path.insert(0, str(CLIENT_SRC))
    try:
        import eventhub_gateway
    except ImportError as error:
        raise CannotRun(f"the client package does not import: {error} (its dependencies: "
                        "clients/python/pyproject.toml)") from error
    return eventhub_gateway


def python_client(args, run, body):
    client = import_client()
    return asyncio.run(python_client_run(client, args, run, body))


async def python_client_run(client, args, run, body):
    options = {} if args.linger_ms is None else {"linger_ms": args.linger_ms}
    producer = client.GatewayProducer(
        args.gateway, args.hub, client_id="bench-python", send_timeout=args.drain_timeout,
        pool_connection_create_timeout=args.setup_timeout, **options,
    )
    started = clock()
    try:
        await producer.start()
    except client.GatewayError as error:
        await producer.close(timeout=0)
        raise CannotRun(f"gateway {args.gateway}: {describe(error)}") from None
    log.info("producer connected to %s in %.3f s", args.gateway, clock() - started)

    rec = Recorder()  # one event loop, one thread: one recorder, no lock
    send = producer.send_event
    per_round = args.gather

    async def one(started):
        # rec.in_flight counts events without an outcome; a cancelled call (past --drain-timeout) stays in it.
        try:
            await send(body)
        except Exception as error:  # noqa: BLE001 - a failed event is counted, not fatal
            rec.in_flight -= 1
            rec.record(False, clock() - started, describe(error))
        else:
            rec.in_flight -= 1
            rec.record(True, clock() - started)

    async def caller():
        while True:
            started = clock()
            if per_round == 1:
                if not run.sending(started):
                    break
                rec.in_flight += 1
                await one(started)
                continue
            count = 0
            while count < per_round and run.sending(started):
                count += 1
            if count == 0:
                break
            rec.in_flight += count
            await asyncio.gather(*[one(started) for _ in range(count)])
        finished = clock()
        if rec.finished is None or finished > rec.finished:
            rec.finished = finished

    run.begin()
    tasks = [asyncio.ensure_future(caller()) for _ in range(args.callers)]
    await asyncio.wait(tasks, timeout=max(run.deadline - clock(), 0.0))
    run.stop.set()
    # A call started just before the deadline may take its whole send_timeout (--drain-timeout): a little slack.
    _, stuck = await asyncio.wait(tasks, timeout=max(run.drain_deadline() + 5.0 - clock(), 0.0))
    ended = rec.finished if rec.finished is not None else run.started
    if stuck:
        ended = clock()
        log.warning("%d of %d callers still waiting for an outcome after --drain-timeout %.0f s; their events "
                    "in flight are counted as failed", len(stuck), len(tasks), args.drain_timeout)
        for task in stuck:
            task.cancel()
        await asyncio.wait(stuck, timeout=5.0)
        rec.unanswered(rec.in_flight, "no outcome within --drain-timeout")
        rec.in_flight = 0
    result = report("python-client", run, [rec], ended)
    try:
        await asyncio.wait_for(producer.close(timeout=5.0), 15.0)
    except Exception as error:  # noqa: BLE001 - closing is best effort, and logged
        log.warning("closing the producer failed: %s", describe(error))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

SCENARIOS = {
    "python-seed": python_seed,
    "python-sdk-batched": python_sdk_batched,
    "python-gateway": python_gateway,
    "python-client": python_client,
}


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {value}")
    return value


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--size", type=positive_int, default=100, help="event body size in bytes (default 100)")
    common.add_argument("--duration", type=positive_float, default=10.0,
                        help="seconds of sending (default 10); then outstanding outcomes are awaited")
    common.add_argument("--max-events", type=positive_int, default=None,
                        help="stop after this many events were sent (CI smoke runs)")
    common.add_argument("--hub", default="bench", help="the Event Hub (default bench)")
    common.add_argument("--drain-timeout", type=positive_float, default=30.0,
                        help="longest wait for outstanding outcomes after sending stopped, and the SDK's send "
                             "timeout (default 30)")
    common.add_argument("--setup-timeout", type=positive_float, default=30.0,
                        help="longest wait for the clients to connect before the clock starts (default 30)")
    common.add_argument("--verbose", action="store_true", help="log the SDK's and grpc's INFO messages too")

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    scenarios = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")

    seed = scenarios.add_parser("python-seed", parents=[common],
                                help="azure-eventhub, one event per batch, callers over a pool of clients")
    seed.add_argument("--emulator", required=True, metavar="CONNECTION_STRING")
    seed.add_argument("--callers", type=positive_int, default=100, help="concurrent caller threads (default 100)")
    seed.add_argument("--clients", type=positive_int, default=10, help="pooled producer clients (default 10)")

    batched = scenarios.add_parser("python-sdk-batched", parents=[common],
                                   help="azure-eventhub, full batches, one client per sender thread")
    batched.add_argument("--emulator", required=True, metavar="CONNECTION_STRING")
    batched.add_argument("--senders", type=positive_int, default=4,
                         help="sender threads, one client each (default 4)")

    gateway = scenarios.add_parser("python-gateway", parents=[common],
                                   help="grpcio SendStream calls through the gateway")
    gateway.add_argument("--gateway", required=True, metavar="HOST:PORT")
    gateway.add_argument("--streams", type=positive_int, default=4,
                         help="concurrent streams, one channel each (default 4)")
    gateway.add_argument("--events-per-message", type=positive_int, default=100,
                         help="events per SendStream message (`events`; 1 sends each in `event`) (default 100)")
    gateway.add_argument("--proto-dir", default=str(REPO / "proto"),
                         help="the proto root (default the repo's proto/)")

    client = scenarios.add_parser("python-client", parents=[common],
                                  help="this repository's client package: callers awaiting send_event")
    client.add_argument("--gateway", required=True, metavar="HOST:PORT")
    client.add_argument("--callers", type=positive_int, default=100,
                        help="concurrent asyncio callers in one event loop (default 100)")
    client.add_argument("--gather", type=positive_int, default=1,
                        help="send_event calls each caller awaits at once with asyncio.gather (default 1)")
    client.add_argument("--linger-ms", type=float, default=None,
                        help="the producer's linger_ms (default: the package's)")
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.setLevel(logging.INFO)
    if args.verbose:
        logging.getLogger().setLevel(logging.INFO)

    run = Run(args)

    def stop(signum, _frame):
        log.warning("signal %d: stop sending", signum)
        run.stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    body = (b"x" * args.size)
    limits = f"{args.duration:g} s" + (f" or {args.max_events} events" if args.max_events else "")
    log.info("%s: %d B events to %s for %s", args.scenario, args.size, args.hub, limits)
    try:
        result = SCENARIOS[args.scenario](args, run, body)
    except CannotRun as error:
        print(f"contenders.py {args.scenario}: cannot run: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"contenders.py {args.scenario}: cannot run: {error} (use the venv: .venv/bin/python)",
              file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Every client is closed by now; leave without waiting on library threads that might still linger.
    os._exit(code)
