use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;

use crate::call_session::{EncoderControl, SenderFeedback};
use crate::cc_common::{CallProperties, HasCall, call_over, signals};

#[derive(Default)]
pub struct ConnectyCubeSink {
    call: CallProperties,
    /// The stream's caps before its first buffer, from the `caps` property.
    announced_caps: Mutex<Option<gst::Caps>>,
    sender: Mutex<Option<u64>>,
    has_caps: AtomicBool,
    ended_posted: AtomicBool,
    /// The upstream encoder congestion control steers, once found.
    encoder: Mutex<Option<EncoderControl>>,
}

#[glib::object_subclass]
impl ObjectSubclass for ConnectyCubeSink {
    const NAME: &'static str = "GstConnectyCubeSink";
    type Type = super::ConnectyCubeSink;
    type ParentType = gst_base::BaseSink;
}

impl HasCall for ConnectyCubeSink {
    fn call_properties(&self) -> &CallProperties {
        &self.call
    }
}

impl ObjectImpl for ConnectyCubeSink {
    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> =
            LazyLock::new(signals::<ConnectyCubeSink>);
        SIGNALS.as_ref()
    }

    fn constructed(&self) {
        self.parent_constructed();
        // A call is live: never wait for preroll, never hold packets for the clock.
        self.obj().set_async(false);
        self.obj().set_sync(false);
        // No reference to the last packet kept: a lock and a reference
        // count less per packet.
        self.obj().set_enable_last_sample(false);
    }

    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let mut properties = CallProperties::properties();
            properties.push(
                glib::ParamSpecBoxed::builder::<gst::Caps>("caps")
                    .nick("Caps")
                    .blurb("RTP caps of the stream, announced before its first buffer so the call can be offered while upstream is still silent (a phone that sends nothing until answered)")
                    .mutable_ready()
                    .build(),
            );
            properties
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        match pspec.name() {
            "caps" => *self.announced_caps.lock().unwrap() = value.get().unwrap(),
            _ => self.call.set_property(value, pspec),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "caps" => self.announced_caps.lock().unwrap().to_value(),
            _ => self.call.property(pspec),
        }
    }
}

/// What the call asks of this element's upstream, passed on to it.
struct Feedback(glib::WeakRef<super::ConnectyCubeSink>);

impl SenderFeedback for Feedback {
    fn bitrate(&self, bits_per_second: u32) {
        if let Some(element) = self.0.upgrade() {
            element.imp().steer_encoder(bits_per_second);
        }
    }

    fn max_playback_rate(&self, rate: u32) {
        if let Some(element) = self.0.upgrade() {
            element.imp().limit_audio_bandwidth(rate);
        }
    }

    fn packet_loss(&self, percent: u32) {
        if let Some(element) = self.0.upgrade() {
            element.imp().expect_loss(percent);
        }
    }

    fn upstream_event(&self, event: gst::Event) {
        if let Some(pad) = self.0.upgrade().and_then(|e| e.static_pad("sink")) {
            gst::debug!(
                crate::CAT,
                obj = pad,
                "relaying {:?} upstream",
                event.structure()
            );
            pad.push_event(event);
        }
    }
}

impl ConnectyCubeSink {
    /// The upstream encoder, found once.
    fn encoder(&self) -> std::sync::MutexGuard<'_, Option<EncoderControl>> {
        let mut encoder = self.encoder.lock().unwrap();
        if encoder.is_none() {
            *encoder = self
                .obj()
                .static_pad("sink")
                .and_then(|pad| EncoderControl::find(&pad));
        }
        encoder
    }

    /// The peer reports `percent` of the audio lost: the encoder adds as
    /// much in-band FEC as that calls for (none at 0).
    fn expect_loss(&self, percent: u32) {
        let encoder = self.encoder();
        if encoder.as_ref().is_some_and(|c| c.expect_loss(percent)) {
            gst::debug!(
                crate::CAT,
                imp = self,
                "the peer reports {percent} % lost: Opus in-band FEC sized to it"
            );
        }
    }

    /// The peer plays at most `rate` Hz: encode no more (as browsers do).
    fn limit_audio_bandwidth(&self, rate: u32) {
        let encoder = self.encoder();
        if let Some(bandwidth) = encoder.as_ref().and_then(|c| c.limit_audio_bandwidth(rate)) {
            gst::info!(
                crate::CAT,
                imp = self,
                "the peer plays at most {rate} Hz: Opus {bandwidth}"
            );
        }
    }

    /// Congestion control allotted `bitrate` bit/s to this stream: the
    /// encoder upstream gets it (never more than it was configured with),
    /// and a `connectycube-bitrate` message says so.
    fn steer_encoder(&self, bitrate: u32) {
        let mut encoder = self.encoder();
        let Some(control) = encoder.as_mut() else {
            gst::debug!(
                crate::CAT,
                imp = self,
                "no encoder upstream to give {bitrate} bit/s"
            );
            return;
        };
        let Some(applied) = control.apply(bitrate) else {
            return;
        };
        let name = control.name();
        drop(encoder);
        gst::debug!(
            crate::CAT,
            imp = self,
            "{name}: {applied} bit/s (estimate share {bitrate})"
        );
        let message = gst::Structure::builder("connectycube-bitrate")
            .field("allotted", bitrate)
            .field("encoder", name)
            .field("encoder-bitrate", applied)
            .build();
        let obj = self.obj();
        let _ = obj.post_message(gst::message::Element::builder(message).src(&*obj).build());
    }
}

impl GstObjectImpl for ConnectyCubeSink {}

impl ElementImpl for ConnectyCubeSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "ConnectyCube sink",
                "Sink/Network/WebRTC",
                "Sends an RTP stream into a ConnectyCube P2P call (webrtcbin); places the call itself when given credentials and a peer",
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

impl BaseSinkImpl for ConnectyCubeSink {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let call = self.call.join(self.obj().upcast_ref())?;
        let sender = call.add_sender(Arc::new(Feedback(self.obj().downgrade())));
        *self.sender.lock().unwrap() = Some(sender);
        self.ended_posted.store(false, Ordering::SeqCst);
        let announced = self.announced_caps.lock().unwrap().clone();
        self.has_caps.store(announced.is_some(), Ordering::SeqCst);
        call.start(self.obj().upcast_ref())?;
        if let Some(caps) = announced {
            call.set_sender_caps(sender, &caps)?;
        }
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        if let (Some(call), Some(id)) = (self.call.call(), self.sender.lock().unwrap().take()) {
            call.remove_sender(id);
        }
        self.call.leave(self.obj().upcast_ref());
        Ok(())
    }

    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        // The stream's codec is fixed for the call; later caps only refine it.
        if self.has_caps.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let (Some(call), Some(id)) = (self.call.call(), *self.sender.lock().unwrap()) else {
            return Err(gst::loggable_error!(crate::CAT, "not started"));
        };
        call.set_sender_caps(id, caps)
            .map_err(|e| gst::loggable_error!(crate::CAT, "{e:?}"))
    }

    fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let (Some(call), Some(id)) = (self.call.call(), *self.sender.lock().unwrap()) else {
            return Err(gst::FlowError::Flushing);
        };
        match call.push(id, buffer.clone()) {
            Ok(()) => Ok(gst::FlowSuccess::Ok),
            // After EOS upstream sends EOS, and the pipeline ends cleanly.
            Err(end) if self.ended_posted.swap(true, Ordering::SeqCst) => Err(if end.error {
                gst::FlowError::Error
            } else {
                gst::FlowError::Eos
            }),
            Err(end) => Err(call_over(self.obj().upcast_ref(), &end)),
        }
    }
}
