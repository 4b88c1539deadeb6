//! The bridge's configuration: one TOML file, the seed's environment
//! variables (and a `.env` file) over it, and a check that names every bad
//! key. With no file at all, the embedded default: the local sandbox and the
//! demo users alice and bob.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use bridge_protocol::ice;
use bridge_protocol::turn::{TurnServer, TurnTransport};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub sip: SipSection,
    pub connectycube: ConnectyCubeSection,
    pub users: Vec<UserMapping>,
    pub recording: RecordingSection,
    pub cdr: CdrSection,
    pub management: ManagementSection,
    pub asterisk: AsteriskSection,
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SipSection {
    /// UDP and TCP.
    pub listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    pub tls_certificate: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Put in Contact and SDP when the bridge is behind NAT; apps also get
    /// the WebRTC legs' candidates at this address.
    pub public_address: Option<IpAddr>,
    /// The SIP server's domain; outbound calls go to `sip:<extension>@<domain>`.
    pub domain: Option<String>,
    /// Where outbound INVITEs are sent (default: the domain).
    pub outbound_proxy: Option<String>,
    /// A trunk account registered at the domain.
    pub username: Option<String>,
    pub password: Option<String>,
    /// SIP servers whose requests need no authentication.
    pub trusted: Vec<IpAddr>,
    /// Act as the registrar for the mapped extensions (their `sip_password`).
    pub registrar: bool,
    /// Seconds between the registrar's OPTIONS to each registered phone
    /// (qualify): one that does not answer is not rung. 0: never asked.
    pub qualify_interval_s: u64,
    /// Also challenge with SHA-256 digests (RFC 8760); some phones fail on it.
    pub digest_sha256: bool,
    pub rtp_timeout_ms: u64,
    /// Jitter buffer on the phones' audio, in ms; 0 (the default): none,
    /// packets go on as they arrive and the app's jitter buffer absorbs
    /// the jitter of both legs.
    pub jitter_buffer_ms: u64,
    /// Effort of the Opus encoder toward apps, 0 (least CPU, the default)
    /// to 10 (best quality).
    pub opus_complexity: u32,
    /// The bridge's own calls to phones offer SDES-SRTP (RTP/SAVP with
    /// `a=crypto`) instead of plain RTP, and hang up on a phone that
    /// answers without it. Phones without SRTP refuse such calls; calls
    /// from phones follow what the phone offers either way.
    pub offer_srtp: bool,
    /// An app's call to a phone is answered on the phone's early media (a
    /// 18x with SDP: a PBX's ringback, a carrier's announcement), so that
    /// the app hears it; the app's SDK then shows the call as answered
    /// while the phone still rings.
    pub early_media: bool,
    pub no_answer_timeout_ms: u64,
    pub max_calls: usize,
    /// While the bridge uses more than this percent of the cores it may
    /// run on (averaged over 3 s), new calls get 503, so that the calls in
    /// progress lose no packet. 0: never refused for CPU.
    pub max_cpu_percent: f64,
    /// On SIGTERM or Ctrl-C, how long the calls in progress may go on
    /// while no new call is taken (0, the default: they are ended at
    /// once). A second signal ends them at once.
    pub drain_timeout_s: u64,
    /// Phones' H.264 video toward apps: "vp8" (transcoded), "h264" (passed
    /// through) or "off".
    pub video: crate::sip::video::AppVideoCodec,
    /// What carries the app leg of calls without video: "shared" (threads
    /// all calls share) or "webrtcbin" (one per call).
    pub webrtc_stack: crate::sip::media::WebRtcStack,
}

