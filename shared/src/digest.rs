//! Content digests (`sha256:<hex>`): parsing, validation, and hashing while bytes stream past.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A validated SHA-256 content digest, always `sha256:` followed by 64 lowercase hex characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form sha256:<64 lowercase hex characters>")]
    Malformed(String),
    #[error("digest {0:?} uses an unsupported algorithm; only sha256 is accepted")]
    UnsupportedAlgorithm(String),
}

impl Digest {
    /// The digest of a byte slice held in memory (manifests, configs; never model weights).
    pub fn of(bytes: &[u8]) -> Digest {
        let mut hasher = Hasher::new();
        hasher.update(bytes);
        hasher.finish()
    }

    /// The 64 hex characters without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tag cosign and our signer store a signature under: `sha256-<hex>.sig`.
    pub fn signature_tag(&self) -> String {
        format!("sha256-{}.sig", self.hex())
    }

    /// Path components for content-addressed storage: `sha256/<first two hex>/<hex>`.
    pub fn storage_path(&self) -> std::path::PathBuf {
        let hex = self.hex();
        ["sha256", &hex[..2], hex].iter().collect()
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(DigestError::Malformed(s.to_owned()));
        };
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(s.to_owned()));
        }
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(DigestError::Malformed(s.to_owned()));
        }
        Ok(Digest(s.to_owned()))
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

/// Incremental SHA-256 that also counts bytes, for hashing while transferring.
/// `sha2` picks the CPU's SHA extensions at run time where present.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Digest {
        Digest(format!("sha256:{}", hex::encode(self.inner.finalize())))
    }
}

/// Hashes a file through a fixed-size buffer, returning its digest and length.
pub async fn hash_file(path: &std::path::Path) -> std::io::Result<(Digest, u64)> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = Hasher::new();
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let len = hasher.len();
    Ok((hasher.finish(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_config_matches_the_spec() {
        assert_eq!(
            Digest::of(b"{}").as_str(),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn parse_rejects_bad_digests() {
        let good = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        assert!(good.parse::<Digest>().is_ok());
        assert!(matches!("sha512:abcd".parse::<Digest>(), Err(DigestError::UnsupportedAlgorithm(_))));
        assert!("sha256:ABCD".parse::<Digest>().is_err());
        assert!(good.to_uppercase().parse::<Digest>().is_err());
        assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
        assert!("nocolon".parse::<Digest>().is_err());
    }

    #[test]
    fn storage_path_is_sharded_by_prefix() {
        let d = Digest::of(b"{}");
        assert_eq!(d.storage_path(), std::path::PathBuf::from(format!("sha256/44/{}", d.hex())));
        assert_eq!(d.signature_tag(), format!("sha256-{}.sig", d.hex()));
    }
}
