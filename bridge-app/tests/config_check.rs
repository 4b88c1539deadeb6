//! `sip-cc-bridge check` and `run` on broken configurations: every bad key
//! is named, and `run` refuses to start.

mod support;

use std::process::Command;

fn bridge(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sip-cc-bridge"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn check_names_every_bad_key_and_run_refuses_to_start() {
    let dir = support::tempdir();
    let config = dir.join("bridge.toml");
    std::fs::write(
        &config,
        "[connectycube]\nchat_url = \"http://not-a-websocket\"\n\n\
         [[users]]\nextension = \"100\"\nlogin = \"alice\"\npassword = \"\"\n\n\
         [[users]]\nextension = \"100\"\nlogin = \"bob\"\npassword = \"x\"\n",
    )
    .unwrap();
    let path = config.to_str().unwrap();
    let (ok, text) = bridge(&["check", "--config", path]);
    assert!(!ok, "check fails:\n{text}");
    for key in [
        "connectycube.chat_url",
        "users[0].password",
        "users[1].extension",
    ] {
        assert!(text.contains(key), "{key} named in:\n{text}");
    }
    let (ok, text) = bridge(&["run", "--config", path]);
    assert!(
        !ok && text.contains("users[0].password"),
        "run refuses:\n{text}"
    );

    std::fs::write(&config, "[sip]\nlisen = \"127.0.0.1:5060\"\n").unwrap();
    let (ok, text) = bridge(&["check", "--config", path]);
    assert!(
        !ok && text.contains("lisen"),
        "an unknown key is named:\n{text}"
    );

    let (ok, text) = bridge(&[
        "check",
        "--config",
        dir.join("missing.toml").to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("cannot read"),
        "a missing file is reported:\n{text}"
    );

    let example = support::repo_root().join("bridge.example.toml");
    let (ok, text) = bridge(&["check", "--config", example.to_str().unwrap()]);
    assert!(
        ok && text.contains("configuration OK"),
        "the example is fine:\n{text}"
    );
}
