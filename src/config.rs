//! The gateway's configuration: one typed struct loaded from defaults, a TOML or YAML file, the environment
//! (`EVENTHUB_GATEWAY_*`, `__` between nested keys) and flags, in that order of precedence, validated once.
//! Each section's type lives with its owner (`Limits` in the gateway, `ProducerConfig` in the producer); this
//! module wires the sections together and checks what spans them. Durations read as humantime strings or
//! numbers of seconds (`eventhubs::settings`); every error names its setting by its dotted path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml, Yaml};
use serde::{Deserialize, Serialize};

use crate::auth::AuthConfig;
use crate::gateway::limits::Limits;
use crate::grpc_web::GrpcWebConfig;
use eventhub_producer::{HttpProxy, ProducerConfig, ProxyCredentials};
use eventhub_wire::settings::seconds;

/// Prefix of the environment variables the gateway reads.
pub const ENV_PREFIX: &str = "EVENTHUB_GATEWAY_";

/// Everything `serve` needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gRPC listener (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The HTTP listener of `/metrics`, `/healthz` and `/readyz` (port 0 picks a free port).
    pub metrics_listen: SocketAddr,
    /// The Event Hubs REST send API's listener (off when unset; TLS as `tls`; port 0 picks a free port).
    pub http_listen: Option<SocketAddr>,
    /// The Event Hubs the gateway forwards to; the first is the default of requests that name none.
    pub event_hubs: Vec<String>,
    /// A connection string (SAS key or signature). Prefer `connection_string_file` or the environment.
    pub connection_string: Option<String>,
    /// A file holding the connection string (a mounted Secret).
    pub connection_string_file: Option<PathBuf>,
    /// The fully qualified namespace (`name.servicebus.windows.net`), for Entra ID authentication.
    pub namespace: Option<String>,
    /// How to get Entra ID tokens for `namespace`.
    pub credential: CredentialKind,
    /// Reach Event Hubs over AMQP on WebSockets (port 443) instead of AMQPS (5671).
    pub websockets: bool,
    /// A PEM CA bundle trusted for Event Hubs besides the webpki roots and the OS store (a TLS-inspecting
    /// proxy's CA, a private endpoint's, an emulator's).
    pub event_hubs_ca_file: Option<PathBuf>,
    /// An HTTP CONNECT proxy for AMQP over WebSockets; without it `HTTPS_PROXY` and `NO_PROXY` apply.
    pub event_hubs_proxy: Option<ProxySettings>,
    /// Serve against an Event Hubs emulator started in-process (no Azure needed).
    pub emulator: bool,
    /// Partitions of each hub of the in-process emulator.
    pub emulator_partitions: u32,
    /// How long a graceful shutdown may take before the process exits anyway.
    #[serde(rename = "drain_timeout_seconds", with = "seconds")]
    pub drain_timeout: Duration,
    /// TLS for the gRPC listener.
    pub tls: Option<ServerTls>,
    /// Per-call and per-client limits.
    pub limits: Limits,
    /// The pooled producer toward Event Hubs.
    pub producer: ProducerConfig,
    /// Who may call, and which hubs each identity may reach.
    pub auth: AuthConfig,
    /// A JSON Schema file per served hub (`[schemas] eh1 = "/etc/schemas/eh1.json"`): that hub's JSON bodies
    /// must match it (docs/schemas.md). Compiled at start; SIGHUP reads them again.
    pub schemas: BTreeMap<String, PathBuf>,
    /// gRPC-Web (and HTTP/1.1) on the gRPC listener, with CORS per origin.
    pub grpc_web: GrpcWebConfig,
}

/// Where Entra ID tokens come from (azure_identity credentials).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// Workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set (Kubernetes), else managed identity.
    #[default]
    Auto,
    /// Azure Workload Identity: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_FEDERATED_TOKEN_FILE`.
    WorkloadIdentity,
    /// The host's managed identity (user-assigned when `AZURE_CLIENT_ID` is set).
    ManagedIdentity,
    /// The signed-in Azure CLI (`az login`).
    AzureCli,
    /// A service principal secret: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`.
    ClientSecret,
}

/// An HTTP proxy toward Event Hubs (the Azure SDKs' `http_proxy`), with optional basic authentication.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// `http://host:port` (credentials go in `username` and `password_file`, not here).
    pub url: String,
    /// Basic-auth user name.
    pub username: Option<String>,
    /// Basic-auth password (prefer `password_file` or `EVENTHUB_GATEWAY_EVENT_HUBS_PROXY__PASSWORD`).
    pub password: Option<String>,
    /// A file holding the basic-auth password (a mounted Secret).
    pub password_file: Option<PathBuf>,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .finish_non_exhaustive()
    }
}

/// Certificate files of the gRPC listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            http_listen: None,
            event_hubs: Vec::new(),
            connection_string: None,
            connection_string_file: None,
            namespace: None,
            credential: CredentialKind::Auto,
            websockets: false,
            event_hubs_ca_file: None,
            event_hubs_proxy: None,
            emulator: false,
            emulator_partitions: 4,
            drain_timeout: Duration::from_secs(30),
            tls: None,
            limits: Limits::default(),
            producer: ProducerConfig::default(),
            auth: AuthConfig::default(),
            schemas: BTreeMap::new(),
            grpc_web: GrpcWebConfig::default(),
        }
    }
}

