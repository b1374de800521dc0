//! The catalog: the services a peer may use, the answer to a catalog request
//! (`header::Op::Catalog`). After an `Ok` response header the exposing side writes it as one
//! JSON object and ends the stream:
//!
//! ```json
//! {"services":[{"name":"nas","protocol":"http"},{"name":"cam","protocol":"rtsp"}]}
//! ```
//!
//! JSON because it is read rarely (an index page, a routing miss), is easy to extend (unknown
//! fields are ignored, an unknown protocol reads as `other`), and `serde_json` is already a
//! dependency. Capped at [`MAX_CATALOG`] bytes.

use serde::{Deserialize, Serialize};

use super::header::Protocol;

/// Longest encoded catalog.
pub const MAX_CATALOG: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Catalog {
    pub services: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub protocol: Kind,
}

/// A service's protocol as the catalog names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tcp,
    Rtsp,
    Http,
    /// A protocol of a newer build.
    #[serde(other)]
    Other,
}

impl From<Protocol> for Kind {
    fn from(p: Protocol) -> Kind {
        match p {
            Protocol::Tcp => Kind::Tcp,
            Protocol::Rtsp(_) => Kind::Rtsp,
            Protocol::Http => Kind::Http,
        }
    }
}

/// Why bytes are not a catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the catalog is over {MAX_CATALOG} bytes")]
    TooLong,
    #[error("the catalog is malformed: {0}")]
    Malformed(String),
}

/// Encodes `catalog`, dropping the entries past the cap.
pub fn encode(catalog: &Catalog) -> Vec<u8> {
    let mut catalog = catalog.clone();
    loop {
        let out = serde_json::to_vec(&catalog).expect("a catalog always serialises");
        if out.len() <= MAX_CATALOG || catalog.services.is_empty() {
            return out;
        }
        let keep = catalog.services.len() * MAX_CATALOG / out.len();
        catalog
            .services
            .truncate(keep.min(catalog.services.len() - 1));
    }
}

pub fn decode(bytes: &[u8]) -> Result<Catalog, CatalogError> {
    if bytes.len() > MAX_CATALOG {
        return Err(CatalogError::TooLong);
    }
    serde_json::from_slice(bytes).map_err(|e| CatalogError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn catalogs_round_trip(names in proptest::collection::vec("[a-zA-Z0-9._-]{1,64}", 0..50),
                               kinds in proptest::collection::vec(0u8..3, 50)) {
            let services = names.into_iter().zip(kinds).map(|(name, k)| Entry {
                name,
                protocol: [Kind::Tcp, Kind::Rtsp, Kind::Http][k as usize],
            }).collect();
            let catalog = Catalog { services };
            prop_assert_eq!(decode(&encode(&catalog)).unwrap(), catalog);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..500)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn newer_fields_and_protocols_are_tolerated_and_the_cap_holds() {
        let text = br#"{"services":[{"name":"x","protocol":"quic","port":1}],"v":2}"#;
        let got = decode(text).unwrap();
        assert_eq!(got.services[0].protocol, Kind::Other);
        let big = Catalog {
            services: (0..5000)
                .map(|i| Entry {
                    name: format!("service-{i:058}"),
                    protocol: Kind::Http,
                })
                .collect(),
        };
        let wire = encode(&big);
        assert!(wire.len() <= MAX_CATALOG);
        assert!(!decode(&wire).unwrap().services.is_empty());
        assert!(matches!(
            decode(&vec![b' '; MAX_CATALOG + 1]),
            Err(CatalogError::TooLong)
        ));
    }
}
