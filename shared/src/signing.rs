//! Cosign's classic key-based signatures: the simple-signing payload, the `sha256-<hex>.sig` tag, key files,
//! signing, and verification against trusted keys. Pure apart from key generation; no I/O.
//!
//! The scheme (what `cosign sign --key` wrote before sigstore bundles, and still writes with
//! `--new-bundle-format=false`): the tag `sha256-<hex>.sig` in the bundle's repository holds an OCI manifest
//! with one layer per signature; each layer is a simple-signing JSON payload naming the signed digest, and
//! its annotation `dev.cosignproject.cosign/signature` holds the base64 ECDSA P-256 / SHA-256 signature of
//! the payload's exact bytes. Verification needs no transparency log: devices are often offline.
//!
//! Crypto comes from the `sigstore` crate without its `cosign` feature (no OIDC, Rekor or registry client):
//! the agent links about half the crates that way. The manifest and payload formats are small and are
//! written here.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sigstore::crypto::signing_key::SigStoreKeyPair;
use sigstore::crypto::{CosignVerificationKey, SigStoreSigner, Signature, SigningScheme};

use crate::digest::Digest;
use crate::oci::{Descriptor, ImageManifest, MEDIA_TYPE_IMAGE_MANIFEST};
use crate::proto::ErrorCode;

/// Media type of a signature layer (the payload blob).
pub const MEDIA_TYPE_SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature.
pub const ANNOTATION_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// Config media type of cosign's signature manifests.
pub const MEDIA_TYPE_SIGNATURE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The payload's `critical.type`.
pub const SIMPLE_SIGNING_TYPE: &str = "cosign container image signature";
/// Signatures read for one digest at most: more is not a signature manifest anyone made by hand.
pub const MAX_SIGNATURES: usize = 64;
/// A simple-signing payload is a few hundred bytes; anything bigger is refused unread.
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 10;
/// Environment variables read (in order) for a key's password, so CI never types it.
pub const PASSWORD_ENV_VARS: [&str; 2] = ["ALKI_KEY_PASSWORD", "COSIGN_PASSWORD"];

/// The tag holding the signatures of `digest`: `sha256-<hex>.sig`.
pub fn signature_tag(digest: &Digest) -> String {
    format!("sha256-{}.sig", digest.hex())
}

/// The digest a signature tag is for, when `tag` is one.
pub fn digest_of_signature_tag(tag: &str) -> Option<Digest> {
    let hex = tag.strip_prefix("sha256-")?.strip_suffix(".sig")?;
    format!("sha256:{hex}").parse().ok()
}