/// A configuration that cannot be loaded or is out of range; names the setting at fault. The producer's and
/// the emulator's configuration errors have the same `{ field, problem }` shape.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, the environment or a flag does not parse into the config, and no one setting is at fault
    /// (a file that is not TOML, say).
    #[error("configuration: {0}")]
    Load(Box<figment::Error>),
    /// A value is refused: out of range, or not of its setting's form (`"30x"` for a duration).
    #[error("configuration: {field}: {problem}")]
    Invalid {
        /// The setting, as a dotted path (`limits.max_unacked_per_stream`).
        field: String,
        /// What is wrong, and what is allowed.
        problem: String,
    },
    /// A file the configuration names cannot be read.
    #[error("configuration: {field}: cannot read {path}: {source}")]
    Unreadable {
        /// The setting naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl ConfigError {
    /// A refused value of `field`.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same error with its field inside `section` (`max_size` -> `producer.max_size`).
    fn within(self, section: &str) -> Self {
        match self {
            Self::Invalid { field, problem } => Self::Invalid {
                field: format!("{section}.{field}"),
                problem,
            },
            other => other,
        }
    }
}

impl From<eventhub_producer::ConfigError> for ConfigError {
    fn from(error: eventhub_producer::ConfigError) -> Self {
        match error {
            eventhub_producer::ConfigError::Invalid { field, problem } => {
                Self::invalid(field, problem).within("producer")
            }
        }
    }
}

/// A value of one setting that does not parse names that setting, and where it came from (the file, the
/// variable); anything else (a file that is not TOML, several errors) stays figment's own message.
impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        if error.path.is_empty() || error.count() != 1 {
            return Self::Load(Box::new(error));
        }
        let origin = match &error.metadata {
            Some(metadata) => match &metadata.source {
                Some(source) => format!(" (in {source} {})", metadata.name),
                None => format!(" (in {})", metadata.name),
            },
            None => String::new(),
        };
        Self::invalid(error.path.join("."), format!("{}{origin}", error.kind))
    }
}

/// Where the producer's credential comes from, once the config is validated.
#[derive(Clone, Debug, PartialEq)]
pub enum EventHubsSource {
    /// The in-process emulator.
    Emulator,
    /// A connection string (read from the config, the file or the environment).
    ConnectionString(String),
    /// A namespace with an Entra ID credential.
    Namespace {
        /// The fully qualified namespace.
        namespace: String,
        /// The credential kind.
        credential: CredentialKind,
    },
}

/// The top-level keys of [`GatewayConfig`], as they appear in files and (upper-cased) in the environment:
/// read off the serialized defaults, so a new field is a setting without another list to keep in step.
static TOP_LEVEL_KEYS: LazyLock<Vec<String>> =
    LazyLock::new(|| match serde_json::to_value(GatewayConfig::default()) {
        Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
        _ => Vec::new(),
    });

/// `EVENTHUB_GATEWAY_*` variables read by the command line rather than the config (no warning for them).
const COMMAND_LINE_VARIABLES: &[&str] = &["log_format"];

/// Whether an environment key (any case, `.` between levels) names a setting: its first level does.
fn is_setting(key: &str) -> bool {
    let first = key.split('.').next().unwrap_or_default();
    TOP_LEVEL_KEYS
        .iter()
        .any(|known| known.eq_ignore_ascii_case(first))
}

