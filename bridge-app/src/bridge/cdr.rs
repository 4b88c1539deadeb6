//! Call detail records: one JSON line per call, appended to a file (or
//! printed), written whole so a reader never sees half a record.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

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
        let mut line = record.to_json().to_string();
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
