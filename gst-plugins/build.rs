fn main() {
    gst_plugin_version_helper::info();
    // The G.729 elements link Debian's libbcg729 (libbcg729-dev).
    println!("cargo:rustc-link-lib=bcg729");
}
