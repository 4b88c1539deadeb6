//! The `sip-cc-bridge` runtime: its commands, and the local
//! ConnectyCube-compatible sandbox.

pub mod analyze;
pub mod bridge;
pub mod config;
pub mod demo;
pub mod management;
pub mod run;
pub mod sandbox;
pub mod sip;
