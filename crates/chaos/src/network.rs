//! The handle on the topology `scripts/chaos.sh` makes (two network namespaces joined by a veth pair): packet
//! loss, blackholes and resets on the emulator's AMQP port (nftables, one table of its own in the emulator's
//! namespace, rewritten whole from the current set of faults), bandwidth caps (tbf on both veth ends), and
//! commands run in the emulator's namespace.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The nftables table the faults live in (family inet), in the emulator's namespace only.
const TABLE: &str = "chaos";

/// Why a fault could not be set or read.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// An environment variable `scripts/chaos.sh` exports is missing or malformed.
    #[error(
        "{name} is not set or not valid ({why}): run the chaos binary through scripts/chaos.sh"
    )]
    Environment { name: &'static str, why: String },
    /// A command could not be started.
    #[error("`{command}` could not start: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A command's output was not what was expected.
    #[error("`{command}` printed what could not be read: {why}")]
    Output { command: String, why: String },
    /// A loss percentage outside 0..=100.
    #[error("a loss of {0}% is not a percentage")]
    Percent(u8),
}

/// The faults in force on the emulator's port; the nftables table is written from this whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Percent of TCP segments dropped at random, each direction.
    pub loss_percent: u8,
    /// Every segment dropped, no RST.
    pub blackhole: bool,
    /// Every segment answered with a TCP RST.
    pub reset: bool,
}

/// Packets the rules of the current table have matched since it was last written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Dropped by the random loss rules.
    pub lost: u64,
    /// Dropped by the blackhole rules.
    pub blackholed: u64,
    /// Answered with RST by the reset rules.
    pub reset: u64,
}

/// The two namespaces and the veth pair between them, and the faults set on them.
#[derive(Debug)]
pub struct Network {
    /// The namespace of the gateway, the load clients, the proxy and the orchestrator.
    pub gateway_ns: String,
    /// The namespace of the emulator.
    pub emulator_ns: String,
    /// The gateway side's veth address.
    pub gateway_ip: IpAddr,
    /// The emulator side's veth address.
    pub emulator_ip: IpAddr,
    /// The veth end in the gateway's namespace.
    pub gateway_veth: String,
    /// The veth end in the emulator's namespace.
    pub emulator_veth: String,
    amqp_port: u16,
    faults: Faults,
    bandwidth_kbit: Option<u32>,
}

impl Network {
    /// The topology from the variables `scripts/chaos.sh` exports; faults act on TCP port `amqp_port`.
    pub fn from_env(amqp_port: u16) -> Result<Network, NetworkError> {
        Self::from_lookup(amqp_port, |name| std::env::var(name).ok())
    }

