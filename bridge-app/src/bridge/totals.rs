//! What the calls ended since the start add up to, for the management
//! API (`/stats`, and `/metrics` for Prometheus): the CDRs' figures kept
//! as running totals.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::json;

use crate::sip::CallRecord;

#[derive(Default)]
pub struct CallTotals {
    totals: Mutex<Totals>,
}

#[derive(Default)]
struct Totals {
    /// By the SIP status the caller got (200: answered).
    by_status: BTreeMap<u16, u64>,
    answered_seconds: f64,
    packets_received: u64,
    packets_lost: u64,
}

impl CallTotals {
    pub fn count(&self, record: &CallRecord) {
        let mut totals = self.totals.lock().unwrap();
        *totals.by_status.entry(record.status).or_default() += 1;
        if let Some(answered) = record.answered {
            let talked = record.ended.duration_since(answered).unwrap_or_default();
            totals.answered_seconds += talked.as_secs_f64();
        }
        totals.packets_received += record.packets_received;
        // Negative when duplicates outnumber the lost (RFC 3550's count).
        totals.packets_lost += u64::try_from(record.packets_lost).unwrap_or(0);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let totals = self.totals.lock().unwrap();
        let by_status: serde_json::Map<String, serde_json::Value> = totals
            .by_status
            .iter()
            .map(|(status, calls)| (status.to_string(), (*calls).into()))
            .collect();
        json!({
            "by_status": by_status,
            "answered_seconds": (totals.answered_seconds * 1000.0).round() / 1000.0,
            "rtp_packets_received": totals.packets_received,
            "rtp_packets_lost": totals.packets_lost,
        })
    }
}
