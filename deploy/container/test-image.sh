#!/usr/bin/env bash
# Checks the images deploy/container/build.sh wrote to $DIST/images (DIST: $1, default dist) the way a user
# gets them: pushes each multi-arch index to a real registry (CNCF distribution, Debian's docker-registry, on
# loopback in a temporary directory) with skopeo, inspects it there (both platforms, non-root user,
# entrypoint, labels), pulls it back and unpacks both platforms' root filesystems, then runs them:
#  - every binary of the amd64 roots as uid 10001 in a chroot, and of the arm64 roots under
#    qemu-aarch64-static with the image's own C library (-L ROOTFS);
#  - the controller for real, then an agent that enrolls with it: with podman when podman can run a
#    container here (pulled from the registry, --read-only, --cap-drop=all, named volumes), otherwise (or with
#    ALKI_IMAGE_RUNNER=chroot) from the unpacked roots as uid 10001 in a mount namespace of their own, the
#    root read-only and only the volume (a host directory) writable. Checks /healthz and /readyz, the admin
#    token and CA made on first start in the volume, alkictl from the image, the agent's enrollment and both
#    graceful stops.
# Prints the image sizes at the end. Runs as root; leaves nothing behind (trap).
# Needs: docker-registry, skopeo, jq, curl, python3, binutils, qemu-user-static; podman (+ runc where crun cannot run, e.g.
# hybrid cgroups) for the podman part, util-linux (unshare) for the chroot part.
set -euo pipefail
cd "$(dirname "$0")/../.."
dist="$(realpath -m "${1:-dist}")"
uid=10001
fail() { echo "test-image: FAIL: $*" >&2; exit 1; }
say() { echo "test-image: $*"; }
[ "$(id -u)" = 0 ] || fail "run as root (chroot, mounts, podman)"
for tool in docker-registry skopeo jq curl qemu-aarch64-static tar python3 readelf; do
  command -v "$tool" >/dev/null || fail "needs $tool"
done

for image in alki-controller alki-agent; do
  [ -f "$dist/images/$image/index.json" ] || fail "$dist/images/$image is not an OCI layout: run deploy/container/build.sh"
done

work=$(mktemp -d /tmp/alki-image-test.XXXXXX)
pids=() podman=() containers=() volumes=()
cleanup() {
  local c
  for c in "${containers[@]}"; do "${podman[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
  for c in "${volumes[@]}"; do "${podman[@]}" volume rm -f "$c" >/dev/null 2>&1 || true; done
  for c in "${pids[@]}"; do kill "$c" 2>/dev/null || true; done
  for c in "${pids[@]}"; do wait "$c" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # seconds description command...
  local n=$(($1 * 5)) what=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  fail "timed out waiting for $what"
}
expect() { # owner:group mode path
  local got; got=$(stat -c '%u:%g %a' "$3") || fail "$3 missing"
  [ "$got" = "$1 $2" ] || fail "$3 is $got, wanted $1 $2"
}
blob() { echo "$1/blobs/sha256/${2#sha256:}"; }

# --- the registry -------------------------------------------------------------------------------------------
reg_port=$(port)
registry="127.0.0.1:$reg_port"
cat > "$work/registry.yml" <<YAML
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $work/registry }, delete: { enabled: true } }
http: { addr: $registry, secret: test-image-$$ }
YAML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
pids+=($!)
wait_for 10 "the registry on $registry" curl -fsS "http://$registry/v2/"
say "registry (CNCF distribution $(docker-registry --version 2>/dev/null | awk '{print $3}')) on $registry"
tls=(--tls-verify=false)

