//! `alkictl key sign-blob` / `key verify-blob` as a release script runs them: the real binary, keys from
//! `alkictl key generate`, and the signature format held to cosign's by two outside parties: openssl verifies
//! what alkictl signs, and alkictl verifies a signature cosign itself made and one openssl made.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PASSWORD: &str = "release-test-password";

/// sigstore-rs's test vector (crypto/verification_key.rs, `verify_signature_success`; also in
/// shared/src/signing.rs): a signature cosign made over exactly these bytes with this key. `cosign
/// sign-blob --key` signs a blob's bytes the same way, so this is a cosign blob signature.
const COSIGN_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENptdY/l3nB0yqkXLBWkZWQwo6+cu
OSWS1X9vPavpiQOoTTGC0xX57OojUadxF1cdQmrsiReWg2Wn4FneJfa8xw==
-----END PUBLIC KEY-----
";
const COSIGN_SIGNATURE: &str =
    "MEUCIQD6q/COgzOyW0YH1Dk+CCYSt4uAhm3FDHUwvPI55zwnlwIgE0ZK58ZOWpZw8YVmBapJhBqCfdPekIknimuO0xH8Jh8=";
const COSIGN_PAYLOAD: &str = r#"{"critical":{"identity":{"docker-reference":"registry-testing.svc.lan/busybox"},"image":{"docker-manifest-digest":"sha256:f3cfc9d0dbf931d3db4685ec659b7ac68e2a578219da4aae65427886e649b06b"},"type":"cosign container image signature"},"optional":null}"#;

/// alkictl with the key password in the environment (and no other password variable, whatever the
/// caller's environment holds).
fn alkictl(args: &[&str], password: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_alkictl"))
        .args(args)
        .env("ALKI_KEY_PASSWORD", password)
        .env_remove("COSIGN_PASSWORD")
        .output()
        .expect("alkictl runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "alkictl failed: {}", stderr(&out));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "alkictl succeeded: {}", String::from_utf8_lossy(&out.stdout));
    stderr(&out)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh key pair `<dir>/<name>.key` / `.pub`.
fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let prefix = dir.join(name);
    ok(alkictl(&["key", "generate", "--output-prefix", s(&prefix)], PASSWORD));
    (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")))
}

/// A checksum file like the release writes.
fn sums(dir: &Path) -> PathBuf {
    let file = dir.join("SHA256SUMS");
    std::fs::write(
        &file,
        "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b  alki-agent_0.1.0-1_amd64.deb\n\
         d4735e3a265e16eee03f59718b9b5d03019c07d8b6c51f90da3a666eec13ab35  alki-controller_0.1.0-1_amd64.deb\n",
    )
    .expect("write");
    file
}

fn sign(file: &Path, key: &Path) -> PathBuf {
    let sig = PathBuf::from(format!("{}.sig", file.display()));
    ok(alkictl(&["key", "sign-blob", s(file), "--key", s(key), "--output-signature", s(&sig)], PASSWORD));
    sig
}

fn verify(file: &Path, public: &Path, sig: &Path) -> Output {
    alkictl(&["key", "verify-blob", s(file), "--key", s(public), "--signature", s(sig)], "")
}

#[test]
fn a_signed_file_verifies_and_the_outputs_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_pair(dir.path(), "release");
    let file = sums(dir.path());
    let sig = sign(&file, &key);
    let text = std::fs::read_to_string(&sig).expect("read the signature");
    assert!(!text.ends_with('\n'), "cosign writes the base64 signature without a newline: {text:?}");
    assert!(ok(verify(&file, &public, &sig)).contains("Verified OK"));

    // Without --output-signature the signature alone goes to stdout, as cosign prints it. ECDSA signatures
    // are randomised, so it is another one, and it verifies too (after the shell's newline).
    let printed = ok(alkictl(&["key", "sign-blob", s(&file), "--key", s(&key)], PASSWORD));
    assert_eq!(printed.lines().count(), 1, "{printed}");
    let other = dir.path().join("printed.sig");
    std::fs::write(&other, &printed).expect("write");
    ok(verify(&file, &public, &other));

    // -o json: the same signature, the file's digest and the key's fingerprint, for scripts.
    let json = ok(alkictl(
        &["-o", "json", "key", "sign-blob", s(&file), "--key", s(&key), "--output-signature", s(&sig)],
        PASSWORD,
    ));
    let signed: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(signed["signature"].as_str(), Some(std::fs::read_to_string(&sig).expect("read").as_str()));
    let content = std::fs::read(&file).expect("read");
    assert_eq!(signed["size"].as_u64(), Some(content.len() as u64));
    let verified: serde_json::Value = serde_json::from_str(&ok(alkictl(
        &["-o", "json", "key", "verify-blob", s(&file), "--key", s(&public), "--signature", s(&sig)],
        "",
    )))
    .expect("json");
    assert_eq!(verified["verified"], serde_json::Value::Bool(true));
    assert_eq!(verified["sha256"], signed["sha256"]);
    assert_eq!(verified["key_fingerprint"], signed["key_fingerprint"]);
}

#[test]
fn a_changed_byte_or_another_key_fails_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_pair(dir.path(), "release");
    let (_, stranger) = key_pair(dir.path(), "stranger");
    let file = sums(dir.path());
    let sig = sign(&file, &key);

    let mut bytes = std::fs::read(&file).expect("read");
    bytes[0] ^= 1;
    let changed = dir.path().join("SHA256SUMS.changed");
    std::fs::write(&changed, &bytes).expect("write");
    let error = failed(verify(&changed, &public, &sig));
    assert!(error.contains("does not verify") && error.contains("changed after it was signed"), "{error}");

    let error = failed(verify(&file, &stranger, &sig));
    assert!(error.contains("does not verify") && error.contains("another key"), "{error}");

    // A signature file that is not one is named as such, not reported as a bad signature.
    let error = failed(verify(&file, &public, &public));
    assert!(error.contains("is not a base64 signature"), "{error}");
}