/// Cosign's simple-signing payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimpleSigning {
    pub critical: Critical,
    #[serde(default)]
    pub optional: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Critical {
    pub identity: Identity,
    pub image: Image,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Image {
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

/// The payload signed for `digest` in `docker_reference` (`registry/repository`, as cosign writes it).
pub fn payload(docker_reference: &str, digest: &Digest) -> Vec<u8> {
    let doc = SimpleSigning {
        critical: Critical {
            identity: Identity { docker_reference: docker_reference.to_owned() },
            image: Image { docker_manifest_digest: digest.to_string() },
            kind: SIMPLE_SIGNING_TYPE.to_owned(),
        },
        optional: None,
    };
    // Serialising plain strings and an empty map cannot fail.
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is not a PEM {expected} ({reason}); make one with `alkictl key generate`")]
    Pem { what: String, expected: &'static str, reason: String },
    #[error("{what}: {reason}")]
    Key { what: String, reason: String },
    #[error(
        "cannot decrypt the private key {what}: wrong password, or not a cosign key ({reason}); set the password \
         in ALKI_KEY_PASSWORD or COSIGN_PASSWORD"
    )]
    Decrypt { what: String, reason: String },
    #[error("cannot read key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("key file {path} is larger than {MAX_KEY_FILE} bytes, so it is no public key; name the .pub file")]
    TooLarge { path: String },
}

/// Largest public key file read (a PEM key is a few hundred bytes): a policy naming `/dev/zero` or a model
/// file by mistake must not take the agent's memory at every pull.
pub const MAX_KEY_FILE: u64 = 64 << 10;

/// A public key signatures are checked against.
#[derive(Clone, Debug)]
pub struct PublicKey {
    der: Vec<u8>,
    key: CosignVerificationKey,
    fingerprint: String,
}

impl PublicKey {
    /// Parses a PEM `PUBLIC KEY` (what `cosign generate-key-pair` and `alkictl key generate` write).
    /// `what` names it in errors (a file path).
    pub fn from_pem(text: &[u8], what: &str) -> Result<PublicKey, KeyError> {
        let der = pem_contents(text, "PUBLIC KEY").map_err(|reason| KeyError::Pem {
            what: what.to_owned(),
            expected: "public key",
            reason,
        })?;
        PublicKey::from_der(der, what)
    }

    fn from_der(der: Vec<u8>, what: &str) -> Result<PublicKey, KeyError> {
        let key = CosignVerificationKey::try_from_der(&der)
            .map_err(|e| KeyError::Key { what: what.to_owned(), reason: e.to_string() })?;
        let fingerprint = Digest::of(&der).to_string();
        Ok(PublicKey { der, key, fingerprint })
    }

    /// Reads a PEM public key file.
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        use std::io::Read as _;
        let shown = path.display().to_string();
        let mut text = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_KEY_FILE + 1).read_to_end(&mut text))
            .map_err(|source| KeyError::Read { path: shown.clone(), source })?;
        if text.len() as u64 > MAX_KEY_FILE {
            return Err(KeyError::TooLarge { path: shown });
        }
        PublicKey::from_pem(&text, &shown)
    }

    /// `sha256:<hex>` of the key's DER (SubjectPublicKeyInfo) encoding.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn to_pem(&self) -> String {
        to_pem("PUBLIC KEY", &self.der)
    }

    /// True when `signature_b64` is this key's signature of exactly `payload`.
    pub fn verifies(&self, payload: &[u8], signature_b64: &str) -> bool {
        self.key.verify_signature(Signature::Base64Encoded(signature_b64.as_bytes()), payload).is_ok()
    }
}

