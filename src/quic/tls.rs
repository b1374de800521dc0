//! TLS 1.3 with mutual authentication by peer id, not by certificate authority.
//!
//! Both sides present their self-signed certificate. The connecting side accepts the server
//! only if the hash of its public key is the pinned [`PeerId`]; the exposing side accepts any
//! client that proves possession of its key, and the expose role then checks the client's id
//! against its allow list (so a refused peer gets a clear close reason rather than a bare
//! TLS alert). Handshake signatures are always verified: a peer id cannot be claimed without
//! the private key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Identity, PeerId};

/// The server name sent in the TLS handshake. Peers are named by key, so it is a constant.
pub const SERVER_NAME: &str = "tunnel";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The handshake-signature part of every verifier here: TLS 1.3 only, checked with the
/// provider's algorithms against the presented certificate's key.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls13RequiredForQuic,
            ))
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
    };
}

/// The peer id of a presented certificate, or a TLS error if it cannot be parsed.
fn peer_of(cert: &CertificateDer<'_>) -> Result<PeerId, rustls::Error> {
    PeerId::from_certificate(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
}

/// The peer presented a key other than the pinned one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the peer presented peer id {got}, not the pinned {expected}: wrong address, or the peer's identity changed")]
pub struct WrongPeer {
    pub expected: PeerId,
    pub got: PeerId,
}

/// Where the pinning verifier records the id a peer presented when it was not the pinned one,
/// so the dialler can say so plainly.
pub type WrongPeerSlot = Arc<std::sync::Mutex<Option<WrongPeer>>>;

/// Checks the server's key: it must be `expected` when one is pinned (a peer); any key
/// proving possession is accepted when none is (the rendezvous, which can introduce peers but
/// never impersonate one, since peers pin each other).
#[derive(Debug)]
struct ServerKey {
    expected: Option<PeerId>,
    provider: Arc<CryptoProvider>,
    wrong: WrongPeerSlot,
}

impl ServerCertVerifier for ServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = peer_of(end_entity)?;
        if let Some(expected) = self.expected.filter(|e| *e != got) {
            let wrong = WrongPeer { expected, got };
            *self.wrong.lock().unwrap_or_else(|p| p.into_inner()) = Some(wrong.clone());
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(wrong))),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Accepts any client certificate that parses; the signature check proves key possession.
#[derive(Debug)]
struct AnyKeyClient {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyKeyClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        peer_of(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

/// rustls client configuration that authenticates as `identity` and accepts the server
/// only if its key is `expected` (any key when `None`: the rendezvous).
pub fn client_config(
    identity: &Identity,
    expected: Option<PeerId>,
    wrong: WrongPeerSlot,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerKey {
            expected,
            provider,
            wrong,
        }))
        .with_client_auth_cert(vec![identity.certificate()], identity.private_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// rustls server configuration that requires a client certificate and speaks `alpns`.
pub fn server_config(
    identity: &Identity,
    alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyKeyClient { provider }))
        .with_single_cert(vec![identity.certificate()], identity.private_key())?;
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// The peer id of an established connection's peer.
pub fn peer_id_of(conn: &quinn::Connection) -> Option<PeerId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    peer_id_in(&certs)
}

/// The peer id of the certificate chain a peer presented (QUIC or a TLS stream).
pub fn peer_id_in(certs: &[CertificateDer<'_>]) -> Option<PeerId> {
    PeerId::from_certificate(certs.first()?).ok()
}
