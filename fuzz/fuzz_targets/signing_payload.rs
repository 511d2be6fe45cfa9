//! The simple-signing payload parser and signature check (alki_shared::signing::verify, check_each) on
//! arbitrary payloads. The first byte chooses the signature: 0 the bytes after the payload's first NUL as
//! is, 1 a real signature by the trusted key, 2 a real signature by another key, 3 the trusted key's
//! signature of the payload before one byte was appended. Only a payload signed by the trusted key that
//! names the bundle's digest with cosign's type may verify, and such a payload must. The same bytes also go
//! to the PEM public key parser.

#![no_main]

use std::sync::OnceLock;

use alki_shared::digest::Digest;
use alki_shared::signing::{self, PublicKey, SignatureLayer, SigningKey, SimpleSigning};
use libfuzzer_sys::fuzz_target;

/// The digest every payload is checked for: the seeds' payloads name it.
const SIGNED: &[u8] = b"alki fuzz bundle";

struct Keys {
    trusted: SigningKey,
    other: SigningKey,
    digest: Digest,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        trusted: SigningKey::generate().expect("generate the trusted key"),
        other: SigningKey::generate().expect("generate another key"),
        digest: Digest::of(SIGNED),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let keys = keys();
    let (payload, signature) = match mode % 4 {
        0 => match rest.iter().position(|b| *b == 0) {
            Some(at) => (rest[..at].to_vec(), String::from_utf8_lossy(&rest[at + 1..]).into_owned()),
            None => (rest.to_vec(), String::new()),
        },
        1 => (rest.to_vec(), keys.trusted.sign(rest).expect("sign")),
        2 => (rest.to_vec(), keys.other.sign(rest).expect("sign")),
        _ => ([rest, b" "].concat(), keys.trusted.sign(rest).expect("sign")),
    };
    let layers = [SignatureLayer { payload: payload.clone(), signature }];
    let trusted = [keys.trusted.public_key().clone()];
    let verified = signing::verify(&keys.digest, &layers, &trusted);
    let checks = signing::check_each(&keys.digest, &layers, &trusted);
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].verified, verified.is_ok(), "check_each and verify disagree");

    let doc: Option<SimpleSigning> = serde_json::from_slice(&payload).ok();
    let names_digest = doc.as_ref().is_some_and(|d| {
        d.critical.image.docker_manifest_digest == keys.digest.as_str()
            && d.critical.kind == signing::SIMPLE_SIGNING_TYPE
    });
    match &verified {
        Ok(v) => {
            assert_eq!(mode % 4, 1, "verified without the trusted key's signature of these bytes");
            assert!(names_digest, "verified a payload that does not name the digest: {doc:?}");
            assert_eq!(v.digest, keys.digest);
            assert_eq!(v.key_fingerprint, keys.trusted.public_key().fingerprint());
        }
        Err(problem) => {
            assert!(!(mode % 4 == 1 && names_digest), "a good signature refused: {problem}");
            let _ = (problem.to_string(), problem.code());
        }
    }

    if let Ok(key) = PublicKey::from_pem(rest, "fuzz input") {
        let _ = (key.fingerprint(), key.to_pem(), key.verifies(&payload, &layers[0].signature));
    }
});