/// A private key that signs (ECDSA P-256, SHA-256, ASN.1 signatures: cosign's default).
pub struct SigningKey {
    signer: SigStoreSigner,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("public", &self.public.fingerprint).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random P-256 key.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let err = |e: sigstore::errors::SigstoreError| KeyError::Key { what: "new key".into(), reason: e.to_string() };
        let signer = SigningScheme::ECDSA_P256_SHA256_ASN1.create_signer().map_err(err)?;
        SigningKey::from_signer(signer, "new key")
    }

    fn from_signer(signer: SigStoreSigner, what: &str) -> Result<SigningKey, KeyError> {
        let err = |e: sigstore::errors::SigstoreError| KeyError::Key { what: what.to_owned(), reason: e.to_string() };
        let der = signer.to_sigstore_keypair().map_err(err)?.public_key_to_der().map_err(err)?;
        let public = PublicKey::from_der(der, what)?;
        Ok(SigningKey { signer, public })
    }

    /// Reads cosign's encrypted private key format (`ENCRYPTED SIGSTORE PRIVATE KEY` or the older
    /// `ENCRYPTED COSIGN PRIVATE KEY`: scrypt and NaCl secretbox). Only P-256 keys are accepted, so
    /// signatures are always what the agents verify.
    pub fn from_encrypted_pem(text: &[u8], password: &[u8], what: &str) -> Result<SigningKey, KeyError> {
        let pair = SigStoreKeyPair::from_encrypted_pem(text, password)
            .map_err(|e| KeyError::Decrypt { what: what.to_owned(), reason: e.to_string() })?;
        let signer = pair.to_sigstore_signer(&SigningScheme::ECDSA_P256_SHA256_ASN1).map_err(|e| KeyError::Key {
            what: what.to_owned(),
            reason: format!("{e}; only ECDSA P-256 keys are supported"),
        })?;
        SigningKey::from_signer(signer, what)
    }

    /// The private key encrypted with `password`, in cosign's format (`cosign sign --key` reads it).
    pub fn to_encrypted_pem(&self, password: &[u8]) -> Result<String, KeyError> {
        let err = |e: sigstore::errors::SigstoreError| KeyError::Key { what: "key".into(), reason: e.to_string() };
        let pair = self.signer.to_sigstore_keypair().map_err(err)?;
        Ok(pair.private_key_to_encrypted_pem(password).map_err(err)?.to_string())
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The base64 signature of `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<String, KeyError> {
        let raw =
            self.signer.sign(payload).map_err(|e| KeyError::Key { what: "signing".into(), reason: e.to_string() })?;
        Ok(base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

/// The descriptor of a signature layer for `payload` signed as `signature_b64`.
pub fn signature_layer(payload: &[u8], signature_b64: &str) -> Descriptor {
    let mut d = Descriptor::new(MEDIA_TYPE_SIMPLE_SIGNING, Digest::of(payload), payload.len() as u64);
    d.annotations.insert(ANNOTATION_SIGNATURE.to_owned(), signature_b64.to_owned());
    d
}

/// A signature manifest holding `layers`, and its config blob, shaped as cosign writes them.
pub fn signature_manifest(layers: Vec<Descriptor>) -> (ImageManifest, Vec<u8>) {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
    let config = serde_json::json!({
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
        artifact_type: None,
        config: Descriptor::new(MEDIA_TYPE_SIGNATURE_CONFIG, Digest::of(&config_bytes), config_bytes.len() as u64),
        layers,
        subject: None,
        annotations: BTreeMap::new(),
    };
    (manifest, config_bytes)
}

/// The signature layers of a signature manifest (simple-signing layers with a signature annotation), at
/// most [`MAX_SIGNATURES`]. Payload blobs larger than [`MAX_PAYLOAD_BYTES`] are left out: they are no
/// simple-signing payload.
pub fn signature_descriptors(manifest: &ImageManifest) -> Vec<&Descriptor> {
    manifest
        .layers
        .iter()
        .filter(|l| l.media_type == MEDIA_TYPE_SIMPLE_SIGNING && l.size <= MAX_PAYLOAD_BYTES)
        .filter(|l| l.annotation(ANNOTATION_SIGNATURE).is_some())
        .take(MAX_SIGNATURES)
        .collect()
}

/// One signature as read from a registry: the payload's bytes and the base64 signature.
#[derive(Clone, Debug)]
pub struct SignatureLayer {
    pub payload: Vec<u8>,
    pub signature: String,
}

impl SignatureLayer {
    /// The layer for `descriptor` whose payload bytes were fetched; None when the descriptor carries no
    /// signature annotation.
    pub fn new(descriptor: &Descriptor, payload: Vec<u8>) -> Option<SignatureLayer> {
        let signature = descriptor.annotation(ANNOTATION_SIGNATURE)?.to_owned();
        Some(SignatureLayer { payload, signature })
    }
}

/// What checking one signature found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SignatureCheck {
    /// The digest the payload names (empty when the payload is unreadable).
    pub signed_digest: String,
    /// `registry/repository` the payload names.
    pub docker_reference: String,
    /// Fingerprint of the trusted key that verified it.
    pub key_fingerprint: Option<String>,
    /// True when it is a valid signature of the digest asked about by a trusted key.
    pub verified: bool,
    /// Why not, for people.
    pub problem: Option<String>,
    #[serde(skip)]
    kind: Option<ProblemKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProblemKind {
    Untrusted,
    Invalid,
}

/// A verified signature: the digest it covers and the key that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub digest: Digest,
    pub key_fingerprint: String,
    pub docker_reference: String,
}

/// Why a digest's signatures do not verify. [`SignatureProblem::code`] is what the agent reports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    #[error("it is not signed (no signature at tag {tag}); sign it with `alkictl bundle sign`")]
    Missing { tag: String },
    #[error(
        "it is signed, but by no trusted key ({signatures} signature(s); trusted: {trusted}); sign it with a \
         trusted key or add the signer's public key to the trust policy"
    )]
    Untrusted { signatures: usize, trusted: String },
    #[error("its signature is not valid: {reason}; sign the bundle again with `alkictl bundle sign`")]
    Invalid { reason: String },
}

impl SignatureProblem {
    pub fn code(&self) -> ErrorCode {
        match self {
            SignatureProblem::Missing { .. } => ErrorCode::SignatureMissing,
            SignatureProblem::Untrusted { .. } => ErrorCode::SignatureUntrusted,
            SignatureProblem::Invalid { .. } => ErrorCode::SignatureInvalid,
        }
    }
}

/// Checks each signature of `digest` against `keys`.
pub fn check_each(digest: &Digest, layers: &[SignatureLayer], keys: &[PublicKey]) -> Vec<SignatureCheck> {
    layers.iter().take(MAX_SIGNATURES).map(|layer| check_one(digest, layer, keys)).collect()
}

fn check_one(digest: &Digest, layer: &SignatureLayer, keys: &[PublicKey]) -> SignatureCheck {
    let invalid = |signed: String, reference: String, key: Option<String>, reason: String| SignatureCheck {
        signed_digest: signed,
        docker_reference: reference,
        key_fingerprint: key,
        verified: false,
        problem: Some(reason),
        kind: Some(ProblemKind::Invalid),
    };
    let doc: SimpleSigning = match serde_json::from_slice(&layer.payload) {
        Ok(doc) => doc,
        Err(e) => {
            return invalid(
                String::new(),
                String::new(),
                None,
                format!("the payload is not simple-signing JSON ({e})"),
            );
        }
    };
    let signed = doc.critical.image.docker_manifest_digest.clone();
    let reference = doc.critical.identity.docker_reference.clone();
    if doc.critical.kind != SIMPLE_SIGNING_TYPE {
        let reason = format!("the payload's type is {:?}, not {SIMPLE_SIGNING_TYPE:?}", doc.critical.kind);
        return invalid(signed, reference, None, reason);
    }
    let by = keys.iter().find(|k| k.verifies(&layer.payload, &layer.signature)).map(|k| k.fingerprint().to_owned());
    if signed != digest.as_str() {
        let reason = match &by {
            Some(key) => format!(
                "it was made by trusted key {key} for {signed}, not for {digest} (a signature copied from another \
                 bundle, or a manifest edited after signing)"
            ),
            None => format!("it was made for {signed}, not for {digest}"),
        };
        return invalid(signed, reference, by, reason);
    }
    match by {
        Some(key) => SignatureCheck {
            signed_digest: signed,
            docker_reference: reference,
            key_fingerprint: Some(key),
            verified: true,
            problem: None,
            kind: None,
        },
        None => SignatureCheck {
            signed_digest: signed,
            docker_reference: reference,
            key_fingerprint: None,
            verified: false,
            problem: Some("no trusted key verifies it".to_owned()),
            kind: Some(ProblemKind::Untrusted),
        },
    }
}

/// Verifies that at least one of `layers` is a valid signature of `digest` by one of `keys`.
/// `layers` empty means unsigned ([`SignatureProblem::Missing`]).
pub fn verify(digest: &Digest, layers: &[SignatureLayer], keys: &[PublicKey]) -> Result<Verified, SignatureProblem> {
    if layers.is_empty() {
        return Err(SignatureProblem::Missing { tag: signature_tag(digest) });
    }
    let checks = check_each(digest, layers, keys);
    if let Some(ok) = checks.iter().find(|c| c.verified) {
        return Ok(Verified {
            digest: digest.clone(),
            key_fingerprint: ok.key_fingerprint.clone().unwrap_or_default(),
            docker_reference: ok.docker_reference.clone(),
        });
    }
    if checks.iter().any(|c| c.kind == Some(ProblemKind::Untrusted)) {
        let trusted = if keys.is_empty() {
            "none".to_owned()
        } else {
            keys.iter().map(|k| short_fingerprint(k.fingerprint())).collect::<Vec<_>>().join(", ")
        };
        return Err(SignatureProblem::Untrusted { signatures: checks.len(), trusted });
    }
    let reason = checks.iter().find_map(|c| c.problem.clone()).unwrap_or_else(|| "no signature layer".to_owned());
    Err(SignatureProblem::Invalid { reason })
}

/// `sha256:ab12cd34ef56` for messages.
pub fn short_fingerprint(f: &str) -> String {
    f.chars().take("sha256:".len() + 12).collect()
}

/// The DER inside a PEM block labelled `label`.
fn pem_contents(text: &[u8], label: &str) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "not text".to_owned())?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or_else(|| format!("no {begin} line"))? + begin.len();
    let stop = text[start..].find(&end).ok_or_else(|| format!("no {end} line"))? + start;
    let body: String = text[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(body).map_err(|e| format!("bad base64: {e}"))
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sigstore-rs's own test vector (crypto/verification_key.rs, `verify_signature_success`): a
    /// signature made by cosign, outside this code, over a classic simple-signing payload.
    const COSIGN_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENptdY/l3nB0yqkXLBWkZWQwo6+cu
OSWS1X9vPavpiQOoTTGC0xX57OojUadxF1cdQmrsiReWg2Wn4FneJfa8xw==
-----END PUBLIC KEY-----";
    const COSIGN_SIGNATURE: &str =
        "MEUCIQD6q/COgzOyW0YH1Dk+CCYSt4uAhm3FDHUwvPI55zwnlwIgE0ZK58ZOWpZw8YVmBapJhBqCfdPekIknimuO0xH8Jh8=";
    const COSIGN_PAYLOAD: &str = r#"{"critical":{"identity":{"docker-reference":"registry-testing.svc.lan/busybox"},"image":{"docker-manifest-digest":"sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b"},"type":"cosign container image signature"},"optional":null}"#;
    /// A key written by `cosign generate-key-pair` with an empty password (sigstore-rs's
    /// tests/data/keys/cosign_generated_encrypted_empty_private.key).
    const COSIGN_PRIVATE_KEY: &str = include_str!("../tests/fixtures/cosign_generated_encrypted_empty_private.key");

    fn digest(hex: &str) -> Digest {
        format!("sha256:{hex}").parse().expect("digest")
    }

    #[test]
    fn key_files_are_read_up_to_a_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("ci.pub");
        std::fs::write(&good, COSIGN_PUBLIC_KEY).expect("write");
        assert!(PublicKey::load(&good).is_ok());
        let huge = dir.path().join("model.gguf");
        std::fs::write(&huge, vec![b'A'; MAX_KEY_FILE as usize + 1]).expect("write");
        assert!(matches!(PublicKey::load(&huge), Err(KeyError::TooLarge { .. })));
        // A device file that never ends is refused too, after reading the cap.
        assert!(matches!(PublicKey::load(Path::new("/dev/zero")), Err(KeyError::TooLarge { .. })));
    }

    #[test]
    fn a_signature_made_by_cosign_verifies_and_names_its_key() {
        let key = PublicKey::from_pem(COSIGN_PUBLIC_KEY.as_bytes(), "test vector").expect("key");
        let signed = digest("f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b");
        let layer = SignatureLayer { payload: COSIGN_PAYLOAD.as_bytes().to_vec(), signature: COSIGN_SIGNATURE.into() };
        let verified = verify(&signed, std::slice::from_ref(&layer), std::slice::from_ref(&key)).expect("verifies");
        assert_eq!(verified.key_fingerprint, key.fingerprint());
        assert_eq!(verified.docker_reference, "registry-testing.svc.lan/busybox");
        // The same signature does not cover another digest.
        let other = verify(&Digest::of(b"other"), std::slice::from_ref(&layer), std::slice::from_ref(&key));
        assert!(matches!(other, Err(SignatureProblem::Invalid { .. })), "{other:?}");
        assert_eq!(other.expect_err("invalid").code(), ErrorCode::SignatureInvalid);
    }

    #[test]
    fn a_key_file_written_by_cosign_signs_what_its_public_key_verifies() {
        let key = SigningKey::from_encrypted_pem(COSIGN_PRIVATE_KEY.as_bytes(), b"", "cosign key").expect("decrypt");
        let d = Digest::of(b"bundle");
        let body = payload("127.0.0.1:7080/acme/qwen", &d);
        let layer = SignatureLayer { signature: key.sign(&body).expect("sign"), payload: body };
        let public = PublicKey::from_pem(key.public_key().to_pem().as_bytes(), "pem").expect("round trip");
        assert!(verify(&d, &[layer], &[public]).is_ok());
        let wrong = SigningKey::from_encrypted_pem(COSIGN_PRIVATE_KEY.as_bytes(), b"wrong", "cosign key");
        assert!(matches!(wrong, Err(KeyError::Decrypt { .. })), "{wrong:?}");
    }

    #[test]
    fn generated_keys_round_trip_through_the_encrypted_format() {
        let key = SigningKey::generate().expect("generate");
        let pem = key.to_encrypted_pem(b"hunter2").expect("encrypt");
        assert!(pem.contains("ENCRYPTED SIGSTORE PRIVATE KEY"), "{pem}");
        let back = SigningKey::from_encrypted_pem(pem.as_bytes(), b"hunter2", "k").expect("decrypt");
        assert_eq!(back.public_key().fingerprint(), key.public_key().fingerprint());
    }

    #[test]
    fn each_failure_has_its_own_reason() {
        let trusted = SigningKey::generate().expect("key");
        let stranger = SigningKey::generate().expect("key");
        let keys = [trusted.public_key().clone()];
        let d = Digest::of(b"bundle");
        let sign = |k: &SigningKey, for_digest: &Digest| {
            let body = payload("r/acme/qwen", for_digest);
            SignatureLayer { signature: k.sign(&body).expect("sign"), payload: body }
        };
        assert!(matches!(verify(&d, &[], &keys), Err(SignatureProblem::Missing { .. })));
        let untrusted = verify(&d, &[sign(&stranger, &d)], &keys).expect_err("untrusted");
        assert_eq!(untrusted.code(), ErrorCode::SignatureUntrusted, "{untrusted}");
        let copied = verify(&d, &[sign(&trusted, &Digest::of(b"another bundle"))], &keys).expect_err("copied");
        assert_eq!(copied.code(), ErrorCode::SignatureInvalid);
        assert!(copied.to_string().contains("not for"), "{copied}");
        let mut garbled = sign(&trusted, &d);
        garbled.payload = b"{not json".to_vec();
        assert_eq!(verify(&d, &[garbled], &keys).expect_err("garbled").code(), ErrorCode::SignatureInvalid);
        // A payload edited after signing no longer matches its signature.
        let mut edited = sign(&trusted, &d);
        edited.payload = String::from_utf8(edited.payload).expect("utf8").replace("r/acme", "x/acme").into_bytes();
        assert_eq!(verify(&d, &[edited], &keys).expect_err("edited").code(), ErrorCode::SignatureUntrusted);
        // Any one good signature among bad ones is enough.
        assert!(verify(&d, &[sign(&stranger, &d), sign(&trusted, &d)], &keys).is_ok());
    }

    #[test]
    fn tags_and_manifests_have_cosign_shapes() {
        let d = digest("f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b");
        let tag = signature_tag(&d);
        assert_eq!(tag, "sha256-f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b.sig");
        assert_eq!(digest_of_signature_tag(&tag), Some(d.clone()));
        assert_eq!(digest_of_signature_tag("latest"), None);
        let body = payload("reg/acme/qwen", &d);
        let (manifest, config) = signature_manifest(vec![signature_layer(&body, "c2ln")]);
        assert_eq!(manifest.config.digest, Digest::of(&config));
        let layers = signature_descriptors(&manifest);
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].annotation(ANNOTATION_SIGNATURE), Some("c2ln"));
        let parsed: SimpleSigning = serde_json::from_slice(&body).expect("payload");
        assert_eq!(parsed.critical.image.docker_manifest_digest, d.to_string());
        assert!(PublicKey::from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "x").is_err());
        assert!(PublicKey::from_pem(b"hello", "x").is_err());
    }
}