impl GatewayConfig {
    /// Loads defaults, then `file` (TOML, or YAML by its `.yaml`/`.yml` extension), then the environment, then
    /// `overrides` (the flags that were given), and validates the result.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Self, ConfigError> {
        Self::load_with_env(file, Self::environment(), overrides)
    }

    /// The `EVENTHUB_GATEWAY_*` variables that are settings. Others are left alone: Kubernetes injects
    /// `EVENTHUB_GATEWAY_SERVICE_HOST`, `EVENTHUB_GATEWAY_PORT`, ... for a Service of that name.
    fn environment() -> Env {
        Env::prefixed(ENV_PREFIX)
            .split("__")
            .filter(|key| is_setting(key.as_str()))
    }

    /// The `EVENTHUB_GATEWAY_*` variables that are not settings (worth a warning: maybe a typo).
    pub fn ignored_environment() -> Vec<String> {
        std::env::vars()
            .filter_map(|(name, _)| {
                let key = name.strip_prefix(ENV_PREFIX)?.replace("__", ".");
                let read_elsewhere = COMMAND_LINE_VARIABLES
                    .iter()
                    .any(|known| known.eq_ignore_ascii_case(&key));
                (!is_setting(&key) && !read_elsewhere).then_some(name)
            })
            .collect()
    }

    fn load_with_env(
        file: Option<&Path>,
        env: Env,
        overrides: Figment,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(path) = file {
            let yaml = path
                .extension()
                .is_some_and(|extension| extension == "yaml" || extension == "yml");
            figment = if yaml {
                figment.merge(Yaml::file_exact(path))
            } else {
                figment.merge(Toml::file_exact(path))
            };
        }
        Self::extract_valid(figment.merge(env).merge(overrides))
    }

    /// A config file's text (TOML, or YAML when `yaml`) over the defaults, extracted and validated as
    /// [`Self::load`] does, without the environment and flags: the entry of the `config` fuzz target.
    pub fn from_file_text(text: &str, yaml: bool) -> Result<Self, ConfigError> {
        let figment = Figment::from(Serialized::defaults(Self::default()));
        Self::extract_valid(if yaml {
            figment.merge(Yaml::string(text))
        } else {
            figment.merge(Toml::string(text))
        })
    }

    fn extract_valid(figment: Figment) -> Result<Self, ConfigError> {
        let config: Self = figment.extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.producer.validate()?;
        self.validate_event_hubs()?;
        self.validate_proxy()?;
        self.validate_listeners()?;
        if !(1..=1024).contains(&self.emulator_partitions) {
            return invalid("emulator_partitions", "must be between 1 and 1024");
        }
        if self.drain_timeout.is_zero() || self.drain_timeout > Duration::from_secs(3600) {
            return invalid(
                "drain_timeout_seconds",
                "must be above 0 and at most 3600 s (an hour)",
            );
        }
        self.limits
            .validate()
            .map_err(|error| error.within("limits"))?;
        // A stream ended at its connection's age answers every event it read, each within the send timeout:
        // a shorter grace would close the connection under acks still owed.
        if self.limits.max_connection_age.is_some()
            && self.limits.max_connection_age_grace < self.producer.send_timeout
        {
            return Err(ConfigError::invalid(
                "limits.max_connection_age_grace_seconds",
                format!(
                    "must be at least producer.send_timeout ({:?}) when limits.max_connection_age_seconds is set, \
                     so every event read before the connection's age is answered before it is closed",
                    self.producer.send_timeout
                ),
            ));
        }
        self.auth
            .validate(&self.hubs())
            .map_err(|error| error.within("auth"))?;
        self.validate_schemas()?;
        self.grpc_web
            .validate()
            .map_err(|error| error.within("grpc_web"))?;
        let client_certificates = self.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some());
        if self.auth.required
            && self.auth.jwt.is_empty()
            && self.auth.api_keys.is_empty()
            && self.auth.sas_keys.is_empty()
            && !client_certificates
        {
            return invalid(
                "auth.required",
                "no caller could prove an identity: configure auth.jwt, auth.api_keys, auth.sas_keys or tls.client_ca",
            );
        }
        Ok(())
    }

    /// The hubs' names, and exactly one place they are reached (emulator, connection string, namespace).
    fn validate_event_hubs(&self) -> Result<(), ConfigError> {
        for (index, hub) in self.event_hubs.iter().enumerate() {
            let valid = !hub.is_empty()
                && hub.len() <= 256
                && hub
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                return invalid(
                    &format!("event_hubs[{index}]"),
                    "must be 1 to 256 letters, digits, '-', '_' or '.'",
                );
            }
        }
        if !self.emulator && self.event_hubs.is_empty() {
            return invalid(
                "event_hubs",
                "name at least one Event Hub (--event-hub); the first is the default",
            );
        }
        let sources = [
            self.emulator,
            self.connection_string.is_some(),
            self.connection_string_file.is_some(),
            self.namespace.is_some(),
        ];
        match sources.iter().filter(|given| **given).count() {
            1 => {}
            0 => {
                return invalid(
                    "connection_string",
                    "say where Event Hubs is: --connection-string (or connection_string_file, or \
                     EVENTHUB_GATEWAY_CONNECTION_STRING), --namespace, or --emulator",
                );
            }
            _ => {
                return invalid(
                    "connection_string",
                    "give exactly one of connection_string, connection_string_file, namespace and emulator",
                );
            }
        }
        if let Some(namespace) = &self.namespace
            && (namespace.is_empty() || namespace.contains('/') || namespace.contains(':'))
        {
            return invalid(
                "namespace",
                "must be a host name such as my-namespace.servicebus.windows.net",
            );
        }
        Ok(())
    }

    /// The proxy toward Event Hubs: a URL without credentials, one password source, over WebSockets only.
    fn validate_proxy(&self) -> Result<(), ConfigError> {
        let Some(proxy) = &self.event_hubs_proxy else {
            return Ok(());
        };
        let parsed = parse_proxy_url(&proxy.url)
            .map_err(|problem| ConfigError::invalid("event_hubs_proxy.url", problem))?;
        if parsed.credentials.is_some() {
            return invalid(
                "event_hubs_proxy.url",
                "must not hold credentials: set event_hubs_proxy.username and password_file",
            );
        }
        if proxy.password.is_some() && proxy.password_file.is_some() {
            return invalid(
                "event_hubs_proxy.password",
                "give password or password_file, not both",
            );
        }
        if proxy.username.is_none() && (proxy.password.is_some() || proxy.password_file.is_some()) {
            return invalid(
                "event_hubs_proxy.username",
                "needed with a password (basic authentication)",
            );
        }
        if self.emulator || !self.websockets {
            return invalid(
                "event_hubs_proxy",
                "needs websockets = true: a proxy carries AMQP over WebSockets (port 443), as with the \
                 Azure SDKs' http_proxy",
            );
        }
        Ok(())
    }

    /// Each schema is for a served hub. (Its file is read and compiled when the gateway is prepared.)
    fn validate_schemas(&self) -> Result<(), ConfigError> {
        let hubs = self.hubs();
        for (hub, path) in &self.schemas {
            if !hubs.contains(hub) {
                return invalid(
                    &format!("schemas.{hub}"),
                    &format!("is not a served hub (the hubs: {})", hubs.join(", ")),
                );
            }
            if path.as_os_str().is_empty() {
                return invalid(&format!("schemas.{hub}"), "must name a JSON Schema file");
            }
        }
        Ok(())
    }

    /// The gRPC and metrics listeners are two sockets.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        if self.metrics_listen == self.listen && self.listen.port() != 0 {
            return invalid(
                "metrics_listen",
                "must differ from listen (the gRPC listener)",
            );
        }
        if let Some(http) = self.http_listen
            && http.port() != 0
        {
            if http == self.listen {
                return invalid("http_listen", "must differ from listen (the gRPC listener)");
            }
            if http == self.metrics_listen {
                return invalid(
                    "http_listen",
                    "must differ from metrics_listen (the metrics and probes listener)",
                );
            }
        }
        Ok(())
    }

    /// The hubs served: the configured ones, or `eh1` alone for an emulator configured with none.
    pub fn hubs(&self) -> Vec<String> {
        if self.event_hubs.is_empty() {
            vec!["eh1".to_owned()]
        } else {
            self.event_hubs.clone()
        }
    }

    /// Where Event Hubs is and how to authenticate, reading the connection string file if one is named.
    pub fn source(&self) -> Result<EventHubsSource, ConfigError> {
        if self.emulator {
            return Ok(EventHubsSource::Emulator);
        }
        if let Some(text) = &self.connection_string {
            return Ok(EventHubsSource::ConnectionString(text.clone()));
        }
        if let Some(path) = &self.connection_string_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
                field: "connection_string_file",
                path: path.clone(),
                source,
            })?;
            return Ok(EventHubsSource::ConnectionString(text.trim().to_owned()));
        }
        match &self.namespace {
            Some(namespace) => Ok(EventHubsSource::Namespace {
                namespace: namespace.clone(),
                credential: self.credential,
            }),
            None => Err(ConfigError::invalid(
                "connection_string",
                "no Event Hubs source configured",
            )),
        }
    }

    /// The proxy toward `host:port` over WebSockets: `event_hubs_proxy` (its password file read), else
    /// `HTTPS_PROXY` unless `NO_PROXY` covers the host (lower-case names too), as curl and the Azure SDKs do.
    /// `env` reads a variable (the process environment in `serve`).
    pub fn proxy_for(
        &self,
        host: &str,
        port: u16,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<HttpProxy>, ConfigError> {
        if let Some(settings) = &self.event_hubs_proxy {
            let mut proxy = parse_proxy_url(&settings.url)
                .map_err(|problem| ConfigError::invalid("event_hubs_proxy.url", problem))?;
            let password = match (&settings.password, &settings.password_file) {
                (Some(password), _) => Some(password.clone()),
                (None, Some(path)) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|source| ConfigError::Unreadable {
                            field: "event_hubs_proxy.password_file",
                            path: path.clone(),
                            source,
                        })?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                (None, None) => None,
            };
            proxy.credentials = settings.username.clone().map(|username| ProxyCredentials {
                username,
                password: password.unwrap_or_default(),
            });
            return Ok(Some(proxy));
        }
        let variable = |name: &str| {
            env(name)
                .or_else(|| env(&name.to_ascii_lowercase()))
                .filter(|value| !value.trim().is_empty())
        };
        let Some(url) = variable("HTTPS_PROXY") else {
            return Ok(None);
        };
        if let Some(list) = variable("NO_PROXY")
            && no_proxy_covers(&list, host, port)
        {
            return Ok(None);
        }
        parse_proxy_url(&url)
            .map(Some)
            .map_err(|problem| ConfigError::invalid("HTTPS_PROXY", problem))
    }
}

