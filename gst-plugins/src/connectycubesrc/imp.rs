//! No streaming thread of its own: what webrtcbin hands out is pushed on
//! in webrtcbin's thread, with no queue in between.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use bridge_protocol::opus_fmtp::FULL_BAND_RATE;

use crate::CAT;
use crate::call_session::{CallEnd, CallSession, MediaKind, ReceiverOutput};
use crate::cc_common::{CallProperties, HasCall, call_over, signals};

/// Packets lost in a row that are announced as a gap; a longer silence
/// is the sender pausing or starting over, not loss.
const MAX_LOST: u16 = 6;
/// The longest packet a gap is reckoned in.
const MAX_PACKET: gst::ClockTime = gst::ClockTime::from_mseconds(120);

/// What went out ahead of the packets: stream-start and segment, the caps
/// last sent, and the last audio packet.
#[derive(Default)]
struct Stream {
    started: bool,
    caps: Option<gst::Caps>,
    /// The caps' clock rate, read once: not for every packet.
    clock_rate: Option<u32>,
    last_audio: Option<Sent>,
}

/// An RTP packet pushed: its sequence number and timestamp, and its PTS.
#[derive(Clone, Copy)]
struct Sent {
    sequence: u16,
    rtp_time: u32,
    pts: gst::ClockTime,
}

/// When the packets missing between `last` and `next` would have played,
/// and for how long: the GAP a decoder conceals (`opusvoicedec plc=true`).
/// It ends where `next` starts, so what the decoder makes of it and of
/// `next` is one stream without a step in its timestamps (which an encoder
/// downstream would otherwise take as time running late). None unless 1 to
/// `MAX_LOST` packets are missing.
fn lost_span(
    last: &Sent,
    next: &Sent,
    clock_rate: u32,
) -> Option<(gst::ClockTime, gst::ClockTime)> {
    let step = next.sequence.wrapping_sub(last.sequence);
    let ticks = next.rtp_time.wrapping_sub(last.rtp_time);
    if !(2..=MAX_LOST + 1).contains(&step) || ticks == 0 || ticks > u32::MAX / 2 || clock_rate == 0
    {
        return None;
    }
    let per_packet = gst::ClockTime::from_nseconds(
        u64::from(ticks) * 1_000_000_000 / u64::from(step) / u64::from(clock_rate),
    );
    let lost = per_packet * u64::from(step - 1);
    (per_packet <= MAX_PACKET).then(|| (next.pts.saturating_sub(lost), lost))
}

pub struct ConnectyCubeSrc {
    srcpad: gst::Pad,
    call: CallProperties,
    media: Mutex<MediaKind>,
    max_playback_rate: std::sync::atomic::AtomicU32,
    receiver: Mutex<Option<u64>>,
    stream: Mutex<Stream>,
    playing: AtomicBool,
}

#[glib::object_subclass]
impl ObjectSubclass for ConnectyCubeSrc {
    const NAME: &'static str = "GstConnectyCubeSrc";
    type Type = super::ConnectyCubeSrc;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let template = klass.pad_template("src").unwrap();
        let srcpad = gst::Pad::builder_from_template(&template)
            .event_function(|pad, parent, event| {
                ConnectyCubeSrc::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.src_event(pad, event),
                )
            })
            .query_function(|pad, parent, query| {
                ConnectyCubeSrc::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.src_query(pad, query),
                )
            })
            .build();
        Self {
            srcpad,
            call: CallProperties::default(),
            media: Mutex::new(MediaKind::default()),
            max_playback_rate: std::sync::atomic::AtomicU32::new(FULL_BAND_RATE),
            receiver: Mutex::new(None),
            stream: Mutex::new(Stream::default()),
            playing: AtomicBool::new(false),
        }
    }
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
        obj.add_pad(&self.srcpad).unwrap();
        // A source to its bin: an EOS sent to the pipeline comes here.
        obj.set_element_flags(gst::ElementFlags::SOURCE);
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
            properties.push(
                glib::ParamSpecUInt::builder("max-playback-rate")
                    .nick("Max playback rate")
                    .blurb(
                        "Highest audio sample rate played downstream (Hz): the SDP asks the peer's \
                         Opus encoder for no more (maxplaybackrate), saving bandwidth and decoding",
                    )
                    .minimum(8000)
                    .maximum(FULL_BAND_RATE)
                    .default_value(FULL_BAND_RATE)
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
            "max-playback-rate" => self
                .max_playback_rate
                .store(value.get().unwrap(), Ordering::SeqCst),
            _ => self.call.set_property(value, pspec),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "media" => self.media.lock().unwrap().to_value(),
            "max-playback-rate" => self.max_playback_rate.load(Ordering::SeqCst).to_value(),
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

    /// An EOS sent to the pipeline (to finish a recording) goes out here,
    /// as from any source.
    fn send_event(&self, event: gst::Event) -> bool {
        if event.is_downstream() {
            self.push_downstream(event)
        } else {
            self.src_event(&self.srcpad, event)
        }
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        match transition {
            gst::StateChange::PausedToPlaying => self.playing.store(true, Ordering::SeqCst),
            gst::StateChange::PlayingToPaused => self.playing.store(false, Ordering::SeqCst),
            _ => {}
        }
        let success = self.parent_change_state(transition)?;
        match transition {
            // Joined once the pad is active, so that the end of a call that
            // is already over can still go out as EOS.
            gst::StateChange::ReadyToPaused => {
                if let Err(e) = self.start() {
                    self.post_error_message(e);
                    let _ = self.parent_change_state(gst::StateChange::PausedToReady);
                    return Err(gst::StateChangeError);
                }
                Ok(gst::StateChangeSuccess::NoPreroll)
            }
            // Live: nothing to preroll.
            gst::StateChange::PlayingToPaused => Ok(gst::StateChangeSuccess::NoPreroll),
            gst::StateChange::PausedToReady => {
                self.stop();
                Ok(success)
            }
            _ => Ok(success),
        }
    }
}

