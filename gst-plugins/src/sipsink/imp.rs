use std::sync::LazyLock;
use std::sync::Mutex;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;

use bridge_protocol::dtmf::EventSender;
use bridge_protocol::sdp::PayloadFormat;

use crate::CAT;
use crate::sip_common::SessionProperties;

/// RFC 4733 events toward the phone, when its SDP offers telephone-event.
#[derive(Default)]
struct Dtmf {
    /// Payload type and clock rate of the phone's telephone-event.
    format: Option<(u8, u32)>,
    sender: EventSender,
}

/// The stream upstream sends, and how the phone numbers it.
#[derive(Default)]
struct Outgoing {
    /// RTP clock rate of the negotiated caps, for the timestamps in Sender Reports.
    clock_rate: u32,
    /// Encoding name of the negotiated caps.
    encoding_name: String,
    /// The formats of the phone's SDP.
    phone_formats: Vec<PayloadFormat>,
    /// The phone's payload type for the caps' encoding: packets leave
    /// numbered by the phone's map, so RTP from another leg (the app's
    /// Opus, say) passes through without a payloader.
    payload_type: Option<u8>,
}

impl Outgoing {
    fn update_payload_type(&mut self) {
        self.payload_type = self
            .phone_formats
            .iter()
            .find(|f| {
                f.encoding_name.eq_ignore_ascii_case(&self.encoding_name)
                    && f.clock_rate == self.clock_rate
            })
            .map(|f| f.payload_type);
    }
}

#[derive(Default)]
pub struct SipSink {
    session: SessionProperties,
    outgoing: Mutex<Outgoing>,
    dtmf: Mutex<Dtmf>,
}

#[glib::object_subclass]
impl ObjectSubclass for SipSink {
    const NAME: &'static str = "GstSipSink";
    type Type = super::SipSink;
    type ParentType = gst_base::BaseSink;
}

impl ObjectImpl for SipSink {
    fn constructed(&self) {
        self.parent_constructed();
        // A call's media is live: waiting for preroll would stall the pipeline
        // when the receiving side is a live source (as udpsink async=false).
        self.obj().set_async(false);
        // No reference to the last packet kept: a lock and a reference
        // count less per packet.
        self.obj().set_enable_last_sample(false);
    }

    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> =
            LazyLock::new(SessionProperties::properties);
        PROPERTIES.as_ref()
    }

    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> = LazyLock::new(|| {
            vec![
                // send-dtmf(digit, duration-ms) -> queued: sends the digit as
                // RFC 4733 events in place of audio packets.
                glib::subclass::Signal::builder("send-dtmf")
                    .param_types([String::static_type(), u32::static_type()])
                    .return_type::<bool>()
                    .action()
                    .class_handler(|args| {
                        let element = args[0].get::<super::SipSink>().unwrap();
                        let digit = args[1].get::<String>().unwrap_or_default();
                        let duration_ms = args[2].get::<u32>().unwrap_or(0);
                        Some(element.imp().queue_dtmf(&digit, duration_ms).to_value())
                    })
                    .build(),
            ]
        });
        SIGNALS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let section = self
            .session
            .set_property(self.obj().upcast_ref(), value, pspec);
        if let Some(section) = section {
            self.dtmf.lock().unwrap().format = section
                .formats
                .iter()
                .find(|f| f.encoding_name.eq_ignore_ascii_case("telephone-event"))
                .map(|f| (f.payload_type, f.clock_rate));
            let mut outgoing = self.outgoing.lock().unwrap();
            outgoing.phone_formats = section.formats;
            outgoing.update_payload_type();
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        self.session.property(pspec)
    }
}

impl GstObjectImpl for SipSink {}

impl ElementImpl for SipSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "SIP RTP sink",
                "Sink/Network/RTP",
                "Sends RTP and RTCP to a SIP phone from the port it receives on (symmetric RTP, latching)",
                "sip-cc-bridge developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> =
            LazyLock::new(|| vec![crate::rtp_pad_template("sink", gst::PadDirection::Sink)]);
        TEMPLATES.as_ref()
    }
}