/// A refused value of `field`, as the `Err` of a check.
fn invalid(field: &str, problem: &str) -> Result<(), ConfigError> {
    Err(ConfigError::invalid(field, problem))
}

/// Parses `[http://][user:password@]host[:port][/]`; the port defaults to 80. Errors never echo the URL,
/// which may hold a password.
fn parse_proxy_url(url: &str) -> Result<HttpProxy, String> {
    let url = url.trim();
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(
                "https:// proxies are not supported: use http:// (the tunnel itself still \
                        carries TLS end to end)"
                    .into(),
            );
        }
        Some(_) => return Err("the scheme must be http://".into()),
        None => url,
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') || authority.contains('#') {
        return Err("must be http://host:port with no path".into());
    }
    let (credentials, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => {
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8()
                    .map(|text| text.into_owned())
                    .map_err(|_| "its user name or password is not UTF-8 once decoded".to_owned())
            };
            let (username, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (
                Some(ProxyCredentials {
                    username: decode(username)?,
                    password: decode(password)?,
                }),
                host_port,
            )
        }
        None => (None, authority),
    };
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| "an IPv6 address must end with ']'".to_owned())?;
        (host, after.strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("has no host".into());
    }
    let port = match port {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| "its port must be a number from 1 to 65535".to_owned())?,
        None => 80,
    };
    Ok(HttpProxy {
        host: host.to_owned(),
        port,
        credentials,
    })
}