/// What the call hands this element, from webrtcbin's streaming thread.
struct Output(glib::WeakRef<super::ConnectyCubeSrc>);

impl ReceiverOutput for Output {
    fn deliver(&self, call: &CallSession, sample: gst::Sample) {
        if let Some(element) = self.0.upgrade() {
            element.imp().deliver(call, sample);
        }
    }

    /// Posted as a `connectycube-dtmf` element message (digit,
    /// duration-ms), as `sipsrc` posts a phone's digits.
    fn dtmf(&self, digit: char, duration_ms: u32) {
        if let Some(element) = self.0.upgrade() {
            let s = gst::Structure::builder("connectycube-dtmf")
                .field("digit", digit.to_string())
                .field("duration-ms", duration_ms)
                .build();
            let message = gst::message::Element::builder(s).src(&element).build();
            let _ = element.post_message(message);
        }
    }

    fn ended(&self, end: &CallEnd) {
        if let Some(element) = self.0.upgrade() {
            let flow = call_over(element.upcast_ref(), end);
            if flow == gst::FlowError::Eos {
                // Not from this thread: a call already over when the
                // element starts is told from within its state change,
                // and a sink still prerolling would hold the EOS (and that
                // state change) until the pipeline plays. Pushed, not sent
                // as an element event: `gst_element_send_event` holds the
                // element's state lock, which a pipeline stopping meanwhile
                // waits for while its paused sink holds the EOS.
                element.call_async(|element| {
                    element.imp().push_downstream(gst::event::Eos::new());
                });
            }
        }
    }
}

