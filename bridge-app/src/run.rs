//! `sip-cc-bridge run` and `check`: the bridge's main job, on the embedded
//! default or a configuration file, with command-line overrides.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};

use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::config::Config;
use crate::management;
use crate::sip::{Account, SipConfig};

#[derive(Debug, Clone, clap::Args)]
pub struct RunOptions {
    /// The configuration file (TOML). Without one: the embedded default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address SIP listens on, UDP and TCP (overrides sip.listen).
    #[arg(long)]
    pub sip: Option<SocketAddr>,
    /// Run the ConnectyCube sandbox here (overrides connectycube.api_url
    /// and chat_url).
    #[arg(long)]
    pub sandbox: Option<SocketAddr>,
    /// A SIP server whose requests need no authentication (repeatable;
    /// replaces sip.trusted).
    #[arg(long = "trust")]
    pub trusted: Vec<IpAddr>,
    /// A user who may call the bridge directly after a digest challenge,
    /// as NAME:PASSWORD (repeatable).
    #[arg(long = "user", value_parser = parse_user)]
    pub users: Vec<(String, String)>,
    /// An account to keep registered, as USER:PASSWORD@REGISTRAR
    /// (repeatable). Calls the registrar routes to USER reach the extension
    /// of that name.
    #[arg(long = "register", value_parser = Account::parse)]
    pub accounts: Vec<Account>,
    /// Milliseconds without RTP before a call is ended.
    #[arg(long)]
    pub rtp_timeout_ms: Option<u64>,
    /// Calls carried at once; more get 503.
    #[arg(long)]
    pub max_calls: Option<usize>,
    /// Percent of its cores the bridge may use before new calls get 503;
    /// 0: no limit (overrides sip.max_cpu_percent).
    #[arg(long)]
    pub max_cpu_percent: Option<f64>,
    /// On SIGTERM or Ctrl-C, seconds the calls in progress may go on while
    /// new ones get 503 (overrides sip.drain_timeout_s).
    #[arg(long)]
    pub drain_timeout_s: Option<u64>,
    /// Milliseconds the line-check extensions (echo, tone) ring before they
    /// answer.
    #[arg(long, default_value_t = 0)]
    pub answer_delay_ms: u64,
    /// Phones' H.264 video toward apps: vp8 (transcoded), h264 (passed
    /// through) or off (overrides sip.video).
    #[arg(long, value_enum)]
    pub video: Option<crate::sip::video::AppVideoCodec>,
    /// Seconds between the registrar's OPTIONS to each registered phone; 0:
    /// never (overrides sip.qualify_interval_s).
    #[arg(long)]
    pub qualify_interval_s: Option<u64>,
    /// Milliseconds of ringing after which a call gets 480.
    #[arg(long)]
    pub no_answer_timeout_ms: Option<u64>,
    /// Append call detail records (JSON lines) here.
    #[arg(long)]
    pub cdr: Option<PathBuf>,
    /// Record every bridged call (both voices, one WAV file per call) into
    /// this directory.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Serve the management API (GET /stats) here (overrides
    /// management.listen); the token comes from management.token or
    /// MANAGEMENT_TOKEN.
    #[arg(long)]
    pub management: Option<SocketAddr>,
}

fn parse_user(text: &str) -> Result<(String, String), String> {
    let (name, password) = text
        .split_once(':')
        .ok_or_else(|| "expected NAME:PASSWORD".to_owned())?;
    Ok((name.to_owned(), password.to_owned()))
}

impl RunOptions {
    /// The configuration with the file-level overrides applied.
    fn configuration(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(sip) = self.sip {
            config.sip.listen = sip;
        }
        if let Some(sandbox) = self.sandbox {
            config.connectycube.sandbox = true;
            config.connectycube.api_url = format!("http://{sandbox}");
            config.connectycube.chat_url = format!("ws://{sandbox}/ws");
        }
        if !self.trusted.is_empty() {
            config.sip.trusted = self.trusted.clone();
        }
        if let Some(ms) = self.rtp_timeout_ms {
            config.sip.rtp_timeout_ms = ms;
        }
        if let Some(calls) = self.max_calls {
            config.sip.max_calls = calls;
        }
        if let Some(percent) = self.max_cpu_percent {
            config.sip.max_cpu_percent = percent;
        }
        if let Some(seconds) = self.drain_timeout_s {
            config.sip.drain_timeout_s = seconds;
        }
        if let Some(video) = self.video {
            config.sip.video = video;
        }
        if let Some(seconds) = self.qualify_interval_s {
            config.sip.qualify_interval_s = seconds;
        }
        if let Some(ms) = self.no_answer_timeout_ms {
            config.sip.no_answer_timeout_ms = ms;
        }
        if let Some(path) = &self.cdr {
            config.cdr.path = Some(path.clone());
        }
        if let Some(directory) = &self.record {
            config.recording.enabled = true;
            config.recording.directory = Some(directory.clone());
        }
        if let Some(listen) = self.management {
            config.management.listen = Some(listen);
        }
        config.validate()?;
        Ok(config)
    }

