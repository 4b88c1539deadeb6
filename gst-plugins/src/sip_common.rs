//! What `sipsrc` and `sipsink` have in common: the session-level properties,
//! joining the shared [`MediaSession`], and the `stats` structure.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_protocol::sdes::SrtpKey;
use bridge_protocol::sdp::{self, MediaSection};
use gst::glib;
use gst::prelude::*;

use crate::media_session::{BindConfig, MediaSession, SessionStats};

pub const DEFAULT_LOCAL_ADDRESS: &str = "0.0.0.0";
pub const DEFAULT_PORT_RANGE: (u32, u32) = (10000, 20000);

#[derive(Debug, Clone)]
struct Settings {
    session: Option<String>,
    local_address: String,
    local_port: u32,
    port_range_min: u32,
    port_range_max: u32,
    rtcp_mux: bool,
    remote_address: Option<String>,
    remote_port: u32,
    remote_rtcp_port: u32,
    /// `None` until set on this element, so that the element joining a
    /// session second does not undo what the first one was told.
    latch: Option<bool>,
    rtcp_interval_ms: Option<u32>,
    sdp: Option<String>,
    srtp_send_key: Option<SrtpKey>,
    srtp_receive_key: Option<SrtpKey>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            session: None,
            local_address: DEFAULT_LOCAL_ADDRESS.into(),
            local_port: 0,
            port_range_min: DEFAULT_PORT_RANGE.0,
            port_range_max: DEFAULT_PORT_RANGE.1,
            rtcp_mux: false,
            remote_address: None,
            remote_port: 0,
            remote_rtcp_port: 0,
            latch: None,
            rtcp_interval_ms: None,
            sdp: None,
            srtp_send_key: None,
            srtp_receive_key: None,
        }
    }
}

/// The session-level properties of one element and the session it joined.
#[derive(Default)]
pub struct SessionProperties {
    settings: Mutex<Settings>,
    session: Mutex<Option<Arc<MediaSession>>>,
}

impl SessionProperties {
    pub fn properties() -> Vec<glib::ParamSpec> {
        vec![
            glib::ParamSpecString::builder("session")
                .nick("Session")
                .blurb("Name shared by the sipsrc and sipsink of one media stream; they then use one socket pair. Unset: a private session")
                .mutable_ready()
                .build(),
            glib::ParamSpecString::builder("local-address")
                .nick("Local address")
                .blurb("Address to bind the RTP/RTCP sockets to (IPv4 or IPv6; \"::\" takes both)")
                .default_value(Some(DEFAULT_LOCAL_ADDRESS))
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt::builder("local-port")
                .nick("Local port")
                .blurb("RTP port to bind (RTCP uses the next one); 0 picks an even port from the port range. Reads back the bound port")
                .maximum(65535)
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt::builder("port-range-min")
                .nick("Port range minimum")
                .blurb("Lowest port to pick from when local-port is 0")
                .maximum(65535)
                .default_value(DEFAULT_PORT_RANGE.0)
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt::builder("port-range-max")
                .nick("Port range maximum")
                .blurb("Highest port to pick from when local-port is 0")
                .maximum(65535)
                .default_value(DEFAULT_PORT_RANGE.1)
                .mutable_ready()
                .build(),
            glib::ParamSpecBoolean::builder("rtcp-mux")
                .nick("RTCP mux")
                .blurb("Send and receive RTCP on the RTP port (RFC 5761) instead of a second socket")
                .default_value(false)
                .mutable_ready()
                .build(),
            glib::ParamSpecString::builder("remote-address")
                .nick("Remote address")
                .blurb("IP address of the phone's media (from its SDP c= line)")
                .mutable_playing()
                .build(),
            glib::ParamSpecUInt::builder("remote-port")
                .nick("Remote port")
                .blurb("RTP port of the phone's media (from its SDP m= line)")
                .maximum(65535)
                .mutable_playing()
                .build(),
            glib::ParamSpecUInt::builder("remote-rtcp-port")
                .nick("Remote RTCP port")
                .blurb("RTCP port of the phone (a=rtcp); 0: remote-port + 1, or remote-port with rtcp-mux")
                .maximum(65535)
                .mutable_playing()
                .build(),
            glib::ParamSpecBoolean::builder("latch")
                .nick("Latch")
                .blurb("Send to the address the phone really sends from (NAT, \"comedia\"); off: packets from other addresses are dropped")
                .default_value(true)
                .mutable_playing()
                .build(),
            glib::ParamSpecUInt::builder("rtcp-interval")
                .nick("RTCP interval")
                .blurb("Mean interval between RTCP reports in milliseconds (randomised ±50 %)")
                .minimum(100)
                .maximum(60_000)
                .default_value(crate::media_session::DEFAULT_RTCP_INTERVAL.as_millis() as u32)
                .mutable_playing()
                .build(),
            glib::ParamSpecString::builder("sdp")
                .nick("SDP")
                .blurb("The phone's SDP (a whole body or one m= section): sets remote address, ports and RTCP mux, and on sipsrc the payload map")
                .mutable_playing()
                .build(),
            glib::ParamSpecString::builder("srtp-send-key")
                .nick("SRTP send key")
                .blurb("SDES-SRTP key for what we send, as in a=crypto without the tag: \"AES_CM_128_HMAC_SHA1_80 inline:<base64>\". Set with srtp-receive-key; write-only")
                .write_only()
                .mutable_playing()
                .build(),
            glib::ParamSpecString::builder("srtp-receive-key")
                .nick("SRTP receive key")
                .blurb("SDES-SRTP key of the phone (its a=crypto without the tag); write-only")
                .write_only()
                .mutable_playing()
                .build(),
            glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                .nick("Statistics")
                .blurb("Packets, octets, loss, late, duplicates, jitter, RTT and last-packet age of the session")
                .read_only()
                .build(),
        ]
    }

