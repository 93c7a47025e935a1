//! The emulator's configuration: hubs, keys, limits; loaded from a TOML file and flags, validated once.
//! Durations read as humantime strings or numbers of milliseconds under their `*_ms` keys
//! (`eventhubs::settings`); errors have the gateway's `{ field, problem }` shape.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use eventhub_wire::DEFAULT_CONSUMER_GROUP;
use eventhub_wire::settings::millis;

/// The default hub's name, the one Microsoft's emulator configures out of the box.
pub const DEFAULT_HUB: &str = "eh1";
/// The default hub's partition count.
pub const DEFAULT_PARTITIONS: u32 = 2;
/// Microsoft's emulator's key name, so its documented connection string works unchanged.
pub const DEFAULT_KEY_NAME: &str = "RootManageSharedAccessKey";
/// Microsoft's emulator's key value.
pub const DEFAULT_KEY: &str = "SAS_KEY_VALUE";
/// The service's `max-message-size` on Standard, Premium and Dedicated namespaces.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1_048_576;

/// Everything the emulator needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Where to listen for plain AMQP (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The host name written into the printed connection string.
    pub host: String,
    /// The shared access key name.
    pub key_name: String,
    /// The shared access key value.
    pub key: String,
    /// The hubs of the namespace.
    pub event_hubs: Vec<HubConfig>,
    /// The `max-message-size` announced on sender links; larger transfers are refused.
    pub max_message_size: u64,
    /// Accept Entra ID (`jwt`) CBS tokens, checking only their form, audience and expiry.
    pub accept_jwt: bool,
    /// A delay before every disposition, to model a network round trip.
    #[serde(rename = "latency_ms", with = "millis")]
    pub latency: Duration,
    /// How much each partition keeps before dropping its oldest events.
    pub retention: RetentionConfig,
    /// The server certificate for AMQPS and wss; needed by `tls_listen`, optional for `websocket_listen`.
    pub tls: Option<TlsConfig>,
    /// Where to listen for AMQPS (TLS straight on TCP, no AMQP TLS header), if anywhere.
    pub tls_listen: Option<SocketAddr>,
    /// Where to listen for AMQP over WebSockets (`/$servicebus/websocket`): wss with `tls`, ws without.
    pub websocket_listen: Option<SocketAddr>,
    /// What clients may hold open, so that none can exhaust the emulator.
    pub limits: LimitsConfig,
}

