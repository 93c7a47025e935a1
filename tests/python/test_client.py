"""The Python client package (clients/python, `eventhub_gateway`) against a real gateway: what it sends is stored
exactly (read back with the official consumer), per-key order holds under concurrent callers, the sync API works
from many threads, close() flushes, the pooled producer's usage patterns run unchanged in examples/, and the
package installs from its directory into a fresh venv."""

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import REPO
from gateway_client import body, partition_positions, properties, read_since

eventhub_gateway = pytest.importorskip("eventhub_gateway")
from eventhub_gateway import (  # noqa: E402 - after the skip
    Event,
    GatewayProducer,
    GatewayProducerSync,
    InvalidEvent,
    ProducerClosed,
)

HUB = "eh2"
PACKAGE = REPO / "clients" / "python"


def stored_events(gateway, before, hub=HUB):
    """Every event `hub` gained since `before`, across partitions: [(partition id, EventData)]."""
    stored = read_since(gateway.connection_string, hub, before)
    return [(partition, event) for partition, events in stored.items() for event in events]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_every_body_kind_and_field_is_stored_exactly(gateway):
    big = 2**53 + 1
    record = {"id": big, "nested": {"list": [1, 2.5, None, True], "text": "grüße"}, "negative": -(2**63)}

    async def send():
        async with GatewayProducer(gateway.address, HUB) as producer:
            return [
                await producer.send_event("plain text", partition_key="user-12345"),
                await producer.send_event(b"\x00\xffraw", partition_id="2", content_type="application/octet-stream"),
                await producer.send_event(record, properties={"source": "test", "empty": ""}, message_id="m-1",
                                          correlation_id="c-1"),
                await producer.send_event('{"as":"text"}', content_type="application/json"),
            ]

    before = partition_positions(gateway.connection_string, HUB)
    receipts = run(send())
    stored = {event.message_id: (partition, event) for partition, event in stored_events(gateway, before)}
    assert len(stored) == 4, stored
    assert [receipt.attempts for receipt in receipts] == [1, 1, 1, 1]

    partition, text = stored[receipts[0].message_id]
    assert body(text) == b"plain text" and text.content_type is None
    assert text.partition_key in (b"user-12345", "user-12345")
    assert partition == receipts[0].partition_id, "the receipt names the partition the key went to"

    partition, raw = stored[receipts[1].message_id]
    assert (partition, body(raw), raw.content_type) == ("2", b"\x00\xffraw", "application/octet-stream")
    assert receipts[1].partition_id == "2"

    _, as_json = stored["m-1"]
    assert receipts[2].message_id == "m-1"
    assert as_json.content_type == "application/json"
    assert json.loads(body(as_json)) == record, "integers above 2^53 and 64-bit ones stay exact"
    assert str(big).encode() in body(as_json)
    assert as_json.correlation_id == "c-1"
    assert properties(as_json) == {"source": "test", "empty": ""}

    _, json_text = stored[receipts[3].message_id]
    assert body(json_text) == b'{"as":"text"}' and json_text.content_type == "application/json"


def test_events_of_one_key_are_stored_in_call_order_under_100_concurrent_callers(gateway):
    """Each call takes the next number when it is made; 100 callers share 5 keys, so calls of one key come from
    many callers at once. Per key, Event Hubs stores the numbers in increasing order."""
    numbers = itertools.count()
    keys = [f"key-{k}" for k in range(5)]

    async def send():
        async with GatewayProducer(gateway.address, HUB, max_batch_events=37) as producer:
            async def caller(index):
                for round_ in range(10):
                    key = keys[(index + round_) % len(keys)]
                    await producer.send_event({"n": next(numbers), "key": key}, partition_key=key)

            await asyncio.gather(*(caller(index) for index in range(100)))

    before = partition_positions(gateway.connection_string, HUB)
    run(send())
    by_key = {}
    for _partition, event in stored_events(gateway, before):
        record = json.loads(body(event))
        by_key.setdefault(record["key"], []).append(record["n"])
    assert sum(map(len, by_key.values())) == 1000
    for key, stored in by_key.items():
        assert stored == sorted(stored), f"{key}: stored out of call order"