declare -A tag local_index
for image in alki-controller alki-agent; do
  layout="$dist/images/$image"
  tag[$image]=$(jq -r '.manifests[0].annotations["org.opencontainers.image.ref.name"]' "$layout/index.json")
  local_index[$image]=$(jq -r '.manifests[0].digest' "$layout/index.json")
  ref="docker://$registry/$image:${tag[$image]}"
  skopeo copy --quiet --all --preserve-digests --dest-tls-verify=false "oci:$layout:${tag[$image]}" "$ref"

  # The index as the registry serves it: the digest built, both platforms.
  skopeo inspect --raw "${tls[@]}" "$ref" > "$work/$image.index.json"
  got="sha256:$(sha256sum < "$work/$image.index.json" | cut -d' ' -f1)"
  [ "$got" = "${local_index[$image]}" ] || fail "$image: the registry serves index $got, built ${local_index[$image]}"
  jq -e '.mediaType == "application/vnd.oci.image.index.v1+json"' "$work/$image.index.json" >/dev/null \
    || fail "$image is not an OCI image index"
  platforms=$(jq -r '[.manifests[].platform | "\(.os)/\(.architecture)"] | sort | join(" ")' "$work/$image.index.json")
  [ "$platforms" = "linux/amd64 linux/arm64" ] || fail "$image index lists $platforms"
  for arch in amd64 arm64; do
    skopeo inspect --config "${tls[@]}" --override-os linux --override-arch "$arch" "$ref" > "$work/$image.$arch.config.json"
    jq -e --arg arch "$arch" --arg tag "${tag[$image]}" --arg user "$uid:$uid" '
      .architecture == $arch and .os == "linux" and .config.User == $user
      and .config.Labels["org.opencontainers.image.version"] == $tag
      and (.config.Labels["org.opencontainers.image.revision"] | test("^[0-9a-f]{40}$"))
      and (.config.Volumes | length) == 1' "$work/$image.$arch.config.json" >/dev/null \
      || fail "$image $arch config: $(jq -c '{architecture, config}' "$work/$image.$arch.config.json")"
  done
  say "$image:${tag[$image]} pushed and inspected: index ${local_index[$image]} ($platforms), User $uid:$uid," \
    "Entrypoint $(jq -c .config.Entrypoint "$work/$image.amd64.config.json"), revision" \
    "$(jq -r '.config.Labels["org.opencontainers.image.revision"]' "$work/$image.amd64.config.json" | cut -c1-12)"
done
jq -e '.config.Entrypoint == ["/usr/bin/alki-controller"] and .config.ExposedPorts == {"7070/tcp":{},"7080/tcp":{}}
  and .config.Volumes == {"/var/lib/alki-controller":{}}' "$work/alki-controller.amd64.config.json" >/dev/null \
  || fail "controller config: $(jq -c .config "$work/alki-controller.amd64.config.json")"
jq -e '.config.Entrypoint == ["/usr/bin/alki-agent"] and .config.Cmd == ["run","--config","/etc/alki/agent.toml"]
  and .config.Volumes == {"/var/lib/alki-agent":{}}' "$work/alki-agent.amd64.config.json" >/dev/null \
  || fail "agent config: $(jq -c .config "$work/alki-agent.amd64.config.json")"