    fn from_lookup(
        amqp_port: u16,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Network, NetworkError> {
        let text = |name: &'static str| {
            lookup(name)
                .filter(|value| !value.is_empty())
                .ok_or(NetworkError::Environment {
                    name,
                    why: "missing".into(),
                })
        };
        let ip = |name: &'static str| {
            text(name)?
                .parse::<IpAddr>()
                .map_err(|error| NetworkError::Environment {
                    name,
                    why: error.to_string(),
                })
        };
        Ok(Network {
            gateway_ns: text("CHAOS_GATEWAY_NS")?,
            emulator_ns: text("CHAOS_EMULATOR_NS")?,
            gateway_ip: ip("CHAOS_GATEWAY_IP")?,
            emulator_ip: ip("CHAOS_EMULATOR_IP")?,
            gateway_veth: text("CHAOS_GATEWAY_VETH")?,
            emulator_veth: text("CHAOS_EMULATOR_VETH")?,
            amqp_port,
            faults: Faults::default(),
            bandwidth_kbit: None,
        })
    }

    /// The emulator's AMQP address, as the gateway side reaches it over the veth.
    pub fn emulator_addr(&self) -> SocketAddr {
        SocketAddr::new(self.emulator_ip, self.amqp_port)
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// Drops `percent`% of the TCP segments to and from the emulator's port, each direction (0 lifts it).
    pub async fn set_loss(&mut self, percent: u8) -> Result<(), NetworkError> {
        if percent > 100 {
            return Err(NetworkError::Percent(percent));
        }
        self.apply(Faults {
            loss_percent: percent,
            ..self.faults
        })
        .await
    }

    /// Drops every TCP segment to and from the emulator's port, without RST, or lets them pass again.
    pub async fn set_blackhole(&mut self, on: bool) -> Result<(), NetworkError> {
        self.apply(Faults {
            blackhole: on,
            ..self.faults
        })
        .await
    }

    /// Answers every TCP segment to and from the emulator's port with an RST while on: established connections
    /// are reset at their next segment either way, new ones refused.
    pub async fn set_reset(&mut self, on: bool) -> Result<(), NetworkError> {
        self.apply(Faults {
            reset: on,
            ..self.faults
        })
        .await
    }

    /// Caps the rate of both veth ends (tbf, every packet, each direction) at `kbit` per second, or lifts it.
    pub async fn cap_bandwidth(&mut self, kbit: Option<u32>) -> Result<(), NetworkError> {
        let ends = [
            (&self.gateway_ns, &self.gateway_veth),
            (&self.emulator_ns, &self.emulator_veth),
        ];
        for (ns, dev) in ends {
            match kbit {
                Some(kbit) => {
                    // At least two full frames per burst (tbf drops a packet larger than its burst), else the
                    // bytes of 20 ms at the rate, so the cap does not cost more than the rate itself.
                    let burst = (u64::from(kbit) * 1000 / 8 / 50).max(2 * 1514);
                    let (rate, burst) = (format!("{kbit}kbit"), burst.to_string());
                    let args = ["qdisc", "replace", "dev", dev, "root", "tbf"];
                    let args = [
                        &args[..],
                        &["rate", &rate, "burst", &burst, "latency", "200ms"],
                    ]
                    .concat();
                    run_in(ns, "tc", &args, None).await?;
                }
                None => {
                    if self.bandwidth_kbit.is_some() {
                        run_in(ns, "tc", &["qdisc", "del", "dev", dev, "root"], None).await?;
                    }
                }
            }
        }
        self.bandwidth_kbit = kbit;
        Ok(())
    }

    /// Lifts every fault: the nftables table goes, and the bandwidth cap.
    pub async fn clear(&mut self) -> Result<(), NetworkError> {
        // Delete whatever is there, even if this handle did not write it ("add" first makes "delete" safe).
        let script = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
        run_in(&self.emulator_ns, "nft", &["-f", "-"], Some(&script)).await?;
        self.faults = Faults::default();
        if self.bandwidth_kbit.is_some() {
            self.cap_bandwidth(None).await?;
        }
        Ok(())
    }

    /// Packets each kind of rule has matched since the table was last written.
    pub async fn counters(&self) -> Result<Counters, NetworkError> {
        let args = ["-j", "list", "table", "inet", TABLE];
        let command = describe(&self.emulator_ns, "nft", &args);
        let json = match run_in(&self.emulator_ns, "nft", &args, None).await {
            Ok(json) => json,
            // No table: no fault has been set since the last clear.
            Err(NetworkError::Failed { .. }) if self.faults == Faults::default() => {
                return Ok(Counters::default());
            }
            Err(error) => return Err(error),
        };
        parse_counters(&json).map_err(|why| NetworkError::Output { command, why })
    }

    /// `program args` in the emulator's namespace (`ip netns exec`), killed when the handle is dropped.
    pub fn emulator_command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.emulator_ns])
            .arg(program)
            .args(args)
            .kill_on_drop(true);
        command
    }

    async fn apply(&mut self, faults: Faults) -> Result<(), NetworkError> {
        let script = ruleset(self.amqp_port, faults);
        run_in(&self.emulator_ns, "nft", &["-f", "-"], Some(&script)).await?;
        self.faults = faults;
        Ok(())
    }
}

