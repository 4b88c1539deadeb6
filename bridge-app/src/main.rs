//! `sip-cc-bridge`: the SIP ↔ ConnectyCube media gateway.

use sip_cc_bridge::{analyze, demo, run, sandbox};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "SIP <-> ConnectyCube media gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge. With no options, the embedded default: SIP on
    /// 127.0.0.1:5060 (UDP and TCP), the ConnectyCube sandbox on
    /// 127.0.0.1:8080 with the demo users alice and bob (password `demo`)
    /// mapped to sip:alice and sip:bob, and the line checks `echo` and `tone`.
    Run(run::RunOptions),
    /// Check a configuration (the same options as `run`) and name every bad key.
    Check(run::RunOptions),
    /// Carry a call's audio through the plugin on loopback and show its
    /// statistics live: a "phone" sends a PCMU tone to a SIP leg, which
    /// transcodes it to Opus for the other leg, where the tone is measured.
    Demo {
        /// How long the call lasts, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Frequency of the phone's tone, in Hz.
        #[arg(long, default_value_t = 440)]
        tone: u32,
    },
    /// Run the local ConnectyCube-compatible sandbox: REST, chat (XMPP over
    /// WebSocket at /ws), the SDK at /connectycube.min.js and a demo page at /.
    Sandbox {
        /// Address and port to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        app_id: u64,
        #[arg(long, default_value = "sandbox")]
        auth_key: String,
        /// Path of connectycube.min.js (default: found in node_modules).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Print the dominant frequency and level of WAV recordings.
    Analyze {
        files: Vec<PathBuf>,
        /// Fail unless every file's dominant frequency is within 5 % of this.
        #[arg(long)]
        expect: Option<f64>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rsipstack logs every datagram at info.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rsipstack=warn")),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Run(options) => run::run(options),
        Command::Check(options) => run::check(options),
        Command::Demo { seconds, tone } => demo::run(seconds, tone),
        Command::Analyze { files, expect } => analyze::run(&files, expect),
        Command::Sandbox {
            listen,
            app_id,
            auth_key,
            sdk,
        } => run_sandbox(sandbox::SandboxConfig {
            listen,
            app_id,
            auth_key,
            sdk_path: sdk,
            ..Default::default()
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_sandbox(config: sandbox::SandboxConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (app_id, auth_key) = (config.app_id, config.auth_key.clone());
        let running = sandbox::Sandbox::start(config).await?;
        let address = running.address;
        println!("ConnectyCube sandbox on http://{address}/ (application id {app_id}, auth key {auth_key:?})");
        println!("  REST: http://{address}   chat: ws://{address}/ws   SDK: http://{address}/connectycube.min.js");
        println!("  Open http://localhost:{}/ in a browser (localhost, for WebRTC). Ctrl-C stops.", address.port());
        tokio::signal::ctrl_c().await?;
        drop(running);
        Ok(())
    })
}
