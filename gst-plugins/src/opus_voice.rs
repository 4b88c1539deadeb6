//! What `opusvoiceenc` and `opusvoicedec` share: their caps and the
//! mapping of negotiated formats to libopus's.

use gst::glib;
use opusic_c::{Application, Bandwidth, Channels, SampleRate};

/// The rates libopus encodes from and decodes to without resampling.
const RATES: [i32; 5] = [48000, 24000, 16000, 12000, 8000];

/// Interleaved 16-bit audio at an Opus rate, mono or stereo.
pub(crate) fn pcm_caps() -> gst::Caps {
    gst::Caps::builder("audio/x-raw")
        .field("format", gst_audio::AUDIO_FORMAT_S16.to_str())
        .field("layout", "interleaved")
        .field("rate", gst::List::new(RATES))
        .field("channels", gst::IntRange::new(1, 2))
        .build()
}

/// One Opus stream (channel mapping family 0), as `rtpopuspay` takes and
/// `rtpopusdepay` gives.
pub(crate) fn opus_caps() -> gst::Caps {
    gst::Caps::builder("audio/x-opus")
        .field("channel-mapping-family", 0i32)
        .build()
}

pub(crate) fn sample_rate(rate: u32) -> Option<SampleRate> {
    Some(match rate {
        8000 => SampleRate::Hz8000,
        12000 => SampleRate::Hz12000,
        16000 => SampleRate::Hz16000,
        24000 => SampleRate::Hz24000,
        48000 => SampleRate::Hz48000,
        _ => return None,
    })
}

pub(crate) fn channels(count: u32) -> Option<Channels> {
    match count {
        1 => Some(Channels::Mono),
        2 => Some(Channels::Stereo),
        _ => None,
    }
}

/// The widest audio band an encoder may send (`OPUS_SET_MAX_BANDWIDTH`):
/// what a peer plays at most (its `maxplaybackrate`) is all worth sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum, Default)]
#[enum_type(name = "GstOpusVoiceBandwidth")]
pub enum MaxBandwidth {
    #[enum_value(name = "4 kHz (8 kHz playback)", nick = "narrowband")]
    Narrowband,
    #[enum_value(name = "6 kHz (12 kHz playback)", nick = "mediumband")]
    Mediumband,
    #[enum_value(name = "8 kHz (16 kHz playback)", nick = "wideband")]
    Wideband,
    #[enum_value(name = "12 kHz (24 kHz playback)", nick = "superwideband")]
    Superwideband,
    #[default]
    #[enum_value(name = "20 kHz (48 kHz playback)", nick = "fullband")]
    Fullband,
}

impl From<MaxBandwidth> for Bandwidth {
    fn from(bandwidth: MaxBandwidth) -> Self {
        match bandwidth {
            MaxBandwidth::Narrowband => Bandwidth::Narrow,
            MaxBandwidth::Mediumband => Bandwidth::Medium,
            MaxBandwidth::Wideband => Bandwidth::Wide,
            MaxBandwidth::Superwideband => Bandwidth::Superwide,
            MaxBandwidth::Fullband => Bandwidth::Full,
        }
    }
}

/// How libopus chooses its mode (`OPUS_SET_APPLICATION`). For a phone's
/// voice at the bridge's 32 kbit/s, `generic` codes in CELT, which costs
/// about 60 % of SILK's CPU here and keeps the spectrum as close (`cargo
/// bench --bench opus_complexity`), and moves to SILK, which carries
/// in-band FEC, when the receiver reports loss (`packet-loss-percentage`
/// above 0) or the bitrate falls; `voice` keeps SILK at any bitrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum, Default)]
#[enum_type(name = "GstOpusVoiceAudioType")]
pub enum AudioType {
    #[default]
    #[enum_value(
        name = "Generic: CELT while the bitrate affords it, SILK (with FEC) under loss",
        nick = "generic"
    )]
    Generic,
    #[enum_value(name = "Voice: SILK, as browsers send", nick = "voice")]
    Voice,
    #[enum_value(
        name = "Restricted low delay: CELT only, 4 ms less look-ahead, no FEC",
        nick = "restricted-lowdelay"
    )]
    RestrictedLowDelay,
}

impl From<AudioType> for Application {
    fn from(audio_type: AudioType) -> Self {
        match audio_type {
            AudioType::Generic => Application::Audio,
            AudioType::Voice => Application::Voip,
            AudioType::RestrictedLowDelay => Application::LowDelay,
        }
    }
}