impl SipSection {
    /// These settings with what a reload from `new` may change: who is
    /// admitted, how many calls at once, what each new call takes as it
    /// starts, how long a stop lets the calls go on, and how often the
    /// registrar asks its phones OPTIONS. The rest (where SIP listens, the
    /// trunk, whether the bridge is a registrar, the WebRTC stack) needs a
    /// restart.
    pub fn reloaded(&self, new: &SipSection) -> SipSection {
        SipSection {
            trusted: new.trusted.clone(),
            digest_sha256: new.digest_sha256,
            max_calls: new.max_calls,
            max_cpu_percent: new.max_cpu_percent,
            early_media: new.early_media,
            rtp_timeout_ms: new.rtp_timeout_ms,
            jitter_buffer_ms: new.jitter_buffer_ms,
            opus_complexity: new.opus_complexity,
            offer_srtp: new.offer_srtp,
            no_answer_timeout_ms: new.no_answer_timeout_ms,
            video: new.video,
            drain_timeout_s: new.drain_timeout_s,
            qualify_interval_s: new.qualify_interval_s,
            ..self.clone()
        }
    }
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectyCubeSection {
    pub app_id: u64,
    pub auth_key: String,
    pub auth_secret: Option<String>,
    pub account_key: Option<String>,
    pub api_url: String,
    pub chat_url: String,
    pub chat_domain: String,
    /// Run the local sandbox at `api_url`'s address.
    pub sandbox: bool,
    /// The user calls from unmapped numbers come from.
    pub gateway_login: Option<String>,
    pub gateway_password: Option<String>,
    /// Seconds an app may ring before the SIP caller gets 480.
    pub answer_timeout_s: u64,
    /// `stun://host[:port]`: asked by each call's WebRTC leg where it is
    /// seen from outside a NAT (ConnectyCube's apps use a public one).
    pub stun_server: Option<String>,
    /// `turn://user:password@host[:port][?transport=tcp]` or
    /// `turns://user:password@host[:port]` (TLS): each call's WebRTC leg
    /// also offers an address relayed by this TURN server.
    pub turn_server: Option<String>,
    /// The certificates (PEM) a `turns:` server's is checked against: its
    /// CA's, or its own self-signed one; the public CAs without it.
    pub turn_ca_file: Option<PathBuf>,
    /// Only the relayed address is offered: for a bridge that may reach
    /// nothing but its TURN server.
    pub relay_only: bool,
    /// Each call to an app user also goes out as a push notification to
    /// the user's subscribed devices, so a mobile app in the background or
    /// closed rings: "production", "development" (apps' development
    /// builds subscribe there) or "off".
    pub call_push: CallPush,
}

/// Where calls' push notifications go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallPush {
    #[default]
    Production,
    Development,
    Off,
}

impl CallPush {
    /// The push environment ConnectyCube names; none when off.
    pub fn environment(self) -> Option<&'static str> {
        match self {
            CallPush::Production => Some("production"),
            CallPush::Development => Some("development"),
            CallPush::Off => None,
        }
    }
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserMapping {
    /// The SIP user part (`alice` in `sip:alice@pbx`).
    pub extension: String,
    /// ConnectyCube login and password of the user standing for it.
    pub login: String,
    pub password: String,
    /// Digest password of the extension's phone (registrar, direct calls).
    pub sip_password: Option<String>,
    pub display_name: Option<String>,
    pub department: Option<String>,
    /// Record this user's calls even when recording is off globally.
    #[serde(default)]
    pub record: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingSection {
    pub enabled: bool,
    pub directory: Option<PathBuf>,
}

/// The management API (`GET /stats`): off unless `listen` is set, and then
/// only with a bearer token.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ManagementSection {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
}

/// The link to Asterisk's manager interface (AMI): off unless `ami` is
/// set. Each mapped user's state is published as a custom device state.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AsteriskSection {
    /// Asterisk's AMI, `host:port` (`manager.conf`; port 5038 when left
    /// out, 5039 with `tls`).
    pub ami: Option<String>,
    pub username: Option<String>,
    pub secret: Option<String>,
    /// Over TLS (`manager.conf`'s `tlsenable`), the server's certificate
    /// checked for the host `ami` names.
    pub tls: bool,
    /// The certificate(s), PEM, Asterisk's is checked against (its own
    /// self-signed one, or a private CA's); without it, the public CAs.
    pub tls_ca_file: Option<PathBuf>,
    /// What comes before the extension in the device's name: with the
    /// default, alice's state is `Custom:alice`.
    pub device_prefix: String,
}

impl Default for AsteriskSection {
    fn default() -> Self {
        Self {
            ami: None,
            username: None,
            secret: None,
            tls: false,
            tls_ca_file: None,
            device_prefix: "Custom:".into(),
        }
    }
}

impl AsteriskSection {
    /// How the AMI is reached: TCP, or TLS trusting `tls_ca_file`.
    pub fn transport(&self) -> Result<bridge_protocol::ami::Transport, String> {
        if !self.tls {
            return Ok(bridge_protocol::ami::Transport::Tcp);
        }
        let ca = match &self.tls_ca_file {
            Some(path) => Some(
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            ),
            None => None,
        };
        bridge_protocol::ami::Transport::tls(ca.as_deref()).map_err(|e| e.to_string())
    }

    /// `ami` with Asterisk's port when it names none.
    pub fn ami_address(&self) -> Option<String> {
        let ami = self.ami.as_deref()?.trim();
        let has_port = match ami.rsplit_once(':') {
            // A bare IPv6 address has colons but no port.
            Some((host, port)) => {
                port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
            }
            None => false,
        };
        let port = match self.tls {
            true => bridge_protocol::ami::DEFAULT_TLS_PORT,
            false => bridge_protocol::ami::DEFAULT_PORT,
        };
        Some(if has_port {
            ami.to_owned()
        } else if ami.contains(':') && !ami.starts_with('[') {
            format!("[{ami}]:{port}")
        } else {
            format!("{ami}:{port}")
        })
    }
}

