//! Shared by the bridge-app tests: the real sandbox process, Rust ConnectyCube
//! users, and browser users (the real SDK in Chromium) as child processes.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bridge_protocol::connectycube::rest::{RestClient, UserSession};
use bridge_protocol::connectycube::signaling::{CallSignal, ReceivedSignal};
use bridge_protocol::connectycube::xmpp::{Chat, ChatConfig, ChatEvent};
use bridge_protocol::connectycube::{AppCredentials, UserCredentials};
use gst::prelude::*;
use serde_json::{Value, json};
use sip_cc_bridge::sip::media::audio_chain;
use tokio::sync::mpsc;

pub mod ami_server;

pub const APP_ID: u64 = 1;
pub const AUTH_KEY: &str = "sandbox";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `sip-cc-bridge sandbox` as a child process; killed when dropped.
pub struct SandboxProcess {
    child: Child,
    pub port: u16,
}

impl SandboxProcess {
    pub fn start(port: u16) -> SandboxProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sip-cc-bridge"))
            .args(["sandbox", "--listen", &format!("127.0.0.1:{port}")])
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the sip-cc-bridge binary runs");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(
            line.contains("ConnectyCube sandbox on"),
            "sandbox did not start: {line}"
        );
        // Keep reading: a closed pipe would kill the sandbox at its next line.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        SandboxProcess { child, port }
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn chat_url(&self) -> String {
        format!("ws://localhost:{}/ws", self.port)
    }
}

impl Drop for SandboxProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Rust ConnectyCube user: REST session and chat, with signals collected.
pub struct RustUser {
    pub user_id: u64,
    pub chat: Chat,
    pub events: mpsc::UnboundedReceiver<ChatEvent>,
    pub session: Arc<UserSession>,
}

pub fn app() -> AppCredentials {
    AppCredentials {
        app_id: APP_ID,
        auth_key: AUTH_KEY.into(),
        auth_secret: None,
    }
}

impl RustUser {
    pub async fn sign_in(api_url: &str, chat_url: &str, login: &str, password: &str) -> RustUser {
        let session = Arc::new(UserSession::new(
            RestClient::new(api_url, app()),
            UserCredentials::Login {
                login: login.into(),
                password: password.into(),
            },
        ));
        let user_id = session.session().await.expect("session").user_id;
        let source = session.clone();
        let (chat, mut events) = Chat::start(ChatConfig {
            url: chat_url.into(),
            domain: "localhost".into(),
            user_id,
            app_id: APP_ID,
            // Each (re)connection signs in again: a restarted server knows no tokens.
            password: Arc::new(move || {
                let source = source.clone();
                Box::pin(async move {
                    source.renew().await.map_err(|e| e.to_string())?;
                    source.chat_password().await.map_err(|e| e.to_string())
                })
            }),
            keepalive: Duration::from_secs(2),
        });
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(ChatEvent::Online { .. })) => {}
            other => panic!("{login} did not come online: {other:?}"),
        }
        RustUser {
            user_id,
            chat,
            events,
            session,
        }
    }

    pub fn send_signal(&self, to_user: u64, signal: &CallSignal) {
        let to = format!("{to_user}-{APP_ID}@localhost");
        self.chat
            .send(&signal.to_stanza(&to, &format!("{:024x}", rand::random::<u128>() >> 32)));
    }

    /// The next call signal that satisfies `wanted`, within `within`.
    pub async fn signal(
        &mut self,
        within: Duration,
        wanted: impl Fn(&ReceivedSignal) -> bool,
    ) -> ReceivedSignal {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("timed out waiting for a call signal")
                .expect("chat ended");
            if let ChatEvent::Stanza(stanza) = event
                && let Ok(signal) = CallSignal::from_stanza(&stanza)
                && wanted(&signal)
            {
                return signal;
            }
        }
    }
}

/// The browser a [`BrowserPeer`] runs the SDK in.
#[derive(Clone, Copy)]
pub enum Browser {
    Chromium,
    Firefox,
}

/// A browser user: `tests/sdk/browser-peer.mjs` (the real SDK in Chromium
/// or Firefox).
pub struct BrowserPeer {
    child: Child,
    /// Closed when dropped: the peer then closes its browser.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub user_id: u64,
}

impl BrowserPeer {
    pub fn start(sandbox_url: &str, login: &str, password: &str, tone: u32) -> BrowserPeer {
        Self::start_in(Browser::Chromium, sandbox_url, login, password, tone)
    }

    pub fn start_in(
        browser: Browser,
        sandbox_url: &str,
        login: &str,
        password: &str,
        tone: u32,
    ) -> BrowserPeer {
        let engine = match browser {
            Browser::Chromium => "chromium",
            Browser::Firefox => "firefox",
        };
        let mut child = Command::new("node")
            .arg(repo_root().join("tests/sdk/browser-peer.mjs"))
            .args([sandbox_url, login, password, &tone.to_string(), engine])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node runs");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("browser peer failed to start: {line:?}"));
        let user_id = ready["userId"].as_u64().unwrap();
        BrowserPeer {
            child,
            stdin: Some(stdin),
            stdout,
            user_id,
        }
    }

