#!/usr/bin/env bash
# Installs the .deb packages in dist/ (or $1) with dpkg (as root, as CI runs), checks their files, owners,
# modes, the alki user and the units (systemd-analyze verify), runs the binaries, then removes (conffiles
# stay) and purges (nothing stays). Changes this machine: meant for CI and throwaway machines.
set -euo pipefail
dist="${1:-dist}"
arch="$(dpkg --print-architecture)"
agent=$(ls "$dist"/alki-agent_*_"$arch".deb)
controller=$(ls "$dist"/alki-controller_*_"$arch".deb)
fail() { echo "test-deb: $*" >&2; exit 1; }
# A previous run's leftovers would hide what this install does.
dpkg --purge alki-agent alki-controller >/dev/null 2>&1 || true

dpkg -i "$agent" "$controller" > /tmp/alki-dpkg.log 2>&1 || { cat /tmp/alki-dpkg.log; fail "dpkg -i failed"; }
grep -q "alki-agent is installed, not enabled and not started" /tmp/alki-dpkg.log || fail "postinst did not say how to start"
grep -q "systemctl enable --now alki-agent.socket alki-agent.service" /tmp/alki-dpkg.log || fail "no start command"

expect() { # owner:group mode path
  local got; got=$(stat -c '%U:%G %a' "$3") || fail "$3 missing"
  [ "$got" = "$1 $2" ] || fail "$3 is $got, wanted $1 $2"
}
expect root:root 755 /usr/bin/alki-agent
expect root:root 755 /usr/bin/alki-controller
expect root:root 755 /usr/bin/alkictl
expect root:alki 750 /etc/alki
expect root:alki 640 /etc/alki/agent.toml
expect root:alki 640 /etc/alki/trust.toml
expect root:alki 640 /etc/alki/controller.env
expect alki:alki 750 /var/lib/alki-agent
expect alki:alki 700 /var/lib/alki-controller
expect root:root 644 /usr/lib/systemd/system/alki-agent.service
getent passwd alki | grep -q ":/usr/sbin/nologin$" || fail "no alki system user without a shell"
dpkg-query -W -f='${Conffiles}\n' alki-agent | grep -q /etc/alki/agent.toml || fail "agent.toml is not a conffile"
# Nothing enabled by surprise.
[ ! -e /etc/systemd/system/multi-user.target.wants/alki-agent.service ] || fail "the agent was enabled"
[ ! -e /etc/systemd/system/multi-user.target.wants/alki-controller.service ] || fail "the controller was enabled"
systemd-analyze verify /usr/lib/systemd/system/alki-agent.service /usr/lib/systemd/system/alki-agent.socket \
  /usr/lib/systemd/system/alki-controller.service || fail "systemd-analyze verify"

target="$(uname -m)-unknown-linux-gnu"
alki-agent version | grep -Eq "^alki-agent [0-9]+\.[0-9]+\.[0-9]+ \(commit [0-9a-f]+, $target\)$" \
  || fail "alki-agent version: $(alki-agent version)"
alki-controller --version | grep -q "(commit " || fail "alki-controller --version"
alkictl --version | grep -q "$target" || fail "alkictl --version"

# Remove keeps the edited conffile and the state; purge takes both.
echo "# edited by test-deb.sh" >> /etc/alki/agent.toml
dpkg --remove alki-agent >/dev/null
[ ! -e /usr/bin/alki-agent ] || fail "the binary stayed after remove"
grep -q "edited by test-deb.sh" /etc/alki/agent.toml || fail "remove dropped the edited conffile"
[ -d /var/lib/alki-agent ] || fail "remove dropped the state"
dpkg --purge alki-agent alki-controller >/dev/null
for gone in /etc/alki/agent.toml /etc/alki/controller.env /var/lib/alki-agent /var/lib/alki-controller \
  /usr/lib/systemd/system/alki-controller.service; do
  [ ! -e "$gone" ] || fail "$gone stayed after purge"
done
# Packages for other architectures (arm64 for Raspberry Pi and Jetson boards): their contents, and their
# binaries run under qemu-user with the target's C library (binfmt_misc is not assumed).
for deb in "$dist"/alki-*_arm64.deb; do
  [ -e "$deb" ] || continue
  [ "$(dpkg-deb -f "$deb" Architecture)" = arm64 ] || fail "$deb is not arm64"
  root=$(mktemp -d); dpkg-deb -x "$deb" "$root"
  for bin in "$root"/usr/bin/*; do
    file -b "$bin" | grep -q "ARM aarch64" || fail "$bin is not an aarch64 binary: $(file -b "$bin")"
  done
  if command -v qemu-aarch64-static >/dev/null && [ -d /usr/aarch64-linux-gnu ]; then
    run=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
    case "$deb" in
      *alki-agent_*) "${run[@]}" "$root/usr/bin/alki-agent" version | grep -q "aarch64-unknown-linux-gnu)" \
        || fail "the arm64 agent's version under qemu" ;;
      *) "${run[@]}" "$root/usr/bin/alkictl" --version | grep -q "aarch64-unknown-linux-gnu)" \
        || fail "the arm64 alkictl's version under qemu" ;;
    esac
  fi
  echo "test-deb: $(basename "$deb") $(stat -c %s "$deb") bytes; binaries: $(for b in "$root"/usr/bin/*; do printf '%s %s B ' "$(basename "$b")" "$(stat -c %s "$b")"; done)"
  rm -rf "$root"
done
echo "test-deb: $(basename "$agent") $(stat -c %s "$agent") bytes, $(basename "$controller") $(stat -c %s "$controller") bytes: install, files, units, versions, remove and purge OK"
