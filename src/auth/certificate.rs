//! A client certificate's identity: its first URI SAN (a SPIFFE ID), else its first DNS SAN, else its CN.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The longest identity a certificate may carry (it keys rate limits and appears in logs).
pub const MAX_IDENTITY_LEN: usize = 1024;

/// The identity of the DER certificate `der`, if it names one (the TLS layer has verified the chain).
pub fn identity(der: &[u8]) -> Option<String> {
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    let names = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|extension| extension.value.general_names.as_slice())
        .unwrap_or_default();
    let usable = |name: &&str| !name.is_empty() && name.len() <= MAX_IDENTITY_LEN;
    let uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Some(*uri).filter(usable),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns).filter(usable),
            _ => None,
        })
    };
    let common_name = || {
        certificate
            .subject()
            .iter_common_name()
            .find_map(|attribute| attribute.as_str().ok())
            .filter(usable)
    };
    uri.or_else(dns).or_else(common_name).map(str::to_owned)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    /// A self-signed test certificate (DER) with these SANs and CN.
    pub(crate) fn certificate(sans: Vec<SanType>, common_name: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let mut name = DistinguishedName::new();
        if let Some(common_name) = common_name {
            name.push(DnType::CommonName, common_name);
        }
        name.push(DnType::OrganizationName, "test only");
        params.distinguished_name = name;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(value: &str) -> SanType {
        SanType::URI(value.try_into().unwrap())
    }

    fn dns(value: &str) -> SanType {
        SanType::DnsName(value.try_into().unwrap())
    }

    #[test]
    fn the_first_uri_san_wins() {
        let der = certificate(
            vec![
                dns("api.billing.svc"),
                uri("spiffe://cluster.local/ns/billing/sa/api"),
                uri("spiffe://cluster.local/ns/other/sa/x"),
            ],
            Some("billing-api"),
        );
        assert_eq!(
            identity(&der).as_deref(),
            Some("spiffe://cluster.local/ns/billing/sa/api")
        );
    }

    #[test]
    fn then_the_first_dns_san() {
        let der = certificate(vec![dns("api.billing.svc"), dns("other.svc")], Some("cn"));
        assert_eq!(identity(&der).as_deref(), Some("api.billing.svc"));
    }

    #[test]
    fn then_the_common_name() {
        let der = certificate(vec![], Some("billing-batch"));
        assert_eq!(identity(&der).as_deref(), Some("billing-batch"));
    }

    #[test]
    fn none_of_them_or_garbage_is_no_identity() {
        assert_eq!(identity(&certificate(vec![], None)), None);
        assert_eq!(identity(b"not a certificate"), None);
        assert_eq!(identity(&[]), None);
    }
}
