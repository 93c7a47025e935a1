//! SASL as the service offers it: `MSSBCBS`, `ANONYMOUS` (authorization then happens per link through CBS)
//! and `PLAIN` with the shared access key name and key.

use std::sync::Arc;

use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

const MSSBCBS: &str = "MSSBCBS";
const ANONYMOUS: &str = "ANONYMOUS";
const PLAIN: &str = "PLAIN";

/// The emulator's SASL server.
#[derive(Debug, Clone)]
pub struct EventHubsSasl {
    key_name: Arc<str>,
    key: Arc<str>,
}

impl EventHubsSasl {
    /// A SASL server whose PLAIN mechanism accepts this key name and key.
    pub fn new(key_name: &str, key: &str) -> Self {
        Self {
            key_name: key_name.into(),
            key: key.into(),
        }
    }

    fn outcome(&self, init: &SaslInit) -> SaslCode {
        match init.mechanism.0.as_str() {
            MSSBCBS | ANONYMOUS => SaslCode::Ok,
            PLAIN => {
                let response = init
                    .initial_response
                    .as_ref()
                    .map(|r| r.as_ref())
                    .unwrap_or_default();
                let mut fields = response.split(|byte| *byte == 0);
                let (_authzid, user, password) = (fields.next(), fields.next(), fields.next());
                if user == Some(self.key_name.as_bytes()) && password == Some(self.key.as_bytes()) {
                    SaslCode::Ok
                } else {
                    SaslCode::Auth
                }
            }
            _ => SaslCode::Auth,
        }
    }
}

impl SaslAcceptor for EventHubsSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from(MSSBCBS),
            Symbol::from(ANONYMOUS),
            Symbol::from(PLAIN),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: self.outcome(&init),
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // None of the offered mechanisms has a challenge, so a response is a protocol error.
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Sys,
            additional_data: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::primitives::Binary;

    fn init(mechanism: &str, response: Option<&[u8]>) -> SaslInit {
        SaslInit {
            mechanism: Symbol::from(mechanism),
            initial_response: response.map(|r| Binary::from(r.to_vec())),
            hostname: None,
        }
    }

    #[test]
    fn offers_what_the_service_offers() {
        let sasl = EventHubsSasl::new("name", "key");
        let offered: Vec<String> = sasl.mechanisms().0.into_iter().map(|s| s.0).collect();
        assert_eq!(offered, ["MSSBCBS", "ANONYMOUS", "PLAIN"]);
    }

    #[test]
    fn plain_checks_the_key_and_others_pass_to_cbs() {
        let sasl = EventHubsSasl::new("name", "key");
        assert_eq!(sasl.outcome(&init("ANONYMOUS", None)), SaslCode::Ok);
        assert_eq!(sasl.outcome(&init("MSSBCBS", None)), SaslCode::Ok);
        assert_eq!(
            sasl.outcome(&init("PLAIN", Some(b"\0name\0key"))),
            SaslCode::Ok
        );
        assert_eq!(
            sasl.outcome(&init("PLAIN", Some(b"\0name\0wrong"))),
            SaslCode::Auth
        );
        assert_eq!(sasl.outcome(&init("PLAIN", None)), SaslCode::Auth);
        assert_eq!(sasl.outcome(&init("SCRAM-SHA-256", None)), SaslCode::Auth);
    }
}
