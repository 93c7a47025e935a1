//! The W3C trace context (`traceparent`, `tracestate`) carried from a caller's headers onto its events: its
//! parsing and the bound on what an event carries of it.

/// Why a `traceparent` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("traceparent: {reason}")]
pub struct TraceContextError {
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A W3C trace context (`traceparent`, optional `tracestate`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
    pub traceparent: String,
    /// Vendor entries, passed through.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// A trace context, if `traceparent` is well formed (version 00 layout, lowercase hex, non-zero ids).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, TraceContextError> {
        let invalid = |reason: &'static str| TraceContextError { reason };
        let parts: Vec<&str> = traceparent.split('-').collect();
        let [version, trace_id, span_id, flags] = parts.as_slice() else {
            return Err(invalid("expected version-traceid-spanid-flags"));
        };
        let is_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(version, 2) || *version == "ff" {
            return Err(invalid("version must be two lowercase hex digits, not ff"));
        }
        if !is_hex(trace_id, 32) || trace_id.bytes().all(|b| b == b'0') {
            return Err(invalid(
                "trace id must be 32 lowercase hex digits, not all zero",
            ));
        }
        if !is_hex(span_id, 16) || span_id.bytes().all(|b| b == b'0') {
            return Err(invalid(
                "parent id must be 16 lowercase hex digits, not all zero",
            ));
        }
        if !is_hex(flags, 2) {
            return Err(invalid("flags must be two lowercase hex digits"));
        }
        Ok(Self {
            traceparent: traceparent.to_owned(),
            tracestate: tracestate.and_then(bounded_tracestate),
        })
    }
}

/// The longest `tracestate` carried onto an event, bytes: W3C's 512, so a caller cannot make every event it
/// sends carry a 16 KiB header.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// `tracestate` as carried: whole list members from the left while they fit in [`MAX_TRACESTATE_BYTES`]
/// (W3C truncates by dropping members, never by cutting one), or none.
fn bounded_tracestate(tracestate: &str) -> Option<String> {
    if tracestate.len() <= MAX_TRACESTATE_BYTES {
        return (!tracestate.is_empty()).then(|| tracestate.to_owned());
    }
    let mut kept = String::new();
    for member in tracestate
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        let separator = usize::from(!kept.is_empty());
        if kept.len() + separator + member.len() > MAX_TRACESTATE_BYTES {
            break;
        }
        if separator == 1 {
            kept.push(',');
        }
        kept.push_str(member);
    }
    (!kept.is_empty()).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn a_long_tracestate_keeps_only_whole_members_that_fit() {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let member = |i: usize| format!("v{i}={}", "x".repeat(60));
        let long: Vec<String> = (0..300).map(member).collect();
        let context = TraceContext::parse(traceparent, Some(&long.join(","))).unwrap();
        let kept = context.tracestate.unwrap();
        assert!(kept.len() <= MAX_TRACESTATE_BYTES, "{}", kept.len());
        assert_eq!(kept, long[..kept.split(',').count()].join(","));
        let short = TraceContext::parse(traceparent, Some("a=1,b=2")).unwrap();
        assert_eq!(short.tracestate.as_deref(), Some("a=1,b=2"));
        let one_huge = "a=".to_owned() + &"y".repeat(2000);
        assert_eq!(
            TraceContext::parse(traceparent, Some(&one_huge))
                .unwrap()
                .tracestate,
            None
        );
        assert_eq!(
            TraceContext::parse(traceparent, Some(""))
                .unwrap()
                .tracestate,
            None
        );
    }

    #[test]
    fn malformed_trace_contexts_are_refused() {
        assert!(TraceContext::parse(TRACEPARENT, None).is_ok());
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_err(), "{bad}");
        }
    }
}