/// Bounds on connections, sessions and links, and the timeouts that reclaim unused ones. Anything over a cap is
/// refused with `amqp:resource-limit-exceeded`; the defaults are far above what the official SDKs use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most connections open at once, over all listeners.
    pub max_connections: usize,
    /// Most connections open at once from one peer IP address.
    pub max_connections_per_peer: usize,
    /// Most sessions open at once on one connection (the .NET and JS SDKs open one per link).
    pub max_sessions_per_connection: usize,
    /// Most links attached at once on one connection, `$cbs` and `$management` included.
    pub max_links_per_connection: usize,
    /// Most `$cbs`/`$management` links attached at once on a connection that has not yet put a valid token.
    pub max_unauthorized_links_per_connection: usize,
    /// A `$cbs`/`$management` link whose connection has put no valid token within this long is detached with
    /// `amqp:unauthorized-access`.
    #[serde(rename = "authorization_timeout_ms", with = "millis")]
    pub authorization_timeout: Duration,
    /// A connection with no links for this long is closed with `amqp:connection:forced` (the service: 5 min).
    #[serde(rename = "idle_connection_timeout_ms", with = "millis")]
    pub idle_connection_timeout: Duration,
    /// The AMQP `idle-time-out` announced in the emulator's `open`: a client sends at least a heartbeat this
    /// often, and one silent for twice as long is taken for dead and dropped. Zero announces and checks nothing.
    #[serde(rename = "idle_time_out_ms", with = "millis")]
    pub idle_time_out: Duration,
    /// How long a new connection may take over each step of its opening (TLS handshake, WebSocket upgrade,
    /// then protocol header, SASL and `open`); a slower or silent one is dropped.
    #[serde(rename = "handshake_timeout_ms", with = "millis")]
    pub handshake_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_peer: 256,
            max_sessions_per_connection: 256,
            max_links_per_connection: 1024,
            max_unauthorized_links_per_connection: 16,
            authorization_timeout: Duration::from_secs(5),
            idle_connection_timeout: Duration::from_secs(300),
            idle_time_out: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl LimitsConfig {
    /// Checks each bound; errors name the field as `limits.<name>`.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, problem: String| ConfigError::Invalid {
            field: format!("limits.{field}"),
            problem,
        };
        for (field, value) in [
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
            (
                "max_sessions_per_connection",
                self.max_sessions_per_connection,
            ),
            ("max_links_per_connection", self.max_links_per_connection),
            (
                "max_unauthorized_links_per_connection",
                self.max_unauthorized_links_per_connection,
            ),
        ] {
            if !(1..=MAX_COUNT_LIMIT).contains(&value) {
                return Err(invalid(
                    field,
                    format!("must be between 1 and {MAX_COUNT_LIMIT}"),
                ));
            }
        }
        if self.max_connections_per_peer > self.max_connections {
            return Err(invalid(
                "max_connections_per_peer",
                format!(
                    "must not exceed limits.max_connections ({})",
                    self.max_connections
                ),
            ));
        }
        if self.max_unauthorized_links_per_connection > self.max_links_per_connection {
            return Err(invalid(
                "max_unauthorized_links_per_connection",
                format!(
                    "must not exceed limits.max_links_per_connection ({})",
                    self.max_links_per_connection
                ),
            ));
        }
        for (field, value) in [
            ("authorization_timeout_ms", self.authorization_timeout),
            ("idle_connection_timeout_ms", self.idle_connection_timeout),
            ("handshake_timeout_ms", self.handshake_timeout),
        ] {
            if !(Duration::from_millis(100)..=MAX_TIMEOUT).contains(&value) {
                return Err(invalid(
                    field,
                    format!(
                        "must be between 100 and {} milliseconds",
                        MAX_TIMEOUT.as_millis()
                    ),
                ));
            }
        }
        if !self.idle_time_out.is_zero()
            && !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.idle_time_out)
        {
            return Err(invalid(
                "idle_time_out_ms",
                "must be 0 (none) or between 1000 and 3600000 milliseconds".into(),
            ));
        }
        Ok(())
    }

    /// `idle_time_out` as announced in `open`, milliseconds (0: none); validation keeps it within an hour.
    pub fn idle_time_out_ms(&self) -> u32 {
        u32::try_from(self.idle_time_out.as_millis()).unwrap_or(u32::MAX)
    }
}

/// The largest value a count limit takes: beyond it, it would bound nothing.
const MAX_COUNT_LIMIT: usize = 1_000_000;
/// The longest timeout accepted: one day.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// The emulator's TLS identity: a certificate chain (leaf first) and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PemSource,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PemSource,
}

/// Where PEM text comes from: a file, or the text itself (tests generate theirs in memory).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PemSource {
    /// A PEM file.
    Path(PathBuf),
    /// PEM text.
    Pem(String),
}

impl PemSource {
    /// The PEM text, read from the file when it is one.
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Self::Path(path) => std::fs::read_to_string(path),
            Self::Pem(pem) => Ok(pem.clone()),
        }
    }
}

// Never print PEM text: it may be a private key.
impl std::fmt::Debug for PemSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(path) => f.debug_tuple("Path").field(path).finish(),
            Self::Pem(pem) => write!(f, "Pem(<{} bytes>)", pem.len()),
        }
    }
}

/// One hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// The hub's name.
    pub name: String,
    /// How many partitions it has (1 to 1024).
    pub partitions: u32,
    /// Its consumer groups; `$Default` is always there.
    #[serde(default)]
    pub consumer_groups: Vec<String>,
}

/// The bound on each partition's in-memory log; the oldest events go first, as retention does on the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Most events kept per partition.
    pub max_events: usize,
    /// Most bytes (encoded events) kept per partition.
    pub max_bytes: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_events: 1_000_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5672)),
            host: "localhost".into(),
            key_name: DEFAULT_KEY_NAME.into(),
            key: DEFAULT_KEY.into(),
            event_hubs: vec![HubConfig {
                name: DEFAULT_HUB.into(),
                partitions: DEFAULT_PARTITIONS,
                consumer_groups: vec!["cg1".into()],
            }],
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            accept_jwt: false,
            latency: Duration::ZERO,
            retention: RetentionConfig::default(),
            tls: None,
            tls_listen: None,
            websocket_listen: None,
            limits: LimitsConfig::default(),
        }
    }
}

