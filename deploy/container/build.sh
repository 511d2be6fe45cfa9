#!/usr/bin/env bash
# Container images of the controller (alki-controller + alkictl) and of the agent (alki-agent), each one
# multi-arch image index (linux/amd64, linux/arm64) in an OCI image layout: $DIST/images/alki-controller and
# $DIST/images/alki-agent (DIST: $1, default dist), tag = the workspace version. Built with buildah from
# scratch, no container daemon and no base image: every root filesystem is made here from local files, the
# release binaries (deploy/release/build.sh; arm64 with TARGETS=aarch64-unknown-linux-gnu), the C library
# they need (this machine's for its own architecture, Debian's libc6-arm64-cross for arm64), the CA bundle
# (ca-certificates) and a non-root `alki` user (uid/gid 10001). Layers are reproducible: mtimes and the
# created time are SOURCE_DATE_EPOCH (default: the commit time of the binaries' commit).
# Needs root (buildah --storage-driver vfs in a temporary store; nothing is left in /var/lib/containers),
# buildah, jq, binutils (readelf) and, for arm64, libc6-arm64-cross. deploy/container/test-image.sh checks
# the result.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
dist="$(realpath -m "${1:-dist}")"
out="$dist/images"
uid=10001
fail() { echo "container/build: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (buildah with the vfs storage driver, files owned by uid $uid)"
for tool in buildah jq readelf dpkg; do command -v "$tool" >/dev/null || fail "needs $tool"; done

if command -v cargo >/dev/null; then
  version=$(cargo metadata --no-deps --format-version 1 --offline |
    jq -r '.packages[] | select(.name == "alki-controller") | .version')
else
  version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
fi
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || fail "no workspace version ($version)"

# platform (OCI arch) -> Rust target and Debian multiarch triplet
declare -A rust_target=([amd64]=x86_64-unknown-linux-gnu [arm64]=aarch64-unknown-linux-gnu)
declare -A gnu=([amd64]=x86_64-linux-gnu [arm64]=aarch64-linux-gnu)
declare -A elf_machine=([amd64]="Advanced Micro Devices X86-64" [arm64]=AArch64)
host_arch=$(dpkg --print-architecture)

# One platform's binary: in $ALKI_BIN_DIR_<arch>, or where deploy/release/build.sh leaves it: target/<target>/<profile>
# (target/<profile> for this machine's own architecture), the agent from the size-optimised `device` profile.
bin_path() {
  local arch=$1 bin=$2 var="ALKI_BIN_DIR_$1" profile=release
  [ "$bin" = alki-agent ] && profile=device
  if [ -n "${!var:-}" ]; then echo "${!var}/$bin"
  elif [ -x "target/${rust_target[$arch]}/$profile/$bin" ]; then echo "target/${rust_target[$arch]}/$profile/$bin"
  elif [ "$arch" = "$host_arch" ]; then echo "target/$profile/$bin"
  else fail "no $arch $bin: run TARGETS=${rust_target[$arch]} deploy/release/build.sh or set $var"; fi
}
# Where the platform's shared libraries are read from.
lib_dirs() {
  if [ "$1" = "$host_arch" ]; then echo "/lib/${gnu[$1]} /usr/lib/${gnu[$1]}"
  else echo "/usr/${gnu[$1]}/lib"; fi
}

# Every binary must be of its platform and say the workspace version; all must come from one commit, which
# becomes org.opencontainers.image.revision (the binaries' commit, not necessarily HEAD's).
commit=""
for arch in amd64 arm64; do
  for bin in alki-controller alkictl alki-agent; do
    f=$(bin_path "$arch" "$bin")
    [ -x "$f" ] || fail "$f missing"
    readelf -h "$f" | grep -q "Machine:.*${elf_machine[$arch]}" || fail "$f is not a linux/$arch binary"
    said=$(grep -aoE -m1 "[0-9]+\.[0-9]+\.[0-9]+[^ ]* \(commit [0-9a-z]+, [a-z0-9_]+-[a-z0-9_-]+\)" "$f" | head -1)
    [[ "$said" =~ ^([^ ]+)\ \(commit\ ([0-9a-z]+),\ ([^\)]+)\)$ ]] || fail "$f has no version string"
    [ "${BASH_REMATCH[1]}" = "$version" ] || fail "$f is version ${BASH_REMATCH[1]}, the workspace $version: rebuild"
    [ "${BASH_REMATCH[3]}" = "${rust_target[$arch]}" ] || fail "$f says target ${BASH_REMATCH[3]}"
    [ -z "$commit" ] || [ "${BASH_REMATCH[2]}" = "$commit" ] || fail "$f is from commit ${BASH_REMATCH[2]}, others from $commit"
    commit="${BASH_REMATCH[2]}"
  done