    /// Handles a common property; returns the parsed section when `sdp` was
    /// set, so that `sipsrc` can take its payload map from it.
    pub fn set_property(
        &self,
        element: &gst::Element,
        value: &glib::Value,
        pspec: &glib::ParamSpec,
    ) -> Option<MediaSection> {
        let mut settings = self.settings.lock().unwrap();
        let mut section = None;
        match pspec.name() {
            "session" => {
                settings.session = value
                    .get::<Option<String>>()
                    .unwrap()
                    .filter(|s| !s.is_empty())
            }
            "local-address" => {
                settings.local_address = value
                    .get::<Option<String>>()
                    .unwrap()
                    .unwrap_or_else(|| DEFAULT_LOCAL_ADDRESS.into())
            }
            "local-port" => settings.local_port = value.get().unwrap(),
            "port-range-min" => settings.port_range_min = value.get().unwrap(),
            "port-range-max" => settings.port_range_max = value.get().unwrap(),
            "rtcp-mux" => settings.rtcp_mux = value.get().unwrap(),
            "remote-address" => {
                settings.remote_address = value
                    .get::<Option<String>>()
                    .unwrap()
                    .filter(|s| !s.is_empty())
            }
            "remote-port" => settings.remote_port = value.get().unwrap(),
            "remote-rtcp-port" => settings.remote_rtcp_port = value.get().unwrap(),
            "latch" => settings.latch = Some(value.get().unwrap()),
            "rtcp-interval" => settings.rtcp_interval_ms = Some(value.get().unwrap()),
            name @ ("srtp-send-key" | "srtp-receive-key") => {
                let key = match value
                    .get::<Option<String>>()
                    .unwrap()
                    .filter(|s| !s.is_empty())
                {
                    None => None,
                    Some(text) => match text.parse::<SrtpKey>() {
                        Ok(key) => Some(key),
                        Err(e) => {
                            // The value is a secret: name the fault, not the key.
                            gst::element_warning!(
                                element,
                                gst::ResourceError::Settings,
                                ("Ignoring {name}: {e}")
                            );
                            return None;
                        }
                    },
                };
                if name == "srtp-send-key" {
                    settings.srtp_send_key = key;
                } else {
                    settings.srtp_receive_key = key;
                }
            }
            "sdp" => {
                let text = value.get::<Option<String>>().unwrap();
                match text.as_deref().map(sdp::parse_media_section) {
                    Some(Ok(parsed)) => {
                        if let Some(address) = parsed.address {
                            settings.remote_address = Some(address.to_string());
                        }
                        settings.remote_port = parsed.port.into();
                        settings.remote_rtcp_port = if parsed.rtcp_mux {
                            parsed.port.into()
                        } else {
                            parsed.effective_rtcp_port().into()
                        };
                        settings.sdp = text;
                        section = Some(parsed);
                    }
                    Some(Err(e)) => {
                        gst::element_warning!(
                            element,
                            gst::StreamError::Format,
                            ("Ignoring sdp: {e}")
                        );
                        return None;
                    }
                    None => settings.sdp = None,
                }
            }
            other => unreachable!("not a session property: {other}"),
        }
        // Changes to the peer apply at once to a running session (re-INVITE).
        if let Some(session) = self.session.lock().unwrap().as_ref()
            && let Err(e) = apply_to_session(&settings, session)
        {
            gst::element_warning!(element, gst::ResourceError::Settings, ("{e}"));
        }
        section
    }