def test_send_events_answers_each_event_and_a_bad_one_fails_alone(gateway):
    async def send():
        async with GatewayProducer(gateway.address, HUB) as producer:
            return await producer.send_events(
                ["first", Event(b"second", partition_id="99"), Event({"third": 3}, partition_key="k")]
            )

    before = partition_positions(gateway.connection_string, HUB)
    first, second, third = run(send())
    assert first.ok and third.ok and not second.ok
    assert isinstance(second.error, InvalidEvent)
    assert second.error.field == "event.partition_id", second.error.fields
    assert not second.error.retryable
    assert sorted(body(event) for _, event in stored_events(gateway, before)) == [b"first", b'{"third":3}']


def test_arguments_that_cannot_be_sent_are_refused_before_anything_is_sent(gateway):
    async def send():
        async with GatewayProducer(gateway.address, HUB) as producer:
            with pytest.raises(ValueError, match="partition_key and partition_id"):
                await producer.send_event("x", partition_key="k", partition_id="1")
            with pytest.raises(TypeError, match="data must be"):
                await producer.send_event(12345)
            with pytest.raises(TypeError, match="properties"):
                await producer.send_event("x", properties={"n": 1})
            with pytest.raises(ValueError, match=r"events\[1\]"):
                await producer.send_events(["fine", Event("x", partition_key="k", partition_id="1")])

    before = partition_positions(gateway.connection_string, HUB)
    run(send())
    assert partition_positions(gateway.connection_string, HUB) == before, "nothing was sent"


def test_the_pooled_producers_pool_settings_are_refused_with_where_they_went():
    with pytest.raises(TypeError, match=r"client_limit .* the gateway's \[producer\] client_limit"):
        GatewayProducer("127.0.0.1:1", "eh1", client_limit=10)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        GatewayProducer("127.0.0.1:1", "eh1", colour="blue")


def test_close_sends_every_event_handed_in_before_it_returns(gateway):
    """Fire-and-forget callers: close() waits for all of them, and everything is stored."""

    async def send():
        producer = GatewayProducer(gateway.address, HUB, linger_ms=20)
        await producer.start()
        tasks = [asyncio.create_task(producer.send_event(f"event {n}")) for n in range(500)]
        await asyncio.sleep(0)  # every task hands its event in
        await producer.close()
        assert all(task.done() for task in tasks)
        with pytest.raises(ProducerClosed):
            await producer.send_event("after close")
        return [task.result() for task in tasks]

    before = partition_positions(gateway.connection_string, HUB)
    receipts = run(send())
    assert len({receipt.message_id for receipt in receipts}) == 500
    assert len(stored_events(gateway, before)) == 500


def test_ready_message_is_sent_once_per_producer(gateway):
    async def send():
        async with GatewayProducer(gateway.address, HUB, ready_message={"ready": True}) as producer:
            await producer.start()  # starting again sends nothing
            await asyncio.gather(*(producer.send_event(f"event {n}") for n in range(20)))

    before = partition_positions(gateway.connection_string, HUB)
    run(send())
    bodies = [body(event) for _, event in stored_events(gateway, before)]
    assert bodies.count(b'{"ready":true}') == 1 and len(bodies) == 21