/// Whether a `NO_PROXY` list (comma-separated: `*`, `host`, `.domain`, `domain` (covers its subdomains), each
/// with an optional `:port`) covers `host:port`.
fn no_proxy_covers(list: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = match entry.rsplit_once(':') {
                Some((name, entry_port)) if !name.contains(':') || name.ends_with(']') => {
                    (name, entry_port.parse::<u16>().ok())
                }
                _ => (entry, None),
            };
            if entry_port.is_some_and(|entry_port| entry_port != port) {
                return false;
            }
            let name = name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .trim_start_matches('*')
                .trim_start_matches('.')
                .to_ascii_lowercase();
            !name.is_empty() && (host == name || host.ends_with(&format!(".{name}")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn no_env() -> Env {
        Env::prefixed("EVENTHUB_GATEWAY_TEST_NOTHING_")
    }

    fn flags(pairs: &[(&str, serde_json::Value)]) -> Figment {
        pairs.iter().fold(Figment::new(), |figment, (key, value)| {
            figment.merge(Serialized::default(key, value.clone()))
        })
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own error type
    fn flags_beat_the_environment_which_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            "event_hubs = [\"from-file\"]\nemulator = true\n[producer]\nmax_size = 3\nlinger_ms = 7.0\n\
             [limits]\nmax_unacked_per_stream = 5\n",
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("EVENTHUB_GATEWAY_PRODUCER__MAX_SIZE", "6");
            jail.set_env("EVENTHUB_GATEWAY_LIMITS__MAX_UNACKED_PER_STREAM", "9");
            let config = GatewayConfig::load(
                Some(&file),
                flags(&[("limits.max_unacked_per_stream", 11.into())]),
            )
            .unwrap();
            assert_eq!(config.event_hubs, ["from-file"]);
            assert_eq!(config.producer.max_size, 6, "environment over file");
            assert_eq!(
                config.producer.linger,
                Duration::from_millis(7),
                "file over defaults"
            );
            assert_eq!(config.limits.max_unacked_per_stream, 11, "flags over all");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own error type
    fn the_metrics_listener_comes_from_the_environment_and_must_not_be_the_grpc_one() {
        figment::Jail::expect_with(|jail| {
            let config = GatewayConfig::load(None, flags(&[("emulator", true.into())])).unwrap();
            assert_eq!(config.metrics_listen.to_string(), "127.0.0.1:9464");
            jail.set_env("EVENTHUB_GATEWAY_METRICS_LISTEN", "0.0.0.0:0");
            let config = GatewayConfig::load(None, flags(&[("emulator", true.into())])).unwrap();
            assert_eq!(config.metrics_listen.to_string(), "0.0.0.0:0");
            jail.set_env("EVENTHUB_GATEWAY_METRICS_LISTEN", "127.0.0.1:50051");
            let error = GatewayConfig::load(None, flags(&[("emulator", true.into())])).unwrap_err();
            assert!(error.to_string().contains("metrics_listen"), "{error}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own error type
    fn the_rest_listener_is_off_by_default_and_must_not_share_a_port() {
        figment::Jail::expect_with(|jail| {
            let config = GatewayConfig::load(None, flags(&[("emulator", true.into())])).unwrap();
            assert_eq!(config.http_listen, None);
            jail.set_env("EVENTHUB_GATEWAY_HTTP_LISTEN", "127.0.0.1:8080");
            let config = GatewayConfig::load(None, flags(&[("emulator", true.into())])).unwrap();
            assert_eq!(
                config.http_listen.map(|a| a.to_string()).as_deref(),
                Some("127.0.0.1:8080")
            );
            jail.set_env("EVENTHUB_GATEWAY_HTTP_LISTEN", "127.0.0.1:9464");
            let error = GatewayConfig::load(None, flags(&[("emulator", true.into())])).unwrap_err();
            assert!(error.to_string().contains("http_listen"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn every_field_is_a_setting_in_any_case_and_nothing_else_is() {
        for key in [
            "listen",
            "METRICS_LISTEN",
            "tls.cert",
            "limits.max_events_per_request",
            "producer.max_size",
        ] {
            assert!(is_setting(key), "{key}");
        }
        for key in ["bin", "service_host", "port", "log_format"] {
            assert!(!is_setting(key), "{key}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own error type
    fn foreign_variables_with_the_prefix_are_ignored_but_typos_in_sections_are_not() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("EVENTHUB_GATEWAY_SERVICE_HOST", "10.0.0.1");
            jail.set_env("EVENTHUB_GATEWAY_PORT", "tcp://10.0.0.1:50051");
            jail.set_env("EVENTHUB_GATEWAY_EMULATOR", "true");
            let config = GatewayConfig::load(None, Figment::new()).unwrap();
            assert!(config.emulator);
            assert!(
                GatewayConfig::ignored_environment()
                    .contains(&"EVENTHUB_GATEWAY_SERVICE_HOST".to_owned())
            );
            jail.set_env("EVENTHUB_GATEWAY_LIMITS__MAX_EVNETS", "3");
            let error = GatewayConfig::load(None, Figment::new()).unwrap_err();
            assert!(error.to_string().contains("max_evnets"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn yaml_files_are_read_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.yaml");
        std::fs::write(
            &file,
            "event_hubs: [a, b]\nconnection_string: \"Endpoint=sb://x/;SharedAccessKeyName=n;SharedAccessKey=k\"\n",
        )
        .unwrap();
        let config = GatewayConfig::load_with_env(Some(&file), no_env(), Figment::new()).unwrap();
        assert_eq!(config.event_hubs, ["a", "b"]);
    }

    #[test]
    fn errors_name_the_setting() {
        let cases: Vec<(Figment, &str)> = vec![
            (flags(&[("emulator", true.into())]), ""),
            (flags(&[]), "event_hubs"),
            (
                flags(&[("event_hubs", vec!["eh1"].into())]),
                "connection_string",
            ),
            (
                flags(&[
                    ("emulator", true.into()),
                    ("namespace", "x.servicebus.windows.net".into()),
                ]),
                "connection_string",
            ),
            (
                flags(&[
                    ("emulator", true.into()),
                    ("event_hubs", vec!["a/b"].into()),
                ]),
                "event_hubs[0]",
            ),
            (
                flags(&[
                    ("emulator", true.into()),
                    ("limits.max_request_bytes", 1000.into()),
                ]),
                "limits.max_request_bytes",
            ),
            (
                flags(&[("emulator", true.into()), ("producer.max_size", 0.into())]),
                "producer.max_size",
            ),
            (
                flags(&[
                    ("emulator", true.into()),
                    ("limits.http2_connection_window_bytes", (1024 * 1024).into()),
                ]),
                "limits.http2_connection_window_bytes",
            ),
            (
                flags(&[
                    ("emulator", true.into()),
                    ("limits.http2_max_concurrent_streams", 0.into()),
                ]),
                "limits.http2_max_concurrent_streams",
            ),
        ];
        for (overrides, field) in cases {
            let result = GatewayConfig::load_with_env(None, no_env(), overrides);
            match (result, field) {
                (Ok(_), "") => {}
                (Err(ConfigError::Invalid { field: found, .. }), expected) => {
                    assert_eq!(found, expected)
                }
                (other, expected) => panic!("{expected}: {other:?}"),
            }
        }
    }

    fn toml(text: &str) -> Result<GatewayConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, format!("emulator = true\n{text}")).unwrap();
        GatewayConfig::load_with_env(Some(&file), no_env(), Figment::new())
    }

    #[test]
    fn schemas_name_served_hubs() {
        let config = toml("event_hubs = [\"a\", \"b\"]\n[schemas]\nb = \"/s/b.json\"\n").unwrap();
        assert_eq!(config.schemas["b"], PathBuf::from("/s/b.json"));
        invalid_problem(
            "event_hubs = [\"a\"]\n[schemas]\nc = \"/s/c.json\"\n",
            "schemas.c",
            "is not a served hub (the hubs: a)",
        );
        invalid_problem(
            "event_hubs = [\"a\"]\n[schemas]\na = \"\"\n",
            "schemas.a",
            "must name a JSON Schema file",
        );
    }

    /// The problem of a config `text` refused for `field`, checked to contain `problem`.
    fn invalid_problem(text: &str, field: &str, problem: &str) -> String {
        match toml(text) {
            Err(ConfigError::Invalid {
                field: found,
                problem: text,
            }) => {
                assert_eq!(found, field, "{text}");
                assert!(text.contains(problem), "{field}: {text}");
                text
            }
            other => panic!("{field}: {other:?}"),
        }
    }

    #[test]
    fn durations_are_humantime_strings_or_numbers_under_the_documented_keys() {
        let config = toml(
            "drain_timeout_seconds = \"1m 30s\"\n\
             [limits]\nstream_idle_timeout_seconds = \"30s\"\n\
             [producer]\npool_get_timeout = 2.5\nlinger_ms = \"250ms\"\nmax_idle_seconds = 300\n\
             retry_max_backoff_ms = 2000\nsend_timeout = \"45s\"\n",
        )
        .unwrap();
        assert_eq!(config.drain_timeout, Duration::from_secs(90));
        assert_eq!(config.limits.stream_idle_timeout, Duration::from_secs(30));
        assert_eq!(
            config.producer.pool_get_timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(config.producer.linger, Duration::from_millis(250));
        assert_eq!(config.producer.max_idle, Duration::from_secs(300));
        assert_eq!(config.producer.retry_max_backoff, Duration::from_secs(2));
        assert_eq!(config.producer.send_timeout, Duration::from_secs(45));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment's own error type
    fn durations_come_from_the_environment_in_either_form() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("EVENTHUB_GATEWAY_EMULATOR", "true");
            jail.set_env("EVENTHUB_GATEWAY_PRODUCER__STALL_TIMEOUT", "1500ms");
            jail.set_env("EVENTHUB_GATEWAY_DRAIN_TIMEOUT_SECONDS", "2.5");
            let config = GatewayConfig::load(None, Figment::new()).unwrap();
            assert_eq!(config.producer.stall_timeout, Duration::from_millis(1500));
            assert_eq!(config.drain_timeout, Duration::from_millis(2500));
            jail.set_env("EVENTHUB_GATEWAY_PRODUCER__STALL_TIMEOUT", "soon");
            let error = GatewayConfig::load(None, Figment::new()).unwrap_err();
            assert!(
                error.to_string().starts_with(
                    "configuration: producer.stall_timeout: \"soon\" is not a duration"
                ),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_value_that_does_not_parse_names_its_setting_and_its_file() {
        for (text, field, problem) in [
            (
                "[producer]\npool_get_timeout = \"30x\"\n",
                "producer.pool_get_timeout",
                "\"30x\" is not a duration (\"30s\", \"250ms\", \"1m 30s\") or a number of seconds",
            ),
            (
                "[limits]\nstream_idle_timeout_seconds = -1\n",
                "limits.stream_idle_timeout_seconds",
                "must not be negative",
            ),
            (
                "[limits]\nglobal_events_per_second = 0\n",
                "limits.global_events_per_second",
                "must be at least 1 when set (leave it unset for no limit)",
            ),
            (
                "[producer]\nrate_limit_events_per_second = 0\n",
                "producer.rate_limit_events_per_second",
                "must be at least 1 when set",
            ),
            (
                "[limits]\nmax_evnets = 3\n",
                "limits.max_evnets",
                "unknown field: found `max_evnets`",
            ),
            (
                "[producer]\nmax_size = \"four\"\n",
                "producer.max_size",
                "invalid type",
            ),
        ] {
            let text = invalid_problem(text, field, problem);
            assert!(text.contains("gateway.toml"), "{field}: {text}");
        }
        let config = toml("[limits]\nclient_events_per_second = 50\n").unwrap();
        assert_eq!(
            config.limits.client_events_per_second,
            std::num::NonZeroU32::new(50)
        );
        assert!(matches!(toml("[limits\n"), Err(ConfigError::Load(_))));
    }

    #[test]
    fn a_connection_age_reads_its_duration_and_its_grace_must_cover_the_send_timeout() {
        let config = toml("[limits]\nmax_connection_age_seconds = \"30m\"\n").unwrap();
        assert_eq!(
            config.limits.max_connection_age,
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            config.limits.max_connection_age_grace,
            Duration::from_secs(60)
        );
        assert_eq!(toml("").unwrap().limits.max_connection_age, None);
        for (text, field, problem) in [
            (
                "[limits]\nmax_connection_age_seconds = 0.5\n",
                "limits.max_connection_age_seconds",
                "must be between 1 s and 2592000 s (30 days), or unset for no age",
            ),
            (
                "[limits]\nmax_connection_age_seconds = 60\nmax_connection_age_grace_seconds = 10\n",
                "limits.max_connection_age_grace_seconds",
                "must be at least producer.send_timeout (60s) when limits.max_connection_age_seconds is set",
            ),
            (
                "[limits]\nmax_connection_age_grace_seconds = 100000\n",
                "limits.max_connection_age_grace_seconds",
                "must be between 1 s and 86400 s (a day)",
            ),
        ] {
            invalid_problem(text, field, problem);
        }
        // A shorter send timeout allows a shorter grace; without an age the grace is not checked against it.
        toml("[limits]\nmax_connection_age_seconds = 60\nmax_connection_age_grace_seconds = 10\n[producer]\nsend_timeout = 10\n")
            .unwrap();
        toml("[limits]\nmax_connection_age_grace_seconds = 10\n").unwrap();
    }

    #[test]
    fn unknown_settings_are_refused_with_their_name() {
        let error = GatewayConfig::load_with_env(
            None,
            no_env(),
            flags(&[("emulator", true.into()), ("limits.max_evnets", 3.into())]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("max_evnets"), "{error}");
    }

    #[test]
    fn the_helm_charts_config_values_are_the_gateways_settings_with_its_defaults() {
        // helm/eventhub-gateway/values.yaml writes `config.limits` and `config.producer` into the ConfigMap as
        // they are: every key must be a setting, every setting a key, each default the gateway's own.
        let values =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/eventhub-gateway/values.yaml");
        let chart = Figment::from(Yaml::file_exact(values));
        let keys = |value: serde_json::Value| -> Vec<String> {
            let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        let defaults = GatewayConfig::default();
        for (section, expected) in [
            ("limits", serde_json::to_value(&defaults.limits).unwrap()),
            (
                "producer",
                serde_json::to_value(&defaults.producer).unwrap(),
            ),
        ] {
            let path = format!("config.{section}");
            let found: serde_json::Value = chart.extract_inner(&path).unwrap();
            assert_eq!(keys(found), keys(expected), "{path}");
        }
        let limits: Limits = chart.extract_inner("config.limits").unwrap();
        assert_eq!(limits, defaults.limits);
        let producer: ProducerConfig = chart.extract_inner("config.producer").unwrap();
        assert_eq!(producer, defaults.producer);
        let drain: f64 = chart.extract_inner("config.drain_timeout_seconds").unwrap();
        assert_eq!(Duration::from_secs_f64(drain), defaults.drain_timeout);
        let partitions: u32 = chart.extract_inner("emulator.partitions").unwrap();
        assert_eq!(partitions, defaults.emulator_partitions);
    }

    #[test]
    fn proxy_urls_parse_with_credentials_ports_and_ipv6_and_errors_never_echo_them() {
        let proxy = parse_proxy_url("http://us%40er:p%3Ass@proxy.corp:3128/").unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.corp", 3128));
        let credentials = proxy.credentials.unwrap();
        assert_eq!(
            (credentials.username.as_str(), credentials.password.as_str()),
            ("us@er", "p:ss")
        );
        let bare = parse_proxy_url("proxy.corp").unwrap();
        assert_eq!((bare.port, bare.credentials), (80, None));
        let v6 = parse_proxy_url("http://[::1]:8080").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8080));
        assert_eq!(v6.address(), "http://[::1]:8080");
        for bad in [
            "https://u:SECRET@proxy:443",
            "socks5://u:SECRET@proxy:1080",
            "http://u:SECRET@proxy:99999",
            "http://u:SECRET@proxy:3128/path",
            "http://u:SECRET@:3128",
        ] {
            let reason = parse_proxy_url(bad).unwrap_err();
            assert!(!reason.contains("SECRET"), "{bad}: {reason}");
        }
    }

    #[test]
    fn no_proxy_matches_hosts_domains_ports_and_star() {
        for (list, host, port, covered) in [
            ("localhost", "localhost", 443, true),
            ("example.com", "ns.example.com", 443, true),
            (
                ".servicebus.windows.net",
                "ns.servicebus.windows.net",
                443,
                true,
            ),
            (
                "*.servicebus.windows.net",
                "ns.servicebus.windows.net",
                443,
                true,
            ),
            (
                "servicebus.windows.net:5671",
                "ns.servicebus.windows.net",
                443,
                false,
            ),
            (
                "servicebus.windows.net:443",
                "ns.servicebus.windows.net",
                443,
                true,
            ),
            ("ample.com", "example.com", 443, false),
            ("a.com, *", "b.org", 1, true),
            ("", "localhost", 443, false),
            ("::1,[::2]:443", "::2", 443, true),
        ] {
            assert_eq!(
                no_proxy_covers(list, host, port),
                covered,
                "{list:?} {host}:{port}"
            );
        }
    }

    #[test]
    fn the_configured_proxy_beats_https_proxy_which_no_proxy_can_bypass() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| (*value).to_owned())
            }
        };
        let config = GatewayConfig::default();
        let host = "ns.servicebus.windows.net";
        assert_eq!(config.proxy_for(host, 443, env(&[])).unwrap(), None);
        let from_env = config
            .proxy_for(host, 443, env(&[("https_proxy", "http://p:1")]))
            .unwrap()
            .unwrap();
        assert_eq!((from_env.host.as_str(), from_env.port), ("p", 1));
        let bypassed = config
            .proxy_for(
                host,
                443,
                env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", ".windows.net")]),
            )
            .unwrap();
        assert_eq!(bypassed, None);
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, "pa ss\n").unwrap();
        let configured = GatewayConfig {
            event_hubs_proxy: Some(ProxySettings {
                url: "http://configured:3128".into(),
                username: Some("user".into()),
                password: None,
                password_file: Some(password_file),
            }),
            ..GatewayConfig::default()
        };
        let proxy = configured
            .proxy_for(
                host,
                443,
                env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*")]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(proxy.host, "configured");
        assert_eq!(proxy.credentials.unwrap().password, "pa ss");
        let error = config
            .proxy_for(host, 443, env(&[("HTTPS_PROXY", "ftp://u:SECRET@p")]))
            .unwrap_err();
        assert!(error.to_string().contains("HTTPS_PROXY"), "{error}");
        assert!(!error.to_string().contains("SECRET"), "{error}");
        assert!(!format!("{configured:?}").contains("pa ss"));
    }

    #[test]
    fn proxy_settings_are_checked_with_their_names() {
        let with_proxy = |proxy: ProxySettings, websockets: bool| GatewayConfig {
            event_hubs: vec!["eh1".into()],
            connection_string: Some(
                "Endpoint=sb://x/;SharedAccessKeyName=n;SharedAccessKey=k".into(),
            ),
            websockets,
            event_hubs_proxy: Some(proxy),
            ..GatewayConfig::default()
        };
        let proxy = ProxySettings {
            url: "http://proxy:3128".into(),
            username: None,
            password: None,
            password_file: None,
        };
        with_proxy(proxy.clone(), true).validate().unwrap();
        let cases = [
            (with_proxy(proxy.clone(), false), "event_hubs_proxy"),
            (
                with_proxy(
                    ProxySettings {
                        url: "http://u:SECRET@proxy:3128".into(),
                        ..proxy.clone()
                    },
                    true,
                ),
                "event_hubs_proxy.url",
            ),
            (
                with_proxy(
                    ProxySettings {
                        password: Some("SECRET".into()),
                        ..proxy.clone()
                    },
                    true,
                ),
                "event_hubs_proxy.username",
            ),
            (
                with_proxy(
                    ProxySettings {
                        username: Some("u".into()),
                        password: Some("SECRET".into()),
                        password_file: Some("/p".into()),
                        ..proxy.clone()
                    },
                    true,
                ),
                "event_hubs_proxy.password",
            ),
        ];
        for (config, expected) in cases {
            match config.validate() {
                Err(ConfigError::Invalid { field, problem }) => {
                    assert_eq!(field, expected, "{problem}");
                    assert!(!problem.contains("SECRET"));
                }
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_connection_string_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cs");
        std::fs::write(
            &file,
            "Endpoint=sb://x/;SharedAccessKeyName=n;SharedAccessKey=k\n",
        )
        .unwrap();
        let config = GatewayConfig {
            event_hubs: vec!["eh1".into()],
            connection_string_file: Some(file),
            ..GatewayConfig::default()
        };
        assert_eq!(
            config.source().unwrap(),
            EventHubsSource::ConnectionString(
                "Endpoint=sb://x/;SharedAccessKeyName=n;SharedAccessKey=k".into()
            )
        );
    }
}
