//! GStreamer elements of the SIP ↔ ConnectyCube bridge.
//!
//! - `sipsrc` / `sipsink`: RTP and RTCP toward SIP phones over one symmetric
//!   UDP socket pair, shared through a `session` name.
//! - `g729enc` / `g729dec`: G.729 (Annex A, with Annex B VAD/CNG) on libbcg729.
//! - `opusvoiceenc` / `opusvoicedec`: Opus at the call's own rate, on the
//!   libopus built into the plugin.
//! - `connectycubesink` / `connectycubesrc`: the WebRTC leg toward ConnectyCube
//!   apps, on one `webrtcbin` per call shared through a `session` name.
//!
//! Build as a cdylib for `GST_PLUGIN_PATH`, or link the rlib and call
//! [`plugin_register_static`].

use std::sync::{LazyLock, Mutex};

use gst::prelude::*;

mod bcg729;
mod call_session;
mod cc_common;
mod connectycubesink;
mod connectycubesrc;
mod g729dec;
mod g729enc;
mod media_pool;
pub mod media_session;
mod opus_voice;
mod opusvoicedec;
mod opusvoiceenc;
mod sip_common;
mod sipsink;
mod sipsrc;

pub use sip_common::{caps_from_media_section, stats_structure};

pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "sipcc",
        gst::DebugColorFlags::empty(),
        Some("SIP/ConnectyCube bridge elements"),
    )
});

/// One small runtime for the plugin's background work (RTCP timers and
/// sockets), shared by every element instead of a runtime per element.
pub(crate) static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sipcc-rtcp")
        .enable_all()
        .build()
        .expect("cannot start the plugin's tokio runtime")
});

/// The threads that carry the media of every call whose elements run on
/// shared threads (`webrtc-stack=shared`, `sipsrc shared-threads=true`):
/// one per core, however many calls. What they push downstream must not
/// block (no clock-synced sink without a queue in front).
pub(crate) static MEDIA_POOL: LazyLock<media_pool::MediaPool> =
    LazyLock::new(media_pool::MediaPool::start);

/// The always-present `application/x-rtp` pad of the network elements.
pub(crate) fn rtp_pad_template(name: &str, direction: gst::PadDirection) -> gst::PadTemplate {
    let caps = gst::Caps::builder("application/x-rtp").build();
    gst::PadTemplate::new(name, direction, gst::PadPresence::Always, &caps)
        .expect("a valid template")
}

/// The always-present `sink` and `src` pads of a converter (the codecs),
/// taking `sink` caps and giving `src` caps.
pub(crate) fn converter_pad_templates(sink: &gst::Caps, src: &gst::Caps) -> Vec<gst::PadTemplate> {
    [
        ("sink", gst::PadDirection::Sink, sink),
        ("src", gst::PadDirection::Src, src),
    ]
    .into_iter()
    .map(|(name, direction, caps)| {
        gst::PadTemplate::new(name, direction, gst::PadPresence::Always, caps)
            .expect("a valid template")
    })
    .collect()
}

/// Answers the queries that reach a live source pad pushed from another
/// thread: live with no latency of its own, and the caps it pushes (or its
/// template's before the first). `None` for other queries.
pub(crate) fn live_source_query(pad: &gst::Pad, query: &mut gst::QueryRef) -> Option<bool> {
    match query.view_mut() {
        gst::QueryViewMut::Latency(q) => {
            q.set(true, gst::ClockTime::ZERO, gst::ClockTime::NONE);
            Some(true)
        }
        gst::QueryViewMut::Caps(q) => {
            let caps = pad
                .current_caps()
                .unwrap_or_else(|| pad.pad_template_caps());
            let caps = match q.filter() {
                Some(filter) => filter.intersect_with_mode(&caps, gst::CapsIntersectMode::First),
                None => caps,
            };
            q.set_result(&caps);
            Some(true)
        }
        _ => None,
    }
}

/// The `clock-rate` of an RTP caps structure, when it has a valid one.
pub(crate) fn clock_rate(structure: &gst::StructureRef) -> Option<u32> {
    u32::try_from(structure.get::<i32>("clock-rate").ok()?).ok()
}

/// Whether an upstream event asks for a key frame (`GstForceKeyUnit`).
pub(crate) fn is_key_frame_request(event: &gst::EventRef) -> bool {
    event.type_() == gst::EventType::CustomUpstream
        && event
            .structure()
            .is_some_and(|s| s.name() == "GstForceKeyUnit")
}

/// An upstream `GstForceKeyUnit` with stream headers: sent toward an
/// encoder, or toward `sipsrc`/`connectycubesrc`, which ask their peer.
pub fn key_frame_request() -> gst::Event {
    gst::event::CustomUpstream::new(
        gst::Structure::builder("GstForceKeyUnit")
            .field("all-headers", true)
            .build(),
    )
}

/// How the shared WebRTC stack configures each call's peer connection
/// (str0m), for `benches/shared_stack.rs`.
#[doc(hidden)]
pub fn shared_stack_config() -> Result<str0m::RtcConfig, String> {
    call_session::shared_stack_config()
}

/// Prepares, on a thread of its own, what the first call of a process
/// would otherwise wait for: webrtcbin's DTLS certificate (an RSA key, a few
/// hundred ms of CPU; later calls share it) and the loading of the plugins
/// of `elements` (webrtcbin's and the caller's codecs).
pub fn warm_up(elements: Vec<&'static str>) {
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        call_session::warm_up_shared_stack();
        for name in ["webrtcbin", "nicesrc", "nicesink", "dtlssrtpenc", "rtpbin"]
            .into_iter()
            .chain(elements)
        {
            if gst::ElementFactory::make(name).build().is_err() {
                gst::warning!(CAT, "no element {name}: calls that need it will fail");
            }
        }
        match gst::ElementFactory::make("dtlssrtpdec").build() {
            // Reading the certificate makes sure it was generated.
            Ok(dtls) if dtls.property::<Option<String>>("pem").is_some() => {
                gst::info!(CAT, "WebRTC ready for calls in {:?}", started.elapsed());
            }
            _ => gst::warning!(CAT, "no DTLS certificate: WebRTC calls cannot be made"),
        }
    });
}

/// Registers the linked-in elements for an application (or test) that links
/// this crate. An installed copy of the plugin found on `GST_PLUGIN_PATH` is
/// dropped first: two copies would each keep their own session registry, and
/// a `sipsrc` from one could never share a socket with a `sipsink` from the other.
/// Safe to call from several threads at once.
pub fn register() -> Result<(), gst::glib::BoolError> {
    // One at a time: two callers finding the installed copy would both
    // remove it, and the second removal would free it under the first.
    static REGISTERING: Mutex<()> = Mutex::new(());
    let _registering = REGISTERING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let registry = gst::Registry::get();
    if let Some(installed) = registry.find_plugin("sipcc")
        && installed.filename().is_some()
    {
        registry.remove_plugin(&installed);
    }
    if registry.find_plugin("sipcc").is_some() {
        return Ok(());
    }
    plugin_register_static()
}

fn plugin_init(plugin: &gst::Plugin) -> Result<(), gst::glib::BoolError> {
    sipsrc::register(plugin)?;
    sipsink::register(plugin)?;
    g729enc::register(plugin)?;
    g729dec::register(plugin)?;
    connectycubesink::register(plugin)?;
    connectycubesrc::register(plugin)?;
    opusvoiceenc::register(plugin)?;
    opusvoicedec::register(plugin)?;
    Ok(())
}

gst::plugin_define!(
    sipcc,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