# --- pulled back, unpacked ----------------------------------------------------------------------------------
unpack() { # layout tag arch dest
  local index manifest layer
  index=$(jq -r --arg t "$2" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$1/index.json")
  manifest=$(jq -r --arg a "$3" '.manifests[] | select(.platform.os == "linux" and .platform.architecture == $a) | .digest' "$(blob "$1" "$index")")
  [ -n "$manifest" ] || fail "$1: no linux/$3 manifest"
  mkdir -p "$4"
  for layer in $(jq -r '.layers[].digest' "$(blob "$1" "$manifest")"); do
    ! tar -tzf "$(blob "$1" "$layer")" | grep -q '\.wh\.' || fail "$1: layer $layer has whiteouts (unexpected)"
    tar -xzf "$(blob "$1" "$layer")" -C "$4" --numeric-owner --same-owner --same-permissions
  done
}
mkdir -p "$work/pulled"
for image in alki-controller alki-agent; do
  skopeo copy --quiet --all --preserve-digests --src-tls-verify=false \
    "docker://$registry/$image:${tag[$image]}" "oci:$work/pulled/$image:${tag[$image]}"
  for arch in amd64 arm64; do unpack "$work/pulled/$image" "${tag[$image]}" "$arch" "$work/root/$image-$arch"; done
done
say "pulled both images back and unpacked linux/amd64 and linux/arm64"

# --- the root filesystems -----------------------------------------------------------------------------------
for root in "$work"/root/*; do
  case "$root" in *alki-controller-*) state=/var/lib/alki-controller; mode=700; bins="alki-controller alkictl" ;;
                  *) state=/var/lib/alki-agent; mode=750; bins="alki-agent" ;; esac
  expect "$uid:$uid" "$mode" "$root$state"
  expect 0:0 1777 "$root/tmp"
  expect 0:0 644 "$root/etc/ssl/certs/ca-certificates.crt"
  grep -q "BEGIN CERTIFICATE" "$root/etc/ssl/certs/ca-certificates.crt" || fail "$root: empty CA bundle"
  grep -qx "alki:x:$uid:$uid:Alki Fleet:$state:/usr/sbin/nologin" "$root/etc/passwd" || fail "$root: no alki user"
  grep -qx "alki:x:$uid:" "$root/etc/group" || fail "$root: no alki group"
  for bin in $bins; do expect 0:0 755 "$root/usr/bin/$bin"; done
  [ "$(find "$root" -xdev -perm /6000 | wc -l)" = 0 ] || fail "$root has setuid/setgid files"
done

# amd64: in a chroot as the image's user; arm64: under qemu with the image's own loader and libraries.
check_version() { # expected-target command...
  local out; out=$("${@:2}" 2>&1) || fail "$* failed: $out"
  [[ "$out" =~ \ ${tag[alki-controller]}\ \(commit\ [0-9a-f]+,\ $1\)$ ]] || fail "$*: $out"
  echo "$out"
}
as_user=(chroot --userspec="$uid:$uid" --groups="$uid")
for image_bin in alki-controller:alki-controller alki-controller:alkictl alki-agent:alki-agent; do
  image=${image_bin%%:*} bin=${image_bin#*:}
  say "amd64 (chroot as $uid): $(check_version x86_64-unknown-linux-gnu "${as_user[@]}" "$work/root/$image-amd64" "/usr/bin/$bin" --version)"
  root="$work/root/$image-arm64"
  readelf -h "$root/usr/bin/$bin" | grep -q 'Machine:.*AArch64' || fail "$image arm64: $bin is not aarch64"
  say "arm64 (qemu-aarch64-static -L rootfs): $(check_version aarch64-unknown-linux-gnu qemu-aarch64-static -L "$root" "$root/usr/bin/$bin" --version)"
done
check_version x86_64-unknown-linux-gnu "${as_user[@]}" "$work/root/alki-agent-amd64" /usr/bin/alki-agent version >/dev/null
check_version aarch64-unknown-linux-gnu qemu-aarch64-static -L "$work/root/alki-agent-arm64" \
  "$work/root/alki-agent-arm64/usr/bin/alki-agent" version >/dev/null

# --- running the controller and an agent --------------------------------------------------------------------
runner="${ALKI_IMAGE_RUNNER:-auto}"
ctl_ref="$registry/alki-controller:${tag[alki-controller]}"
agent_ref="$registry/alki-agent:${tag[alki-agent]}"
# Podman asks for 1048576 open files and 4194304 processes, above this machine's hard limits where root lacks
# CAP_SYS_RESOURCE (sandboxes), and conmon gets at most pid_max processes: ask for what can be had.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu); pid_max=$(cat /proc/sys/kernel/pid_max)
[ "$nproc" != unlimited ] && [ "$nproc" -le "$pid_max" ] || nproc=$pid_max
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
if [ "$runner" != chroot ] && command -v podman >/dev/null; then
  base=(podman --root "$work/podman/root" --runroot "$work/podman/run" --tmpdir "$work/podman/tmp" --storage-driver vfs)
  "${base[@]}" pull --quiet "${tls[@]}" "docker://$ctl_ref" "docker://$agent_ref" >/dev/null
  # crun refuses hybrid cgroups (v1 controllers plus a v2 hierarchy with controllers); runc manages them.
  for runtime in "" runc; do
    [ -z "$runtime" ] || command -v "$runtime" >/dev/null || continue
    try=("${base[@]}" ${runtime:+--runtime "$runtime"})
    if "${try[@]}" run --rm "${limits[@]}" --network none "$ctl_ref" --version >"$work/podman.try" 2>&1; then
      podman=("${try[@]}"); break
    fi
    say "podman${runtime:+ --runtime $runtime} cannot run a container here: $(tail -1 "$work/podman.try")"
  done
fi
if [ "${#podman[@]}" -gt 0 ]; then runner=podman
elif [ "$runner" = podman ]; then fail "ALKI_IMAGE_RUNNER=podman but podman cannot run containers here"
else runner=chroot; fi

grpc_port=$(port); http_port=$(port); front_port=$(port)
agent_etc="$work/agent-etc"
install -d -m 0750 -o 0 -g "$uid" "$agent_etc"
write_agent_config() { # controller-url front-addr
  cat > "$agent_etc/agent.toml" <<TOML
device_id = "ctr-001"
data_dir = "/var/lib/alki-agent"
labels = { site = "container-test" }

[controller]
url = "$1"
ca_file = "/etc/alki/ca.crt"
bootstrap_token_file = "/etc/alki/bootstrap.token"

[runtime]
llama_server = "/usr/local/bin/llama-server"
front_addr = "$2"
TOML
  chown "0:$uid" "$agent_etc"/*; chmod 0640 "$agent_etc"/*
}
healthy() { curl -fsS --cacert "$1" "https://127.0.0.1:$http_port/healthz" | grep -qx ok; }

if [ "$runner" = podman ]; then
  say "running with $(podman --version) (runtime $("${podman[@]}" info --format '{{.Host.OCIRuntime.Name}}')):" \
    "the controller, then an agent in its network namespace"
  run=("${podman[@]}" run -d --read-only --user "$uid:$uid" --cap-drop=all --security-opt=no-new-privileges
    "${limits[@]}")
  ctl="alki-test-ctl-$$" agent="alki-test-agent-$$"
  containers+=("$agent" "$ctl"); volumes+=("$ctl-data" "$agent-data")
  # A named volume: podman copies the image's /var/lib/alki-controller (owner 10001, 0700) into it.
  "${run[@]}" --name "$ctl" -v "$ctl-data:/var/lib/alki-controller" \
    -p "127.0.0.1:$grpc_port:7070" -p "127.0.0.1:$http_port:7080" "$ctl_ref" >/dev/null
  ctl_data=$("${podman[@]}" volume inspect --format '{{.Mountpoint}}' "$ctl-data")
  alkictl() { "${podman[@]}" exec "$ctl" alkictl "$@"; }
else
  say "running from the unpacked roots: unshare --mount, the root bound read-only, the volume a host directory, chroot as $uid"
  # The root filesystem bound onto itself and made read-only, the volume and a /tmp tmpfs writable, /proc and
  # /dev for the process; all in a mount namespace that ends with the process. Host network.
  start_rooted() { # root volume-host-dir volume-path log extra-bind ("" or host:path) command...
    local root=$1 vol=$2 path=$3 log=$4 bind=$5; shift 5
    unshare --mount --propagation private -- sh -ec '
      root=$1 vol=$2 path=$3 bind=$4 uid=$5; shift 5
      mount --bind "$root" "$root"
      mount --bind "$vol" "$root$path"
      [ -z "$bind" ] || mount --bind -o ro "${bind%%:*}" "$root${bind#*:}"
      mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
      mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
      mount --rbind /dev "$root/dev"
      mount -o remount,bind,ro,nosuid,nodev "$root"
      exec setpriv --no-new-privs chroot --userspec="$uid:$uid" --groups="$uid" "$root" "$@"
    ' start-rooted "$root" "$vol" "$path" "$bind" "$uid" "$@" > "$log" 2>&1 &
    pids+=($!)
    last_pid=$!
  }
  ctl_data="$work/ctl-data"; install -d -m 0700 -o "$uid" -g "$uid" "$ctl_data"
  ctl_root="$work/root/alki-controller-amd64"
  start_rooted "$ctl_root" "$ctl_data" /var/lib/alki-controller "$work/controller.log" "" \
    /usr/bin/alki-controller --grpc-addr "127.0.0.1:$grpc_port" --http-addr "127.0.0.1:$http_port"
  ctl_pid=$last_pid
  # alkictl of the image, run from outside its root with the image's loader and libraries.
  alkictl() {
    "$ctl_root/lib64/ld-linux-x86-64.so.2" --library-path "$ctl_root/lib/x86_64-linux-gnu" "$ctl_root/usr/bin/alkictl" \
      --controller "https://127.0.0.1:$grpc_port" --token-file "$ctl_data/admin.token" "$@"
  }
fi

wait_for 30 "the controller's CA and admin token in its volume" test -s "$ctl_data/admin.token" -a -s "$ctl_data/pki/ca.crt"
wait_for 30 "https://127.0.0.1:$http_port/healthz" healthy "$ctl_data/pki/ca.crt"
curl -fsS --cacert "$ctl_data/pki/ca.crt" "https://127.0.0.1:$http_port/readyz" >/dev/null || fail "/readyz"
expect "$uid:$uid" 600 "$ctl_data/admin.token"
expect "$uid:$uid" 700 "$ctl_data"
alkictl token list | grep -q bootstrap-admin || fail "alkictl token list has no bootstrap-admin"
say "controller: /healthz ok and /readyz (TLS, CA from the volume), admin.token 0600 owned by $uid, alkictl token list ok"
if [ "$runner" = podman ]; then
  [ "$("${podman[@]}" top "$ctl" huser | tail -1 | tr -d ' ')" = "$uid" ] || fail "the controller is not running as $uid"
  "${podman[@]}" inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$ctl" | grep -qx true || fail "root not read-only"
else
  [ "$(awk '/^Uid:/ {print $2 $3}' "/proc/$ctl_pid/status")" = "$uid$uid" ] || fail "the controller is not running as $uid"
  awk '$5 == "/" {print $6}' "/proc/$ctl_pid/mountinfo" | grep -q '^ro' || fail "the controller's root is not read-only"
  awk '$5 == "/var/lib/alki-controller" {print $6}' "/proc/$ctl_pid/mountinfo" | grep -q '^rw' || fail "the volume is not writable"
fi

# An agent from its image enrolls with a one-use bootstrap token and connects.
alkictl enroll token create --labels site=container-test --uses 1 --expires 1h -o json | jq -r .secret > "$agent_etc/bootstrap.token"
cp "$ctl_data/pki/ca.crt" "$agent_etc/ca.crt"
if [ "$runner" = podman ]; then
  write_agent_config "https://127.0.0.1:7070" "0.0.0.0:8080"
  "${run[@]}" --name "$agent" --network "container:$ctl" -v "$agent-data:/var/lib/alki-agent" \
    -v "$agent_etc:/etc/alki:ro" "$agent_ref" >/dev/null
else
  write_agent_config "https://127.0.0.1:$grpc_port" "127.0.0.1:$front_port"
  agent_data="$work/agent-data"; install -d -m 0750 -o "$uid" -g "$uid" "$agent_data"
  start_rooted "$work/root/alki-agent-amd64" "$agent_data" /var/lib/alki-agent "$work/agent.log" "$agent_etc:/etc/alki" \
    /usr/bin/alki-agent run --config /etc/alki/agent.toml
  agent_pid=$last_pid
fi
connected() { alkictl devices list -o json | jq -e '[.[] | select(.id == "ctr-001" and .connected)] | length == 1'; }
if ! (wait_for 60 "the agent to enroll and connect" connected); then
  if [ "$runner" = podman ]; then "${podman[@]}" logs "$agent" 2>&1 | tail -20; else tail -20 "$work/agent.log"; fi
  fail "the agent did not connect"
fi
say "agent: enrolled with a bootstrap token over TLS and connected (alkictl devices list: ctr-001 connected)"

# Graceful stops (SIGTERM): both exit 0.
if [ "$runner" = podman ]; then
  for c in "$agent" "$ctl"; do
    "${podman[@]}" stop -t 30 "$c" >/dev/null
    code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$c")
    [ "$code" = 0 ] || { "${podman[@]}" logs "$c" 2>&1 | tail -20; fail "$c exited $code on SIGTERM"; }
  done
else
  for p in "$agent_pid" "$ctl_pid"; do
    kill -TERM "$p"; code=0; wait "$p" || code=$?
    [ "$code" = 0 ] || { tail -20 "$work/agent.log" "$work/controller.log"; fail "pid $p exited $code on SIGTERM"; }
  done
fi
say "agent and controller stopped on SIGTERM with exit 0 ($runner)"

# --- sizes --------------------------------------------------------------------------------------------------
say "image sizes (compressed layer bytes, as in the registry; unpacked root filesystem bytes):"
for image in alki-controller alki-agent; do
  for arch in amd64 arm64; do
    manifest=$(jq -r --arg a "$arch" '.manifests[] | select(.platform.architecture == $a) | .digest' "$work/$image.index.json")
    layers=$(skopeo inspect --raw "${tls[@]}" "docker://$registry/$image@$manifest" | jq '[.layers[].size] | add')
    printf 'test-image:   %-16s linux/%-6s %10s bytes compressed  %10s bytes unpacked\n' \
      "$image" "$arch" "$layers" "$(du -sb --apparent-size "$work/root/$image-$arch" | cut -f1)"
  done
done
say "OK ($runner)"
