//! Grants as checked at run time: identity patterns (`*` globs) and the hubs each grant covers.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;

use super::config::GrantConfig;
use super::{Access, Grant};

/// Which hubs a grant covers.
#[derive(Debug, Clone)]
pub(crate) enum HubScope {
    /// `["*"]`: every configured hub.
    All,
    /// The named hubs.
    Named(HashSet<String>),
}

impl HubScope {
    pub(crate) fn from_names(names: &[String]) -> Self {
        if names.iter().any(|name| name == "*") {
            Self::All
        } else {
            Self::Named(names.iter().cloned().collect())
        }
    }

    pub(crate) fn allows(&self, hub: &str) -> bool {
        match self {
            Self::All => true,
            Self::Named(names) => names.contains(hub),
        }
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters (`/` and `:` included)
/// and every other character stands for itself.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.as_bytes();
    let name = name.as_bytes();
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and the name position it currently absorbs up to: one backtrack point
    // suffices for `*`-only globs, which keeps matching O(pattern × name) at worst.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((star_p, star_n)) = star {
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// One configured grant: the run-time [`Grant`] and the identities it covers.
#[derive(Debug)]
struct CompiledGrant {
    grant: Arc<Grant>,
    identities: Vec<String>,
}

/// Every configured grant, in configuration order.
#[derive(Debug, Default)]
pub(crate) struct Grants {
    grants: Vec<CompiledGrant>,
}

impl Grants {
    pub(crate) fn new(configs: &[GrantConfig]) -> Self {
        let grants = configs
            .iter()
            .map(|config| CompiledGrant {
                grant: Arc::new(Grant::new(
                    config.name.clone(),
                    &config.event_hubs,
                    config.events_per_second,
                )),
                identities: config.identities.clone(),
            })
            .collect();
        Self { grants }
    }

    /// Whether no grant is configured.
    pub(crate) fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Every distinct per-identity rate the grants set.
    pub(crate) fn rates(&self) -> Vec<NonZeroU32> {
        let mut rates: Vec<_> = self
            .grants
            .iter()
            .filter_map(|compiled| compiled.grant.events_per_second)
            .collect();
        rates.sort_unstable();
        rates.dedup();
        rates
    }

    /// The grants whose identity patterns match `identity`, in configuration order.
    pub(crate) fn access_for(&self, identity: &str) -> Access {
        Access::from_grants(
            self.grants
                .iter()
                .filter(|compiled| {
                    compiled
                        .identities
                        .iter()
                        .any(|pattern| glob_matches(pattern, identity))
                })
                .map(|compiled| Arc::clone(&compiled.grant))
                .collect(),
        )
    }
}

impl Grant {
    /// A grant named `name` covering `event_hubs` (`"*"` for all), with an optional per-identity rate.
    pub fn new(
        name: impl Into<String>,
        event_hubs: &[String],
        events_per_second: Option<NonZeroU32>,
    ) -> Self {
        Self {
            name: name.into(),
            events_per_second,
            hubs: HubScope::from_names(event_hubs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_match_any_run_including_slashes_and_colons() {
        let cases = [
            ("billing-batch", "billing-batch", true),
            ("billing-batch", "billing-batch2", false),
            ("billing-batch", "billing-batc", false),
            (
                "system:serviceaccount:billing:*",
                "system:serviceaccount:billing:api",
                true,
            ),
            (
                "system:serviceaccount:billing:*",
                "system:serviceaccount:billing:",
                true,
            ),
            (
                "system:serviceaccount:billing:*",
                "system:serviceaccount:billingx:api",
                false,
            ),
            (
                "spiffe://cluster.local/ns/billing/*",
                "spiffe://cluster.local/ns/billing/sa/api",
                true,
            ),
            (
                "spiffe://cluster.local/ns/billing/*",
                "spiffe://cluster.local/ns/other/sa/api",
                false,
            ),
            ("*", "", true),
            ("*", "anything/at:all", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("*ab", "aab", true),
            ("*.example", "x.example", true),
            ("**", "x", true),
            ("a?c", "abc", false),
            ("", "", true),
            ("", "a", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(glob_matches(pattern, name), expected, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn a_hostile_glob_stays_cheap() {
        let pattern = "*a".repeat(30) + "b";
        let name = "a".repeat(8192);
        assert!(!glob_matches(&pattern, &name));
    }

    #[test]
    fn access_lists_matching_grants_in_order() {
        let configs = vec![
            GrantConfig {
                name: "billing".into(),
                identities: vec![
                    "system:serviceaccount:billing:*".into(),
                    "billing-batch".into(),
                ],
                event_hubs: vec!["orders".into()],
                events_per_second: None,
            },
            GrantConfig {
                name: "everything".into(),
                identities: vec!["*".into()],
                event_hubs: vec!["*".into()],
                events_per_second: NonZeroU32::new(10),
            },
            GrantConfig {
                name: "audit".into(),
                identities: vec!["auditor".into()],
                event_hubs: vec!["audit".into()],
                events_per_second: NonZeroU32::new(5),
            },
        ];
        let grants = Grants::new(&configs);
        let access = grants.access_for("billing-batch");
        assert_eq!(access.grant_for("orders").unwrap().name, "billing");
        assert_eq!(access.grant_for("payments").unwrap().name, "everything");
        assert_eq!(access.events_per_second(), NonZeroU32::new(10));
        let access = grants.access_for("auditor");
        assert_eq!(access.grant_for("audit").unwrap().name, "everything");
        let only = Grants::new(&configs[2..]);
        let access = only.access_for("someone");
        assert!(access.grant_for("audit").is_none());
        assert_eq!(access.events_per_second(), None);
    }
}