/// A configuration the emulator cannot start with; says which field and why (the gateway's and the
/// producer's configuration errors have the same `{ field, problem }` shape).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or a value in it could not be read (figment's message names the key and the file).
    #[error("cannot load the emulator configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A `--event-hub` value is not `NAME:PARTITIONS[:GROUP,...]`.
    #[error("--event-hub {value:?}: {problem}")]
    HubSpec {
        /// The value given.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A field has a value the emulator cannot use.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field's path, e.g. `event_hubs[1].partitions`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl EmulatorConfig {
    /// Loads a TOML file over the defaults (fields missing from the file keep their defaults). A value that
    /// does not parse is refused naming its field, as a value out of range is.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Figment::from(Serialized::defaults(Self::default()))
            .merge(Toml::file_exact(path))
            .extract()
            .map_err(|error| {
                if error.path.is_empty() || error.count() != 1 {
                    return ConfigError::Load(Box::new(error));
                }
                ConfigError::Invalid {
                    field: error.path.join("."),
                    problem: format!("{} (in {})", error.kind, path.display()),
                }
            })
    }

    /// The hubs, each with `$Default` among its consumer groups.
    pub fn hubs(&self) -> impl Iterator<Item = HubConfig> + '_ {
        self.event_hubs.iter().map(|hub| {
            let mut hub = hub.clone();
            if !hub
                .consumer_groups
                .iter()
                .any(|g| g.eq_ignore_ascii_case(DEFAULT_CONSUMER_GROUP))
            {
                hub.consumer_groups.insert(0, DEFAULT_CONSUMER_GROUP.into());
            }
            hub
        })
    }

    /// Checks every field; the first problem found is returned with its field path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, problem: &str| ConfigError::Invalid {
            field,
            problem: problem.into(),
        };
        if self.event_hubs.is_empty() {
            return Err(invalid("event_hubs".into(), "at least one hub is needed"));
        }
        for (i, hub) in self.event_hubs.iter().enumerate() {
            validate_entity_name(&hub.name)
                .map_err(|problem| invalid(format!("event_hubs[{i}].name"), problem))?;
            if self.event_hubs[..i]
                .iter()
                .any(|other| other.name.eq_ignore_ascii_case(&hub.name))
            {
                return Err(invalid(
                    format!("event_hubs[{i}].name"),
                    "two hubs have this name (names are case-insensitive)",
                ));
            }
            if !(1..=1024).contains(&hub.partitions) {
                return Err(invalid(
                    format!("event_hubs[{i}].partitions"),
                    "must be between 1 and 1024",
                ));
            }
            for (j, group) in hub.consumer_groups.iter().enumerate() {
                if !group.eq_ignore_ascii_case(DEFAULT_CONSUMER_GROUP) {
                    validate_entity_name(group).map_err(|problem| {
                        invalid(format!("event_hubs[{i}].consumer_groups[{j}]"), problem)
                    })?;
                }
            }
        }
        if self.key_name.is_empty() || self.key.is_empty() {
            return Err(invalid("key_name/key".into(), "both must be non-empty"));
        }
        if self.max_message_size < 1024 {
            return Err(invalid(
                "max_message_size".into(),
                "must be at least 1024 bytes",
            ));
        }
        if self.retention.max_events == 0 || self.retention.max_bytes == 0 {
            return Err(invalid(
                "retention".into(),
                "max_events and max_bytes must be positive",
            ));
        }
        if self.tls_listen.is_some() && self.tls.is_none() {
            return Err(invalid(
                "tls_listen".into(),
                "needs tls (a certificate and its key)",
            ));
        }
        if self.tls.is_some() && self.tls_listen.is_none() && self.websocket_listen.is_none() {
            return Err(invalid(
                "tls".into(),
                "no listener uses it: set tls_listen or websocket_listen",
            ));
        }
        self.limits.validate()
    }

    /// The connection string for clients, in the form Microsoft's emulator documents.
    pub fn connection_string(&self, port: u16) -> String {
        format!(
            "Endpoint=sb://{}:{port};SharedAccessKeyName={};SharedAccessKey={};UseDevelopmentEmulator=true;",
            self.host, self.key_name, self.key
        )
    }
}

