# Shared by the scripts: system packages, the build, and the plugin's path.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

# Debian 12 packages the build, the pipelines and the tests need.
SYSTEM_PACKAGES=(
  build-essential pkg-config curl ca-certificates
  libglib2.0-dev libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstreamer-plugins-bad1.0-dev
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-nice
  libbcg729-dev cmake meson ninja-build sox chromium firefox-esr pulseaudio iproute2 nftables
  sip-tester kamailio baresip-core baresip-ffmpeg dnsmasq-base socat coturn
)

# Installs whatever of SYSTEM_PACKAGES is missing (apt-get update only when needed).
ensure_system_packages() {
  local missing=()
  for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> installing system packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Node for the SDK tests (Debian's nodejs when none is installed), and the npm
# packages of package-lock.json (the real ConnectyCube SDK, playwright-core)
# installed into the repository.
ensure_node_packages() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    SYSTEM_PACKAGES=(nodejs npm) ensure_system_packages
  fi
  if [ ! -f "$ROOT/node_modules/.package-lock.json" ] || [ "$ROOT/package-lock.json" -nt "$ROOT/node_modules/.package-lock.json" ]; then
    echo "==> installing npm packages (package-lock.json)"
    (cd "$ROOT" && npm ci --no-audit --no-fund)
  fi
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] || {
      echo "==> installing Rust (rustup)"
      curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
    }
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
}

# Builds the workspace (release: the one profile everything uses) and puts
# the plugin alone in target/gst-plugins, the directory for GST_PLUGIN_PATH.
build_all() {
  (cd "$ROOT" && cargo build --release --workspace)
  mkdir -p "$ROOT/target/gst-plugins"
  cp "$ROOT/target/release/libgstsipcc.so" "$ROOT/target/gst-plugins/"
  export GST_PLUGIN_PATH="$ROOT/target/gst-plugins"
  export PATH="$ROOT/target/release:$PATH"
}

# The longest one suite of tests may take (the cargo tests take about 20
# minutes on 2 cores).
TEST_TIME_LIMIT=${TEST_TIME_LIMIT:-45m}

# Runs a command inside a network namespace made for it: loopback plus a veth
# pair with documentation-range addresses and no way out. WebRTC peers
# (browsers ignore loopback) talk over the veth; nothing leaves the namespace.
in_test_netns() {
  local ns="sipcc-test-$$" status
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  if ! $sudo ip netns add "$ns" 2>/dev/null; then
    echo "warning: cannot create a network namespace (needs root); running on the host" >&2
    "$@"
    return
  fi
  $sudo ip netns exec "$ns" sh -e -c '
    ip link set lo up
    ip link add media0 type veth peer name media1
    ip addr add 192.0.2.50/32 dev media0
    ip addr add 192.0.2.51/32 dev media1
    ip link set media0 up
    ip link set media1 up
    ip route add 192.0.2.51 dev media0
    ip route add 192.0.2.50 dev media1
    # A default route, as every real machine has (Firefox gathers no
    # candidate without one); what takes it reaches media1 and ends there.
    ip route add default dev media0
    # A one-to-one NAT, as a cloud VM has: its public address 198.51.100.7
    # leads to 192.0.2.50, and what 192.0.2.50 sends out (to 198.51.100.0/24,
    # where a STUN server, 198.51.100.8, is) comes from 198.51.100.7.
    ip route add 198.51.100.7 dev media1
    ip addr add 198.51.100.8/32 dev lo
    nft add table ip one_to_one_nat
    nft add chain ip one_to_one_nat output "{ type nat hook output priority -100; }"
    nft add rule ip one_to_one_nat output ip daddr 198.51.100.7 dnat to 192.0.2.50
    nft add chain ip one_to_one_nat postrouting "{ type nat hook postrouting priority 100; }"
    nft add rule ip one_to_one_nat postrouting ip saddr 192.0.2.50 ip daddr 198.51.100.0/24 snat to 198.51.100.7'
  # `ip netns exec` mounts a sysfs of its own, without the cgroup
  # hierarchies a machine or a container has: the CPU one is mounted again
  # (cgroup v2's, or v1's cpu controller with the host's options).
  local cpu_cgroup
  cpu_cgroup=$(awk '$3 == "cgroup" && $4 ~ /(^|,)cpu(,|$)/ { print $4; exit }' /proc/mounts)
  [ -e /sys/fs/cgroup/cgroup.controllers ] && cpu_cgroup=v2
  # Bounded, so that a test that hangs fails its suite and the others still
  # run; the namespace goes either way.
  $sudo timeout --kill-after=30 "$TEST_TIME_LIMIT" ip netns exec "$ns" sh -c '
    case "$0" in
      "") ;;
      v2) mount -t cgroup2 cgroup2 /sys/fs/cgroup ;;
      *) mount -t tmpfs cgroups /sys/fs/cgroup && mkdir /sys/fs/cgroup/cpu &&
         mount -t cgroup -o "$0" cgroup /sys/fs/cgroup/cpu ;;
    esac || echo "warning: no CPU cgroup hierarchy in the test namespace" >&2
    exec "$@"' "$cpu_cgroup" "$@"
  status=$?
  [ $status -eq 124 ] && echo "error: stopped after $TEST_TIME_LIMIT: $*" >&2
  $sudo ip netns del "$ns"
  return $status
}
