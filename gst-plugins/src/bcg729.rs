//! Bindings to Debian's libbcg729 (G.729 Annex A encoder/decoder with Annex B).

use std::ptr::NonNull;

#[repr(C)]
struct EncoderContext {
    _private: [u8; 0],
}

#[repr(C)]
struct DecoderContext {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn initBcg729EncoderChannel(enable_vad: u8) -> *mut EncoderContext;
    fn closeBcg729EncoderChannel(ctx: *mut EncoderContext);
    fn bcg729Encoder(
        ctx: *mut EncoderContext,
        input: *const i16,
        bitstream: *mut u8,
        length: *mut u8,
    );
    fn initBcg729DecoderChannel() -> *mut DecoderContext;
    fn closeBcg729DecoderChannel(ctx: *mut DecoderContext);
    fn bcg729Decoder(
        ctx: *mut DecoderContext,
        bitstream: *const u8,
        length: u8,
        frame_erasure: u8,
        sid_frame: u8,
        rfc3389_payload: u8,
        signal: *mut i16,
    );
}

/// Samples in one 10 ms G.729 frame at 8 kHz.
pub const FRAME_SAMPLES: usize = 80;
/// Bytes of a voice frame.
pub const FRAME_BYTES: usize = 10;
/// Bytes of an Annex B SID (comfort noise) frame.
pub const SID_BYTES: usize = 2;

pub struct Encoder(NonNull<EncoderContext>);

// The context is plain heap memory owned by this value alone.
unsafe impl Send for Encoder {}

impl Encoder {
    pub fn new(annex_b: bool) -> Option<Encoder> {
        NonNull::new(unsafe { initBcg729EncoderChannel(u8::from(annex_b)) }).map(Encoder)
    }

    /// Encodes one 10 ms frame into `out`; returns the bytes written: 10 for
    /// voice, 2 for a SID frame, 0 for an untransmitted frame (Annex B).
    pub fn encode(&mut self, frame: &[i16; FRAME_SAMPLES], out: &mut [u8; FRAME_BYTES]) -> usize {
        let mut length = 0u8;
        unsafe {
            bcg729Encoder(
                self.0.as_ptr(),
                frame.as_ptr(),
                out.as_mut_ptr(),
                &mut length,
            )
        };
        usize::from(length).min(FRAME_BYTES)
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        unsafe { closeBcg729EncoderChannel(self.0.as_ptr()) }
    }
}

pub struct Decoder(NonNull<DecoderContext>);

unsafe impl Send for Decoder {}

impl Decoder {
    pub fn new() -> Option<Decoder> {
        NonNull::new(unsafe { initBcg729DecoderChannel() }).map(Decoder)
    }

    /// Decodes a voice frame (10 bytes) or a SID frame (2 bytes).
    pub fn decode(&mut self, frame: &[u8], out: &mut [i16; FRAME_SAMPLES]) {
        debug_assert!(frame.len() == FRAME_BYTES || frame.len() == SID_BYTES);
        let sid = u8::from(frame.len() == SID_BYTES);
        unsafe {
            bcg729Decoder(
                self.0.as_ptr(),
                frame.as_ptr(),
                frame.len() as u8,
                0,
                sid,
                0,
                out.as_mut_ptr(),
            )
        }
    }

    /// Conceals one lost frame.
    pub fn conceal(&mut self, out: &mut [i16; FRAME_SAMPLES]) {
        let silence = [0u8; FRAME_BYTES];
        unsafe {
            bcg729Decoder(
                self.0.as_ptr(),
                silence.as_ptr(),
                FRAME_BYTES as u8,
                1,
                0,
                0,
                out.as_mut_ptr(),
            )
        }
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        unsafe { closeBcg729DecoderChannel(self.0.as_ptr()) }
    }
}

/// `audio/G729` as `rtpg729pay`/`rtpg729depay` take and give it.
pub fn g729_caps() -> gst::Caps {
    gst::Caps::builder("audio/G729")
        .field("rate", 8000)
        .field("channels", 1)
        .build()
}

/// The PCM side of the codec: 8 kHz mono S16.
pub fn pcm_caps() -> gst::Caps {
    gst_audio::AudioCapsBuilder::new_interleaved()
        .format(gst_audio::AUDIO_FORMAT_S16)
        .rate(8000)
        .channels(1)
        .build()
}
