use std::sync::LazyLock;
use std::sync::Mutex;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;

use crate::CAT;
use crate::sip_common::SessionProperties;

#[derive(Default)]
pub struct SipSink {
    session: SessionProperties,
    /// RTP clock rate of the negotiated caps, for the timestamps in Sender Reports.
    clock_rate: Mutex<u32>,
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
    }

    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> =
            LazyLock::new(SessionProperties::properties);
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        self.session
            .set_property(self.obj().upcast_ref(), value, pspec);
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
        }
        self.session.stop();
        Ok(())
    }

    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let rate = caps
            .structure(0)
            .and_then(|s| s.get::<i32>("clock-rate").ok())
            .unwrap_or(0);
        *self.clock_rate.lock().unwrap() = rate.max(0) as u32;
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
        let clock_rate = *self.clock_rate.lock().unwrap();
        if let Err(e) = session.send_rtp(
            map.as_slice(),
            packet.ssrc(),
            packet.timestamp(),
            clock_rate,
        ) {
            gst::warning!(CAT, imp = self, "sending RTP failed: {e}");
        }
    }
}
