#!/bin/sh
# cargo_wrapper.sh CARGO WORKSPACE TARGET_DIR PROFILE OUTPUT
# Builds the plugin crate with cargo and copies the library to meson's output.
set -eu
cargo=$1 workspace=$2 target_dir=$3 profile=$4 output=$5
if [ "$profile" = release ]; then flag=--release; else flag=; fi
"$cargo" build $flag -p gst-plugin-sipcc --manifest-path "$workspace/Cargo.toml" --target-dir "$target_dir"
cp "$target_dir/$profile/libgstsipcc.so" "$output"
