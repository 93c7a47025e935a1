//! Link addresses and CBS audiences: which Event Hubs entity a link or a token names.
//!
//! The SDKs use bare paths (`eh1/Partitions/0`) and URIs (`amqps://ns.servicebus.windows.net/eh1`)
//! interchangeably; segment names (`Partitions`, `ConsumerGroups`) are case-insensitive, as are entity names.

/// The entity a link address names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityAddress {
    /// The `$cbs` node.
    Cbs,
    /// The `$management` node.
    Management,
    /// A hub: the service routes each event (round-robin or by partition key).
    Hub {
        /// The hub's name as written in the address.
        hub: String,
    },
    /// One partition of a hub, for sending.
    Partition {
        /// The hub's name as written in the address.
        hub: String,
        /// The partition id.
        partition: String,
    },
    /// One partition of a hub seen through a consumer group, for receiving.
    ConsumerPartition {
        /// The hub's name as written in the address.
        hub: String,
        /// The consumer group's name.
        consumer_group: String,
        /// The partition id.
        partition: String,
    },
}

/// An address that names no Event Hubs entity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the address {0:?} is not a hub, a partition, a consumer group partition, $cbs or $management"
)]
pub struct UnknownAddress(pub String);

impl EntityAddress {
    /// Parses a link source or target address.
    pub fn parse(address: &str) -> Result<Self, UnknownAddress> {
        let segments: Vec<&str> = path_of(address)
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let unknown = || UnknownAddress(address.to_owned());
        let owned = |s: &str| s.to_owned();
        match segments.as_slice() {
            [node] if node.eq_ignore_ascii_case(super::CBS_NODE) => Ok(Self::Cbs),
            [node] if node.eq_ignore_ascii_case(super::MANAGEMENT_NODE) => Ok(Self::Management),
            [_, node] if node.eq_ignore_ascii_case(super::MANAGEMENT_NODE) => Ok(Self::Management),
            [hub] if !hub.starts_with('$') => Ok(Self::Hub { hub: owned(hub) }),
            [hub, partitions, partition] if partitions.eq_ignore_ascii_case("partitions") => {
                Ok(Self::Partition {
                    hub: owned(hub),
                    partition: owned(partition),
                })
            }
            [hub, groups, group, partitions, partition]
                if groups.eq_ignore_ascii_case("consumergroups")
                    && partitions.eq_ignore_ascii_case("partitions") =>
            {
                Ok(Self::ConsumerPartition {
                    hub: owned(hub),
                    consumer_group: owned(group),
                    partition: owned(partition),
                })
            }
            _ => Err(unknown()),
        }
    }

    /// The hub this address belongs to, if any.
    pub fn hub(&self) -> Option<&str> {
        match self {
            Self::Hub { hub }
            | Self::Partition { hub, .. }
            | Self::ConsumerPartition { hub, .. } => Some(hub),
            Self::Cbs | Self::Management => None,
        }
    }

    /// The path a CBS token must cover to use this entity, lower-cased: the whole entity path, so a token
    /// for the hub, the consumer group or (as the JS SDK puts them) the exact link address all cover it.
    pub fn authorization_path(&self) -> Option<String> {
        let path = match self {
            Self::Hub { hub } => hub.clone(),
            Self::Partition { hub, partition } => format!("{hub}/partitions/{partition}"),
            Self::ConsumerPartition {
                hub,
                consumer_group,
                partition,
            } => {
                format!("{hub}/consumergroups/{consumer_group}/partitions/{partition}")
            }
            Self::Cbs | Self::Management => return None,
        };
        Some(path.to_ascii_lowercase())
    }
}

/// The entity path of an audience or resource URI (`sb://ns/eh1/` -> `eh1`), lower-cased, without the host.
pub fn audience_path(audience: &str) -> String {
    path_of(audience).trim_matches('/').to_ascii_lowercase()
}

/// Whether a token for `granted` (an audience path) lets its holder use `requested`: equal, or a parent
/// at a segment boundary (`""` is the whole namespace).
pub fn path_covers(granted: &str, requested: &str) -> bool {
    granted.is_empty()
        || requested == granted
        || (requested.starts_with(granted)
            && requested.as_bytes().get(granted.len()) == Some(&b'/'))
}

/// Strips `scheme://host[:port]` from a URI; a bare path is returned as is.
fn path_of(address: &str) -> &str {
    match address.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |slash| &rest[slash..]),
        None => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_address_form_the_sdks_use() {
        let hub = EntityAddress::Hub { hub: "eh1".into() };
        assert_eq!(EntityAddress::parse("eh1"), Ok(hub.clone()));
        assert_eq!(
            EntityAddress::parse("amqps://ns.servicebus.windows.net/eh1"),
            Ok(hub.clone())
        );
        assert_eq!(EntityAddress::parse("amqp://localhost:5672/eh1/"), Ok(hub));
        let partition = EntityAddress::Partition {
            hub: "eh1".into(),
            partition: "3".into(),
        };
        assert_eq!(
            EntityAddress::parse("eh1/Partitions/3"),
            Ok(partition.clone())
        );
        assert_eq!(
            EntityAddress::parse("amqps://ns/eh1/partitions/3"),
            Ok(partition)
        );
        assert_eq!(
            EntityAddress::parse("amqps://ns/eh1/ConsumerGroups/$Default/Partitions/0"),
            Ok(EntityAddress::ConsumerPartition {
                hub: "eh1".into(),
                consumer_group: "$Default".into(),
                partition: "0".into()
            })
        );
        assert_eq!(EntityAddress::parse("$cbs"), Ok(EntityAddress::Cbs));
        assert_eq!(
            EntityAddress::parse("$management"),
            Ok(EntityAddress::Management)
        );
        assert_eq!(
            EntityAddress::parse("amqps://ns/eh1/$management"),
            Ok(EntityAddress::Management)
        );
    }

    #[test]
    fn refuses_what_is_not_an_entity() {
        for bad in [
            "",
            "amqps://ns",
            "amqps://ns/",
            "eh1/Partitions",
            "eh1/foo/0",
            "$other",
            "a/b/c/d/e/f",
        ] {
            assert!(EntityAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn authorization_paths_are_lower_case() {
        let consumer = EntityAddress::parse("EH1/ConsumerGroups/$Default/Partitions/0").unwrap();
        assert_eq!(
            consumer.authorization_path().as_deref(),
            Some("eh1/consumergroups/$default/partitions/0")
        );
        let partition = EntityAddress::parse("amqps://ns/EH1/Partitions/3").unwrap();
        assert_eq!(
            partition.authorization_path().as_deref(),
            Some("eh1/partitions/3")
        );
        assert_eq!(audience_path("sb://localhost:5672/EH1/"), "eh1");
        assert_eq!(audience_path("sb://localhost/"), "");
    }

    #[test]
    fn coverage_respects_segment_boundaries() {
        assert!(path_covers("", "eh1"));
        assert!(path_covers("eh1", "eh1"));
        assert!(path_covers("eh1", "eh1/consumergroups/$default"));
        assert!(!path_covers("eh1", "eh10"));
        assert!(!path_covers("eh1/consumergroups/a", "eh1"));
    }
}