def test_the_sync_producer_serves_50_threads_at_once(gateway):
    errors = []
    receipts = []
    with GatewayProducerSync(gateway.address, HUB) as producer:
        def worker(index):
            try:
                for n in range(20):
                    receipts.append(producer.send_event(f"thread {index} event {n}", partition_key=f"t{index}"))
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        before = partition_positions(gateway.connection_string, HUB)
        threads = [threading.Thread(target=worker, args=(index,)) for index in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        results = producer.send_events(["batch a", "batch b"])
    assert not errors, errors
    assert len(receipts) == 1000 and all(result.ok for result in results)
    stored = stored_events(gateway, before)
    assert len(stored) == 1002
    for index in (0, 49):
        of_thread = [body(e).decode() for _, e in stored if body(e).startswith(f"thread {index} ".encode())]
        assert of_thread == [f"thread {index} event {n}" for n in range(20)], "one thread's key keeps its order"


def test_an_event_sent_inside_a_span_carries_its_trace_and_others_carry_none(gateway):
    """With opentelemetry-api installed, the caller's current span travels as the call's traceparent (the event
    goes alone with SendEvent), and the gateway continues that trace onto the stored event."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    span = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1)))

    async def send():
        async with GatewayProducer(gateway.address, HUB) as producer:
            with trace.use_span(span):
                traced = await producer.send_event("traced", message_id="traced")
            plain = await producer.send_event("plain", message_id="plain")
            return traced, plain

    before = partition_positions(gateway.connection_string, HUB)
    run(send())
    stored = {event.message_id: properties(event) for _, event in stored_events(gateway, before)}
    assert stored["traced"]["traceparent"].split("-")[1] == f"{trace_id:032x}", stored["traced"]
    assert "traceparent" not in stored["plain"], stored["plain"]


@pytest.mark.parametrize(
    "example, options",
    [
        ("event_stream.py", ["--count", "300", "--workers", "8"]),
        ("event_aggregator.py", ["--count", "300", "--batch-size", "64"]),
        ("resilient_producer.py", ["--count", "50"]),
    ],
)
def test_the_pooled_producers_usage_patterns_run_with_only_the_import_and_constructor_changed(
    gateway, example, options
):
    before = partition_positions(gateway.connection_string, HUB)
    ran = subprocess.run(
        [sys.executable, str(REPO / "examples" / example), "--target", gateway.address, "--hub", HUB, *options],
        capture_output=True, text=True, timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    summary = json.loads(ran.stdout.strip().splitlines()[-1])
    stored = stored_events(gateway, before)
    assert sorted(event.message_id for _, event in stored) == sorted(summary["message_ids"])
    if example == "resilient_producer.py":
        assert (summary["sent"], summary["failed"]) == (45, 5)
        assert summary["errors"] == ["InvalidEvent: event.partition_id"]
    else:
        assert (summary["sent"], summary["failed"]) == (300, 0)


def test_the_committed_stubs_match_proto():
    checked = subprocess.run([sys.executable, str(PACKAGE / "generate_stubs.py"), "--check"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr


def test_the_package_type_checks_strictly(tmp_path):
    """py.typed promises types: mypy --strict (the package's own [tool.mypy]) finds nothing."""
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(PACKAGE / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "mypy-cache"), str(PACKAGE / "src" / "eventhub_gateway")],
        capture_output=True, text=True, timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_package_installs_from_its_directory_into_a_fresh_venv_and_sends(gateway, tmp_path):
    """`pip install ./clients/python` with only its declared dependency ranges (from the package index), then
    one event from the fresh venv."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(PACKAGE)],
        capture_output=True, text=True, timeout=600,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    script = (
        "import asyncio, sys\n"
        "from eventhub_gateway import GatewayProducer\n"
        "async def main():\n"
        "    async with GatewayProducer(sys.argv[1], 'eh2') as producer:\n"
        "        print((await producer.send_event({'fresh': 'venv'})).message_id)\n"
        "asyncio.run(main())\n"
    )
    before = partition_positions(gateway.connection_string, HUB)
    sent = subprocess.run([str(python), "-c", script, gateway.address], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (stored,) = stored_events(gateway, before)
    assert stored[1].message_id == sent.stdout.strip()
    listed = subprocess.run([str(python), "-m", "pip", "show", "--files", "eventhub-gateway-client"],
                            capture_output=True, text=True, timeout=60).stdout
    assert "eventhub_gateway/py.typed" in listed and "eventhub_gateway/_proto/gateway_pb2.pyi" in listed
