//! Event Hubs connection strings in every form the Azure SDKs accept, parsed without ever echoing a secret.

use std::fmt;

/// The secret part of a connection string.
#[derive(Clone, PartialEq, Eq)]
pub enum SharedAccess {
    /// A key name and key: tokens are signed locally.
    Key {
        /// `SharedAccessKeyName`.
        name: String,
        /// `SharedAccessKey`.
        key: String,
    },
    /// A ready-made `SharedAccessSignature` token (it cannot be renewed).
    Signature(String),
}

impl fmt::Debug for SharedAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Key { name, .. } => write!(f, "Key {{ name: {name:?}, key: <redacted> }}"),
            Self::Signature(_) => f.write_str("Signature(<redacted>)"),
        }
    }
}

/// A parsed connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionString {
    /// The namespace's host name (`<ns>.servicebus.windows.net`, or `localhost` for an emulator).
    pub host: String,
    /// The endpoint's explicit port, if it names one.
    pub port: Option<u16>,
    /// `EntityPath`: the hub this string is scoped to.
    pub entity_path: Option<String>,
    /// How to authenticate.
    pub shared_access: SharedAccess,
    /// `UseDevelopmentEmulator=true`: plain AMQP (port 5672 unless the endpoint names one).
    pub use_development_emulator: bool,
}

/// What is wrong with a connection string. Never holds a key or signature.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    /// A `;`-separated part has no `=`.
    #[error("connection string part {index} is not Key=Value")]
    NotKeyValue {
        /// 1-based position of the part.
        index: usize,
    },
    /// A required key is missing.
    #[error("connection string has no {0}")]
    Missing(&'static str),
    /// A key appears twice.
    #[error("connection string has {0} twice")]
    Duplicate(String),
    /// `Endpoint` is not `sb://host[:port][/]`.
    #[error(
        "connection string Endpoint must look like sb://<namespace>.servicebus.windows.net/: {0}"
    )]
    BadEndpoint(&'static str),
    /// Both a key and a signature are given, or a key without its name.
    #[error(
        "connection string must have SharedAccessKeyName with SharedAccessKey, or SharedAccessSignature, not {0}"
    )]
    Credentials(&'static str),
    /// `UseDevelopmentEmulator` is neither true nor false.
    #[error("connection string UseDevelopmentEmulator must be true or false")]
    BadEmulatorFlag,
}

impl std::str::FromStr for ConnectionString {
    type Err = ConnectionStringError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut signature = None;
        let mut entity_path = None;
        let mut emulator = None;
        for (index, part) in text.split(';').enumerate() {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (name, value) = part
                .split_once('=')
                .ok_or(ConnectionStringError::NotKeyValue { index: index + 1 })?;
            let name = name.trim();
            let slot = match name.to_ascii_lowercase().as_str() {
                "endpoint" => &mut endpoint,
                "sharedaccesskeyname" => &mut key_name,
                "sharedaccesskey" => &mut key,
                "sharedaccesssignature" => &mut signature,
                "entitypath" => &mut entity_path,
                "usedevelopmentemulator" => &mut emulator,
                // The SDKs ignore keys they do not know (e.g. TransportType in older strings).
                _ => continue,
            };
            if slot.replace(value.trim().to_owned()).is_some() {
                return Err(ConnectionStringError::Duplicate(name.to_owned()));
            }
        }
        let endpoint = endpoint.ok_or(ConnectionStringError::Missing("Endpoint"))?;
        let (host, port) = parse_endpoint(&endpoint)?;
        let shared_access = match (key_name, key, signature) {
            (Some(name), Some(key), None) if !name.is_empty() && !key.is_empty() => {
                SharedAccess::Key { name, key }
            }
            (None, None, Some(signature)) if !signature.is_empty() => {
                SharedAccess::Signature(signature)
            }
            (None, None, None) => {
                return Err(ConnectionStringError::Missing(
                    "SharedAccessKeyName/SharedAccessKey or SharedAccessSignature",
                ));
            }
            (_, _, Some(_)) => return Err(ConnectionStringError::Credentials("both")),
            _ => return Err(ConnectionStringError::Credentials("an incomplete key pair")),
        };
        let use_development_emulator = match emulator.as_deref().map(str::to_ascii_lowercase) {
            None => false,
            Some(flag) if flag == "true" => true,
            Some(flag) if flag == "false" => false,
            Some(_) => return Err(ConnectionStringError::BadEmulatorFlag),
        };
        Ok(Self {
            host,
            port,
            entity_path: entity_path.filter(|path| !path.is_empty()),
            shared_access,
            use_development_emulator,
        })
    }
}

