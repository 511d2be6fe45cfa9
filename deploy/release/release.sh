#!/usr/bin/env bash
# The release: the .deb packages (deploy/release/build.sh, for this machine and each of $TARGETS), the
# container images (deploy/container/build.sh, when it exists) as OCI layout tarballs, a CycloneDX SBOM per
# artifact (cargo-cyclonedx), SHA256SUMS over all of them signed with cosign's key-based blob format
# (`alkictl key sign-blob`: `cosign verify-blob --key` accepts SHA256SUMS.sig), and, with ALKI_REGISTRY, the
# images pushed (skopeo) and signed like bundles (`alkictl bundle sign`: the index and every platform
# manifest). deploy/ci/release.yml runs it on a tag. Everything lands in dist/ (or $OUT), which must be empty.
#
#   TARGETS                  Rust targets built besides this machine's (aarch64-unknown-linux-gnu for arm64
#                            packages; the images need it: they are amd64 + arm64)
#   ALKI_SIGNING_KEY_FILE    the encrypted private key (`alkictl key generate`, `cosign generate-key-pair`), or
#   ALKI_SIGNING_KEY         its PEM text (a CI secret)
#   ALKI_KEY_PASSWORD        its password (COSIGN_PASSWORD works too)
#   ALKI_SIGNING_PUBKEY      its public key file: SHA256SUMS.sig is checked against it (optional, recommended)
#   IMAGES=0                 skip the container images (default: built when deploy/container/build.sh exists)
#   ALKI_REGISTRY            host[:port] to push the images to (optional); ALKI_IMAGE_NAMESPACE the path before
#                            the image name (e.g. acme/alki-fleet: acme/alki-fleet/alki-controller:VERSION)
#   ALKI_REGISTRY_USERNAME   its login, with ALKI_REGISTRY_PASSWORD_FILE or ALKI_REGISTRY_PASSWORD (a secret)
#   ALKI_REGISTRY_INSECURE=1 plain HTTP to the registry (a registry on loopback in a test only)
#   OUT                      the output directory (default dist)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
out="$(realpath -m "${OUT:-dist}")"
CYCLONEDX_VERSION=0.5.9
fail() { echo "release: $*" >&2; exit 1; }
step() { echo "==> [${SECONDS}s] $*"; }

# Everything that can be wrong before a long build is checked before it.
for tool in jq sha256sum tar; do command -v "$tool" >/dev/null || fail "needs $tool"; done
if [ -z "${ALKI_KEY_PASSWORD+set}" ] && [ -z "${COSIGN_PASSWORD+set}" ]; then
  fail "set ALKI_KEY_PASSWORD (or COSIGN_PASSWORD) to the signing key's password"
fi
work="$(mktemp -d /tmp/alki-release.XXXXXX)"
trap 'rm -rf "$work"' EXIT
key_file="${ALKI_SIGNING_KEY_FILE:-}"
if [ -z "$key_file" ]; then
  [ -n "${ALKI_SIGNING_KEY:-}" ] || fail "set ALKI_SIGNING_KEY (the private key PEM) or ALKI_SIGNING_KEY_FILE"
  key_file="$work/signing.key"
  (umask 077; printf '%s\n' "$ALKI_SIGNING_KEY" >"$key_file")
fi
[ -r "$key_file" ] || fail "cannot read the signing key $key_file"
[ -z "${ALKI_SIGNING_PUBKEY:-}" ] || [ -r "$ALKI_SIGNING_PUBKEY" ] || fail "cannot read ALKI_SIGNING_PUBKEY $ALKI_SIGNING_PUBKEY"
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ]; then
  fail "$out already holds files; a release signs everything in it: remove it, or set OUT to a new directory"
fi
if [ -n "${ALKI_REGISTRY:-}" ]; then
  command -v skopeo >/dev/null || fail "ALKI_REGISTRY is set: pushing the images needs skopeo"
  if [ -n "${ALKI_REGISTRY_USERNAME:-}" ] && [ -z "${ALKI_REGISTRY_PASSWORD_FILE:-}" ]; then
    [ -n "${ALKI_REGISTRY_PASSWORD:-}" ] || fail "ALKI_REGISTRY_USERNAME needs ALKI_REGISTRY_PASSWORD_FILE or ALKI_REGISTRY_PASSWORD"
    (umask 077; printf '%s' "$ALKI_REGISTRY_PASSWORD" >"$work/registry.password")
    export ALKI_REGISTRY_PASSWORD_FILE="$work/registry.password"
  fi
fi
if ! cargo cyclonedx --version 2>/dev/null | grep -q "$CYCLONEDX_VERSION"; then
  step "installing cargo-cyclonedx $CYCLONEDX_VERSION"
  cargo install --locked cargo-cyclonedx --version "$CYCLONEDX_VERSION" --quiet
fi

export ALKI_GIT_COMMIT="${ALKI_GIT_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
# SBOM times and image layers say the commit's time, so a rebuild of a commit gives the same files.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
version=$(cargo metadata --no-deps --format-version 1 --locked |
  jq -r '.packages[] | select(.name == "alki-controller") | .version')