    pub fn command(&mut self, command: Value) -> Value {
        writeln!(self.stdin.as_mut().unwrap(), "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("bad answer {line:?}"));
        assert_eq!(answer["ok"], true, "{command} failed: {answer}");
        answer["value"].clone()
    }

    /// How many events of `kind` the page logged so far.
    pub fn count_events(&mut self, kind: &str) -> usize {
        let events = self.command(json!({"op": "events"}));
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .count()
    }

    /// Waits until the page logged more than `seen` events of `kind`.
    pub fn wait_for_more(&mut self, kind: &str, seen: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.count_events(kind) <= seen {
            assert!(
                Instant::now() < deadline,
                "no new {kind:?} event; events: {}",
                self.command(json!({"op": "events"}))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the page logged an event of `kind`; returns its detail.
    pub fn wait_event(&mut self, kind: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let events = self.command(json!({"op": "events"}));
            if let Some(e) = events
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .find(|e| e["kind"] == kind)
            {
                return e["detail"].as_str().unwrap_or_default().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no {kind:?} event; events: {events}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for BrowserPeer {
    /// Lets the peer close its browser (a Firefox, reached over a socket,
    /// would outlive a killed peer), and kills it if it takes too long.
    fn drop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sip-cc-bridge run` as a child process with its log lines collected;
/// killed when dropped.
pub struct BridgeProcess {
    child: Child,
    pub sip_port: u16,
    /// The embedded sandbox (demo users alice and bob).
    pub sandbox_port: u16,
    host: String,
    logs: Arc<std::sync::Mutex<Vec<String>>>,
}

/// The management token every test bridge gets.
pub const MANAGEMENT_TOKEN: &str = "test-management-token-0123";

/// A GET on loopback `port`, with `token` as bearer when given: status and body.
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorization}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

impl BridgeProcess {
    pub fn start(extra_args: &[&str]) -> BridgeProcess {
        Self::start_on("127.0.0.1", extra_args)
    }

    /// With SIP on `host` (an IPv4 or IPv6 address) and a free port.
    pub fn start_on(host: &str, extra_args: &[&str]) -> BridgeProcess {
        Self::start_with_environment(host, extra_args, &[])
    }

    /// With environment variables that override the configuration. A
    /// bridge that exits before it listens (a port picked free and taken
    /// before it bound it) is started again on other ports.
    pub fn start_with_environment(
        host: &str,
        extra_args: &[&str],
        environment: &[(&str, &str)],
    ) -> BridgeProcess {
        Self::start_with(host, extra_args, environment, Launch::Directly)
    }

    /// With DNS answered by `dns` alone: the bridge runs in a mount
    /// namespace of its own whose /etc/resolv.conf names it (root, as the
    /// test namespace).
    pub fn start_resolving_with(dns: &Dnsmasq, extra_args: &[&str]) -> BridgeProcess {
        let launch = Launch::ResolvingWith(&dns.resolv_conf);
        Self::start_with("127.0.0.1", extra_args, &[], launch)
    }

    /// In the cgroup of `quota` from its start.
    pub fn start_under(quota: &CpuQuota, extra_args: &[&str]) -> BridgeProcess {
        let launch = Launch::InCgroup(&quota.procs);
        Self::start_with("127.0.0.1", extra_args, &[], launch)
    }

    fn start_with(
        host: &str,
        extra_args: &[&str],
        environment: &[(&str, &str)],
        launch: Launch,
    ) -> BridgeProcess {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let mut bridge = Self::spawn(host, extra_args, environment, launch);
            match bridge.until_listening(Duration::from_secs(20)) {
                Ok(()) => return bridge,
                Err(why) if attempt < ATTEMPTS => {
                    eprintln!("the bridge did not start ({why}), again on other ports")
                }
                Err(why) => panic!("the bridge did not start listening ({why})"),
            }
        }
        unreachable!()
    }

    /// Waits for the bridge to listen for SIP; else why not, with its log.
    fn until_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let listening = |l: &str| l.contains("SIP listening on tcp");
        // In short waits, to notice between them a bridge that exited.
        while self
            .wait_for_log(listening, Duration::from_millis(100))
            .is_none()
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                // What it wrote last may still be on its way.
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!("it exited, {status}: {:#?}", self.logs()));
            }
            if Instant::now() > deadline {
                return Err(format!("not within {timeout:?}: {:#?}", self.logs()));
            }
        }
        Ok(())
    }

    fn spawn(
        host: &str,
        extra_args: &[&str],
        environment: &[(&str, &str)],
        launch: Launch,
    ) -> BridgeProcess {
        let sip_port = free_port();
        let sandbox_port = free_port();
        let sip = if host.contains(':') {
            format!("[{host}]:{sip_port}")
        } else {
            format!("{host}:{sip_port}")
        };
        // A configuration file says where ConnectyCube is; else an own sandbox.
        let sandbox = if extra_args.contains(&"--config") {
            vec![]
        } else {
            vec!["--sandbox".to_owned(), format!("127.0.0.1:{sandbox_port}")]
        };
        let binary = env!("CARGO_BIN_EXE_sip-cc-bridge");
        let mut command = match launch {
            Launch::Directly => Command::new(binary),
            Launch::ResolvingWith(resolv_conf) => {
                let mut command = Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
                    .arg(resolv_conf)
                    .arg(binary);
                command
            }
            Launch::InCgroup(procs) => {
                let mut command = Command::new("sh");
                command
                    .arg("-c")
                    .arg(r#"echo $$ > "$0" && exec "$@""#)
                    .arg(procs)
                    .arg(binary);
                command
            }
        };
        let mut child = command
            .arg("run")
            .args(["--sip", &sip])
            .args(&sandbox)
            .args(extra_args)
            .current_dir(repo_root())
            // BRIDGE_LOG (a RUST_LOG filter) shows more when a test is studied.
            .env(
                "RUST_LOG",
                std::env::var("BRIDGE_LOG").unwrap_or("info,rsipstack=warn".into()),
            )
            // Used only with --management.
            .env("MANAGEMENT_TOKEN", MANAGEMENT_TOKEN)
            .envs(environment.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the sip-cc-bridge binary runs");
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let collected = logs.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                collected.lock().unwrap().push(line);
            }
        });
        BridgeProcess {
            child,
            sip_port,
            sandbox_port,
            host: host.to_owned(),
            logs,
        }
    }

    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.sip_port)
        } else {
            format!("{}:{}", self.host, self.sip_port)
        }
    }

    /// The first log line matching `matches`, waiting up to `timeout`.
    pub fn wait_for_log(
        &self,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs.lock().unwrap().iter().find(|l| matches(l)) {
                return Some(line.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log lines that match, once there are `count` of them (or at
    /// the timeout): lines reach the log a little after the bridge acts.
    pub fn wait_for_logs(
        &self,
        matches: impl Fn(&str) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<String> = self.logs().into_iter().filter(|l| matches(l)).collect();
            if found.len() >= count || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Whether a line of the bridge's log so far holds `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// The bridge's RTP port of a call's video (`None`: the first call
    /// with video), and its H.264 payload type, from its log.
    pub fn video_port(&self, call_id: Option<&str>) -> (u16, u8) {
        let line = self
            .wait_for_log(
                |l| {
                    l.contains(" video at ")
                        && call_id.is_none_or(|id| l.contains(&format!("call {id}: ")))
                },
                Duration::from_secs(20),
            )
            .unwrap_or_else(|| panic!("no video for call {call_id:?}: {:#?}", self.logs()));
        let at = line.split(" video at ").nth(1).unwrap();
        let address = at.split_whitespace().next().unwrap();
        let port = address.rsplit(':').next().unwrap().parse().unwrap();
        let pt = line.rsplit("H264/").next().unwrap().trim_end_matches(')');
        (port, pt.parse().unwrap())
    }

    /// The bridge's RTP port of a call, from its log.
    pub fn media_port(&self, call_id: &str) -> u16 {
        let line = self
            .wait_for_log(
                |l| l.contains(&format!("call {call_id}:")) && l.contains(" local "),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|| panic!("no media for call {call_id}: {:#?}", self.logs()));
        let local = line.split(" local ").nth(1).unwrap();
        let address = local.split_whitespace().next().unwrap();
        address.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Ctrl-C, as a user stops it; waits up to 10 s for it to exit.
    pub fn interrupt(&mut self) -> bool {
        self.signal("INT");
        self.exited_within(Duration::from_secs(10)) == Some(true)
    }

    /// Sends the bridge a signal by name (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{name} {pid}");
    }

    /// Whether it exited successfully, once it exits within `timeout`.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<bool> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the bridge's process is started.
#[derive(Clone, Copy)]
enum Launch<'a> {
    Directly,
    /// In a mount namespace of its own whose /etc/resolv.conf is this file.
    ResolvingWith(&'a Path),
    /// In the cgroup whose `cgroup.procs` this is.
    InCgroup(&'a Path),
}

/// A cgroup with a CPU quota, as a container's CPU limit sets one (root:
/// cgroup v2's `cpu.max`, or v1's `cpu` hierarchy); removed when dropped,
/// after the processes in it have ended.
pub struct CpuQuota {
    directory: PathBuf,
    procs: PathBuf,
}

impl CpuQuota {
    /// `cores` of CPU time per 100 ms period.
    pub fn new(cores: f64) -> CpuQuota {
        let name = format!("sipcc-test-{}", std::process::id());
        let quota = (cores * 100_000.0).round() as u64;
        let unified = Path::new("/sys/fs/cgroup");
        let (directory, file, value) = if unified.join("cgroup.controllers").exists() {
            // Children get the cpu controller only if the parent hands it on.
            let _ = std::fs::write(unified.join("cgroup.subtree_control"), "+cpu");
            (unified.join(&name), "cpu.max", format!("{quota} 100000"))
        } else {
            let directory = unified.join("cpu").join(&name);
            (directory, "cpu.cfs_quota_us", quota.to_string())
        };
        std::fs::create_dir_all(&directory)
            .unwrap_or_else(|e| panic!("cannot make cgroup {} (root?): {e}", directory.display()));
        std::fs::write(directory.join(file), value).expect("the cgroup takes a CPU quota");
        CpuQuota {
            procs: directory.join("cgroup.procs"),
            directory,
        }
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // Busy until the processes in it are gone.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.directory).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One SIPp run of a scenario in `tests/sipp/`; returns whether every call
/// succeeded, with SIPp's output for the failure message.
pub fn sipp(scenario: &str, target: &str, service: &str, extra_args: &[&str]) -> (bool, String) {
    let dir = tempdir();
    let scenario_path = repo_root().join("bridge-app/tests/sipp").join(scenario);
    let output = Command::new("sipp")
        .arg("-sf")
        .arg(&scenario_path)
        .args(["-s", service, target])
        .args([
            "-i",
            if target.starts_with('[') {
                "::1"
            } else {
                "127.0.0.1"
            },
        ])
        // Its SIP port too from the reserved blocks: a port merely free
        // now in the ephemeral range can be taken before SIPp binds it.
        .args(["-p", &free_even_port().to_string()])
        .args(["-mp", &free_even_port().to_string()])
        .args([
            "-m",
            "1",
            "-nostdin",
            "-timeout",
            "30s",
            "-timeout_error",
            "-trace_err",
        ])
        .args(extra_args)
        // The profile of the scenarios' offers unless the test gave one
        // (SIPp keeps a key's first value).
        .args(["-key", "profile", "RTP/AVP"])
        .current_dir(&dir)
        .output()
        .expect("sipp (Debian sip-tester) is installed");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().ends_with("_errors.log") {
            text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    (output.status.success(), text)
}

/// SIPp on `sip_port` taking one call (or REGISTER) to alice with `scenario` (and
/// `args`); the thread yields its verdict and output.
pub fn sipp_server(
    sip_port: u16,
    scenario: &str,
    args: &[&str],
) -> std::thread::JoinHandle<(bool, String)> {
    let mut command = std::process::Command::new("sipp");
    command
        .arg("-sf")
        .arg(repo_root().join("bridge-app/tests/sipp").join(scenario))
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &sip_port.to_string(),
            "-s",
            "alice",
        ])
        .args(args)
        .args([
            "-m",
            "1",
            "-nostdin",
            "-timeout",
            "60s",
            "-timeout_error",
            "-trace_err",
        ])
        .current_dir(tempdir());
    std::thread::spawn(move || {
        let output = command.output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    })
}

/// A fresh directory under the system's temporary directory.
/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in
/// a new directory: what a server's TLS is set up with in the tests.
pub fn self_signed_certificate() -> (PathBuf, PathBuf) {
    let dir = tempdir();
    let (certificate, key) = (dir.join("certificate.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&certificate)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(made.success(), "openssl made no certificate");
    (certificate, key)
}

pub fn tempdir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sip-cc-bridge-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An even UDP port with the next three free (RTP and RTCP for audio and video).
pub fn free_even_port() -> u16 {
    // Between the bridge's RTP range (10000-20000) and the kernel's ephemeral
    // range (32768 up), so no socket bound to port 0 meanwhile (ICE, udpsrc)
    // can take it; each call in this process gets its own block of four, the
    // ports SIPp binds for audio and video RTP/RTCP.
    const FIRST: u16 = 20000;
    const BLOCKS: u16 = (32000 - FIRST) / 4;
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let start = (std::process::id() % u32::from(BLOCKS)) as u16;
    loop {
        let block = (start + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % BLOCKS;
        let port = FIRST + block * 4;
        if (port..port + 4).all(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()) {
            return port;
        }
    }
}

/// A DNS server (dnsmasq) on the test namespace's 127.0.0.1:53 that
/// knows only the records it is given, and a resolv.conf naming it.
pub struct Dnsmasq {
    child: Child,
    pub resolv_conf: PathBuf,
    log: PathBuf,
}

impl Dnsmasq {
    /// `records`: dnsmasq options such as `--srv-host=…`, `--host-record=…`.
    pub fn start(records: &[String]) -> Dnsmasq {
        let dir = tempdir();
        let resolv_conf = dir.join("resolv.conf");
        std::fs::write(&resolv_conf, "nameserver 127.0.0.1\n").unwrap();
        let log = dir.join("dnsmasq.log");
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--port=53",
                "--user=root",
                "--pid-file",
                "--log-queries",
                "--log-facility=-",
            ])
            .args(records)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("dnsmasq (Debian dnsmasq-base) is installed");
        let mut dns = Dnsmasq {
            child,
            resolv_conf,
            log,
        };
        // Serving once port 53 is taken.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::UdpSocket::bind("127.0.0.1:53").is_ok() {
            if let Ok(Some(status)) = dns.child.try_wait() {
                panic!("dnsmasq exited, {status}: {}", dns.log());
            }
            assert!(Instant::now() < deadline, "dnsmasq: {}", dns.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        dns
    }

    /// What it logged, the queries it answered among it.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// coturn (Debian's `coturn`), a TURN server with one user, at
/// 198.51.100.8: outside the test namespace's NAT (`scripts/lib.sh`);
/// killed when dropped.
pub struct Coturn {
    child: Child,
    port: u16,
    /// Its TLS port, and the self-signed certificate it shows there.
    tls: Option<(u16, PathBuf)>,
}

impl Coturn {
    pub const ADDRESS: &str = "198.51.100.8";

    pub fn start() -> Coturn {
        Self::launch(&["--no-tls"], None)
    }

    /// Also over TLS, with a self-signed certificate.
    pub fn start_with_tls() -> Coturn {
        let (certificate, key) = self_signed_certificate();
        let tls_port = free_port();
        let coturn = Self::launch(
            &[
                "--tls-listening-port",
                &tls_port.to_string(),
                "--cert",
                certificate.to_str().unwrap(),
                "--pkey",
                key.to_str().unwrap(),
            ],
            Some((tls_port, certificate.clone())),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((Self::ADDRESS, tls_port)).is_err() {
            assert!(Instant::now() < deadline, "coturn did not listen for TLS");
            std::thread::sleep(Duration::from_millis(50));
        }
        coturn
    }

    fn launch(options: &[&str], tls: Option<(u16, PathBuf)>) -> Coturn {
        let port = free_port();
        let child = Command::new("turnserver")
            .args(["-n", "--no-cli", "--no-dtls", "--simple-log"])
            .args(options)
            .args(["--listening-ip", Self::ADDRESS, "--relay-ip", Self::ADDRESS])
            .args(["--listening-port", &port.to_string()])
            .args(["--lt-cred-mech", "--realm", "example.org"])
            .args(["--user", "bridge:relay-s3cret"])
            .args(["--log-file", "stdout"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver (Debian coturn) is installed");
        let coturn = Coturn { child, port, tls };
        // Ready once it answers a Binding request.
        let probe = UdpSocket::bind("0.0.0.0:0").unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut binding = [0u8; 20];
        binding[1] = 1;
        binding[4..8].copy_from_slice(&0x2112_a442u32.to_be_bytes());
        while probe
            .send_to(&binding, (Self::ADDRESS, port))
            .and_then(|_| probe.recv_from(&mut [0u8; 512]))
            .is_err()
        {
            assert!(Instant::now() < deadline, "coturn did not start");
        }
        coturn
    }

    /// As `connectycube.turn_server` takes it.
    pub fn url(&self) -> String {
        format!("turn://bridge:relay-s3cret@{}:{}", Self::ADDRESS, self.port)
    }

    /// Over TLS: the URL, and the certificate to trust.
    pub fn tls_url(&self) -> (String, &Path) {
        let (port, certificate) = self.tls.as_ref().expect("started with TLS");
        let url = format!("turns://bridge:relay-s3cret@{}:{port}", Self::ADDRESS);
        (url, certificate)
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kamailio as registrar and proxy (config `tests/kamailio/kamailio.cfg`),
/// on a free loopback port; killed when dropped.
pub struct KamailioProcess {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl KamailioProcess {
    /// Challenges with MD5 digests.
    pub fn start() -> KamailioProcess {
        Self::start_with_digest("MD5")
    }

    /// Challenges with `algorithm` (`MD5` or `SHA-256`).
    pub fn start_with_digest(algorithm: &str) -> KamailioProcess {
        let dir = tempdir();
        Self::start_config(
            dir,
            "kamailio.cfg",
            "127.0.0.1",
            &[("KAMAILIO_DIGEST_ALGORITHM", algorithm)],
        )
    }

    /// A STUN server only (`tests/kamailio/stun.cfg`), at 198.51.100.8:
    /// outside the test namespace's NAT (`scripts/lib.sh`).
    pub fn start_stun() -> KamailioProcess {
        Self::start_config(tempdir(), "stun.cfg", "198.51.100.8", &[])
    }

    /// A load balancer (`tests/kamailio/dispatcher.cfg`) sending new calls
    /// to `bridges` in rotation while they answer its OPTIONS with 2xx.
    pub fn start_dispatcher(bridges: &[String]) -> KamailioProcess {
        let dir = tempdir();
        let list = dir.join("dispatcher.list");
        let destinations: String = bridges.iter().map(|b| format!("1 sip:{b}\n")).collect();
        std::fs::write(&list, destinations).unwrap();
        let list = list.display().to_string();
        Self::start_config(
            dir,
            "dispatcher.cfg",
            "127.0.0.1",
            &[("DISPATCHER_LIST", &list)],
        )
    }

    /// Kamailio with `file`, its port and `replacements` put in, in `dir`.
    fn start_config(
        dir: PathBuf,
        file: &str,
        address: &str,
        replacements: &[(&str, &str)],
    ) -> KamailioProcess {
        let port = free_port();
        let template =
            std::fs::read_to_string(repo_root().join("bridge-app/tests/kamailio").join(file))
                .unwrap();
        let config = dir.join("kamailio.cfg");
        let text = replacements.iter().fold(
            template.replace("KAMAILIO_PORT", &port.to_string()),
            |text, (name, value)| text.replace(name, value),
        );
        std::fs::write(&config, text).unwrap();
        let child = Command::new("kamailio")
            .arg("-f")
            .arg(&config)
            .args(["-DD", "-E", "-P"])
            .arg(dir.join("kamailio.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("kamailio.log")).unwrap())
            // Its workers with it, in a group of their own (see `drop`).
            .process_group(0)
            .spawn()
            .expect("kamailio (Debian kamailio) is installed");
        let kamailio = KamailioProcess { child, port, dir };
        // Alive once it answers anything.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let options = format!(
            "OPTIONS sip:{address}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {0};branch=z9hG4bKprobe\r\nFrom: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:{address}:{port}>\r\nCall-ID: probe\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            probe.local_addr().unwrap()
        );
        let mut buffer = [0u8; 2048];
        loop {
            probe.send_to(options.as_bytes(), (address, port)).unwrap();
            if probe.recv_from(&mut buffer).is_ok() {
                return kamailio;
            }
            assert!(
                Instant::now() < deadline,
                "kamailio did not start: {}",
                kamailio.log()
            );
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kamailio.log")).unwrap_or_default()
    }
}

impl Drop for KamailioProcess {
    fn drop(&mut self) {
        // SIGTERM: Kamailio then stops its worker processes, which a
        // SIGKILL of the main one would leave running.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever of the group is still there (a main process that did not
        // stop in time, or workers it left) must not outlive the test.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A baresip phone registered to Kamailio: its microphone is a WAV tone
/// and what it hears is recorded (the sndfile module).
pub struct Baresip {
    dir: PathBuf,
    registrar_port: u16,
    video: bool,
}

impl Baresip {
    /// A phone for `user`/`password` that sends `frequency` Hz and offers
    /// only `codec` (baresip module name: g711, g722, opus).
    pub fn new(
        user: &str,
        password: &str,
        registrar_port: u16,
        frequency: u32,
        codec: &str,
    ) -> Baresip {
        let dir = tempdir();
        let tone = dir.join("tone.wav");
        // aufile wants the codec's own rate and channels.
        let (rate, channels) = match codec {
            "g722" => ("16000", "1"),
            "opus" => ("48000", "2"),
            _ => ("8000", "1"),
        };
        let status = Command::new("sox")
            .args(["-n", "-r", rate, "-c", channels, "-b", "16"])
            .arg(&tone)
            .args(["synth", "20", "sine", &frequency.to_string(), "vol", "0.5"])
            .status()
            .expect("sox is installed");
        assert!(status.success());
        let config = format!(
            "poll_method epoll\n\
             sip_listen 127.0.0.1:{sip_port}\n\
             audio_source aufile,{tone}\n\
             audio_player aubridge,nil\n\
             audio_alert aubridge,nil\n\
             module_path /usr/lib/baresip/modules\n\
             module {codec}.so\n\
             module aufile.so\n\
             module aubridge.so\n\
             module sndfile.so\n\
             module_app account.so\n\
             module_app menu.so\n\
             snd_path {dir}\n",
            // baresip listens for TLS on the next port up: a block from the
            // reserved range, where no socket bound to port 0 lands.
            sip_port = free_even_port(),
            tone = tone.display(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("config"), config).unwrap();
        std::fs::write(
            dir.join("accounts"),
            format!(
                "<sip:{user}@127.0.0.1:{registrar_port}>;auth_pass={password};answermode=auto;regint=60\n"
            ),
        )
        .unwrap();
        Baresip {
            dir,
            registrar_port,
            video: false,
        }
    }

    /// Gives the phone a camera (fakevideo) and H.264 (avcodec, Debian
    /// `baresip-ffmpeg`); the first frame it decodes is saved (`decoded_frame`).
    pub fn with_video(mut self) -> Baresip {
        let config = self.dir.join("config");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(
            "module avcodec.so\n\
             module fakevideo.so\n\
             module snapshot.so\n\
             video_source fakevideo,nil\n\
             video_display fakevideo,nil\n\
             video_size 320x240\n\
             video_bitrate 300000\n\
             video_fps 15\n",
        );
        std::fs::write(&config, text).unwrap();
        self.video = true;
        self
    }

    /// Width and height of the first video frame the phone decoded.
    pub fn decoded_frame(&self) -> Option<(u32, u32)> {
        let png = std::fs::read(self.dir.join("decoded.png")).ok()?;
        // The PNG signature, then the IHDR chunk: length, type, width, height.
        let dimension = |at: usize| Some(u32::from_be_bytes(png.get(at..at + 4)?.try_into().ok()?));
        Some((dimension(16)?, dimension(20)?))
    }

    /// baresip on this phone's configuration; with video, it saves the first
    /// frame it decodes.
    fn command(&self) -> Command {
        let mut command = Command::new("baresip");
        command.arg("-f").arg(&self.dir).args(["-n", "127.0.0.1"]);
        if self.video {
            command.arg("-e").arg(format!(
                "/snapshot_recv {}",
                self.dir.join("decoded.png").display()
            ));
        }
        command
    }

    /// Makes the phone insist on SDES-SRTP: baresip's `mediaenc`
    /// `srtp-mand` offers RTP/SAVP with a=crypto, `srtp-mandf` RTP/SAVPF
    /// (with RTCP feedback) and takes only an answer in that profile.
    pub fn with_mandatory_srtp(self, mediaenc: &str) -> Baresip {
        let config = self.dir.join("config");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("module srtp.so\n");
        std::fs::write(&config, text).unwrap();
        let accounts = self.dir.join("accounts");
        let line = std::fs::read_to_string(&accounts).unwrap();
        std::fs::write(
            &accounts,
            format!("{};mediaenc={mediaenc}\n", line.trim_end()),
        )
        .unwrap();
        self
    }

    /// Calls `user` through the registrar, stays on the line `seconds`, hangs up;
    /// returns baresip's output.
    pub fn call(&self, user: &str, seconds: u32) -> String {
        let output = self
            .command()
            .arg("-e")
            .arg(format!(
                "/dial sip:{user}@127.0.0.1:{}",
                self.registrar_port
            ))
            .args(["-t", &seconds.to_string()])
            .output()
            .expect("baresip is installed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Registers, answers every call at once, and quits after `seconds`;
    /// returns baresip's output.
    pub fn answer_calls(&self, seconds: u32) -> String {
        let output = self
            .command()
            .args(["-t", &seconds.to_string()])
            .output()
            .expect("baresip is installed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The recording of what the phone heard (sndfile's `*-dec.wav`).
    pub fn heard(&self) -> Option<PathBuf> {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with("-dec.wav"))
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The dominant frequency of a WAV file.
pub fn wav_frequency(path: &std::path::Path) -> Option<f64> {
    let mut reader = hound::WavReader::open(path).ok()?;
    let spec = reader.spec();
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Int => reader
            .samples::<i32>()
            .map_while(Result::ok)
            .map(|s| s as f32 / (1u32 << (spec.bits_per_sample - 1)) as f32)
            .collect(),
        hound::SampleFormat::Float => reader.samples::<f32>().map_while(Result::ok).collect(),
    };
    let mono: Vec<f32> = samples
        .iter()
        .step_by(spec.channels.into())
        .copied()
        .collect();
    // Skip the first second: call setup.
    let skip = (spec.sample_rate as usize).min(mono.len() / 2);
    bridge_protocol::tone::dominant_frequency(&mono[skip..], spec.sample_rate)
}

/// A phone made of GStreamer elements: sends a tone in one codec and
/// records what comes back, and the digits it receives (RFC 4733, payload
/// type 101 as `sipp/call.xml` offers it).
pub struct Phone {
    pipeline: gst::Pipeline,
    heard: Arc<Mutex<Vec<f32>>>,
    digits: Arc<Mutex<String>>,
}

impl Phone {
    pub fn new(encoding_name: &str, payload_type: u8, clock_rate: u32, frequency: u32) -> Phone {
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            gst::init().unwrap();
            gstsipcc::register().unwrap();
        });
        let chain = audio_chain(encoding_name).unwrap();
        let params = if encoding_name == "OPUS" {
            ",encoding-params=(string)2"
        } else {
            ""
        };
        // Elements of one session name share its sockets: one per phone.
        static PHONES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let number = PHONES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = format!("phone-{encoding_name}-{number}");
        let description = format!(
            "audiotestsrc is-live=true freq={frequency} volume=0.5 ! audioconvert ! audioresample \
               ! audio/x-raw,rate={},channels=1 ! {} ! {} pt={payload_type} max-ptime=20000000 \
               ! sipsink name=tx session={session} local-address=127.0.0.1 \
             sipsrc name=rx session={session} local-address=127.0.0.1 stats-interval=0 \
               payload-map=\"application/x-rtp,media=audio,payload={payload_type},clock-rate={clock_rate},encoding-name={encoding_name}{params};\
                 application/x-rtp,media=audio,payload=101,clock-rate=8000,encoding-name=TELEPHONE-EVENT\" \
               ! {} ! {} ! audioconvert ! audioresample ! audio/x-raw,format=F32LE,rate=48000,channels=1 \
               ! appsink name=ear sync=false",
            chain.encoder_rate, chain.encoder, chain.payloader, chain.depayloader, chain.decoder
        );
        let pipeline = gst::parse::launch(&description)
            .unwrap()
            .downcast::<gst::Pipeline>()
            .unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink_heard = heard.clone();
        let ear = pipeline
            .by_name("ear")
            .unwrap()
            .downcast::<gst_app::AppSink>()
            .unwrap();
        ear.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let map = sample.buffer().unwrap().map_readable().unwrap();
                    sink_heard.lock().unwrap().extend(
                        map.chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    );
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let digits = Arc::new(Mutex::new(String::new()));
        let received = digits.clone();
        pipeline.bus().unwrap().set_sync_handler(move |_, message| {
            if let gst::MessageView::Element(element) = message.view()
                && let Some(s) = element.structure().filter(|s| s.name() == "sip-dtmf")
                && let Ok(digit) = s.get::<String>("digit")
            {
                received.lock().unwrap().push_str(&digit);
            }
            gst::BusSyncReply::Drop
        });
        pipeline.set_state(gst::State::Paused).unwrap();
        Phone {
            pipeline,
            heard,
            digits,
        }
    }

    /// The digits received so far, in order.
    pub fn digits(&self) -> String {
        self.digits.lock().unwrap().clone()
    }

    /// The digits heard once there are `count` of them, or after 5 s.
    pub fn wait_for_digits(&self, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.digits().len() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.digits()
    }

    pub fn port(&self) -> u16 {
        self.pipeline
            .by_name("rx")
            .unwrap()
            .property::<u32>("local-port") as u16
    }

    pub fn call(&self, bridge_port: u16) {
        let tx = self.pipeline.by_name("tx").unwrap();
        tx.set_property("remote-address", "127.0.0.1");
        tx.set_property("remote-port", u32::from(bridge_port));
        self.pipeline.set_state(gst::State::Playing).unwrap();
    }

    /// Sends nothing until [`Self::resume`], as a desk phone holding a call.
    pub fn pause(&self) {
        self.pipeline.set_state(gst::State::Paused).unwrap();
    }

    pub fn resume(&self) {
        self.pipeline.set_state(gst::State::Playing).unwrap();
    }

    /// From now on its packets' timestamps are `jump` ticks off, as when a
    /// PBX re-bridges the call: with another SSRC, or with the same one and
    /// the marker bit on the first packet (Asterisk with its SSRC constant).
    pub fn change_source(&self, jump: i32, new_ssrc: bool) {
        let pad = self
            .pipeline
            .by_name("tx")
            .unwrap()
            .static_pad("sink")
            .unwrap();
        let first = std::sync::atomic::AtomicBool::new(true);
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(buffer) = info.buffer_mut()
                && let Ok(mut map) = buffer.make_mut().map_writable()
                && map.len() >= 12
            {
                let timestamp = u32::from_be_bytes([map[4], map[5], map[6], map[7]]);
                map[4..8].copy_from_slice(&timestamp.wrapping_add_signed(jump).to_be_bytes());
                if new_ssrc {
                    let ssrc = u32::from_be_bytes([map[8], map[9], map[10], map[11]]);
                    map[8..12].copy_from_slice(&(!ssrc).to_be_bytes());
                } else if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    map[1] |= 0x80;
                }
            }
            gst::PadProbeReturn::Ok
        });
    }

    /// The dominant frequency of the last second heard.
    pub fn heard_frequency(&self) -> Option<f64> {
        let heard = self.heard.lock().unwrap();
        let tail = &heard[heard.len().saturating_sub(48000)..];
        bridge_protocol::tone::dominant_frequency(tail, 48000)
    }
}

impl Drop for Phone {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// The camera and screen of a GStreamer video phone: a moving test picture
/// sent as H.264, and the H.264 it receives decoded, its frames counted.
pub struct VideoPhone {
    pipeline: gst::Pipeline,
    frames: Arc<std::sync::atomic::AtomicU64>,
    /// The largest picture decoded: width, height.
    largest: Arc<Mutex<Option<(i32, i32)>>>,
    /// Packets received with a NAL unit in parts (FU-A, FU-B) or several
    /// in one (STAP, MTAP): what a phone in packetization mode 0 drops.
    not_single_nal: Arc<std::sync::atomic::AtomicU64>,
    key_frames: Arc<Mutex<Vec<Instant>>>,
    key_frames_sent: Arc<std::sync::atomic::AtomicU64>,
}

impl VideoPhone {
    pub fn new() -> VideoPhone {
        let description = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=15/1 \
               ! openh264enc name=camera gop-size=100000 ! h264parse ! rtph264pay name=pay config-interval=-1 \
               ! sipsink name=tx session=video-phone local-address=127.0.0.1 \
             sipsrc name=rx session=video-phone local-address=127.0.0.1 stats-interval=0 timeout=0 \
               ! rtph264depay ! h264parse name=parse ! avdec_h264 ! appsink name=screen sync=false";
        let pipeline = gst::parse::launch(description)
            .unwrap()
            .downcast::<gst::Pipeline>()
            .unwrap();
        let frames = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = frames.clone();
        let largest = Arc::new(Mutex::new(None));
        let measured = largest.clone();
        let screen = pipeline
            .by_name("screen")
            .unwrap()
            .downcast::<gst_app::AppSink>()
            .unwrap();
        screen.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let size = sample
                        .caps()
                        .and_then(|caps| caps.structure(0))
                        .and_then(|s| {
                            Some((s.get::<i32>("width").ok()?, s.get::<i32>("height").ok()?))
                        });
                    let mut largest = measured.lock().unwrap();
                    if size.is_some_and(|(w, h)| largest.is_none_or(|(lw, lh)| w * h > lw * lh)) {
                        *largest = size;
                    }
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        let not_single_nal = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen_not_single = not_single_nal.clone();
        pipeline
            .by_name("rx")
            .unwrap()
            .static_pad("src")
            .unwrap()
            .add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                let nal_type = info
                    .buffer()
                    .and_then(|b| b.map_readable().ok())
                    .and_then(|packet| rtp_payload(&packet).first().map(|b| b & 0x1f));
                // 24–27 aggregate, 28–29 fragment (RFC 6184, Table 1).
                if nal_type.is_some_and(|t| (24..=29).contains(&t)) {
                    seen_not_single.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                gst::PadProbeReturn::Ok
            });
        let key_frames = Arc::new(Mutex::new(Vec::new()));
        let seen = key_frames.clone();
        pipeline
            .by_name("parse")
            .unwrap()
            .static_pad("src")
            .unwrap()
            .add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                if let Some(buffer) = info.buffer()
                    && !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT)
                {
                    seen.lock().unwrap().push(Instant::now());
                }
                gst::PadProbeReturn::Ok
            });
        // The camera makes a key frame at the start and then only when
        // asked (RTCP PLI/FIR reaching its sipsink).
        let key_frames_sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sent = key_frames_sent.clone();
        pipeline
            .by_name("camera")
            .unwrap()
            .static_pad("src")
            .unwrap()
            .add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                if info
                    .buffer()
                    .is_some_and(|b| !b.flags().contains(gst::BufferFlags::DELTA_UNIT))
                {
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                gst::PadProbeReturn::Ok
            });
        pipeline.set_state(gst::State::Paused).unwrap();
        VideoPhone {
            pipeline,
            frames,
            largest,
            not_single_nal,
            key_frames,
            key_frames_sent,
        }
    }

    pub fn port(&self) -> u16 {
        self.pipeline
            .by_name("rx")
            .unwrap()
            .property::<u32>("local-port") as u16
    }

    /// Starts sending to `bridge_port`, H.264 as `payload_type` both ways.
    pub fn call(&self, bridge_port: u16, payload_type: u8) {
        let by_name = |name| self.pipeline.by_name(name).unwrap();
        let tx = by_name("tx");
        tx.set_property("remote-address", "127.0.0.1");
        tx.set_property("remote-port", u32::from(bridge_port));
        by_name("pay").set_property("pt", u32::from(payload_type));
        let map = gst::Caps::builder("application/x-rtp")
            .field("media", "video")
            .field("payload", i32::from(payload_type))
            .field("clock-rate", 90000)
            .field("encoding-name", "H264")
            .build();
        by_name("rx").set_property("payload-map", map);
        self.pipeline.set_state(gst::State::Playing).unwrap();
    }

    /// When each key frame arrived.
    pub fn key_frames(&self) -> Vec<Instant> {
        self.key_frames.lock().unwrap().clone()
    }

    /// Key frames the camera made (the first, then one per request).
    pub fn key_frames_sent(&self) -> u64 {
        self.key_frames_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Frames decoded so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The largest picture decoded so far: width, height.
    pub fn largest_picture(&self) -> Option<(i32, i32)> {
        *self.largest.lock().unwrap()
    }

    /// Packets received that were not a single NAL unit each.
    pub fn packets_not_single_nal(&self) -> u64 {
        self.not_single_nal
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// An RTP packet's payload (after its CSRCs and header extension).
fn rtp_payload(packet: &[u8]) -> &[u8] {
    let Some(&first) = packet.first() else {
        return &[];
    };
    let mut start = 12 + 4 * usize::from(first & 0x0f);
    if first & 0x10 != 0 {
        let words = packet
            .get(start + 2..start + 4)
            .map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
        start += 4 + 4 * words;
    }
    packet.get(start..).unwrap_or(&[])
}

impl Drop for VideoPhone {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// One codec as the test phones use it: encoding name, payload type, clock
/// rate, `a=rtpmap` value, and the phone's tone in Hz.
pub type PhoneCodec = (&'static str, u8, u32, &'static str, u32);

/// A GStreamer phone sending its tone in `codec`, calling `service` through
/// SIPp (`scenario`, with the Call-ID `<call_id>-1`) for `seconds`; its RTP
/// flows once the bridge has picked a port. The thread yields SIPp's verdict.
pub fn phone_call(
    bridge: &BridgeProcess,
    scenario: &'static str,
    service: &str,
    codec: PhoneCodec,
    seconds: u32,
    call_id: &str,
) -> (Phone, std::thread::JoinHandle<(bool, String)>) {
    phone_call_with(bridge, scenario, service, codec, seconds, call_id, &[])
}

/// [`phone_call`] with more SIPp arguments (`-key name value` for what a
/// scenario asks of its test).
pub fn phone_call_with(
    bridge: &BridgeProcess,
    scenario: &'static str,
    service: &str,
    codec: PhoneCodec,
    seconds: u32,
    call_id: &str,
    extra_args: &[&str],
) -> (Phone, std::thread::JoinHandle<(bool, String)>) {
    let (phone, signalling) = dial(
        bridge, scenario, service, codec, seconds, call_id, extra_args,
    );
    phone.call(bridge.media_port(&format!("{call_id}-1")));
    (phone, signalling)
}

/// [`phone_call_with`] whose phone sends nothing until the test calls
/// [`Phone::call`], as real phones wait for the answer.
pub fn dial(
    bridge: &BridgeProcess,
    scenario: &'static str,
    service: &str,
    codec: PhoneCodec,
    seconds: u32,
    call_id: &str,
    extra_args: &[&str],
) -> (Phone, std::thread::JoinHandle<(bool, String)>) {
    let (name, pt, rate, rtpmap, frequency) = codec;
    let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
    let phone = Phone::new(name, pt, rate, frequency);
    let (address, service, phone_port) = (
        bridge.address(),
        service.to_owned(),
        phone.port().to_string(),
    );
    let cid = format!("{call_id}-%u");
    let signalling = std::thread::spawn(move || {
        sipp(
            scenario,
            &address,
            &service,
            &[
                "-d",
                &(seconds * 1000).to_string(),
                "-cid_str",
                &cid,
                "-key",
                "pt",
                &pt.to_string(),
                "-key",
                "rtpmap",
                rtpmap,
                "-key",
                "phone_port",
                &phone_port,
            ]
            .into_iter()
            .chain(extra_args.iter().map(String::as_str))
            .collect::<Vec<_>>(),
        )
    });
    (phone, signalling)
}

/// What a recording holds once decoded.
pub struct Recording {
    /// Frames decoded from each video track.
    pub video_frames: Vec<u64>,
    /// Its audio, mono at 16 kHz.
    pub audio: Vec<f32>,
}

/// Decodes every track of a recorded file (20 s at most).
pub fn decode_recording(path: &std::path::Path) -> Recording {
    use std::sync::atomic::{AtomicU64, Ordering};
    gst::init().unwrap();
    let pipeline = gst::parse::launch(&format!(
        "filesrc location=\"{}\" ! decodebin name=decoder",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let video_frames: Arc<Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
    let audio: Arc<Mutex<Vec<f32>>> = Arc::default();
    let (frames_seen, audio_heard) = (video_frames.clone(), audio.clone());
    let weak = pipeline.downgrade();
    pipeline
        .by_name("decoder")
        .unwrap()
        .connect_pad_added(move |_, pad| {
            let Some(pipeline) = weak.upgrade() else {
                return;
            };
            let kind = pad
                .current_caps()
                .and_then(|c| c.structure(0).map(|s| s.name().to_string()))
                .unwrap_or_default();
            let branch = if kind.starts_with("video/") {
                let frames = Arc::new(AtomicU64::new(0));
                frames_seen.lock().unwrap().push(frames.clone());
                let sink = gst::ElementFactory::make("fakesink")
                    .property("sync", false)
                    .build()
                    .unwrap();
                sink.static_pad("sink").unwrap().add_probe(
                    gst::PadProbeType::BUFFER,
                    move |_, _| {
                        frames.fetch_add(1, Ordering::Relaxed);
                        gst::PadProbeReturn::Ok
                    },
                );
                sink
            } else if kind.starts_with("audio/") {
                let bin = gst::parse::bin_from_description(
                    "audioconvert ! audioresample ! audio/x-raw,format=F32LE,rate=16000,channels=1 \
                     ! appsink name=ears sync=false",
                    true,
                )
                .unwrap();
                let ears = bin
                    .by_name("ears")
                    .unwrap()
                    .downcast::<gst_app::AppSink>()
                    .unwrap();
                let heard = audio_heard.clone();
                ears.set_callbacks(
                    gst_app::AppSinkCallbacks::builder()
                        .new_sample(move |sink| {
                            let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                            let buffer = sample.buffer().ok_or(gst::FlowError::Error)?;
                            let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
                            heard.lock().unwrap().extend(
                                map.chunks_exact(4)
                                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                            );
                            Ok(gst::FlowSuccess::Ok)
                        })
                        .build(),
                );
                bin.upcast()
            } else {
                return;
            };
            pipeline.add(&branch).unwrap();
            branch.sync_state_with_parent().unwrap();
            pad.link(&branch.static_pad("sink").unwrap()).unwrap();
        });
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let ended = bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(20),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    );
    let _ = pipeline.set_state(gst::State::Null);
    if let Some(gst::MessageView::Error(e)) = ended.as_ref().map(|m| m.view()) {
        panic!("{} does not decode: {}", path.display(), e.error());
    }
    let video_frames = video_frames
        .lock()
        .unwrap()
        .iter()
        .map(|f| f.load(Ordering::Relaxed))
        .collect();
    let audio = std::mem::take(&mut *audio.lock().unwrap());
    Recording {
        video_frames,
        audio,
    }
}

/// A firewall table of the test namespace (nftables; the tests run as root
/// there), `family name` with its chains and rules, removed when dropped.
pub struct NftTable(String);

impl NftTable {
    pub fn add(table: &str, body: &str) -> NftTable {
        nft(&format!("add table {table}\n{body}"));
        NftTable(table.to_owned())
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        nft(&format!("delete table {}\n", self.0));
    }
}

fn nft(rules: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft (nftables), in the test namespace");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft refused:\n{rules}");
}

/// A web device's push endpoint, as a push service would reach it: each
/// notification posted to it is kept, as JSON.
pub struct PushEndpoint {
    pub url: String,
    received: Arc<Mutex<Vec<Value>>>,
}

impl PushEndpoint {
    pub fn start() -> PushEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/device", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let mut reader = BufReader::new(stream);
                let mut length = 0;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let mut body = vec![0; length];
                if std::io::Read::read_exact(&mut reader, &mut body).is_ok() {
                    let notification = serde_json::from_slice(&body)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
                    kept.lock().unwrap().push(notification);
                }
                let _ = reader.get_mut().write_all(
                    b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        PushEndpoint { url, received }
    }

    pub fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// The first notification whose `signal_type` is `signal_type`.
    pub fn wait_for(&self, signal_type: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let received = self.received();
            if let Some(found) = received.iter().find(|n| n["signal_type"] == signal_type) {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {signal_type} push within {within:?}: {received:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Subscribes `login`'s web device to pushes in `environment`, as the
    /// SDK's `pushnotifications.subscriptions.create` does.
    pub fn subscribe(&self, api_url: &str, login: &str, password: &str, environment: &str) {
        let subscription = json!({
            "notification_channel": "web",
            "push_token": {
                "environment": environment,
                "web_endpoint": self.url,
                "web_auth": "auth",
                "web_p256dh": "p256dh",
            },
            "device": { "platform": "web", "udid": format!("{login}-browser") },
        });
        let (status, body) = post_as(
            api_url,
            (login, password),
            "subscriptions.json",
            subscription,
        );
        assert!((200..300).contains(&status), "subscription refused: {body}");
    }
}

/// `body` posted to `route` of the REST API at `api_url` in a session of
/// `login` (as an app with no chat does): the status and the body.
pub fn post_as(
    api_url: &str,
    (login, password): (&str, &str),
    route: &str,
    body: Value,
) -> (u16, String) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let session = UserSession::new(
            RestClient::new(api_url, app()),
            UserCredentials::Login {
                login: login.into(),
                password: password.into(),
            },
        );
        let token = session.session().await.expect("a session").token;
        let response = reqwest::Client::new()
            .post(format!("{api_url}/{route}"))
            .header("CB-Token", token)
            .json(&body)
            .send()
            .await
            .expect("the REST API answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    })
}