done
[ "$commit" != unknown ] || fail "the binaries were built without ALKI_GIT_COMMIT: build them with deploy/release/build.sh"
revision=$(git rev-parse --verify -q "${commit}^{commit}" 2>/dev/null) || fail "commit $commit (from the binaries) is not in this repository"
head=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ "$revision" = "$head" ] || echo "container/build: note: the binaries are from commit $revision, HEAD is $head" >&2
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct "$revision" 2>/dev/null || echo 0)}"
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

work=$(mktemp -d /tmp/alki-container.XXXXXX)
B=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
  "${B[@]}" rm --all >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Copies a library (its content, under the name asked for) from the platform's library directories.
copy_lib() { # arch name dest_dir
  local d
  for d in $(lib_dirs "$1"); do
    if [ -e "$d/$2" ]; then
      install -m 0644 "$(readlink -f "$d/$2")" "$3/$2"
      local pkg
      pkg=$(dpkg -S "$d/$2" 2>/dev/null | head -1 | cut -d: -f1) || true
      if [ -n "$pkg" ] && [ -f "/usr/share/doc/$pkg/copyright" ]; then
        install -D -m 0644 "/usr/share/doc/$pkg/copyright" "$root/usr/share/doc/$pkg/copyright"
      fi
      return 0
    fi
  done
  fail "$2 ($1) not found in $(lib_dirs "$1")${4:+ (needed by $4)}"
}

