//! Where an inbound call goes: a built-in service, or an application on the
//! other side of the bridge. The SIP leg knows the latter only through
//! [`AppLeg`], so it carries no ConnectyCube code.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde_json::json;
use tokio::sync::oneshot;

use super::media::Service;

/// Who is calling, as the INVITE says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User part of the From URI (the number).
    pub user: String,
    pub display_name: Option<String>,
    pub uri: String,
}

/// The far side of a bridged call, whichever side called.
pub trait AppSide: Send {
    /// For logs: who is on the app side.
    fn describe(&self) -> String;
    /// The SIP side ended the call (BYE, CANCEL, timeout, failure).
    fn hang_up(&mut self, reason: &str);
}

/// An app the SIP caller reaches.
pub trait AppLeg: AppSide {
    /// Offers the call through `webrtc` (a `connectycubesink`); resolves
    /// when the app answers — with a receiver of the reason it later hangs
    /// up for — or refuses.
    fn ring(
        &mut self,
        webrtc: gst::Element,
    ) -> BoxFuture<'_, Result<oneshot::Receiver<String>, Refusal>>;
}

/// An app calling a SIP phone.
pub trait AppCaller: AppSide {
    /// The app's offer carries video.
    fn wants_video(&self) -> bool;
    /// The phone answered: answer the app's offer through `webrtc`;
    /// resolves with a receiver of the reason the app later hangs up for.
    fn answer(
        &mut self,
        webrtc: gst::Element,
    ) -> BoxFuture<'_, Result<oneshot::Receiver<String>, String>>;
    /// The phone side refused or failed before answering.
    fn refuse(&mut self, status: u16, reason: &str);
    /// Resolves when the app gives up while the phone rings.
    fn abandoned(&mut self) -> BoxFuture<'_, String>;
}

/// Why the app side did not take the call, as a SIP final response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

pub enum Destination {
    Service(Service),
    App {
        leg: Box<dyn AppLeg>,
        /// Record both voices into this WAV file.
        record_to: Option<std::path::PathBuf>,
    },
}

pub trait Router: Send + Sync {
    /// `None`: nobody by that name (404).
    fn route(&self, target: &str, caller: &Caller) -> Option<Destination>;
    /// Every call that rang ends here once, whatever became of it.
    fn call_ended(&self, _record: &CallRecord) {}
}

/// Only the built-in services, by user part.
pub struct Services(pub HashMap<String, Service>);

impl Services {
    /// `echo` and `tone` (440 Hz).
    pub fn line_checks() -> Self {
        Services(HashMap::from([
            ("echo".to_owned(), Service::Echo),
            ("tone".to_owned(), Service::Tone(440.0)),
        ]))
    }
}

impl Router for Services {
    fn route(&self, target: &str, _caller: &Caller) -> Option<Destination> {
        self.0.get(target).copied().map(Destination::Service)
    }
}

/// What happened to one call that rang, for the call detail record.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub call_id: String,
    pub caller: Caller,
    /// The user part dialled.
    pub target: String,
    /// Who took it: a service or the app party.
    pub callee: String,
    /// The user the phone last transferred the call to (REFER), who then
    /// had the app on the line.
    pub transferred_to: Option<String>,
    pub started: std::time::SystemTime,
    pub answered: Option<std::time::SystemTime>,
    pub ended: std::time::SystemTime,
    /// The SIP final response the caller got (200 when answered).
    pub status: u16,
    pub cause: String,
    pub sip_codec: Option<&'static str>,
    /// The SDES-SRTP suite protecting the SIP leg, if any.
    pub sip_srtp: Option<&'static str>,
    /// Opus toward the app, for bridged calls.
    pub app_codec: Option<&'static str>,
    pub transcoded: bool,
    /// The video, when the call has some: the app's codec and the encoders
    /// in use (none when passed through), e.g. `{"app_codec": "VP8", …}`.
    pub video: Option<serde_json::Value>,
    /// The recording of both voices, when the call was recorded.
    pub recording: Option<std::path::PathBuf>,
    /// RTP from the phone: received, lost, interarrival jitter (ms).
    pub packets_received: u64,
    pub packets_lost: i64,
    pub jitter_ms: f64,
    /// How long the bridge held the audio in each direction.
    pub latency: Option<super::media::AudioLatency>,
    /// The audio bandwidth of the app's Opus (`narrowband` … `fullband`),
    /// where the WebRTC stack reports it.
    pub app_audio_bandwidth: Option<String>,
}

impl CallRecord {
    /// A call that has just started ringing.
    pub fn new(
        call_id: String,
        caller: Caller,
        target: String,
        callee: String,
        started: std::time::SystemTime,
    ) -> Self {
        Self {
            call_id,
            caller,
            target,
            callee,
            transferred_to: None,
            started,
            answered: None,
            ended: started,
            status: 0,
            cause: String::new(),
            sip_codec: None,
            sip_srtp: None,
            app_codec: None,
            transcoded: false,
            video: None,
            recording: None,
            packets_received: 0,
            packets_lost: 0,
            jitter_ms: 0.0,
            latency: None,
            app_audio_bandwidth: None,
        }
    }
}

fn seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl CallRecord {
    /// The record as one JSON object (a CDR line).
    pub fn to_json(&self) -> serde_json::Value {
        let record = self;
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
            "transferred_to": record.transferred_to,
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
            "video": record.video,
            "recording": record.recording.as_ref().map(|p| p.display().to_string()),
            "rtp": {
                "packets_received": record.packets_received,
                "packets_lost": record.packets_lost,
                "jitter_ms": (record.jitter_ms * 100.0).round() / 100.0,
            },
            "latency_ms": record.latency,
            "app_audio_bandwidth": record.app_audio_bandwidth,
        })
    }
}