impl std::str::FromStr for HubConfig {
    type Err = ConfigError;

    /// Parses `NAME:PARTITIONS[:GROUP,GROUP...]`, as `--event-hub` takes it.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let fail = |problem: &str| ConfigError::HubSpec {
            value: value.into(),
            problem: problem.into(),
        };
        let mut parts = value.splitn(3, ':');
        let name = parts.next().unwrap_or_default();
        let partitions = parts
            .next()
            .ok_or_else(|| fail("expected NAME:PARTITIONS, e.g. orders:4"))?
            .parse()
            .map_err(|_| fail("PARTITIONS must be a whole number"))?;
        let consumer_groups = parts
            .next()
            .map(|groups| {
                groups
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            name: name.into(),
            partitions,
            consumer_groups,
        })
    }
}

/// Event Hubs' rule for hub and consumer group names: 1 to 256 letters, digits, `.`, `-`, `_`,
/// starting and ending with a letter or digit.
fn validate_entity_name(name: &str) -> Result<(), &'static str> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    let edges_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 256 {
        Err("must have 1 to 256 characters")
    } else if !name.chars().all(valid_char) || !edges_ok {
        Err(
            "may hold only letters, digits, '.', '-' and '_', and must start and end with a letter or digit",
        )
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_microsofts_emulator() {
        let config = EmulatorConfig::default();
        config.validate().unwrap();
        assert_eq!(
            config.connection_string(5672),
            "Endpoint=sb://localhost:5672;SharedAccessKeyName=RootManageSharedAccessKey;\
             SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
        );
        let hub = config.hubs().next().unwrap();
        assert_eq!(hub.name, "eh1");
        assert_eq!(hub.consumer_groups, ["$Default", "cg1"]);
    }

    #[test]
    fn hub_spec_parses() {
        let hub: HubConfig = "orders:4:analytics,audit".parse().unwrap();
        assert_eq!(hub.name, "orders");
        assert_eq!(hub.partitions, 4);
        assert_eq!(hub.consumer_groups, ["analytics", "audit"]);
        assert!("orders".parse::<HubConfig>().is_err());
        let err = "orders:four".parse::<HubConfig>().unwrap_err().to_string();
        assert!(err.contains("PARTITIONS must be a whole number"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let with_second_hub = |name: &str, partitions: u32| {
            let mut config = EmulatorConfig::default();
            config.event_hubs.push(HubConfig {
                name: name.into(),
                partitions,
                consumer_groups: vec![],
            });
            config.validate().unwrap_err().to_string()
        };
        assert_eq!(
            with_second_hub("big", 2000),
            "event_hubs[1].partitions: must be between 1 and 1024"
        );
        assert!(with_second_hub("EH1", 1).starts_with("event_hubs[1].name: two hubs"));
        assert!(with_second_hub("-x", 1).starts_with("event_hubs[1].name: may hold only"));

        let tls_listen_alone = EmulatorConfig {
            tls_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..EmulatorConfig::default()
        };
        assert_eq!(
            tls_listen_alone.validate().unwrap_err().to_string(),
            "tls_listen: needs tls (a certificate and its key)"
        );
        let unused_tls = EmulatorConfig {
            tls: Some(TlsConfig {
                cert: PemSource::Path("cert.pem".into()),
                key: PemSource::Pem("secret".into()),
            }),
            ..EmulatorConfig::default()
        };
        let err = unused_tls.validate().unwrap_err().to_string();
        assert!(err.starts_with("tls: no listener uses it"), "{err}");
        let debug = format!("{unused_tls:?}");
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn limits_are_validated_with_their_field_path() {
        let with_limits = |limits: LimitsConfig| {
            EmulatorConfig {
                limits,
                ..EmulatorConfig::default()
            }
            .validate()
            .map_err(|err| err.to_string())
        };
        assert_eq!(with_limits(LimitsConfig::default()), Ok(()));
        assert_eq!(
            with_limits(LimitsConfig {
                max_links_per_connection: 0,
                ..LimitsConfig::default()
            }),
            Err("limits.max_links_per_connection: must be between 1 and 1000000".into())
        );
        assert_eq!(
            with_limits(LimitsConfig {
                max_connections: 10,
                ..LimitsConfig::default()
            }),
            Err(
                "limits.max_connections_per_peer: must not exceed limits.max_connections (10)"
                    .into()
            )
        );
        assert_eq!(
            with_limits(LimitsConfig {
                max_links_per_connection: 8,
                ..LimitsConfig::default()
            }),
            Err("limits.max_unauthorized_links_per_connection: must not exceed limits.max_links_per_connection (8)".into())
        );
        assert_eq!(
            with_limits(LimitsConfig {
                authorization_timeout: Duration::from_millis(10),
                ..LimitsConfig::default()
            }),
            Err(
                "limits.authorization_timeout_ms: must be between 100 and 86400000 milliseconds"
                    .into()
            )
        );
        assert_eq!(
            with_limits(LimitsConfig {
                idle_time_out: Duration::from_millis(500),
                ..LimitsConfig::default()
            }),
            Err("limits.idle_time_out_ms: must be 0 (none) or between 1000 and 3600000 milliseconds".into())
        );
        assert_eq!(
            with_limits(LimitsConfig {
                idle_time_out: Duration::ZERO,
                ..LimitsConfig::default()
            }),
            Ok(())
        );
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("emulator.toml");
        std::fs::write(
            &path,
            "max_message_size = 262144\n[[event_hubs]]\nname = \"orders\"\npartitions = 8\nconsumer_groups = [\"cg\"]\n",
        )
        .unwrap();
        let config = EmulatorConfig::from_file(&path).unwrap();
        assert_eq!(config.max_message_size, 262_144);
        assert_eq!(config.event_hubs.len(), 1);
        assert_eq!(config.event_hubs[0].partitions, 8);
        assert_eq!(config.key_name, DEFAULT_KEY_NAME);

        std::fs::write(
            &path,
            "tls_listen = \"127.0.0.1:5671\"\nwebsocket_listen = \"127.0.0.1:443\"\n\
             [tls]\ncert = { path = \"/etc/eh/cert.pem\" }\nkey = { path = \"/etc/eh/key.pem\" }\n",
        )
        .unwrap();
        let config = EmulatorConfig::from_file(&path).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.tls.unwrap().key,
            PemSource::Path("/etc/eh/key.pem".into())
        );
        assert_eq!(
            config.websocket_listen,
            Some("127.0.0.1:443".parse().unwrap())
        );

        std::fs::write(
            &path,
            "latency_ms = 2\n[limits]\nauthorization_timeout_ms = \"1s\"\nidle_time_out_ms = 1500\n",
        )
        .unwrap();
        let config = EmulatorConfig::from_file(&path).unwrap();
        assert_eq!(config.latency, Duration::from_millis(2));
        assert_eq!(config.limits.authorization_timeout, Duration::from_secs(1));
        assert_eq!(config.limits.idle_time_out_ms(), 1500);

        std::fs::write(
            &path,
            "[limits]\nidle_connection_timeout_ms = \"5 minutes\"\n",
        )
        .unwrap();
        assert_eq!(
            EmulatorConfig::from_file(&path)
                .unwrap()
                .limits
                .idle_connection_timeout,
            Duration::from_secs(300)
        );
        std::fs::write(&path, "latency_ms = \"2 parsecs\"\n").unwrap();
        let err = EmulatorConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.starts_with("latency_ms: \"2 parsecs\" is not a duration"),
            "{err}"
        );
        std::fs::write(&path, "[limits]\nidle_time_out_ms = -1\n").unwrap();
        let err = EmulatorConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.starts_with("limits.idle_time_out_ms: must not be negative (in "),
            "{err}"
        );

        std::fs::write(&path, "max_mesage_size = 1\n").unwrap();
        let err = EmulatorConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("max_mesage_size"), "{err}");
    }
}