/// The nftables script that replaces the table with one holding `faults` (one transaction: atomic).
fn ruleset(port: u16, faults: Faults) -> String {
    let mut input = Vec::new();
    let mut output = Vec::new();
    if faults.blackhole {
        input.push(format!(
            "tcp dport {port} counter drop comment \"blackhole\""
        ));
        output.push(format!(
            "tcp sport {port} counter drop comment \"blackhole\""
        ));
    }
    if faults.reset {
        // Both ways: the peer's next segment is answered with an RST, and the emulator's own socket is reset
        // at its next segment out (a reject in output sends the RST back to the local sender). RSTs pass:
        // the RST the input rule sends goes through the output chain, which would otherwise eat it.
        let rule = "tcp flags & rst == 0 counter reject with tcp reset comment \"reset\"";
        input.push(format!("tcp dport {port} {rule}"));
        output.push(format!("tcp sport {port} {rule}"));
    }
    if faults.loss_percent > 0 {
        let n = faults.loss_percent;
        input.push(format!(
            "tcp dport {port} numgen random mod 100 < {n} counter drop comment \"loss\""
        ));
        output.push(format!(
            "tcp sport {port} numgen random mod 100 < {n} counter drop comment \"loss\""
        ));
    }
    let chain = |name: &str, rules: &[String]| {
        let mut text =
            format!("  chain {name} {{\n    type filter hook {name} priority 0; policy accept;\n");
        for rule in rules {
            text.push_str(&format!("    {rule}\n"));
        }
        text.push_str("  }\n");
        text
    };
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n{}{}}}\n",
        chain("input", &input),
        chain("output", &output)
    )
}

/// Sums the counters of `nft -j list table` by the comment of their rule.
fn parse_counters(json: &str) -> Result<Counters, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|error| error.to_string())?;
    let items = value["nftables"]
        .as_array()
        .ok_or("no \"nftables\" array")?;
    let mut counters = Counters::default();
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let packets: u64 = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|expr| expr.get("counter")?.get("packets")?.as_u64())
            .sum();
        match rule["comment"].as_str() {
            Some("loss") => counters.lost += packets,
            Some("blackhole") => counters.blackholed += packets,
            Some("reset") => counters.reset += packets,
            _ => {}
        }
    }
    Ok(counters)
}

fn describe(ns: &str, program: &str, args: &[&str]) -> String {
    format!("ip netns exec {ns} {program} {}", args.join(" "))
}

/// Runs `program args` in namespace `ns`, feeding it `stdin`; answers its standard output.
async fn run_in(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetworkError> {
    let command = describe(ns, program, args);
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NetworkError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the command's own failure below, with its stderr.
        let _ = pipe.write_all(text.as_bytes()).await;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|source| NetworkError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(NetworkError::Failed {
            command,
            status: output.status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_variable_is_named() {
        let error = Network::from_lookup(5672, |name| {
            (name != "CHAOS_EMULATOR_NS").then(|| "10.0.0.1".into())
        })
        .unwrap_err();
        assert!(error.to_string().contains("CHAOS_EMULATOR_NS"), "{error}");
        let error = Network::from_lookup(5672, |name| {
            Some(if name.ends_with("_IP") { "nope" } else { "x" }.into())
        })
        .unwrap_err();
        assert!(error.to_string().contains("CHAOS_GATEWAY_IP"), "{error}");
    }

    #[test]
    fn faults_combine_in_one_table() {
        let script = ruleset(
            5672,
            Faults {
                loss_percent: 5,
                blackhole: false,
                reset: true,
            },
        );
        assert!(
            script.starts_with("add table inet chaos\ndelete table inet chaos\n"),
            "{script}"
        );
        assert_eq!(
            script
                .matches("numgen random mod 100 < 5 counter drop")
                .count(),
            2,
            "{script}"
        );
        assert_eq!(
            script.matches("reject with tcp reset").count(),
            2,
            "{script}"
        );
        assert!(!script.contains("comment \"blackhole\""), "{script}");
        let empty = ruleset(5672, Faults::default());
        assert!(!empty.contains("tcp "), "{empty}");
    }

    #[test]
    fn counters_are_summed_by_rule_comment() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"rule": {"comment": "loss", "expr": [{"counter": {"packets": 3, "bytes": 1}}, {"drop": null}]}},
            {"rule": {"comment": "loss", "expr": [{"counter": {"packets": 4, "bytes": 1}}, {"drop": null}]}},
            {"rule": {"comment": "reset", "expr": [{"counter": {"packets": 1, "bytes": 1}}]}}]}"#;
        assert_eq!(
            parse_counters(json).unwrap(),
            Counters {
                lost: 7,
                blackholed: 0,
                reset: 1
            }
        );
        assert!(parse_counters("{}").is_err());
    }
}
