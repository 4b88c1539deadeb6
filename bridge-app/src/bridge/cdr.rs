//! Call detail records: one JSON line per call, appended to a file (or
//! printed), written whole so a reader never sees half a record.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use tracing::warn;

use crate::sip::CallRecord;

pub struct CdrWriter {
    file: Option<Mutex<std::fs::File>>,
}

impl CdrWriter {
    /// Appends to `path`; without one, records go to standard output.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let file = match path {
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        anyhow::anyhow!("cdr.path: cannot open {}: {e}", path.display())
                    })?,
            )),
            None => None,
        };
        Ok(Self { file })
    }

    pub fn write(&self, record: &CallRecord) {
        let mut line = line(record).to_string();
        line.push('\n');
        match &self.file {
            Some(file) => {
                if let Err(e) = file.lock().unwrap().write_all(line.as_bytes()) {
                    warn!("cannot write the CDR of call {}: {e}", record.call_id);
                }
            }
            None => print!("CDR {line}"),
        }
    }
}

fn seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The record as one JSON object.
pub fn line(record: &CallRecord) -> serde_json::Value {
    let duration = record
        .answered
        .and_then(|answered| record.ended.duration_since(answered).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    json!({
        "call_id": record.call_id,
        "caller": {
            "number": record.caller.user,
            "name": record.caller.display_name,
            "uri": record.caller.uri,
        },
        "called": record.target,
        "callee": record.callee,
        "start": seconds(record.started),
        "answer": record.answered.map(seconds),
        "end": seconds(record.ended),
        "duration_s": (duration * 1000.0).round() / 1000.0,
        "status": record.status,
        "cause": record.cause,
        "sip_codec": record.sip_codec,
        "sip_srtp": record.sip_srtp,
        "app_codec": record.app_codec,
        "media": if record.transcoded { "transcoded" } else { "passthrough" },
        "recording": record.recording.as_ref().map(|p| p.display().to_string()),
        "rtp": {
            "packets_received": record.packets_received,
            "packets_lost": record.packets_lost,
            "jitter_ms": (record.jitter_ms * 100.0).round() / 100.0,
        },
    })
}
