#!/usr/bin/env python3
"""Writes the committed seed corpora in fuzz/corpus/<target>/: a few valid inputs per fuzz target (and a few
hostile ones the code already refuses), built the way the project's own code and fixtures build them:

- gguf: GGUF v3/v2 files laid out as e2e/src/tiny_model.rs writes them (llama metadata, a tokenizer, F32,
  F16 and Q8_0 tensors), small enough to mutate quickly.
- oci_manifest: an index, a variant manifest and a config shaped as bundle/src/pack.rs packs them, a cosign
  signature manifest as shared/src/signing.rs writes it, a runtime build config (shared/src/bundle.rs).
- extract: tar layers like agent/src/pull/extract.rs's tests make (a good build with links and a nested
  file; traversal, absolute links, writes through links), plus GNU long names and PAX headers.
- signing_payload: the simple-signing payload of shared/src/signing.rs `payload()` for the digest the target
  checks, behind each mode byte, and a PEM public key.
- agent_config, trust_policy: deploy/config/*.toml and the examples in agent/src/config.rs's tests.

Run from anywhere: python3 fuzz/seeds.py. Deterministic: the same files every time.
"""

import hashlib
import io
import json
import os
import struct
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- gguf -------------------------------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(kind, v):
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}
    if kind == STRING:
        return gguf_string(v)
    if kind == ARRAY:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(gguf_value(elem, i) for i in items)
    return struct.pack(fmt[kind], v)


def gguf(metadata, tensors, version=3, alignment=32):
    """tensors: (name, dims, ggml type, data bytes); offsets aligned as tiny_model.rs aligns them."""
    out = b"GGUF" + struct.pack("<Iqq", version, len(tensors), len(metadata))
    for key, kind, v in metadata:
        out += gguf_string(key) + struct.pack("<I", kind) + gguf_value(kind, v)
    offset, data = 0, b""
    for name, dims, ggml_type, blob in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
        pad = (-len(blob)) % alignment
        data += blob + b"\0" * pad
        offset += len(blob) + pad
    out += b"\0" * ((-len(out)) % alignment)
    return out + data