/// Shortest management token accepted.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CdrSection {
    /// One JSON line per call is appended here (default: standard output).
    pub path: Option<PathBuf>,
}

impl Default for SipSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5060)),
            tls_listen: None,
            tls_certificate: None,
            tls_key: None,
            public_address: None,
            domain: None,
            outbound_proxy: None,
            username: None,
            password: None,
            trusted: vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()],
            registrar: false,
            qualify_interval_s: 30,
            digest_sha256: false,
            rtp_timeout_ms: 30_000,
            jitter_buffer_ms: 0,
            opus_complexity: crate::sip::media::DEFAULT_OPUS_COMPLEXITY,
            offer_srtp: false,
            early_media: false,
            no_answer_timeout_ms: 60_000,
            max_calls: 200,
            max_cpu_percent: crate::sip::DEFAULT_MAX_CPU_PERCENT,
            drain_timeout_s: 0,
            video: Default::default(),
            webrtc_stack: Default::default(),
        }
    }
}

impl Default for ConnectyCubeSection {
    fn default() -> Self {
        Self {
            app_id: 1,
            auth_key: "sandbox".into(),
            auth_secret: None,
            account_key: None,
            api_url: "http://127.0.0.1:8080".into(),
            chat_url: "ws://127.0.0.1:8080/ws".into(),
            chat_domain: "localhost".into(),
            sandbox: false,
            gateway_login: None,
            gateway_password: None,
            answer_timeout_s: 45,
            stun_server: None,
            turn_server: None,
            turn_ca_file: None,
            relay_only: false,
            call_push: CallPush::default(),
        }
    }
}

/// What a file leaves out: no users, no sandbox (the embedded default is
/// only for running without a file).
impl Default for Config {
    fn default() -> Self {
        Self {
            sip: SipSection::default(),
            connectycube: ConnectyCubeSection::default(),
            users: Vec::new(),
            recording: RecordingSection::default(),
            cdr: CdrSection::default(),
            management: ManagementSection::default(),
            asterisk: AsteriskSection::default(),
        }
    }
}

