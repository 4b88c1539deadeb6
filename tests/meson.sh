#!/usr/bin/env bash
# The meson-wrap project, as a GStreamer meson build would use it:
#  1. stand-alone: meson setup / compile / install into a DESTDIR;
#  2. as a subproject of another meson project through gst-plugin-sipcc.wrap,
#     cloned from this repository's committed HEAD;
# each time gst-inspect-1.0 must list every element of the installed file.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0 passed=0

check_installed() { # label stage-dir
  local so
  so=$(find "$2" -path '*/gstreamer-1.0/libgstsipcc.so' | head -1)
  if [ -z "$so" ]; then echo "FAIL $1: nothing installed under <libdir>/gstreamer-1.0"; failed=$((failed + 1)); return; fi
  local listing missing=()
  listing=$(env -u GST_PLUGIN_PATH gst-inspect-1.0 "$so")
  for element in sipsrc sipsink g729enc g729dec; do
    grep -q "^  $element:" <<<"$listing" || missing+=("$element")
  done
  if [ ${#missing[@]} -eq 0 ]; then echo "ok   $1: ${so#"$2"} lists sipsrc sipsink g729enc g729dec"; passed=$((passed + 1))
  else echo "FAIL $1: ${missing[*]} missing from gst-inspect-1.0 $so"; failed=$((failed + 1)); fi
}

# 1. Stand-alone, reusing the workspace's cargo build.
meson setup "$work/standalone" "$root/meson-wrap" --prefix=/usr --buildtype=release \
  -Dcargo_target_dir="$root/target" >"$work/standalone.log"
meson compile -C "$work/standalone" >>"$work/standalone.log" 2>&1
DESTDIR="$work/stage1" meson install -C "$work/standalone" >>"$work/standalone.log"
check_installed "stand-alone meson install" "$work/stage1"

# 2. As a subproject through the wrap file.
parent="$work/parent"
mkdir -p "$parent/subprojects/packagefiles/gst-plugin-sipcc"
cp "$root"/meson-wrap/{meson.build,meson_options.txt,cargo_wrapper.sh} "$parent/subprojects/packagefiles/gst-plugin-sipcc/"
sed -e "s|^url = .*|url = $root|" -e "s|^revision = .*|revision = $(git -C "$root" rev-parse HEAD)|" -e '/^depth/d' \
  "$root/meson-wrap/gst-plugin-sipcc.wrap" >"$parent/subprojects/gst-plugin-sipcc.wrap"
cat >"$parent/meson.build" <<'MESON'
project('a-gstreamer-build', 'c', meson_version: '>= 0.63')
sipcc = subproject('gst-plugin-sipcc')
MESON
meson setup "$work/parent-build" "$parent" --prefix=/usr --buildtype=release \
  -Dgst-plugin-sipcc:cargo_target_dir="$root/target" >"$work/parent.log" 2>&1
meson compile -C "$work/parent-build" >>"$work/parent.log" 2>&1
DESTDIR="$work/stage2" meson install -C "$work/parent-build" >>"$work/parent.log"
check_installed "subproject through gst-plugin-sipcc.wrap" "$work/stage2"

echo "meson: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
