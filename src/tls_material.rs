//! TLS files read at start (certificate chains, private keys, CA bundles): read, parsed and checked once, with
//! errors that name the file and what is wrong with it (not PEM, no key, key of another certificate, expired).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// What is wrong with a TLS file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file has no PEM section at all.
    #[error("{path}: not PEM ({hint})")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What it looks like instead.
        hint: &'static str,
    },
    /// A PEM section is damaged (bad base64, no END line).
    #[error("{path}: damaged PEM: {reason}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader said.
        reason: String,
    },
    /// The file holds PEM, but no certificate.
    #[error("{path}: holds no certificate{found}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What it holds instead (`" (found: PRIVATE KEY)"`), or nothing.
        found: String,
    },
    /// A CA bundle with nothing in it.
    #[error("{path}: the CA bundle is empty (no CERTIFICATE section)")]
    EmptyBundle {
        /// The file.
        path: PathBuf,
    },
    /// The file holds PEM, but no private key.
    #[error("{path}: holds no private key{found}")]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
        /// What it holds instead, or nothing.
        found: String,
    },
    /// A certificate does not parse as X.509.
    #[error("{path}: certificate {index} is not a valid X.509 certificate: {reason}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Its position in the file, from 0.
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// A certificate's validity ended.
    #[error("{path}: certificate {index} ({subject}) expired at {not_after}")]
    Expired {
        /// The file.
        path: PathBuf,
        /// Its position in the file, from 0.
        index: usize,
        /// Its subject.
        subject: String,
        /// The end of its validity.
        not_after: String,
    },
    /// A certificate's validity has not begun.
    #[error("{path}: certificate {index} ({subject}) is not valid before {not_before}")]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// Its position in the file, from 0.
        index: usize,
        /// Its subject.
        subject: String,
        /// The start of its validity.
        not_before: String,
    },
    /// The key cannot be used for signing (unsupported algorithm or damaged).
    #[error("{path}: unusable private key: {reason}")]
    UnusableKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("{key}: not the private key of the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A CA certificate cannot be a trust anchor.
    #[error("{path}: certificate {index} cannot be a trust anchor: {reason}")]
    BadTrustAnchor {
        /// The file.
        path: PathBuf,
        /// Its position in the file, from 0.
        index: usize,
        /// What webpki said.
        reason: String,
    },
}

/// A certificate chain and its key, both checked.
#[derive(Clone, Debug)]
pub struct CheckedIdentity {
    /// The chain's PEM text, leaf first, as read.
    pub cert_pem: Vec<u8>,
    /// The key's PEM text, as read.
    pub key_pem: Vec<u8>,
}

/// A CA bundle, checked.
#[derive(Clone, Debug)]
pub struct CheckedBundle {
    /// The bundle's PEM text, as read.
    pub pem: Vec<u8>,
    /// Its certificates.
    pub certificates: Vec<CertificateDer<'static>>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Unreadable {
        path: path.to_owned(),
        source,
    })
}

/// Every PEM section of a file; an error when there is none or one is damaged.
fn sections(path: &Path, bytes: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsFileError> {
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsFileError::BadPem {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    if sections.is_empty() {
        let hint = if bytes.is_empty() {
            "the file is empty"
        } else if bytes.first() == Some(&0x30) {
            "it looks like DER: convert it with `openssl x509 -inform der` or `openssl pkey -inform der`"
        } else {
            "no -----BEGIN line"
        };
        return Err(TlsFileError::NotPem {
            path: path.to_owned(),
            hint,
        });
    }
    Ok(sections)
}

/// `" (found: A, B)"` for the kinds of sections a file holds.
fn found(sections: &[(SectionKind, Vec<u8>)]) -> String {
    let kinds: Vec<String> = sections
        .iter()
        .map(|(kind, _)| format!("{kind:?}"))
        .collect();
    if kinds.is_empty() {
        String::new()
    } else {
        format!(" (found: {})", kinds.join(", "))
    }
}

fn certificates(sections: &[(SectionKind, Vec<u8>)]) -> Vec<CertificateDer<'static>> {
    sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect()
}

/// Checks that each certificate parses and is valid now.
fn check_validity(path: &Path, certificates: &[CertificateDer<'_>]) -> Result<(), TlsFileError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64);
    for (index, der) in certificates.iter().enumerate() {
        let (_, certificate) =
            x509_parser::parse_x509_certificate(der.as_ref()).map_err(|error| {
                TlsFileError::BadCertificate {
                    path: path.to_owned(),
                    index,
                    reason: error.to_string(),
                }
            })?;
        let validity = certificate.validity();
        let subject = certificate.subject().to_string();
        if validity.not_after.timestamp() < now {
            return Err(TlsFileError::Expired {
                path: path.to_owned(),
                index,
                subject,
                not_after: validity.not_after.to_string(),
            });
        }
        if validity.not_before.timestamp() > now {
            return Err(TlsFileError::NotYetValid {
                path: path.to_owned(),
                index,
                subject,
                not_before: validity.not_before.to_string(),
            });
        }
    }
    Ok(())
}

/// Reads a certificate chain (leaf first) and its private key, and checks both: PEM, at least one
/// certificate, every certificate valid now, a usable key, and the key is the leaf's.
pub fn load_identity(cert: &Path, key: &Path) -> Result<CheckedIdentity, TlsFileError> {
    let cert_pem = read(cert)?;
    let cert_sections = sections(cert, &cert_pem)?;
    let chain = certificates(&cert_sections);
    if chain.is_empty() {
        return Err(TlsFileError::NoCertificate {
            path: cert.to_owned(),
            found: found(&cert_sections),
        });
    }
    check_validity(cert, &chain)?;
    let key_pem = read(key)?;
    let key_sections = sections(key, &key_pem)?;
    let private_key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsFileError::NoPrivateKey {
            path: key.to_owned(),
            found: found(&key_sections),
        })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(private_key)
        .map_err(|error| TlsFileError::UnusableKey {
            path: key.to_owned(),
            reason: error.to_string(),
        })?;
    match CertifiedKey::new(chain, signing_key).keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsFileError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            });
        }
        // The key cannot tell its public half: nothing to compare, as rustls itself decides.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(error) => {
            return Err(TlsFileError::BadCertificate {
                path: cert.to_owned(),
                index: 0,
                reason: error.to_string(),
            });
        }
    }
    Ok(CheckedIdentity { cert_pem, key_pem })
}

/// Reads a CA bundle and checks it: PEM, at least one certificate, each a valid X.509 certificate, valid now,
/// and usable as a trust anchor.
pub fn load_bundle(path: &Path) -> Result<CheckedBundle, TlsFileError> {
    let pem = read(path)?;
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Err(TlsFileError::EmptyBundle {
            path: path.to_owned(),
        });
    }
    let bundle_sections = sections(path, &pem)?;
    let certificates = certificates(&bundle_sections);
    if certificates.is_empty() {
        return Err(TlsFileError::NoCertificate {
            path: path.to_owned(),
            found: found(&bundle_sections),
        });
    }
    check_validity(path, &certificates)?;
    for (index, certificate) in certificates.iter().enumerate() {
        rustls::RootCertStore::empty()
            .add(certificate.clone())
            .map_err(|error| TlsFileError::BadTrustAnchor {
                path: path.to_owned(),
                index,
                reason: error.to_string(),
            })?;
    }
    Ok(CheckedBundle { pem, certificates })
}
