//! `sip-cc-bridge run`: the bridge's main job.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::sip::{Account, Listener, Services, SipConfig, Transport, UserAgent};

#[derive(Debug, Clone, clap::Args)]
pub struct RunOptions {
    /// Address SIP listens on, UDP and TCP.
    #[arg(long, default_value = "127.0.0.1:5060")]
    pub sip: SocketAddr,
    /// A SIP server whose requests need no authentication (repeatable;
    /// default: loopback).
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
    #[arg(long, default_value_t = 30_000)]
    pub rtp_timeout_ms: u64,
    /// Calls carried at once; more get 503.
    #[arg(long, default_value_t = 200)]
    pub max_calls: usize,
    /// Milliseconds the built-in extensions ring before they answer.
    #[arg(long, default_value_t = 0)]
    pub answer_delay_ms: u64,
    /// Milliseconds of ringing after which a call gets 480.
    #[arg(long, default_value_t = 60_000)]
    pub no_answer_timeout_ms: u64,
}

fn parse_user(text: &str) -> Result<(String, String), String> {
    let (name, password) = text
        .split_once(':')
        .ok_or_else(|| "expected NAME:PASSWORD".to_owned())?;
    Ok((name.to_owned(), password.to_owned()))
}

impl RunOptions {
    fn sip_config(&self) -> SipConfig {
        let mut config = SipConfig::embedded_default();
        config.listeners = [Transport::Udp, Transport::Tcp]
            .into_iter()
            .map(|transport| Listener {
                transport,
                address: self.sip,
            })
            .collect();
        config.media_address = self.sip.ip();
        if !self.trusted.is_empty() {
            config.admission.trusted = self.trusted.clone();
        }
        config.admission.users = self.users.iter().cloned().collect();
        config.accounts = self.accounts.clone();
        config.rtp_timeout = Duration::from_millis(self.rtp_timeout_ms);
        config.max_calls = self.max_calls;
        config.answer_delay = Duration::from_millis(self.answer_delay_ms);
        config.no_answer_timeout = Duration::from_millis(self.no_answer_timeout_ms);
        config
    }
}

pub fn run(options: RunOptions) -> anyhow::Result<()> {
    gst::init()?;
    gstsipcc::register()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let config = options.sip_config();
        let sip = UserAgent::start(config, Arc::new(Services::line_checks()))
            .await
            .context("cannot start SIP")?;
        let address = options.sip;
        println!("sip-cc-bridge is running. SIP on udp and tcp {address}.");
        println!("  Call sip:echo@{address} to hear yourself, sip:tone@{address} to hear 440 Hz.");
        println!("  e.g. sipp -sn uac -s echo {address}   Ctrl-C stops.");
        tokio::signal::ctrl_c().await?;
        println!("Stopping: ending {} call(s).", sip.active_calls());
        sip.shutdown().await;
        Ok(())
    })
}
