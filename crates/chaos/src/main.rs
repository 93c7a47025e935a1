//! `chaos`: the gateway and the emulator as separate processes in network namespaces made by
//! `scripts/chaos.sh`, with latency, loss, partitions, resets and process kills on the path between them;
//! after each scenario every event is read back from the emulator and checked against what its client was
//! answered. Writes the fault matrix and the soak's charts.

mod network;
mod proxy;

fn main() {}
