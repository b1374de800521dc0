//! The exposing side's TLS session to an `https://` device.
//!
//! The browser talks plain HTTP to localhost (a secure context); the exposing side speaks TLS
//! to the device, so its certificate is checked where it is: against the system's roots by
//! default, not at all with `tls_verify = false`, or against a pinned SHA-256 fingerprint.
//! A failed check names the certificate's fingerprint, so pinning a self-signed device is one
//! copy and paste. TLS 1.2 is offered too (many devices speak nothing newer), and only
//! `http/1.1` as ALPN: the connecting side reads HTTP/1.1 heads.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::DeviceVerify;

/// Why the TLS session to a device did not come up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceTlsError {
    #[error("{0:?} is not a valid TLS server name")]
    Name(String),
    #[error("the device's TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("no TLS handshake with the device within {0:?}")]
    Timeout(Duration),
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// The TLS client settings for one way of checking devices.
pub fn client_config(verify: DeviceVerify) -> Result<Arc<rustls::ClientConfig>, DeviceTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match verify {
        DeviceVerify::Roots => Some(system_roots(&provider)?),
        DeviceVerify::Off | DeviceVerify::Pin(_) => None,
    };
    let verifier = DeviceVerifier {
        verify,
        roots,
        provider: provider.clone(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| DeviceTlsError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Runs the handshake over `tcp` to the device at `host` (the target's host: a name or an IP)
/// within `limit`.
pub async fn connect(
    tcp: TcpStream,
    host: &str,
    config: Arc<rustls::ClientConfig>,
    limit: Duration,
) -> Result<TlsStream<TcpStream>, DeviceTlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name =
        ServerName::try_from(bare.to_owned()).map_err(|_| DeviceTlsError::Name(host.to_owned()))?;
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(DeviceTlsError::Handshake(e)),
        Err(_) => Err(DeviceTlsError::Timeout(limit)),
    }
}

/// The system's trusted roots (`/etc/ssl/certs`), read once per process.
fn system_roots(
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, DeviceTlsError> {
    static ROOTS: OnceLock<Result<Arc<rustls::RootCertStore>, String>> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map_or_else(|| "none found".to_owned(), |e| e.to_string());
            return Err(format!("no trusted root certificates on this system ({why}): install ca-certificates, or pin the device's certificate"));
        }
        Ok(Arc::new(store))
    });
    let roots = roots.clone().map_err(DeviceTlsError::Setup)?;
    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| DeviceTlsError::Setup(e.to_string()))
}

/// `sha256:` and the lowercase hex of the SHA-256 of `cert`'s DER.
pub fn fingerprint(cert: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    format!("sha256:{}", data_encoding::HEXLOWER.encode(digest.as_ref()))
}

#[derive(Debug)]
struct DeviceVerifier {
    verify: DeviceVerify,
    roots: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

/// A certificate check that failed, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{why}; the device's certificate is {fingerprint}: for a self-signed device set pin = \"{fingerprint}\" (or tls_verify = false) on the service")]
struct Untrusted {
    why: String,
    fingerprint: String,
}

impl Untrusted {
    fn error(why: String, cert: &CertificateDer<'_>) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(Untrusted {
                why,
                fingerprint: fingerprint(cert),
            }),
        )))
    }
}

impl ServerCertVerifier for DeviceVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match (&self.verify, &self.roots) {
            (DeviceVerify::Off, _) => Ok(ServerCertVerified::assertion()),
            (DeviceVerify::Pin(pin), _) => {
                let digest = ring::digest::digest(&ring::digest::SHA256, end_entity);
                if digest.as_ref() == pin {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(Untrusted::error(
                        format!(
                            "the certificate is not the pinned one (sha256:{})",
                            data_encoding::HEXLOWER.encode(pin)
                        ),
                        end_entity,
                    ))
                }
            }
            (DeviceVerify::Roots, Some(roots)) => roots
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .map_err(|e| {
                    Untrusted::error(format!("the certificate is not trusted ({e})"), end_entity)
                }),
            (DeviceVerify::Roots, None) => Err(rustls::Error::General("no trusted roots".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