# Fills $root with the binaries, their libraries and loader, the user, the CA bundle, /tmp and the volume.
populate() { # arch state_dir state_mode "extra dirs" binaries...
  local arch=$1 state=$2 mode=$3 extra=$4; shift 4
  local libdir="$root/lib/${gnu[$arch]}"
  install -d -m 0755 "$root"/{etc/ssl/certs,usr/bin,usr/share/doc/alki-fleet,var/lib} "$libdir"
  install -d -m 1777 "$root/tmp"
  install -d -m 0755 "$root"/{proc,sys,dev}   # mount points (runtimes make them; a chroot of the tree needs them)
  install -d -m "$mode" -o "$uid" -g "$uid" "$root$state"
  local d
  for d in $extra; do install -d -m 0755 "$root$d"; done
  local bin interp=""
  for bin in "$@"; do install -m 0755 "$(bin_path "$arch" "$bin")" "$root/usr/bin/$bin"; done
  # The loader, at the path the binaries name (PT_INTERP), a link to the multiarch directory as on Debian.
  interp=$(readelf -l "$root/usr/bin/$1" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
  [ -n "$interp" ] || fail "$1 names no program interpreter"
  copy_lib "$arch" "$(basename "$interp")" "$libdir"
  chmod 0755 "$libdir/$(basename "$interp")"
  if [ "$interp" != "/lib/${gnu[$arch]}/$(basename "$interp")" ]; then
    install -d -m 0755 "$root$(dirname "$interp")"
    ln -sr "$libdir/$(basename "$interp")" "$root$interp"
  fi
  # NEEDED, transitively.
  local queue=("${@/#/$root/usr/bin/}") f lib
  while [ "${#queue[@]}" -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    for lib in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [ -e "$libdir/$lib" ] && continue
      copy_lib "$arch" "$lib" "$libdir" "$f"
      queue+=("$libdir/$lib")
    done
  done
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nalki:x:%s:%s:Alki Fleet:%s:/usr/sbin/nologin\n' \
    "$uid" "$uid" "$state" > "$root/etc/passwd"
  printf 'root:x:0:\nalki:x:%s:\n' "$uid" > "$root/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$root/etc/nsswitch.conf"
  chmod 0644 "$root"/etc/{passwd,group,nsswitch.conf}
  [ -s /etc/ssl/certs/ca-certificates.crt ] || fail "/etc/ssl/certs/ca-certificates.crt missing (apt-get install ca-certificates)"
  install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  install -m 0644 LICENSE "$root/usr/share/doc/alki-fleet/LICENSE"
}

# One image: both platforms' roots committed, put in one index, pushed into $out/$name as tag $version.
build_image() { # name state_dir state_mode "extra dirs" title description config... -- binaries...
  local name=$1 state=$2 mode=$3 extra=$4 title=$5 description=$6; shift 6
  local config=() meta=()
  while [ "$1" != -- ]; do config+=("$1"); shift; done; shift
  local k v
  for kv in "version=$version" "revision=$revision" "created=$created" "title=$title" \
    "description=$description" "licenses=Apache-2.0" "vendor=Alki Fleet"; do
    k=${kv%%=*}; v=${kv#*=}
    meta+=(--label "org.opencontainers.image.$k=$v" --annotation "org.opencontainers.image.$k=$v")
  done
  local list="localhost/$name:$version" arch c instance
  "${B[@]}" manifest create "$list" >/dev/null
  for arch in amd64 arm64; do
    c=$("${B[@]}" from --arch "$arch" --os linux --name "$name-$arch" scratch)
    root=$("${B[@]}" mount "$c")
    populate "$arch" "$state" "$mode" "$extra" "$@"
    "${B[@]}" umount "$c" >/dev/null
    "${B[@]}" config --arch "$arch" --os linux --user "$uid:$uid" --workingdir / \
      --env PATH=/usr/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --volume "$state" \
      --created-by "deploy/container/build.sh ($name $version, commit $revision, linux/$arch)" \
      "${config[@]}" "${meta[@]}" "$c"
    "${B[@]}" commit --quiet --rm --identity-label=false --timestamp "$SOURCE_DATE_EPOCH" \
      "$c" "localhost/$name:$version-$arch" >/dev/null
    instance=$("${B[@]}" manifest add "$list" "localhost/$name:$version-$arch" | sed -n 's/.*: *\(sha256:[0-9a-f]*\)$/\1/p')
    [ -n "$instance" ] || fail "manifest add $name $arch printed no digest"
    "${B[@]}" manifest annotate --annotation "org.opencontainers.image.version=$version" \
      --annotation "org.opencontainers.image.revision=$revision" "$list" "$instance" >/dev/null
  done
  rm -rf "${out:?}/$name"
  mkdir -p "$out"
  "${B[@]}" manifest push --quiet --all "$list" "oci:$out/$name:$version" >/dev/null
  # Summary: the index, then each platform's manifest and its compressed layer bytes.
  local index
  index=$(jq -r --arg v "$version" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $v) | .digest' "$out/$name/index.json")
  echo "$out/$name:$version  index $index"
  jq -r '.manifests[] | "\(.platform.os)/\(.platform.architecture) \(.digest)"' "$out/$name/blobs/sha256/${index#sha256:}" |
    while read -r platform digest; do
      echo "  $platform  manifest $digest  layers $(jq '[.layers[].size] | add' "$out/$name/blobs/sha256/${digest#sha256:}") bytes (compressed)"
    done
}

echo "container/build: version $version, revision $revision, SOURCE_DATE_EPOCH $SOURCE_DATE_EPOCH ($created)"
# The controller listens on all addresses of its container; its data dir is the volume, and alkictl inside
# the container (`podman exec`) finds the bootstrap admin token and the CA there.
build_image alki-controller /var/lib/alki-controller 0700 "" "Alki Fleet controller" \
  "Alki Fleet control plane (gRPC 7070, HTTPS registry/API/console 7080) with alkictl" \
  --entrypoint '["/usr/bin/alki-controller"]' --cmd '' \
  --env ALKI_DATA_DIR=/var/lib/alki-controller --env ALKI_GRPC_ADDR=0.0.0.0:7070 \
  --env ALKI_HTTP_ADDR=0.0.0.0:7080 --env ALKI_TOKEN_FILE=/var/lib/alki-controller/admin.token \
  --port 7070/tcp --port 7080/tcp \
  -- alki-controller alkictl
# The agent reads /etc/alki/agent.toml (mount the directory, with ca.crt and the bootstrap token, readable by
# uid 10001); its front port is runtime.front_addr (0.0.0.0:8080 in a container). llama-server is not in the
# image: mount it or build an image on top of this one, and point runtime.llama_server at it.
build_image alki-agent /var/lib/alki-agent 0750 /etc/alki "Alki Fleet agent" \
  "Alki Fleet device agent (OpenAI-compatible front port 8080; llama-server not included)" \
  --entrypoint '["/usr/bin/alki-agent"]' --cmd '["run","--config","/etc/alki/agent.toml"]' \
  --port 8080/tcp \
  -- alki-agent
