use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;

use crate::call_session::MediaKind;
use crate::cc_common::{CallProperties, HasCall, call_over, signals};

#[derive(Default)]
pub struct ConnectyCubeSrc {
    call: CallProperties,
    media: Mutex<MediaKind>,
    flushing: AtomicBool,
    caps: Mutex<Option<gst::Caps>>,
}

#[glib::object_subclass]
impl ObjectSubclass for ConnectyCubeSrc {
    const NAME: &'static str = "GstConnectyCubeSrc";
    type Type = super::ConnectyCubeSrc;
    type ParentType = gst_base::PushSrc;
}

impl HasCall for ConnectyCubeSrc {
    fn call_properties(&self) -> &CallProperties {
        &self.call
    }
}

impl ObjectImpl for ConnectyCubeSrc {
    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> =
            LazyLock::new(signals::<ConnectyCubeSrc>);
        SIGNALS.as_ref()
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_live(true);
        obj.set_format(gst::Format::Time);
    }

    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let mut properties = CallProperties::properties();
            properties.push(
                glib::ParamSpecEnum::builder_with_default("media", MediaKind::Audio)
                    .nick("Media")
                    .blurb("Which received stream this element outputs")
                    .mutable_ready()
                    .build(),
            );
            properties
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        match pspec.name() {
            "media" => *self.media.lock().unwrap() = value.get().unwrap(),
            _ => self.call.set_property(value, pspec),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "media" => self.media.lock().unwrap().to_value(),
            _ => self.call.property(pspec),
        }
    }
}

impl GstObjectImpl for ConnectyCubeSrc {}

impl ElementImpl for ConnectyCubeSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "ConnectyCube source",
                "Source/Network/WebRTC",
                "Outputs a received RTP stream of a ConnectyCube P2P call (webrtcbin); places or answers the call itself when given credentials",
                "sip-cc-bridge developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> =
            LazyLock::new(|| vec![crate::rtp_pad_template("src", gst::PadDirection::Src)]);
        TEMPLATES.as_ref()
    }
}

impl BaseSrcImpl for ConnectyCubeSrc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let call = self.call.join(self.obj().upcast_ref())?;
        call.add_receiver(*self.media.lock().unwrap());
        self.caps.lock().unwrap().take();
        call.start()
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        if let Some(call) = self.call.call() {
            call.remove_receiver(*self.media.lock().unwrap());
        }
        self.call.leave(self.obj().upcast_ref());
        Ok(())
    }

    /// A key-frame request from downstream (a decoder, or a phone's
    /// `picture_fast_update`) goes to the peer as PLI/FIR.
    fn event(&self, event: &gst::Event) -> bool {
        if crate::is_key_frame_request(event) {
            return self.call.call().is_some_and(|call| {
                call.request_key_frame(*self.media.lock().unwrap(), event.clone())
            });
        }
        self.parent_event(event)
    }

    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        self.flushing.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        self.flushing.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl PushSrcImpl for ConnectyCubeSrc {
    fn create(
        &self,
        _buffer: Option<&mut gst::BufferRef>,
    ) -> Result<CreateSuccess, gst::FlowError> {
        let call = self.call.call().ok_or(gst::FlowError::Flushing)?;
        let media = *self.media.lock().unwrap();
        loop {
            if self.flushing.load(Ordering::SeqCst) {
                return Err(gst::FlowError::Flushing);
            }
            let sample = match call.pull(media, Duration::from_millis(50)) {
                Ok(Some(sample)) => sample,
                Ok(None) => continue,
                Err(end) => return Err(call_over(self.obj().upcast_ref(), &end)),
            };
            let Some(mut buffer) = sample.buffer_owned() else {
                continue;
            };
            if let Some(caps) = sample.caps_owned()
                && self.caps.lock().unwrap().as_ref() != Some(&caps)
            {
                let _ = self.obj().set_caps(&caps);
                *self.caps.lock().unwrap() = Some(caps);
            }
            // Stamp with this pipeline's running time of its arrival at
            // webrtcbin (so what the call's pipeline held counts as latency
            // downstream), or of now when the call runs on another clock.
            let obj = self.obj();
            let stamp = obj.clock().zip(obj.base_time()).map(|(clock, base)| {
                let now = clock.time().saturating_sub(base);
                call.capture_time(&sample, &clock)
                    .and_then(|captured| captured.checked_sub(base))
                    .filter(|captured| *captured <= now)
                    .unwrap_or(now)
            });
            let buffer_mut = buffer.make_mut();
            buffer_mut.set_pts(stamp);
            buffer_mut.set_dts(None::<gst::ClockTime>);
            return Ok(CreateSuccess::NewBuffer(buffer));
        }
    }
}