def tiny_llama(version=3, per_layer_heads=False, alignment=None):
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(8)] + ["\u2581w%d" % i for i in range(4)]
    heads = (ARRAY, (U32, [4, 4])) if per_layer_heads else (U32, 4)
    meta = [
        ("general.architecture", STRING, "llama"),
        ("general.name", STRING, "alki-tiny"),
        ("general.file_type", U32, 1),
        ("llama.vocab_size", U32, len(tokens)),
        ("llama.context_length", U32, 2048),
        ("llama.embedding_length", U32, 64),
        ("llama.block_count", U32, 2),
        ("llama.feed_forward_length", U32, 128),
        ("llama.attention.head_count", heads[0], heads[1]),
        ("llama.attention.head_count_kv", U32, 4),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("tokenizer.ggml.model", STRING, "llama"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.scores", ARRAY, (F32, [-float(i) for i in range(len(tokens))])),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [2, 3, 3] + [6] * 8 + [1] * 4)),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.chat_template", STRING, "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    ]
    if alignment:
        meta.append(("general.alignment", U32, alignment))
    tensors = [
        ("token_embd.weight", [32, 2], GGML_F16, b"\x00\x3c" * 64),
        ("blk.0.attn_norm.weight", [32], GGML_F32, struct.pack("<32f", *([1.0] * 32))),
        ("blk.0.ffn_down.weight", [32, 1], GGML_Q8_0, b"\x00\x3c" + bytes(range(32))),
    ]
    return gguf(meta, tensors, version=version, alignment=alignment or 32)


def gguf_seeds():
    write("gguf", "tiny-llama-v3", tiny_llama())
    write("gguf", "tiny-llama-v2-per-layer-heads", tiny_llama(version=2, per_layer_heads=True, alignment=64))
    many = [("k.u8", U8, 7), ("k.i8", I8, -7), ("k.u16", U16, 7), ("k.i16", I16, -7), ("k.i32", I32, -7),
            ("k.u64", U64, 1 << 40), ("k.i64", I64, -(1 << 40)), ("k.f64", F64, 0.5), ("k.bool", BOOL, True),
            ("k.long", ARRAY, (U8, list(range(80)))), ("k.strs", ARRAY, (STRING, ["a", "bb", ""]))]
    write("gguf", "metadata-only-all-types", gguf(many, []))


# --- oci_manifest -----------------------------------------------------------------------------------------
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
ARTIFACT_MODEL = "application/vnd.cncf.model.manifest.v1+json"
CREATED = "2025-01-01T00:00:00Z"


def desc(media_type, data, **extra):
    d = {"mediaType": media_type, "digest": digest(data), "size": len(data)}
    d.update(extra)
    return d


def compact(doc):
    # serde_json::to_vec's output: no spaces.
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def oci_seeds():
    weights = tiny_llama()
    # RuntimeDefaults (shared/src/bundle.rs) as pack.rs writes the runtime layer.
    runtime = compact({"context_size": 2048, "threads": 0, "gpu_layers": 0, "parallel_slots": 1,
                       "chat_template": "{{ messages }}", "health_path": "/health",
                       "runtime_build": "alki/runtime@" + digest(b"runtime build")})
    config = compact({
        "descriptor": {"name": "alki-tiny", "version": "1", "licenses": ["Apache-2.0"], "createdAt": CREATED},
        "config": {"format": "gguf", "architecture": "llama", "quantization": "F16", "paramSize": "4096"},
        "modelfs": {"type": "layers", "diffIds": [digest(weights)]},
    })
    manifest = compact({
        "schemaVersion": 2,
        "mediaType": IMAGE_MANIFEST,
        "artifactType": ARTIFACT_MODEL,
        "config": desc("application/vnd.cncf.model.config.v1+json", config),
        "layers": [
            desc("application/vnd.cncf.model.weight.v1.raw", weights,
                 annotations={"org.opencontainers.image.title": "alki-tiny-F16.gguf",
                              "org.cncf.model.filepath": "alki-tiny-F16.gguf"}),
            desc("application/vnd.alki.runtime.v1+json", runtime),
            desc("application/vnd.cncf.model.doc.v1.raw", b"# README\n",
                 annotations={"org.opencontainers.image.title": "README.md"}),
        ],
        "annotations": {"org.opencontainers.image.created": CREATED},
    })
    index = compact({
        "schemaVersion": 2,
        "mediaType": IMAGE_INDEX,
        "artifactType": ARTIFACT_MODEL,
        "manifests": [
            desc(IMAGE_MANIFEST, manifest, artifactType=ARTIFACT_MODEL, annotations={
                "ai.alki.quantization": "F16", "ai.alki.architecture": "llama", "ai.alki.model-name": "alki-tiny",
                "ai.alki.parameters": "4096", "ai.alki.context-length": "2048",
                "ai.alki.weights-bytes": str(len(weights)), "ai.alki.memory-bytes": str(len(weights) * 2)}),
            desc(IMAGE_MANIFEST, manifest + b" ", platform={"architecture": "arm64", "os": "linux", "variant": "v8"},
                 annotations={"ai.alki.quantization": "Q8_0", "ai.alki.weights-bytes": "100"}),
        ],
        "annotations": {"org.opencontainers.image.created": CREATED},
    })
    write("oci_manifest", "model-index", index)
    write("oci_manifest", "model-variant-manifest", manifest)
    write("oci_manifest", "model-config", config)
    write("oci_manifest", "runtime-defaults", runtime)
    payload = simple_signing_payload("registry.example:5000/acme/model", digest(index))
    signature = compact({
        "schemaVersion": 2,
        "mediaType": IMAGE_MANIFEST,
        "config": desc("application/vnd.oci.image.config.v1+json", b"{}"),
        "layers": [desc("application/vnd.dev.cosign.simplesigning.v1+json", payload,
                        annotations={"dev.cosignproject.cosign/signature": "MEUCIQDfake"})],
        "subject": desc(IMAGE_INDEX, index),
    })
    write("oci_manifest", "cosign-signature-manifest", signature)
    docker_list = compact({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [desc("application/vnd.docker.distribution.manifest.v2+json", b"x",
                           platform={"architecture": "amd64", "os": "linux"}, urls=["https://example.invalid/x"])],
    })
    write("oci_manifest", "docker-manifest-list", docker_list)
    build = compact({"version": "b1234", "build_info": "version: 1234", "accelerator": "cpu", "os": "linux",
                     "architecture": "amd64"})
    write("oci_manifest", "runtime-build-config", build)
    write("oci_manifest", "runtime-build-reference",
          "registry.example:5000/alki/runtime:b1234@" + digest(b"runtime build"))


# --- extract ----------------------------------------------------------------------------------------------
def tar_bytes(entries, fmt=tarfile.GNU_FORMAT):
    """entries: (name, type, data, linkname, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, data, link, mode in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            info.linkname = link or ""
            info.mode = mode
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    # Without tarfile's padding to a 10 KiB record: the entries, then the two zero blocks that end an archive.
    body = buf.getvalue().rstrip(b"\0")
    return body + b"\0" * ((-len(body)) % 512) + b"\0" * 1024


def extract_seeds():
    R, D, S, L = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    write("extract", "good-build", tar_bytes([
        ("llama-server", R, b"#!/bin/sh\n", None, 0o4755),
        ("lib", D, b"", None, 0o755),
        ("lib/libllama.so.0", R, b"ELF", None, 0o644),
        ("libllama.so", S, b"", "lib/libllama.so.0", 0o777),
        ("./sub/deeper/x", R, b"x", None, 0o600),
    ]))
    long_name = "lib/" + "n" * 120 + "/libggml-base.so"
    write("extract", "gnu-long-names", tar_bytes([
        ("llama-server", R, b"#!/bin/sh\n", None, 0o755),
        (long_name, R, b"ELF", None, 0o644),
        ("lib/" + "l" * 110, S, b"", "n" * 120 + "/libggml-base.so", 0o777),
    ]))
    write("extract", "pax-headers", tar_bytes([
        ("llama-server", R, b"#!/bin/sh\n", None, 0o755),
        ("d/\u00e9t\u00e9.txt", R, b"pax", None, 0o644),
    ], fmt=tarfile.PAX_FORMAT))
    write("extract", "dotdot", tar_bytes([("a/../../evil", R, b"x", None, 0o644)]))
    write("extract", "link-up-then-write", tar_bytes([
        ("l", S, b"", "../outside", 0o777),
        ("l/sentinel", R, b"overwritten", None, 0o644),
    ]))
    write("extract", "write-through-link", tar_bytes([
        ("d", S, b"", "sub", 0o777),
        ("sub", D, b"", None, 0o755),
        ("d/x", R, b"x", None, 0o644),
    ]))
    write("extract", "hard-link", tar_bytes([("h", L, b"", "/etc/shadow", 0o644)]))


# --- signing_payload --------------------------------------------------------------------------------------
SIGNED_DIGEST = digest(b"alki fuzz bundle")  # the digest fuzz_targets/signing_payload.rs checks


def simple_signing_payload(reference, digest_str):
    # shared/src/signing.rs payload(): serde_json of SimpleSigning, fields in declaration order.
    return compact({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest_str},
            "type": "cosign container image signature",
        },
        "optional": None,
    })


PUBLIC_KEY_PEM = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEbFPBOfgcUmtl+cN8xWTqrmOqwCBr
3eWQpuPyfUYHo1JewJmkkDtIeTeOV9Cy9l4ASONxG+4ZveiCzgyvCH49Lg==
-----END PUBLIC KEY-----
"""


def signing_seeds():
    good = simple_signing_payload("registry.example:5000/acme/model", SIGNED_DIGEST)
    write("signing_payload", "trusted-good", b"\x01" + good)
    write("signing_payload", "other-key-good", b"\x02" + good)
    write("signing_payload", "trusted-appended", b"\x03" + good)
    write("signing_payload", "raw-signature", b"\x00" + good + b"\x00MEUCIQDfakefakefake==")
    other = simple_signing_payload("registry.example:5000/acme/model", digest(b"another bundle"))
    write("signing_payload", "trusted-other-digest", b"\x01" + other)
    with_optional = good.replace(b'"optional":null', b'"optional":{"creator":"alkictl","n":1}')
    write("signing_payload", "trusted-with-optional", b"\x01" + with_optional)
    write("signing_payload", "public-key-pem", b"\x00" + PUBLIC_KEY_PEM.encode())


# --- agent_config, trust_policy ---------------------------------------------------------------------------
CONFIG_EXAMPLE = '''
device_id = "pi-001"
data_dir = "/var/lib/alki-agent"
labels = { site = "lab", class = "x86-avx2" }
[controller]
url = "http://127.0.0.1:7070"
insecure_plaintext = true
token_file = "/etc/alki/agent.token"
[registry]
insecure_plain_http = ["127.0.0.1:5000"]
bandwidth_limit_kib = 2048
[runtime]
llama_server = "/usr/local/bin/llama-server"
front_addr = "127.0.0.1:8080"
health_timeout_secs = 120
drain_timeout_secs = 30
extra_args = []
watch_window_secs = 60
swap_strategy = "auto"
memory_reserve_mib = 256
gap_wait_secs = 30
[store]
budget_mib = 20480
disk_reserve_mib = 512
[eval]
gap_budget_seconds = 120
'''

CONFIG_MINIMAL = '''
data_dir = "/data"
[controller]
url = "https://ctl.example:7070/"
ca_file = "/etc/alki/ca.crt"
[runtime]
llama_server = "/bin/llama-server"
'''

CONFIG_MIRRORS = '''
data_dir = "/data"
metrics_addr = "127.0.0.1:9464"
[controller]
url = "https://[::1]:7070"
ca_file = "/etc/alki/ca.crt"
[registry]
embedded = "ctl.example:7070"
mirrors = { "registry.example.com:5000" = ["cache.site.internal:5000", "10.0.0.2:5000"] }
[registry.credentials."registry.example.com:5000"]
username = "fleet-reader"
password_file = "/etc/alki/registry.password"
[runtime]
llama_server = "/bin/llama-server"
front_addr = "0.0.0.0:8080"
api_keys_file = "/etc/alki/api-keys"
requests_per_minute_per_client = 600
extra_args = ["--threads", "4"]
'''

TRUST_TWO_RULES = '''# acme/*/models*: the first line is also matched as a pattern against itself
[[repository]]
pattern = "acme/*"
keys = ["keys/release.pub", "/etc/alki/keys/release.pub"]

[[repository]]
pattern = "lab/*"
required = false
'''

TRUST_BROKEN_KEY = '''[[repository]]
pattern = "*"
keys = ["keys/broken.pub"]
required = true
'''


def config_seeds():
    with open(os.path.join(ROOT, "deploy/config/agent.toml"), "rb") as f:
        write("agent_config", "deploy-agent.toml", f.read())
    write("agent_config", "example.toml", CONFIG_EXAMPLE)
    write("agent_config", "minimal.toml", CONFIG_MINIMAL)
    write("agent_config", "mirrors-credentials.toml", CONFIG_MIRRORS)
    with open(os.path.join(ROOT, "deploy/config/trust.toml"), "rb") as f:
        write("trust_policy", "deploy-trust.toml", f.read())
    write("trust_policy", "two-rules.toml", TRUST_TWO_RULES)
    write("trust_policy", "broken-key.toml", TRUST_BROKEN_KEY)


if __name__ == "__main__":
    gguf_seeds()
    oci_seeds()
    extract_seeds()
    signing_seeds()
    config_seeds()
