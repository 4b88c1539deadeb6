//! Call detail records: one JSON line per call, appended to a file (or
//! printed), written whole so a reader never sees half a record.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tracing::warn;

use crate::sip::CallRecord;

pub struct CdrWriter {
    /// `None`: standard output.
    file: Mutex<Option<std::fs::File>>,
}

impl CdrWriter {
    /// Appends to `path`; without one, records go to standard output.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        Ok(Self {
            file: Mutex::new(open_file(path)?),
        })
    }

    /// Records from now on go to `path` (opened again: after a log
    /// rotation moved the file away, a new one is made). On an error the
    /// file before stays.
    pub fn reopen(&self, path: Option<&Path>) -> anyhow::Result<()> {
        let file = open_file(path)?;
        *self.file.lock().unwrap() = file;
        Ok(())
    }

    pub fn write(&self, record: &CallRecord) {
        let mut line = record.to_json().to_string();
        line.push('\n');
        match &mut *self.file.lock().unwrap() {
            Some(file) => {
                if let Err(e) = file.write_all(line.as_bytes()) {
                    warn!("cannot write the CDR of call {}: {e}", record.call_id);
                }
            }
            None => print!("CDR {line}"),
        }
    }
}

fn open_file(path: Option<&Path>) -> anyhow::Result<Option<std::fs::File>> {
    path.map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cdr.path: cannot open {}: {e}", path.display()))
    })
    .transpose()
}
