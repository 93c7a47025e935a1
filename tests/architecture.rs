//! The crate graph ARCHITECTURE.md draws, checked with `cargo tree`: the producer knows no gRPC or protobuf,
//! the emulator needs nothing of ours but the wire crate, telemetry and wire need nothing of ours at all, and
//! nothing depends on the harnesses (bench, chaos).

use std::process::Command;

/// Every package `package` depends on (normal dependencies, all targets), by name.
fn dependencies_of(package: &str) -> Vec<String> {
    let output = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "--edges",
            "normal",
            "--target",
            "all",
        ])
        .args(["--prefix", "none", "--format", "{p}", "--package", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .skip(1) // the package itself
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn assert_none_of(package: &str, forbidden: &[&str]) {
    let dependencies = dependencies_of(package);
    assert!(
        dependencies
            .iter()
            .any(|name| !name.starts_with("eventhub-"))
            || dependencies.is_empty(),
        "{package}: cargo tree listed nothing useful: {dependencies:?}"
    );
    let found: Vec<&String> = dependencies
        .iter()
        .filter(|name| forbidden.contains(&name.as_str()))
        .collect();
    assert!(found.is_empty(), "{package} depends on {found:?}");
}

#[test]
fn the_producer_knows_no_grpc_no_protobuf_and_not_the_emulator() {
    assert_none_of(
        "eventhub-producer",
        &[
            "tonic",
            "prost",
            "prost-types",
            "eventhub-emulator",
            "eventhub-gateway",
            "axum",
        ],
    );
}

#[test]
fn the_emulator_depends_on_the_wire_crate_only() {
    let ours: Vec<String> = dependencies_of("eventhub-emulator")
        .into_iter()
        .filter(|name| name.starts_with("eventhub-"))
        .collect();
    assert_eq!(ours, ["eventhub-wire"]);
    assert_none_of("eventhub-emulator", &["tonic", "prost"]);
}

#[test]
fn telemetry_and_wire_depend_on_nothing_of_ours() {
    for package in ["eventhub-telemetry", "eventhub-wire"] {
        assert_none_of(
            package,
            &[
                "eventhub-wire",
                "eventhub-telemetry",
                "eventhub-producer",
                "eventhub-emulator",
                "eventhub-gateway",
                "tonic",
            ],
        );
    }
}

#[test]
fn the_checks_see_an_edge_that_is_there() {
    // Guards the parsing above: the gateway does depend on tonic and on the producer.
    let dependencies = dependencies_of("eventhub-gateway");
    assert!(dependencies.iter().any(|name| name == "tonic"));
    assert!(dependencies.iter().any(|name| name == "eventhub-producer"));
}

#[test]
fn nothing_depends_on_the_harnesses() {
    for package in [
        "eventhub-gateway",
        "eventhub-producer",
        "eventhub-emulator",
        "eventhub-telemetry",
        "eventhub-wire",
    ] {
        assert_none_of(package, &["eventhub-bench", "eventhub-chaos", "plotters"]);
    }
}