    /// What only the command line sets on the SIP leg.
    fn adjust(&self, sip: &mut SipConfig) {
        sip.admission.users.extend(self.users.iter().cloned());
        sip.accounts.extend(self.accounts.iter().cloned());
        sip.answer_delay = Duration::from_millis(self.answer_delay_ms);
    }
}

pub fn check(options: RunOptions) -> anyhow::Result<()> {
    let config = options.configuration()?;
    println!(
        "configuration OK: SIP on {}, {} mapped user(s), ConnectyCube at {}{}",
        config.sip.listen,
        config.users.len(),
        config.connectycube.api_url,
        if config.connectycube.sandbox {
            " (embedded sandbox)"
        } else {
            ""
        }
    );
    Ok(())
}

pub fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = options.configuration()?;
    gst::init()?;
    gstsipcc::register()?;
    let mut elements = crate::sip::media::COMMON_ELEMENTS.to_vec();
    elements.extend(crate::sip::video::elements(config.sip.video));
    gstsipcc::warm_up(elements);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let bridge = Arc::new(
            Bridge::start(config.clone(), |sip| options.adjust(sip))
                .await
                .context("cannot start the bridge")?,
        );
        let stop_management = CancellationToken::new();
        if let (Some(listen), Some(token)) = (config.management.listen, &config.management.token) {
            let source = bridge.clone();
            management::serve(
                listen,
                token.clone(),
                Arc::new(move || source.stats()),
                stop_management.clone(),
            )
            .await?;
        }
        let address = config.sip.listen;
        println!("sip-cc-bridge is running. SIP on udp and tcp {address}.");
        println!("  Line checks: sip:echo@{address} (you hear yourself), sip:tone@{address} (440 Hz).");
        if let Some(sandbox) = &bridge.sandbox {
            let port = sandbox.address.port();
            println!("  ConnectyCube sandbox: http://localhost:{port}/ — open it, sign in as a user below, tick auto-answer.");
        }
        for (extension, user_id) in bridge.signed_in() {
            let mapping = config.user_by_extension(&extension);
            println!(
                "  sip:{extension}@{address} ↔ ConnectyCube user {user_id} (login {:?}{})",
                mapping.map_or("", |m| m.login.as_str()),
                if config.sip.registrar { ", phones may REGISTER as this extension" } else { "" }
            );
        }
        println!(
            "  e.g. sipp -sn uac -s alice {address}   Ctrl-C stops; SIGHUP reloads the configuration."
        );
        let mut stop = StopSignals::new()?;
        let mut reloads =
            signal(SignalKind::hangup()).context("cannot watch for reload signals")?;
        loop {
            tokio::select! {
                () = stop.next() => break,
                // On a task: signing users in may take long, and a stop
                // signal must be heard meanwhile.
                _ = reloads.recv() => {
                    let (bridge, options) = (bridge.clone(), options.clone());
                    tokio::spawn(async move {
                        let read = || options.configuration();
                        bridge.reload(read, |sip| options.adjust(sip)).await;
                    });
                }
            }
        }
        let drain = bridge.drain_timeout();
        if !drain.is_zero() && bridge.sip.active_calls() > 0 {
            println!(
                "Draining: {} call(s) in progress may go on for up to {drain:?}; new calls get 503. \
                 A second Ctrl-C or SIGTERM ends them now.",
                bridge.sip.active_calls()
            );
            let calls_ended = async {
                bridge.sip.drain().await;
                while bridge.sip.active_calls() > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                () = calls_ended => {}
                () = tokio::time::sleep(drain) => {}
                () = stop.next() => {}
            }
        }
        println!("Stopping: ending {} call(s).", bridge.sip.active_calls());
        stop_management.cancel();
        bridge.shutdown().await;
        Ok(())
    })
}

/// Ctrl-C (SIGINT) and SIGTERM, which service managers and containers
/// send to stop a process: either stops the bridge the same way.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn new() -> anyhow::Result<Self> {
        let watch = |kind: SignalKind| signal(kind).context("cannot watch for stop signals");
        Ok(Self {
            interrupt: watch(SignalKind::interrupt())?,
            terminate: watch(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