host=$(rustc -vV | sed -n 's/^host: //p')
targets=("$host" ${TARGETS:-})
mkdir -p "$out"

step "packages for ${targets[*]} (deploy/release/build.sh)"
OUT="$out" TARGETS="${TARGETS:-}" deploy/release/build.sh
rm -f "$out/SHA256SUMS"   # build.sh's covers the packages only; the release's covers every artifact
alkictl="${ALKICTL:-$repo/target/release/alkictl}"
"$alkictl" --version >/dev/null || fail "no alkictl at $alkictl"

images=()
if [ "${IMAGES:-1}" != 0 ] && [ -f deploy/container/build.sh ]; then
  step "container images (deploy/container/build.sh)"
  if [ "$(id -u)" = 0 ]; then bash deploy/container/build.sh "$out"
  else sudo --preserve-env=SOURCE_DATE_EPOCH,ALKI_GIT_COMMIT bash deploy/container/build.sh "$out"; fi
  for layout in "$out"/images/*/; do
    [ -f "$layout/index.json" ] || continue
    name=$(basename "$layout")
    images+=("$name")
    # One file per image for the release page: the OCI layout, reproducibly tarred (`skopeo copy
    # oci-archive:FILE:VERSION ...` reads it).
    tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
      -C "$layout" -cf "$out/$name-image_$version.oci.tar" .
  done
fi

# Debian architecture of a Rust target, as cargo-deb names its packages.
deb_arch() {
  case "$1" in
    x86_64-*) echo amd64 ;; aarch64-*) echo arm64 ;; armv7-*hf) echo armhf ;; i686-*) echo i386 ;;
    riscv64gc-*) echo riscv64 ;; *) fail "no Debian architecture known for $1" ;;
  esac
}

step "SBOMs (cargo-cyclonedx $CYCLONEDX_VERSION)"
# cargo-cyclonedx writes beside each Cargo.toml of the workspace: it runs in a copy of the sources, and the
# copy's path in the package ids is put back to this checkout's.
src="$work/src"
mkdir -p "$src"
tar -c --exclude=./target --exclude=./dist --exclude=./.git --exclude="./${out#"$repo"/}" . | tar -x -C "$src"
# The dependency SBOMs of the three binaries as built for a Rust target, in $work/sbom/TARGET/BIN.cdx.json.
crate_sboms() {
  local target=$1 bin
  [ -d "$work/sbom/$target" ] && return 0
  (cd "$src" && cargo cyclonedx --quiet --format json --spec-version 1.5 --describe binaries --target "$target")
  mkdir -p "$work/sbom/$target"
  for bin in agent/alki-agent controller/alki-controller alkictl/alkictl; do
    sed "s#file://$src#file://$repo#g" "$src/${bin}_bin.cdx.json" >"$work/sbom/$target/${bin#*/}.cdx.json"
  done
  find "$src" -name '*.cdx.json' -delete
}

# One CycloneDX document for an artifact: the artifact itself as the subject, depending on the binaries it
# ships (each cargo-cyclonedx's subject), with the union of their components and dependency graphs.
# Usage: sbom OUTPUT SUBJECT_JSON INPUT.cdx.json...
sbom() {
  local output=$1 subject=$2; shift 2
  jq -s --argjson subject "$subject" --arg commit "$ALKI_GIT_COMMIT" '
    def merged: group_by(."bom-ref") | map(if any(.[]; .scope == "required") then .[0] + {scope: "required"} else .[0] end);
    . as $boms
    | {
        bomFormat: "CycloneDX", specVersion: "1.5", version: 1,
        metadata: {
          timestamp: $boms[0].metadata.timestamp,
          tools: ($boms[0].metadata.tools + [{vendor: "Alki Fleet", name: "deploy/release/release.sh"}]),
          component: $subject,
          properties: ([{name: "alki:git-commit", value: $commit}]
            + ([$boms[].metadata.properties[]?] | unique))
        },
        components: ([$boms[].metadata.component] + [$boms[].components[]?] | merged),
        dependencies: ([{ref: $subject."bom-ref", dependsOn: ([$boms[].metadata.component."bom-ref"] | unique)}]
          + ([$boms[].dependencies[]?] | group_by(.ref)
             | map({ref: .[0].ref, dependsOn: ([.[].dependsOn[]?] | unique)})))
      }' "$@" >"$output"
}