impl ConnectyCubeSrc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let call = self.call.join(self.obj().upcast_ref())?;
        *self.stream.lock().unwrap() = Stream::default();
        let output = Arc::new(Output(self.obj().downgrade()));
        let rate = self.max_playback_rate.load(Ordering::SeqCst);
        // Not locked across the call: one already over ends this element
        // from within `add_receiver`, which announces the stream's media.
        let kind = *self.media.lock().unwrap();
        let id = call.add_receiver(kind, rate, output);
        *self.receiver.lock().unwrap() = Some(id);
        call.start(self.obj().upcast_ref())
    }

    fn stop(&self) {
        if let (Some(call), Some(id)) = (self.call.call(), self.receiver.lock().unwrap().take()) {
            call.remove_receiver(id);
        }
        self.call.leave(self.obj().upcast_ref());
    }

    fn push_downstream(&self, event: gst::Event) -> bool {
        self.announce(None);
        self.srcpad.push_event(event)
    }

    /// Stream-start and segment ahead of the first packet (or an EOS before
    /// any), and new caps ahead of the packets they describe.
    fn announce(&self, caps: Option<gst::Caps>) {
        let mut stream = self.stream.lock().unwrap();
        let starting = !stream.started;
        if starting {
            let media = format!("{:?}", *self.media.lock().unwrap()).to_lowercase();
            let id = self.srcpad.create_stream_id(&*self.obj(), Some(&media));
            self.srcpad.push_event(
                gst::event::StreamStart::builder(&id)
                    .group_id(gst::GroupId::next())
                    .build(),
            );
            stream.started = true;
        }
        if let Some(caps) = caps
            && stream.caps.as_ref() != Some(&caps)
        {
            self.srcpad.push_event(gst::event::Caps::new(&caps));
            stream.clock_rate = caps.structure(0).and_then(crate::clock_rate);
            stream.caps = Some(caps);
        }
        if starting {
            self.srcpad
                .push_event(gst::event::Segment::new(&gst::FormattedSegment::<
                    gst::ClockTime,
                >::new()));
        }
    }

    fn deliver(&self, call: &CallSession, sample: gst::Sample) {
        if !self.playing.load(Ordering::SeqCst) {
            return;
        }
        let Some(mut buffer) = sample.buffer_owned() else {
            return;
        };
        let obj = self.obj();
        self.announce(sample.caps_owned());
        // Stamped with this pipeline's running time of its arrival at
        // webrtcbin's jitter buffer (so what the call's pipeline held
        // counts as latency downstream), or of now when the call runs on
        // another clock.
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
        if *self.media.lock().unwrap() == MediaKind::Audio
            && let Some(gap) = self.follow_audio(&buffer, stamp)
        {
            self.srcpad.push_event(gap);
        }
        let _ = self.srcpad.push(buffer);
    }

    /// Keeps the audio packet's numbering; a GAP event for the packets lost
    /// before it, which the network or the sender's jitter left out (the
    /// shared WebRTC stack has no jitter buffer to say so).
    fn follow_audio(
        &self,
        packet: &gst::Buffer,
        pts: Option<gst::ClockTime>,
    ) -> Option<gst::Event> {
        let map = packet.map_readable().ok()?;
        let header = map.get(..8)?;
        let next = Sent {
            sequence: u16::from_be_bytes([header[2], header[3]]),
            rtp_time: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
            pts: pts?,
        };
        let mut stream = self.stream.lock().unwrap();
        let last = stream.last_audio.replace(next)?;
        let (start, duration) = lost_span(&last, &next, stream.clock_rate?)?;
        gst::debug!(CAT, imp = self, "{duration} of audio lost at {start}");
        Some(gst::event::Gap::builder(start).duration(duration).build())
    }

    /// A key-frame request from downstream (a decoder, or a phone's
    /// `picture_fast_update`) goes to the peer as PLI/FIR.
    fn src_event(&self, _pad: &gst::Pad, event: gst::Event) -> bool {
        if crate::is_key_frame_request(&event) {
            return self
                .call
                .call()
                .is_some_and(|call| call.request_key_frame(*self.media.lock().unwrap(), event));
        }
        // Nothing to seek in a call.
        event.type_() != gst::EventType::Seek
    }

    fn src_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        crate::live_source_query(pad, query)
            .unwrap_or_else(|| gst::Pad::query_default(pad, Some(&*self.obj()), query))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(sequence: u16, rtp_time: u32, pts_ms: u64) -> Sent {
        Sent {
            sequence,
            rtp_time,
            pts: gst::ClockTime::from_mseconds(pts_ms),
        }
    }

    #[test]
    fn packets_lost_make_a_gap_where_they_would_have_played() {
        let ms = gst::ClockTime::from_mseconds;
        let last = sent(65534, u32::MAX - 959, 1000);
        // Two 20 ms packets lost, across both counters' wrap; the packet
        // after them came 5 ms late, and the gap ends where it starts.
        assert_eq!(
            lost_span(&last, &sent(1, 1920, 1065), 48000),
            Some((ms(1025), ms(40)))
        );
        assert_eq!(
            lost_span(&last, &sent(65535, 0, 1020), 48000),
            None,
            "none lost"
        );
        assert_eq!(
            lost_span(&last, &sent(65533, 0, 1020), 48000),
            None,
            "a late packet"
        );
        let pause = 65534_u16.wrapping_add(MAX_LOST + 2);
        assert_eq!(
            lost_span(&last, &sent(pause, 48000, 2000), 48000),
            None,
            "more than MAX_LOST missing is a pause or a new start"
        );
        assert_eq!(
            lost_span(&last, &sent(0, u32::MAX - 959, 1040), 48000),
            None,
            "no time passed"
        );
    }
}
