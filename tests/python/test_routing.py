"""Where events land: partition keys on the partition the official (JS SDK) resolver names, partition ids,
single events, and atomic batches."""

import json
from concurrent.futures import ThreadPoolExecutor
import pathlib

from azure.eventhub import EventData

from conftest import producer, read_partition

VECTORS = json.loads((pathlib.Path(__file__).parents[1] / "data" / "partition-key-vectors.json").read_text())


def pick_keys():
    """Non-empty keys of every kind: ASCII, non-ASCII (accented, CJK, emoji, Cyrillic), long."""
    cases = [case for case in VECTORS["cases"] if case["key"]]
    ascii_keys = [c for c in cases if c["key"].isascii()][:8]
    non_ascii = [c for c in cases if not c["key"].isascii()][:12]
    long_keys = [c for c in cases if c["utf8_len"] > 200][:3]
    return ascii_keys + non_ascii + long_keys


def test_keyed_batches_land_where_the_official_resolver_says(start_emulator):
    running = start_emulator("--event-hub", "four:4", "--event-hub", "wide:32")
    keys = pick_keys()
    assert any(not case["key"].isascii() for case in keys)
    for hub, count in (("four", 4), ("wide", 32)):
        with producer(running.connection_string, hub) as client:
            for case in keys:
                batch = client.create_batch(partition_key=case["key"])
                batch.add(EventData(f"{hub}:{case['key']}"))
                client.send_batch(batch)
            expected = {}
            for case in keys:
                expected.setdefault(str(case["partition"][str(count)]), []).append(case["key"])
        with ThreadPoolExecutor(max_workers=len(expected)) as pool:
            reads = {
                partition: pool.submit(read_partition, running.connection_string, hub, partition, len(partition_keys))
                for partition, partition_keys in expected.items()
            }
        for partition, partition_keys in expected.items():
            events = reads[partition].result()
            assert sorted(e.partition_key.decode() for e in events) == sorted(partition_keys), (hub, partition)
            assert all(e.body_as_str() == f"{hub}:{e.partition_key.decode()}" for e in events), "the key is kept"


def test_a_batch_with_a_partition_id_lands_there_in_order(start_emulator):
    running = start_emulator("--event-hub", "ids:4")
    with producer(running.connection_string, "ids") as client:
        batch = client.create_batch(partition_id="2")
        for n in range(10):
            batch.add(EventData(f"n{n}"))
        client.send_batch(batch)
    events = read_partition(running.connection_string, "ids", "2", 10)
    assert [e.body_as_str() for e in events] == [f"n{n}" for n in range(10)]
    assert [e.sequence_number for e in events] == list(range(10))
    assert len({e.enqueued_time for e in events}) == 1, "one batch, stored atomically at one time"


def test_a_single_send_event_round_trips(start_emulator):
    running = start_emulator("--event-hub", "single:1")
    with producer(running.connection_string, "single") as client:
        client.send_event(EventData("just one"))
        client.send_event(EventData("keyed"), partition_key="k")
    events = read_partition(running.connection_string, "single", "0", 2)
    assert [e.body_as_str() for e in events] == ["just one", "keyed"]
    assert events[1].partition_key == b"k"


def test_keyless_events_spread_over_every_partition(start_emulator):
    running = start_emulator("--event-hub", "spread:4")
    with producer(running.connection_string, "spread") as client:
        for n in range(8):
            client.send_batch([EventData(f"e{n}")])
        counts = [client.get_partition_properties(p)["last_enqueued_sequence_number"] + 1 for p in "0123"]
    assert counts == [2, 2, 2, 2]
