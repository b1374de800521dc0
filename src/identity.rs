//! A host's identity: an ECDSA P-256 key and a self-signed certificate made with rcgen, kept in
//! one PEM file (mode 0600), and the short [`PeerId`] derived from its public key.
//!
//! The peer id is the first 20 bytes (160 bits) of SHA-256 over the certificate's
//! SubjectPublicKeyInfo, written as 32 characters of lowercase RFC 4648 base32. Both TLS sides
//! compute it from the certificate the other presents, so a peer id pins a key, not a name.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Bytes of SHA-256 kept in a peer id.
const PEER_ID_BYTES: usize = 20;
/// Length of a peer id's text form.
pub const PEER_ID_CHARS: usize = 32;

/// The hash of a peer's public key: what `connect` pins and `expose` allows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; PEER_ID_BYTES]);

impl PeerId {
    /// The id of the key in a DER SubjectPublicKeyInfo.
    pub fn from_spki(spki_der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut id = [0u8; PEER_ID_BYTES];
        id.copy_from_slice(&digest.as_ref()[..PEER_ID_BYTES]);
        PeerId(id)
    }

    /// The id of the key a DER certificate carries.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let parsed = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        Ok(Self::from_spki(parsed.subject_public_key_info().as_ref()))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &data_encoding::BASE32_NOPAD
                .encode(&self.0)
                .to_ascii_lowercase(),
        )
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

/// Why a text is not a peer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid peer id {text:?}: expected {PEER_ID_CHARS} characters of a-z and 2-7, as printed by `tunnel id`")]
pub struct PeerIdParseError {
    text: String,
}

impl FromStr for PeerId {
    type Err = PeerIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PeerIdParseError {
            text: s.chars().take(64).collect(),
        };
        if s.len() != PEER_ID_CHARS {
            return Err(err());
        }
        let bytes = data_encoding::BASE32_NOPAD
            .decode(s.to_ascii_uppercase().as_bytes())
            .map_err(|_| err())?;
        let id: [u8; PEER_ID_BYTES] = bytes.try_into().map_err(|_| err())?;
        Ok(PeerId(id))
    }
}

impl serde::Serialize for PeerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PeerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Problems loading or creating an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create identity file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity file {path} is damaged ({reason}); move it away to create a new identity (peers will then see a new peer id)")]
    Damaged { path: PathBuf, reason: String },
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("cannot generate a key: {0}")]
    Generate(String),
}

/// This host's key and certificate. The key never appears in `Debug` output or logs.
pub struct Identity {
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
    peer_id: PeerId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Identity {
    /// A new random identity, kept in memory only.
    pub fn generate() -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec!["tunnel".to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        Self::from_parts(cert.der().clone(), key.serialize_der())
    }

    fn from_parts(cert: CertificateDer<'static>, key_der: Vec<u8>) -> Result<Self, IdentityError> {
        let peer_id = PeerId::from_certificate(&cert)?;
        Ok(Identity {
            cert,
            key_der,
            peer_id,
        })
    }

    /// Loads the identity at `path`, or creates it (and its directory) if there is none.
    /// Returns the identity and whether it was created now.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        match fs::read(path) {
            Ok(pem) => Ok((Self::from_pem(path, &pem)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Self::generate()?;
                match identity.write_new(path) {
                    Ok(()) => Ok((identity, true)),
                    // Another process created it first: use theirs.
                    Err(IdentityError::Write { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        Self::load_or_create(path)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(source) => Err(IdentityError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn from_pem(path: &Path, pem: &[u8]) -> Result<Self, IdentityError> {
        let damaged = |reason: String| IdentityError::Damaged {
            path: path.to_owned(),
            reason,
        };
        if let Ok(meta) = fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "identity file is readable by other users; run: chmod 600 {}", path.display());
            }
        }
        let cert = CertificateDer::from_pem_slice(pem)
            .map_err(|e| damaged(format!("no certificate: {e:?}")))?;
        let key = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| damaged(format!("no private key: {e:?}")))?;
        let key_der = key.secret_der().to_vec();
        // The key must be the one the certificate names, or every handshake would fail.
        let pair = rcgen::KeyPair::try_from(key_der.as_slice())
            .map_err(|e| damaged(format!("unusable private key: {e}")))?;
        let identity = Self::from_parts(cert, key_der).map_err(|e| damaged(e.to_string()))?;
        if PeerId::from_spki(&pair.public_key_der()) != identity.peer_id {
            return Err(damaged(
                "the private key does not match the certificate".into(),
            ));
        }
        Ok(identity)
    }

    fn write_new(&self, path: &Path) -> Result<(), IdentityError> {
        let write_err = |source| IdentityError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write_err)?;
        }
        let key_pem = pem_block("PRIVATE KEY", &self.key_der);
        let cert_pem = pem_block("CERTIFICATE", self.cert.as_ref());
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_err)?;
        file.write_all(format!("{key_pem}{cert_pem}").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_err)
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// A secret derived from the private key for `purpose` (a domain-separated SHA-256), so
    /// state that must survive a restart (the QUIC stateless-reset key) needs no file of its own.
    pub fn derive_secret(&self, purpose: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"tunnel identity secret\0");
        ctx.update(purpose.as_bytes());
        ctx.update(b"\0");
        ctx.update(&self.key_der);
        ctx.finish().as_ref().try_into().expect("32 bytes")
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Where the identity lives when no path is given: `$XDG_CONFIG_HOME/tunnel/identity.pem`,
/// else `$HOME/.config/tunnel/identity.pem`.
pub fn default_identity_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("tunnel").join("identity.pem"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_text_round_trips() {
        let id = Identity::generate().unwrap().peer_id();
        let text = id.to_string();
        assert_eq!(text.len(), PEER_ID_CHARS);
        assert!(text
            .chars()
            .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c)));
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
        assert_eq!(text.to_uppercase().parse::<PeerId>().unwrap(), id);
    }

    #[test]
    fn bad_peer_ids_are_refused() {
        for bad in ["", "abc", &"a".repeat(31), &"1".repeat(32), &"a".repeat(33)] {
            assert!(bad.parse::<PeerId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_is_created_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("tunnel-id-test-{}", std::process::id()));
        let path = dir.join("sub").join("identity.pem");
        let _ = fs::remove_dir_all(&dir);
        let (a, created) = Identity::load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = Identity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.peer_id(), b.peer_id());
        assert!(!format!("{a:?}").contains(&format!("{:?}", &a.key_der[..8])));
        fs::write(&path, "garbage").unwrap();
        let err = Identity::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
