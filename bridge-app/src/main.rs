//! `sip-cc-bridge`: the SIP ↔ ConnectyCube media gateway.

mod analyze;
mod demo;

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
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Demo { seconds, tone } => demo::run(seconds, tone),
        Command::Analyze { files, expect } => analyze::run(&files, expect),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
