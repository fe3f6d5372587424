//! TLS: the certificate authorities trusted besides the system's, and a
//! refused certificate told apart from a passing network fault.

use std::path::Path;

use oci_client::client::{Certificate, CertificateEncoding};

use super::RegistryError;

/// Why TLS refused the registry's certificate, if that is what `error`
/// comes down to: no retry can change it.
pub(super) fn certificate_refusal(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut pending = vec![error];
    while let Some(current) = pending.pop() {
        match current.downcast_ref::<rustls::Error>() {
            Some(tls @ rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                return Some(format!(
                    "{tls}; if a private CA signed it, add that CA to [registries] ca-certificates (--ca-certificate)"
                ));
            }
            Some(tls @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)) => {
                return Some(tls.to_string());
            }
            _ => {}
        }
        // An io::Error's `source` skips the error it wraps (here, an io::Error
        // wrapping the TLS error): follow both.
        if let Some(wrapped) = current.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            pending.push(wrapped);
        }
        pending.extend(current.source());
    }
    None
}

/// The certificates in the PEM file `path`: at least one, all well formed.
pub(super) fn read_authorities(path: &Path) -> Result<Vec<Certificate>, RegistryError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let refuse = |reason: String| RegistryError::Certificates { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|error| refuse(error.to_string()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .map(|certificate| {
            let der = certificate.map_err(|error| refuse(format!("not a PEM certificate: {error}")))?;
            // What the client will do with it, so a bad one is named here.
            rustls::RootCertStore::empty()
                .add(der.clone())
                .map_err(|error| refuse(format!("a certificate in it cannot be used: {error}")))?;
            Ok::<_, RegistryError>(Certificate { encoding: CertificateEncoding::Der, data: der.to_vec() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if certificates.is_empty() {
        return Err(refuse("no PEM certificate in it".into()));
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS refusal is found however deep it is wrapped, io::Errors
    /// included (whose `source` skips what they wrap), and only an unknown
    /// issuer gets the hint about private CAs.
    #[test]
    fn certificate_refusals_are_found_in_error_chains() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect")]
        struct Connect(#[source] std::io::Error);
        let wrapped =
            |error: rustls::Error| Connect(std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, error)));
        let unknown = wrapped(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        assert!(certificate_refusal(&unknown).is_some_and(|reason| reason.contains("ca-certificates")));
        let expired = wrapped(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired));
        assert!(certificate_refusal(&expired).is_some_and(|reason| !reason.contains("ca-certificates")));
        assert_eq!(certificate_refusal(&Connect(std::io::Error::other("connection refused"))), None);
    }
}
