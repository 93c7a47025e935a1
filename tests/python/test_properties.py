"""Hub and partition properties through $management, as the official SDK reads them."""

import datetime

from azure.eventhub import EventData

from conftest import producer


def test_hub_properties(emulator):
    with producer(emulator.connection_string, "eh1") as client:
        properties = client.get_eventhub_properties()
        assert properties["eventhub_name"] == "eh1"
        assert properties["partition_ids"] == ["0", "1", "2", "3"]
        age = datetime.datetime.now(datetime.timezone.utc) - properties["created_at"]
        assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)
        assert client.get_partition_ids() == ["0", "1", "2", "3"]


def test_empty_partition_properties(start_emulator):
    running = start_emulator("--event-hub", "fresh:2")
    with producer(running.connection_string, "fresh") as client:
        properties = client.get_partition_properties("1")
    assert properties["id"] == "1"
    assert properties["beginning_sequence_number"] == 0
    assert properties["last_enqueued_sequence_number"] == -1
    assert properties["last_enqueued_offset"] == "-1"
    assert properties["is_empty"] is True


def test_management_reflects_the_writes(start_emulator):
    running = start_emulator("--event-hub", "counted:2")
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    with producer(running.connection_string, "counted") as client:
        batch = client.create_batch(partition_id="1")
        for n in range(5):
            batch.add(EventData(f"event {n}"))
        client.send_batch(batch)
        properties = client.get_partition_properties("1")
        untouched = client.get_partition_properties("0")
    assert properties["last_enqueued_sequence_number"] == 4
    assert int(properties["last_enqueued_offset"]) > 0
    assert properties["is_empty"] is False
    assert properties["last_enqueued_time_utc"] >= before
    assert untouched["is_empty"] is True