    pub fn property(&self, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.settings.lock().unwrap();
        let session = self.session.lock().unwrap();
        match pspec.name() {
            "session" => settings
                .session
                .clone()
                .or_else(|| session.as_ref().map(|s| s.name().to_owned()))
                .to_value(),
            "local-address" => settings.local_address.to_value(),
            "local-port" => session
                .as_ref()
                .map_or(settings.local_port, |s| s.local_rtp_addr().port().into())
                .to_value(),
            "port-range-min" => settings.port_range_min.to_value(),
            "port-range-max" => settings.port_range_max.to_value(),
            "rtcp-mux" => settings.rtcp_mux.to_value(),
            "remote-address" => settings.remote_address.to_value(),
            "remote-port" => settings.remote_port.to_value(),
            "remote-rtcp-port" => settings.remote_rtcp_port.to_value(),
            "latch" => settings.latch.unwrap_or(true).to_value(),
            "rtcp-interval" => settings
                .rtcp_interval_ms
                .unwrap_or(crate::media_session::DEFAULT_RTCP_INTERVAL.as_millis() as u32)
                .to_value(),
            "sdp" => settings.sdp.to_value(),
            "srtp-send-key" | "srtp-receive-key" => None::<String>.to_value(),
            "stats" => {
                stats_structure(&session.as_ref().map(|s| s.stats()).unwrap_or_default()).to_value()
            }
            other => unreachable!("not a session property: {other}"),
        }
    }

    /// Joins (or creates) the session; errors name the property at fault.
    pub fn start(&self) -> Result<Arc<MediaSession>, gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        let address: IpAddr = settings.local_address.parse().map_err(|_| {
            gst::error_msg!(
                gst::ResourceError::Settings,
                (
                    "local-address {:?} is not an IP address",
                    settings.local_address
                )
            )
        })?;
        if settings.port_range_min > settings.port_range_max {
            return Err(gst::error_msg!(
                gst::ResourceError::Settings,
                (
                    "port-range-min {} is above port-range-max {}",
                    settings.port_range_min,
                    settings.port_range_max
                )
            ));
        }
        let bind = BindConfig {
            address,
            port: settings.local_port as u16,
            port_range: (
                settings.port_range_min as u16,
                settings.port_range_max as u16,
            ),
            rtcp_mux: settings.rtcp_mux,
        };
        let session = MediaSession::acquire(settings.session.as_deref(), &bind)
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenReadWrite, ("{e}")))?;
        apply_to_session(&settings, &session)
            .map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("{e}")))?;
        *self.session.lock().unwrap() = Some(session.clone());
        Ok(session)
    }

    pub fn stop(&self) {
        self.session.lock().unwrap().take();
    }

    pub fn session(&self) -> Option<Arc<MediaSession>> {
        self.session.lock().unwrap().clone()
    }
}