/// Problems found in a configuration, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the configuration has {} problem(s):", self.0.len())?;
        for problem in &self.0 {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The environment variables that override the file, with their keys.
const ENVIRONMENT: &[(&str, &str)] = &[
    ("SIP_DOMAIN", "sip.domain"),
    ("SIP_USERNAME", "sip.username"),
    ("SIP_PASSWORD", "sip.password"),
    ("SIP_OFFER_SRTP", "sip.offer_srtp"),
    ("CONNECTYCUBE_APP_ID", "connectycube.app_id"),
    ("CONNECTYCUBE_AUTH_KEY", "connectycube.auth_key"),
    ("CONNECTYCUBE_AUTH_SECRET", "connectycube.auth_secret"),
    ("CONNECTYCUBE_ACCOUNT_KEY", "connectycube.account_key"),
    ("CONNECTYCUBE_API_URL", "connectycube.api_url"),
    ("CONNECTYCUBE_CHAT_URL", "connectycube.chat_url"),
    ("CONNECTYCUBE_STUN_SERVER", "connectycube.stun_server"),
    ("CONNECTYCUBE_TURN_SERVER", "connectycube.turn_server"),
    ("CONNECTYCUBE_TURN_CA_FILE", "connectycube.turn_ca_file"),
    ("CONNECTYCUBE_RELAY_ONLY", "connectycube.relay_only"),
    ("CONNECTYCUBE_CALL_PUSH", "connectycube.call_push"),
    ("MANAGEMENT_TOKEN", "management.token"),
    ("ASTERISK_AMI", "asterisk.ami"),
    ("ASTERISK_AMI_USERNAME", "asterisk.username"),
    ("ASTERISK_AMI_SECRET", "asterisk.secret"),
    ("ASTERISK_AMI_TLS", "asterisk.tls"),
    ("ASTERISK_AMI_CA_FILE", "asterisk.tls_ca_file"),
];

impl Config {
    /// No file: the local sandbox with alice and bob (password `demo`),
    /// the bridge their registrar, SIP on 127.0.0.1:5060.
    pub fn embedded_default() -> Self {
        let demo = |name: &str, display: &str| UserMapping {
            extension: name.into(),
            login: name.into(),
            password: "demo".into(),
            sip_password: Some("demo".into()),
            display_name: Some(display.into()),
            department: Some("Demo".into()),
            record: false,
        };
        Self {
            sip: SipSection {
                registrar: true,
                ..SipSection::default()
            },
            connectycube: ConnectyCubeSection {
                sandbox: true,
                // Calls from numbers nobody is mapped to come from this user.
                gateway_login: Some("sip-gateway".into()),
                gateway_password: Some("demo".into()),
                ..ConnectyCubeSection::default()
            },
            users: vec![demo("alice", "Alice"), demo("bob", "Bob")],
            recording: RecordingSection::default(),
            cdr: CdrSection::default(),
            management: ManagementSection::default(),
            asterisk: AsteriskSection::default(),
        }
    }

    /// Reads `path` (or the embedded default), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigErrors> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())])
                })?;
                Self::parse(&text)?
            }
            None => Self::embedded_default(),
        };
        load_dotenv(Path::new(".env"));
        config.apply_environment(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML; an unknown or mistyped key is an error naming it.
    pub fn parse(text: &str) -> Result<Self, ConfigErrors> {
        toml::from_str::<Config>(text)
            .map_err(|e| ConfigErrors(vec![describe_toml_error(text, &e)]))
    }

    fn apply_environment(
        &mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        for (name, key) in ENVIRONMENT {
            let Some(value) = get(name) else { continue };
            let cc = &mut self.connectycube;
            let mut boolean = |set: &mut bool| match value.trim() {
                "true" => *set = true,
                "false" => *set = false,
                _ => problems.push(format!("{key} (from {name}): true or false")),
            };
            match *name {
                "SIP_DOMAIN" => self.sip.domain = Some(value),
                "SIP_USERNAME" => self.sip.username = Some(value),
                "SIP_PASSWORD" => self.sip.password = Some(value),
                "SIP_OFFER_SRTP" => boolean(&mut self.sip.offer_srtp),
                "CONNECTYCUBE_APP_ID" => match value.trim().parse() {
                    Ok(id) => cc.app_id = id,
                    Err(_) => problems.push(format!("{key} (from {name}): not a number")),
                },
                "CONNECTYCUBE_AUTH_KEY" => cc.auth_key = value,
                "CONNECTYCUBE_AUTH_SECRET" => cc.auth_secret = Some(value),
                "CONNECTYCUBE_ACCOUNT_KEY" => cc.account_key = Some(value),
                "CONNECTYCUBE_API_URL" => cc.api_url = value,
                "CONNECTYCUBE_CHAT_URL" => cc.chat_url = value,
                "CONNECTYCUBE_STUN_SERVER" => cc.stun_server = Some(value),
                "CONNECTYCUBE_TURN_SERVER" => cc.turn_server = Some(value),
                "CONNECTYCUBE_TURN_CA_FILE" => cc.turn_ca_file = Some(value.into()),
                "CONNECTYCUBE_RELAY_ONLY" => boolean(&mut cc.relay_only),
                "CONNECTYCUBE_CALL_PUSH" => match value.trim() {
                    "production" => cc.call_push = CallPush::Production,
                    "development" => cc.call_push = CallPush::Development,
                    "off" => cc.call_push = CallPush::Off,
                    _ => problems.push(format!(
                        "{key} (from {name}): production, development or off"
                    )),
                },
                "MANAGEMENT_TOKEN" => self.management.token = Some(value),
                "ASTERISK_AMI" => self.asterisk.ami = Some(value),
                "ASTERISK_AMI_USERNAME" => self.asterisk.username = Some(value),
                "ASTERISK_AMI_SECRET" => self.asterisk.secret = Some(value),
                "ASTERISK_AMI_TLS" => boolean(&mut self.asterisk.tls),
                "ASTERISK_AMI_CA_FILE" => self.asterisk.tls_ca_file = Some(value.into()),
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// Checks what TOML types cannot: every problem, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        let cc = &self.connectycube;
        if !(cc.api_url.starts_with("http://") || cc.api_url.starts_with("https://")) {
            problems.push(format!(
                "connectycube.api_url: {:?} is not an http(s) URL",
                cc.api_url
            ));
        }
        if !(cc.chat_url.starts_with("ws://") || cc.chat_url.starts_with("wss://")) {
            problems.push(format!(
                "connectycube.chat_url: {:?} is not a ws(s) URL",
                cc.chat_url
            ));
        }
        if cc.auth_key.is_empty() {
            problems.push("connectycube.auth_key: empty".into());
        }
        if let Some(Err(e)) = cc.stun_server.as_deref().map(ice::stun_host_and_port) {
            problems.push(format!("connectycube.stun_server: {e}"));
        }
        // The value holds a password: the problem names the key only.
        let turn = cc.turn_server.as_deref().map(str::parse::<TurnServer>);
        if let Some(Err(e)) = &turn {
            problems.push(format!("connectycube.turn_server: {e}"));
        }
        if let Some(path) = &cc.turn_ca_file {
            let over_tls =
                matches!(&turn, Some(Ok(server)) if server.transport == TurnTransport::Tls);
            let certificates = || {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                bridge_protocol::tls::client_config(Some(&pem)).map(drop)
            };
            if !over_tls {
                problems.push(
                    "connectycube.turn_ca_file: needs a turns:// connectycube.turn_server".into(),
                );
            } else if let Err(why) = certificates() {
                problems.push(format!("connectycube.turn_ca_file: {why}"));
            }
        }
        if cc.relay_only && cc.turn_server.is_none() {
            problems.push("connectycube.relay_only: needs connectycube.turn_server".into());
        }
        if cc.sandbox && cc.api_url.starts_with("http://") && sandbox_address(cc).is_none() {
            problems.push(format!(
                "connectycube.api_url: the sandbox needs host:port, got {:?}",
                cc.api_url
            ));
        }
        if cc.gateway_login.is_some() != cc.gateway_password.is_some() {
            problems
                .push("connectycube.gateway_login / gateway_password: give both or neither".into());
        }
        if let Some(Err(e)) = self
            .sip
            .outbound_proxy
            .as_deref()
            .map(crate::sip::proxy_address)
        {
            problems.push(format!("sip.outbound_proxy: {e}"));
        }
        if self.sip.username.is_some() && self.sip.domain.is_none() {
            problems.push("sip.domain: needed to register sip.username".into());
        }
        if self.sip.username.is_some() != self.sip.password.is_some() {
            problems.push("sip.username / sip.password: give both or neither".into());
        }
        if self.sip.tls_listen.is_some()
            && (self.sip.tls_certificate.is_none() || self.sip.tls_key.is_none())
        {
            problems.push("sip.tls_certificate / sip.tls_key: needed by sip.tls_listen".into());
        }
        if self.management.listen.is_some() {
            match &self.management.token {
                None => problems.push(
                    "management.token: needed by management.listen (or set MANAGEMENT_TOKEN)"
                        .into(),
                ),
                Some(token) if token.chars().count() < MIN_TOKEN_LEN => problems.push(format!(
                    "management.token: at least {MIN_TOKEN_LEN} characters"
                )),
                Some(_) => {}
            }
        }
        if self.sip.jitter_buffer_ms > 10_000 {
            problems.push("sip.jitter_buffer_ms: at most 10000".into());
        }
        if self.sip.opus_complexity > 10 {
            problems.push("sip.opus_complexity: 0 to 10".into());
        }
        if !(0.0..=100.0).contains(&self.sip.max_cpu_percent) {
            problems.push("sip.max_cpu_percent: 0 (never refuse) to 100".into());
        }
        if self.sip.rtp_timeout_ms == 0 {
            problems.push("sip.rtp_timeout_ms: must be more than 0".into());
        }
        let mut extensions = HashSet::new();
        let mut logins = HashSet::new();
        for (index, user) in self.users.iter().enumerate() {
            let key = |field: &str| format!("users[{index}].{field}");
            if user.extension.is_empty()
                || !user
                    .extension
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
            {
                problems.push(format!(
                    "{}: {:?} is not a SIP user part",
                    key("extension"),
                    user.extension
                ));
            }
            if !extensions.insert(user.extension.to_ascii_lowercase()) {
                problems.push(format!(
                    "{}: {:?} is mapped twice",
                    key("extension"),
                    user.extension
                ));
            }
            if user.login.is_empty() {
                problems.push(format!("{}: empty", key("login")));
            } else if !logins.insert(user.login.clone()) {
                problems.push(format!(
                    "{}: {:?} is mapped twice",
                    key("login"),
                    user.login
                ));
            }
            if user.password.is_empty() {
                problems.push(format!("{}: empty", key("password")));
            }
            if self.sip.registrar && user.sip_password.as_deref().is_none_or(str::is_empty) {
                problems.push(format!(
                    "{}: needed when sip.registrar is on",
                    key("sip_password")
                ));
            }
        }
        if (self.recording.enabled || self.users.iter().any(|u| u.record))
            && self.recording.directory.is_none()
        {
            problems.push("recording.directory: needed to record calls".into());
        }
        let asterisk = &self.asterisk;
        if let Some(ami) = &asterisk.ami {
            if ami.trim().is_empty() || ami.contains(char::is_whitespace) {
                problems.push(format!("asterisk.ami: {ami:?} is not host:port"));
            }
            for (key, value) in [
                ("asterisk.username", &asterisk.username),
                ("asterisk.secret", &asterisk.secret),
            ] {
                match value.as_deref() {
                    None | Some("") => problems.push(format!("{key}: needed by asterisk.ami")),
                    // It goes on one line of the login.
                    Some(v) if v.contains(['\r', '\n']) => {
                        problems.push(format!("{key}: holds a line break"))
                    }
                    Some(_) => {}
                }
            }
        }
        if asterisk.tls_ca_file.is_some() && !asterisk.tls {
            problems.push("asterisk.tls_ca_file: needs asterisk.tls = true".into());
        } else if let Err(why) = asterisk.transport() {
            problems.push(format!("asterisk.tls_ca_file: {why}"));
        }
        if asterisk.device_prefix.contains(['\r', '\n', '(', ')']) {
            problems.push(format!(
                "asterisk.device_prefix: {:?} cannot name a device",
                asterisk.device_prefix
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// The sections other than `users`, `recording` and `cdr` in which `other`
    /// differs, but for what a reload may change in `[sip]`
    /// (`SipSection::reloaded`): what a reload cannot apply to a running bridge.
    pub fn fixed_sections_changed(&self, other: &Config) -> Vec<&'static str> {
        [
            ("sip", self.sip.reloaded(&other.sip) != other.sip),
            ("connectycube", self.connectycube != other.connectycube),
            ("management", self.management != other.management),
            ("asterisk", self.asterisk != other.asterisk),
        ]
        .into_iter()
        .filter_map(|(section, changed)| changed.then_some(section))
        .collect()
    }

    pub fn user_by_extension(&self, extension: &str) -> Option<&UserMapping> {
        self.users
            .iter()
            .find(|u| u.extension.eq_ignore_ascii_case(extension))
    }
}

/// Where the embedded sandbox listens: `api_url`'s host and port.
pub fn sandbox_address(cc: &ConnectyCubeSection) -> Option<SocketAddr> {
    let rest = cc.api_url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.replace("localhost", "127.0.0.1");
    authority.parse().ok()
}

/// `KEY=value` lines into the environment, for variables not already set.
fn load_dotenv(path: &Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.trim_start_matches("export ").split_once('=') else {
            continue;
        };
        let (name, value) = (
            name.trim(),
            value.trim().trim_matches('"').trim_matches('\''),
        );
        if ENVIRONMENT.iter().any(|(n, _)| *n == name) && std::env::var_os(name).is_none() {
            // SAFETY: called once at start-up, before any other thread exists.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

/// One line: where, the offending line itself (so its key), and why.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line_number = text[..start].matches('\n').count() + 1;
            let line = text.lines().nth(line_number - 1).unwrap_or("").trim();
            format!("line {line_number} `{line}`: {message}")
        }
        None => message,
    }
}

impl fmt::Debug for AsteriskSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsteriskSection")
            .field("ami", &self.ami)
            .field("username", &self.username)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("device_prefix", &self.device_prefix)
            .finish()
    }
}

impl fmt::Debug for ManagementSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagementSection")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Debug for SipSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SipSection")
            .field("listen", &self.listen)
            .field("domain", &self.domain)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("trusted", &self.trusted)
            .field("registrar", &self.registrar)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ConnectyCubeSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectyCubeSection")
            .field("app_id", &self.app_id)
            .field("auth_key", &"<redacted>")
            .field(
                "auth_secret",
                &self.auth_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("api_url", &self.api_url)
            .field("chat_url", &self.chat_url)
            .field("sandbox", &self.sandbox)
            .field("gateway_login", &self.gateway_login)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for UserMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserMapping")
            .field("extension", &self.extension)
            .field("login", &self.login)
            .field("password", &"<redacted>")
            .field("display_name", &self.display_name)
            .field("department", &self.department)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[sip]
listen = "127.0.0.1:5070"
domain = "pbx.example.com"
trusted = ["10.0.0.1"]

[connectycube]
app_id = 42
auth_key = "key"
api_url = "https://api.connectycube.com"
chat_url = "wss://chat.connectycube.com:5291"
chat_domain = "chat.connectycube.com"

[[users]]
extension = "100"
login = "alice"
password = "secret"
display_name = "Alice"
department = "Sales"
"#;

    #[test]
    fn a_file_with_every_section_reads() {
        let config = Config::parse(EXAMPLE).unwrap();
        config.validate().unwrap();
        assert_eq!(config.sip.listen, "127.0.0.1:5070".parse().unwrap());
        assert_eq!(config.connectycube.app_id, 42);
        assert_eq!(config.user_by_extension("100").unwrap().login, "alice");
        assert!(
            !format!("{config:?}").contains("\"secret\""),
            "passwords stay out of logs"
        );
    }

    #[test]
    fn the_asterisk_link_needs_its_credentials_and_keeps_its_secret() {
        let text = format!(
            "{EXAMPLE}\n[asterisk]\nami = \"pbx.example.com\"\nusername = \"bridge\"\nsecret = \"s3cret-ami\"\n"
        );
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.asterisk.ami_address().as_deref(),
            Some("pbx.example.com:5038")
        );
        assert!(!format!("{config:?}").contains("s3cret-ami"));

        let mut config = Config::parse(EXAMPLE).unwrap();
        config.asterisk.ami = Some("10.0.0.5:15038".into());
        config.asterisk.device_prefix = "Custom:x)\n".into();
        let problems = config.validate().unwrap_err().0;
        for key in [
            "asterisk.username",
            "asterisk.secret",
            "asterisk.device_prefix",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{problems:?}");
        }
        config.asterisk.username = Some("bridge".into());
        config.asterisk.secret = Some("x\r\nAction: Originate".into());
        let problems = config.validate().unwrap_err().0;
        assert!(
            problems.contains(&"asterisk.secret: holds a line break".to_owned()),
            "{problems:?}"
        );
        assert_eq!(
            config.asterisk.ami_address().as_deref(),
            Some("10.0.0.5:15038")
        );
        config.asterisk.ami = Some("::1".into());
        assert_eq!(config.asterisk.ami_address().as_deref(), Some("[::1]:5038"));
        config.asterisk.ami = Some("[::1]:6000".into());
        assert_eq!(config.asterisk.ami_address().as_deref(), Some("[::1]:6000"));
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let err = Config::parse("[sip]\nlisten = \"127.0.0.1:5060\"\nlisen = 1\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = Config::parse("[connectycube]\napp_id = \"one\"\n").unwrap_err();
        assert!(
            err.to_string().contains("app_id") || err.to_string().contains("integer"),
            "{err}"
        );
        let err = Config::parse("[sip]\nlisten = \"not an address\"\n").unwrap_err();
        assert!(err.to_string().contains("socket address"), "{err}");
    }

    #[test]
    fn a_turn_ca_file_is_checked_with_the_configuration() {
        let mut config = Config::parse(EXAMPLE).unwrap();
        let named = |config: &Config, why: &str| {
            let problems = config.validate().unwrap_err().0;
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with("connectycube.turn_ca_file: ") && p.contains(why)),
                "{why}: {problems:#?}"
            );
        };
        let no_certificate = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(no_certificate.path(), "not a certificate\n").unwrap();
        config.connectycube.turn_ca_file = Some(no_certificate.path().to_owned());
        config.connectycube.turn_server = Some("turn://user:pw@relay.example".into());
        named(&config, "needs a turns://");
        config.connectycube.turn_server = Some("turns://user:pw@relay.example".into());
        named(&config, "no certificate in the file");
        config.connectycube.turn_ca_file = Some("/no/such/ca.pem".into());
        named(&config, "cannot read /no/such/ca.pem");
        config.connectycube.turn_ca_file = None;
        assert!(config.validate().is_ok(), "turns:// with the public CAs");
    }

    #[test]
    fn a_bad_turn_server_is_named_without_its_password() {
        let mut config = Config::parse(EXAMPLE).unwrap();
        config.connectycube.turn_server = Some("turn://user:hunter2@relay.example:port".into());
        let problems = config.validate().unwrap_err().0;
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("connectycube.turn_server: ")),
            "{problems:#?}"
        );
        assert!(
            !format!("{problems:?}").contains("hunter2"),
            "{problems:#?}"
        );
        config.connectycube.turn_server = Some("turn://user:hunter2@relay.example".into());
        config.connectycube.relay_only = true;
        assert!(config.validate().is_ok());
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn validation_names_every_bad_key() {
        let text = format!(
            "{EXAMPLE}\n[[users]]\nextension = \"100\"\nlogin = \"\"\npassword = \"\"\n\n[recording]\nenabled = true\n"
        );
        let mut config = Config::parse(&text).unwrap();
        config.connectycube.chat_url = "http://wrong".into();
        config.management.listen = Some(([127, 0, 0, 1], 8088).into());
        config.sip.opus_complexity = 11;
        config.sip.max_cpu_percent = 150.0;
        config.asterisk.tls_ca_file = Some("/no/such/ca.pem".into());
        config.connectycube.stun_server = Some("turn://user:pass@host".into());
        config.connectycube.relay_only = true;
        config.sip.outbound_proxy = Some("sbc.example.com:five".into());
        let problems = config.validate().unwrap_err().0;
        for key in [
            "sip.outbound_proxy",
            "connectycube.relay_only",
            "sip.opus_complexity",
            "sip.max_cpu_percent",
            "asterisk.tls_ca_file",
            "connectycube.stun_server",
            "users[1].extension",
            "users[1].login",
            "users[1].password",
            "connectycube.chat_url",
            "recording.directory",
            "management.token",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key} in {problems:#?}"
            );
        }
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let mut config = Config::parse(EXAMPLE).unwrap();
        let env = |name: &str| match name {
            "CONNECTYCUBE_APP_ID" => Some("7".to_owned()),
            "SIP_DOMAIN" => Some("other.example".to_owned()),
            "MANAGEMENT_TOKEN" => Some("a-long-enough-token".to_owned()),
            "SIP_OFFER_SRTP" => Some("true".to_owned()),
            "CONNECTYCUBE_CALL_PUSH" => Some("development".to_owned()),
            _ => None,
        };
        assert_eq!(config.connectycube.call_push, CallPush::Production);
        config.apply_environment(env).unwrap();
        assert!(config.sip.offer_srtp);
        assert_eq!(config.connectycube.call_push, CallPush::Development);
        assert_eq!(
            config.management.token.as_deref(),
            Some("a-long-enough-token")
        );
        assert!(!format!("{:?}", config.management).contains("a-long-enough-token"));
        assert_eq!(config.connectycube.app_id, 7);
        assert_eq!(config.sip.domain.as_deref(), Some("other.example"));
        let err = config
            .apply_environment(|n| (n == "CONNECTYCUBE_APP_ID").then(|| "x".to_owned()))
            .unwrap_err();
        assert!(err.0[0].contains("connectycube.app_id"));
        let err = config
            .apply_environment(|n| (n == "SIP_OFFER_SRTP").then(|| "yes".to_owned()))
            .unwrap_err();
        assert!(err.0[0].contains("sip.offer_srtp"), "{err}");
        let err = config
            .apply_environment(|n| (n == "CONNECTYCUBE_CALL_PUSH").then(|| "on".to_owned()))
            .unwrap_err();
        assert!(err.0[0].contains("connectycube.call_push"), "{err}");
        let off = Config::parse("[connectycube]\ncall_push = \"off\"\n").unwrap();
        assert_eq!(off.connectycube.call_push.environment(), None);
    }

    #[test]
    fn the_example_in_the_repository_is_valid() {
        let config = Config::parse(include_str!("../../bridge.example.toml")).unwrap();
        config.validate().unwrap();
        assert_eq!(config.users.len(), 2);
        assert_eq!(config.sip.domain.as_deref(), Some("pbx.example.com"));
    }

    #[test]
    fn a_file_leaves_out_the_demo_users() {
        let config = Config::parse("[sip]\nlisten = \"127.0.0.1:5070\"\n").unwrap();
        assert!(config.users.is_empty());
        assert!(!config.connectycube.sandbox);
        assert!(!config.sip.registrar);
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let config = Config::embedded_default();
        config.validate().unwrap();
        assert_eq!(
            sandbox_address(&config.connectycube),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(config.users.len(), 2);
    }

    #[test]
    fn a_reload_names_the_sections_it_cannot_apply() {
        let running = Config::embedded_default();
        let mut reloaded = running.clone();
        reloaded.users.pop();
        reloaded.sip.trusted.push("10.0.0.1".parse().unwrap());
        reloaded.recording.enabled = true;
        reloaded.cdr.path = Some("/var/log/bridge/cdr.jsonl".into());
        reloaded.sip.max_calls += 100;
        reloaded.sip.max_cpu_percent = 50.0;
        reloaded.sip.early_media = !running.sip.early_media;
        reloaded.sip.rtp_timeout_ms += 1;
        reloaded.sip.opus_complexity = 5;
        reloaded.sip.video = crate::sip::video::AppVideoCodec::Off;
        reloaded.sip.drain_timeout_s = 600;
        assert!(running.fixed_sections_changed(&reloaded).is_empty());
        assert!(running.sip.reloaded(&reloaded.sip) == reloaded.sip);
        reloaded.sip.qualify_interval_s += 1;
        assert!(running.sip.reloaded(&reloaded.sip) == reloaded.sip);
        reloaded.sip.registrar = !running.sip.registrar;
        reloaded.connectycube.app_id += 1;
        reloaded.management.token = Some("another-token-of-sixteen".into());
        assert_eq!(
            running.fixed_sections_changed(&reloaded),
            ["sip", "connectycube", "management"]
        );
    }
}