fn parse_endpoint(endpoint: &str) -> Result<(String, Option<u16>), ConnectionStringError> {
    let rest = endpoint
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or(ConnectionStringError::BadEndpoint("no scheme"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(ConnectionStringError::BadEndpoint("no host"));
    }
    if authority.contains('@') {
        return Err(ConnectionStringError::BadEndpoint(
            "credentials belong in SharedAccessKey",
        ));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => port
            .parse::<u16>()
            .map(|port| (host.to_owned(), Some(port)))
            .map_err(|_| ConnectionStringError::BadEndpoint("port is not a number")),
        Some(_) => Err(ConnectionStringError::BadEndpoint("no host")),
        None => Ok((authority.to_owned(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_the_sdks_accept_are_parsed() {
        let parsed: ConnectionString = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc=;EntityPath=eh1"
            .parse()
            .unwrap();
        assert_eq!(parsed.host, "ns.servicebus.windows.net");
        assert_eq!(parsed.port, None);
        assert_eq!(parsed.entity_path.as_deref(), Some("eh1"));
        assert_eq!(
            parsed.shared_access,
            SharedAccess::Key {
                name: "send".into(),
                key: "abc=".into()
            }
        );
        assert!(!parsed.use_development_emulator);

        let emulator: ConnectionString = "Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
            .parse()
            .unwrap();
        assert!(emulator.use_development_emulator);
        assert_eq!((emulator.host.as_str(), emulator.port), ("localhost", None));

        let signed: ConnectionString =
            "endpoint=sb://localhost:5673/;sharedaccesssignature=SharedAccessSignature sr=a&sig=b&se=1&skn=c"
                .parse()
                .unwrap();
        assert_eq!(signed.port, Some(5673));
        assert!(
            matches!(signed.shared_access, SharedAccess::Signature(ref s) if s.starts_with("SharedAccessSignature "))
        );
    }

    #[test]
    fn malformed_strings_name_the_fault_and_never_the_key() {
        let cases = [
            (
                "SharedAccessKeyName=a;SharedAccessKey=SECRET",
                ConnectionStringError::Missing("Endpoint"),
            ),
            (
                "Endpoint=localhost;SharedAccessKeyName=a;SharedAccessKey=SECRET",
                ConnectionStringError::BadEndpoint("no scheme"),
            ),
            (
                "Endpoint=sb://h:x;SharedAccessKeyName=a;SharedAccessKey=SECRET",
                ConnectionStringError::BadEndpoint("port is not a number"),
            ),
            (
                "Endpoint=sb://h;SharedAccessKey=SECRET",
                ConnectionStringError::Credentials("an incomplete key pair"),
            ),
            (
                "Endpoint=sb://h;SharedAccessKeyName=a;SharedAccessKey=SECRET;SharedAccessSignature=SECRET",
                ConnectionStringError::Credentials("both"),
            ),
            (
                "Endpoint=sb://h;SECRET",
                ConnectionStringError::NotKeyValue { index: 2 },
            ),
            (
                "Endpoint=sb://h;SharedAccessKeyName=a;SharedAccessKey=SECRET;UseDevelopmentEmulator=yes",
                ConnectionStringError::BadEmulatorFlag,
            ),
            (
                "Endpoint=sb://h;Endpoint=sb://i;SharedAccessKeyName=a;SharedAccessKey=SECRET",
                ConnectionStringError::Duplicate("Endpoint".into()),
            ),
        ];
        for (text, expected) in cases {
            let error = text.parse::<ConnectionString>().unwrap_err();
            assert_eq!(error, expected, "{text}");
            assert!(!error.to_string().contains("SECRET"), "{error}");
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let parsed: ConnectionString =
            "Endpoint=sb://h;SharedAccessKeyName=a;SharedAccessKey=SECRET"
                .parse()
                .unwrap();
        assert!(!format!("{parsed:?}").contains("SECRET"));
    }
}