#[test]
fn mistakes_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_pair(dir.path(), "release");
    let file = sums(dir.path());
    let sig = sign(&file, &key);
    let missing = dir.path().join("nope");

    let error = failed(alkictl(&["key", "sign-blob", s(&missing), "--key", s(&key)], PASSWORD));
    assert!(error.contains("cannot read") && error.contains("check the path"), "{error}");
    let error = failed(verify(&missing, &public, &sig));
    assert!(error.contains("cannot read") && error.contains("check the path"), "{error}");
    let error = failed(verify(&file, &public, &missing));
    assert!(error.contains("cannot read the signature file"), "{error}");

    let error = failed(alkictl(&["key", "sign-blob", s(&file), "--key", s(&key)], "wrong password"));
    assert!(error.contains("wrong password") && error.contains("ALKI_KEY_PASSWORD"), "{error}");
    // The halves swapped.
    let error = failed(alkictl(&["key", "sign-blob", s(&file), "--key", s(&public)], PASSWORD));
    assert!(error.contains("is a public key") && error.contains(".key"), "{error}");
    let error = failed(verify(&file, &key, &sig));
    assert!(error.contains("is a private key") && error.contains(".pub"), "{error}");

    // Past the cap, nothing is read (a sparse file: no disk or memory spent).
    let big = dir.path().join("big.iso");
    std::fs::File::create(&big).and_then(|f| f.set_len((64 << 20) + 1)).expect("sparse file");
    let error = failed(alkictl(&["key", "sign-blob", s(&big), "--key", s(&key)], PASSWORD));
    assert!(error.contains("more than the 64.00 MiB") && error.contains("SHA256SUMS"), "{error}");
}

/// `openssl` on PATH, or a failure that says how to get it (the test proves compatibility; skipping it
/// would hide a break).
fn openssl(args: &[&str]) -> Output {
    Command::new("openssl").args(args).output().expect("openssl runs (apt-get install openssl)")
}

#[test]
fn openssl_verifies_what_alkictl_signs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_pair(dir.path(), "release");
    let file = sums(dir.path());
    let sig = sign(&file, &key);
    // The .sig is base64 of a DER ECDSA signature over SHA-256 of the file: exactly `openssl dgst -sha256
    // -sign`'s output, base64-encoded.
    let der = dir.path().join("sig.der");
    let out = openssl(&["base64", "-d", "-A", "-in", s(&sig), "-out", s(&der)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = openssl(&["dgst", "-sha256", "-verify", s(&public), "-signature", s(&der), s(&file)]);
    assert!(out.status.success(), "openssl rejects it: {}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Verified OK"));
    // And rejects it for a changed file, so the check above means something.
    let changed = dir.path().join("changed");
    std::fs::write(&changed, b"not the file").expect("write");
    let out = openssl(&["dgst", "-sha256", "-verify", s(&public), "-signature", s(&der), s(&changed)]);
    assert!(!out.status.success());
}

#[test]
fn alkictl_verifies_what_openssl_and_cosign_sign() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = sums(dir.path());
    // A P-256 key and a signature made by openssl alone.
    let private = dir.path().join("openssl.pem");
    let public = dir.path().join("openssl.pub");
    let der = dir.path().join("sig.der");
    let sig = dir.path().join("SHA256SUMS.sig");
    for args in [
        &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", s(&private)][..],
        &["ec", "-in", s(&private), "-pubout", "-out", s(&public)],
        &["dgst", "-sha256", "-sign", s(&private), "-out", s(&der), s(&file)],
        &["base64", "-A", "-in", s(&der), "-out", s(&sig)],
    ] {
        let out = openssl(args);
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    }
    assert!(ok(verify(&file, &public, &sig)).contains("Verified OK"));

    // The signature cosign made over the test vector's bytes.
    let blob = dir.path().join("payload.json");
    let cosign_pub = dir.path().join("cosign.pub");
    let cosign_sig = dir.path().join("payload.json.sig");
    std::fs::write(&blob, COSIGN_PAYLOAD).expect("write");
    std::fs::write(&cosign_pub, COSIGN_PUBLIC_KEY).expect("write");
    std::fs::write(&cosign_sig, COSIGN_SIGNATURE).expect("write");
    assert!(ok(verify(&blob, &cosign_pub, &cosign_sig)).contains("Verified OK"));
    std::fs::write(&blob, COSIGN_PAYLOAD.replace("busybox", "busyb0x")).expect("write");
    failed(verify(&blob, &cosign_pub, &cosign_sig));
}

#[test]
fn a_private_key_written_by_cosign_signs_blobs() {
    // `cosign generate-key-pair` with an empty password (sigstore-rs's test data, kept in shared/).
    let cosign_key = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/tests/fixtures/cosign_generated_encrypted_empty_private.key");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = sums(dir.path());
    let sig = dir.path().join("SHA256SUMS.sig");
    let json = ok(alkictl(
        &["-o", "json", "key", "sign-blob", s(&file), "--key", s(&cosign_key), "--output-signature", s(&sig)],
        "",
    ));
    let signed: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert!(signed["key_fingerprint"].as_str().is_some_and(|f| f.starts_with("sha256:")), "{json}");
}