impl BaseSinkImpl for SipSink {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let session = self.session.start()?;
        // The phone lost the picture (PLI/FIR): ask the encoder upstream.
        let sink_pad = self.obj().static_pad("sink").unwrap().downgrade();
        session.set_key_frame_handler(Some(Box::new(move || {
            if let Some(pad) = sink_pad.upgrade() {
                pad.push_event(crate::key_frame_request());
            }
        })));
        gst::info!(
            CAT,
            imp = self,
            "sending from {} in session {}",
            session.local_rtp_addr(),
            session.name()
        );
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        if let Some(session) = self.session.session() {
            session.send_bye();
            session.set_key_frame_handler(None);
        }
        self.session.stop();
        Ok(())
    }

    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let structure = caps.structure(0);
        let mut outgoing = self.outgoing.lock().unwrap();
        outgoing.clock_rate = structure.and_then(crate::clock_rate).unwrap_or(0);
        outgoing.encoding_name = structure
            .and_then(|s| s.get::<String>("encoding-name").ok())
            .unwrap_or_default();
        outgoing.update_payload_type();
        Ok(())
    }

    fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        self.send(buffer);
        Ok(gst::FlowSuccess::Ok)
    }

    fn render_list(&self, list: &gst::BufferList) -> Result<gst::FlowSuccess, gst::FlowError> {
        for buffer in list.iter() {
            self.send(buffer);
        }
        Ok(gst::FlowSuccess::Ok)
    }

    fn event(&self, event: gst::Event) -> bool {
        if let gst::EventView::Eos(_) = event.view()
            && let Some(session) = self.session.session()
        {
            session.send_bye();
        }
        self.parent_event(event)
    }
}

impl SipSink {
    /// Queues a digit (0–9, *, #, A–D) of at least 40 ms; `false` when the
    /// phone takes no telephone-event, or its rate differs from the stream's.
    fn queue_dtmf(&self, digit: &str, duration_ms: u32) -> bool {
        let clock_rate = self.outgoing.lock().unwrap().clock_rate;
        let mut dtmf = self.dtmf.lock().unwrap();
        let Some((_, event_rate)) = dtmf.format else {
            gst::warning!(
                CAT,
                imp = self,
                "no telephone-event in the phone's SDP: digit {digit:?} not sent"
            );
            return false;
        };
        if clock_rate != 0 && clock_rate != event_rate {
            gst::warning!(
                CAT,
                imp = self,
                "telephone-event/{event_rate} does not match the stream's clock {clock_rate}: digit {digit:?} not sent"
            );
            return false;
        }
        let mut chars = digit.chars();
        let (Some(digit), None) = (chars.next(), chars.next()) else {
            return false;
        };
        let length = u64::from(duration_ms.max(40)) * u64::from(event_rate) / 1000;
        dtmf.sender
            .queue(digit, length.min(u64::from(u32::MAX)) as u32)
    }

    /// Sends one packet. A send error is logged, never fatal: a phone that is
    /// briefly unreachable must not end the call.
    fn send(&self, buffer: &gst::BufferRef) {
        let Some(session) = self.session.session() else {
            return;
        };
        let Ok(map) = buffer.map_readable() else {
            return;
        };
        let Ok(packet) = rtp_types::RtpPacket::parse(map.as_slice()) else {
            gst::warning!(
                CAT,
                imp = self,
                "dropping a buffer that is not RTP ({} bytes)",
                map.size()
            );
            return;
        };
        let (clock_rate, payload_type) = {
            let outgoing = self.outgoing.lock().unwrap();
            let payload_type = outgoing.payload_type.unwrap_or(packet.payload_type());
            (outgoing.clock_rate, payload_type)
        };
        let event = {
            let mut dtmf = self.dtmf.lock().unwrap();
            match dtmf.format.map(|(pt, _)| pt) {
                Some(pt) if pt != payload_type => dtmf
                    .sender
                    .replace(packet.timestamp())
                    .map(|event| (pt, event)),
                _ => None,
            }
        };
        let event_packet = event.and_then(|(pt, event)| {
            rtp_types::RtpPacketBuilder::new()
                .payload_type(pt)
                .marker_bit(event.marker)
                .sequence_number(packet.sequence_number())
                .timestamp(event.timestamp)
                .ssrc(packet.ssrc())
                .payload(event.payload.as_slice())
                .write_vec()
                .ok()
        });
        let renumbered = (event_packet.is_none() && payload_type != packet.payload_type())
            .then(|| with_payload_type(map.as_slice(), payload_type));
        let data = event_packet
            .as_deref()
            .or(renumbered.as_deref())
            .unwrap_or(map.as_slice());
        if let Err(e) = session.send_rtp(data, packet.ssrc(), packet.timestamp(), clock_rate) {
            gst::warning!(CAT, imp = self, "sending RTP failed: {e}");
        }
    }
}

/// A copy of an RTP packet with another payload type (the marker bit kept).
fn with_payload_type(packet: &[u8], payload_type: u8) -> Vec<u8> {
    let mut copy = packet.to_vec();
    copy[1] = (copy[1] & 0x80) | (payload_type & 0x7f);
    copy
}