fn apply_to_session(settings: &Settings, session: &MediaSession) -> Result<(), String> {
    if let Some(latch) = settings.latch {
        session.set_latch(latch);
    }
    if let Some(ms) = settings.rtcp_interval_ms {
        session.set_rtcp_interval(Duration::from_millis(ms.into()));
    }
    match (&settings.srtp_send_key, &settings.srtp_receive_key) {
        (Some(send), Some(receive)) => session.set_srtp(Some((send.clone(), receive.clone())))?,
        (None, None) => {}
        _ => return Err("srtp-send-key and srtp-receive-key go together".into()),
    }
    if let Some(address) = &settings.remote_address {
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("remote-address {address:?} is not an IP address"))?;
        if settings.remote_port == 0 {
            return Err("remote-port is needed with remote-address".into());
        }
        let rtp = SocketAddr::new(ip, settings.remote_port as u16);
        let rtcp = (settings.remote_rtcp_port != 0)
            .then(|| SocketAddr::new(ip, settings.remote_rtcp_port as u16));
        if session.remote_rtp() != Some(rtp) {
            session.set_remote(rtp, rtcp);
        }
    }
    Ok(())
}

/// The `stats` structure of `sipsrc`/`sipsink`, also posted as the
/// `sip-rtp-stats` element message.
pub fn stats_structure(stats: &SessionStats) -> gst::Structure {
    gst::Structure::builder("sip-rtp-stats")
        .field("local-address", &stats.local_address)
        .field("remote-address", &stats.remote_address)
        .field("local-ssrc", stats.local_ssrc)
        .field("remote-ssrc", stats.remote_ssrc)
        .field("packets-received", stats.packets_received)
        .field("octets-received", stats.octets_received)
        .field("packets-lost", stats.packets_lost)
        .field("packets-late", stats.packets_late)
        .field("packets-duplicated", stats.packets_duplicated)
        .field("packets-reordered", stats.packets_reordered)
        .field("packets-invalid", stats.packets_invalid)
        .field("packets-unknown-pt", stats.packets_unknown_pt)
        .field("packets-wrong-source", stats.packets_wrong_source)
        .field("jitter", stats.jitter)
        .field("jitter-ms", stats.jitter_ms)
        .field("rtt-ms", stats.rtt_ms)
        .field("last-packet-age-ms", stats.last_packet_age_ms)
        .field("packets-sent", stats.packets_sent)
        .field("octets-sent", stats.octets_sent)
        .field("packets-not-sent", stats.packets_not_sent)
        .field("rtcp-sent", stats.rtcp_sent)
        .field("rtcp-received", stats.rtcp_received)
        .field("rtcp-invalid", stats.rtcp_invalid)
        .field("srtp-rejected", stats.srtp_rejected)
        .field(
            "key-frame-requests-received",
            stats.key_frame_requests_received,
        )
        .field("key-frame-requests-sent", stats.key_frame_requests_sent)
        .field("remote-fraction-lost", stats.remote_fraction_lost)
        .field("remote-cumulative-lost", stats.remote_cumulative_lost)
        .field("remote-jitter", stats.remote_jitter)
        .build()
}

/// RTP caps for every payload type of an SDP media section, one structure
/// each, with the fmtp parameters as fields (as GStreamer's SDP helpers do).
pub fn caps_from_media_section(section: &MediaSection) -> gst::Caps {
    let mut caps = gst::Caps::new_empty();
    let caps_mut = caps.get_mut().unwrap();
    for format in &section.formats {
        let mut s = gst::Structure::builder("application/x-rtp")
            .field("media", &section.kind)
            .field("payload", i32::from(format.payload_type))
            .field("clock-rate", format.clock_rate as i32)
            .field("encoding-name", &format.encoding_name)
            .build();
        if let Some(channels) = format.channels {
            s.set("encoding-params", channels.to_string());
        }
        for parameter in format.fmtp.iter().flat_map(|f| f.split(';')) {
            if let Some((key, value)) = parameter.split_once('=') {
                let key = key.trim().to_ascii_lowercase();
                if !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    s.set(key.as_str(), value.trim());
                }
            }
        }
        caps_mut.append_structure(s);
    }
    caps
}