for target in "${targets[@]}"; do
  arch=$(deb_arch "$target")
  for package in alki-agent alki-controller; do
    debs=("$out/${package}_"*"_$arch.deb")
    [ "${#debs[@]}" = 1 ] && [ -f "${debs[0]}" ] || fail "expected one $package package for $arch in $out"
    deb=$(basename "${debs[0]}")
    deb_version=${deb#"${package}_"}; deb_version=${deb_version%"_$arch.deb"}
    purl="pkg:deb/alki-fleet/$package@$deb_version?arch=$arch"
    subject=$(jq -n --arg name "$package" --arg v "$deb_version" --arg purl "$purl" --arg file "$deb" \
      --arg sha "$(sha256sum "${debs[0]}" | cut -d' ' -f1)" \
      '{type: "application", "bom-ref": $purl, name: $name, version: $v, purl: $purl,
        description: "Debian package \($file)", licenses: [{expression: "Apache-2.0"}],
        hashes: [{alg: "SHA-256", content: $sha}]}')
    case "$package" in
      alki-agent) bins=(alki-agent) ;;
      alki-controller) bins=(alki-controller alkictl) ;;
    esac
    crate_sboms "$target"
    inputs=()
    for bin in "${bins[@]}"; do inputs+=("$work/sbom/$target/$bin.cdx.json"); done
    sbom "$out/$deb.cdx.json" "$subject" "${inputs[@]}"
  done
done
for name in "${images[@]}"; do
  index=$(jq -r --arg v "$version" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $v) | .digest' \
    "$out/images/$name/index.json")
  [ -n "$index" ] || fail "image layout $out/images/$name has no tag $version"
  case "$name" in
    alki-agent) bins=(alki-agent) ;;
    *) bins=(alki-controller alkictl) ;;
  esac
  # Every platform the index lists, whatever TARGETS built this time.
  inputs=()
  for arch in $(jq -r '.manifests[].platform.architecture' "$out/images/$name/blobs/sha256/${index#sha256:}"); do
    case "$arch" in
      amd64) target=x86_64-unknown-linux-gnu ;; arm64) target=aarch64-unknown-linux-gnu ;;
      *) fail "image $name: no Rust target known for platform $arch" ;;
    esac
    crate_sboms "$target"
    for bin in "${bins[@]}"; do inputs+=("$work/sbom/$target/$bin.cdx.json"); done
  done
  purl="pkg:oci/$name@${index/:/%3A}?tag=$version"
  subject=$(jq -n --arg name "$name" --arg v "$version" --arg purl "$purl" --arg index "$index" \
    '{type: "container", "bom-ref": $purl, name: $name, version: $v, purl: $purl,
      description: "OCI image index \($index) (the C library and CA bundle copied into it are not listed)",
      licenses: [{expression: "Apache-2.0"}]}')
  sbom "$out/$name-image_$version.oci.tar.cdx.json" "$subject" "${inputs[@]}"
done

step "SHA256SUMS, signed"
(
  cd "$out"
  shopt -s nullglob
  artifacts=(*.deb *.oci.tar *.cdx.json)
  sha256sum -- "${artifacts[@]}" >SHA256SUMS
)
"$alkictl" key sign-blob "$out/SHA256SUMS" --key "$key_file" --output-signature "$out/SHA256SUMS.sig"
if [ -n "${ALKI_SIGNING_PUBKEY:-}" ]; then
  "$alkictl" key verify-blob "$out/SHA256SUMS" --key "$ALKI_SIGNING_PUBKEY" --signature "$out/SHA256SUMS.sig"
fi
(cd "$out" && sha256sum --quiet --check SHA256SUMS)

if [ -n "${ALKI_REGISTRY:-}" ] && [ "${#images[@]}" -gt 0 ]; then
  insecure_skopeo=(); insecure_alkictl=()
  if [ "${ALKI_REGISTRY_INSECURE:-0}" = 1 ]; then
    insecure_skopeo=(--dest-tls-verify=false); insecure_alkictl=(--insecure-plain-http)
  fi
  auth=()
  if [ -n "${ALKI_REGISTRY_USERNAME:-}" ]; then
    # An auth file instead of --dest-creds, so the password is in no process's arguments.
    (umask 077; jq -n --arg r "$ALKI_REGISTRY" --arg a "$(printf '%s:%s' "$ALKI_REGISTRY_USERNAME" \
      "$(cat "$ALKI_REGISTRY_PASSWORD_FILE")" | base64 -w0)" '{auths: {($r): {auth: $a}}}' >"$work/auth.json")
    auth=(--dest-authfile "$work/auth.json")
  fi
  for name in "${images[@]}"; do
    repository="${ALKI_IMAGE_NAMESPACE:+$ALKI_IMAGE_NAMESPACE/}$name"
    step "pushing $name to $ALKI_REGISTRY/$repository:$version"
    skopeo copy --quiet --all --preserve-digests --digestfile "$work/$name.digest" "${auth[@]}" \
      "${insecure_skopeo[@]}" "oci:$out/images/$name:$version" "docker://$ALKI_REGISTRY/$repository:$version"
    digest=$(cat "$work/$name.digest")
    step "signing $ALKI_REGISTRY/$repository@$digest (the index and every platform manifest)"
    "$alkictl" bundle sign "$ALKI_REGISTRY/$repository@$digest" --key "$key_file" "${insecure_alkictl[@]}"
  done
fi
step "done"
ls -l "$out"
