//! DTMF as phones send it: RFC 4733 telephone-event payloads and SIP INFO
//! bodies (`application/dtmf-relay`, `application/dtmf`).

/// The digit an RFC 4733 event code stands for (0–9, *, #, A–D).
pub fn event_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => Some(char::from(b'0' + event)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + event - 12)),
        _ => None,
    }
}

/// The event code of a digit, for sending.
pub fn digit_event(digit: char) -> Option<u8> {
    match digit.to_ascii_uppercase() {
        d @ '0'..='9' => Some(d as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        d @ 'A'..='D' => Some(d as u8 - b'A' + 12),
        _ => None,
    }
}

/// One RFC 4733 event payload (§2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    pub event: u8,
    pub end: bool,
    pub volume: u8,
    /// In RTP clock units.
    pub duration: u16,
}

impl TelephoneEvent {
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let [event, flags, d0, d1, ..] = *payload else {
            return None;
        };
        Some(Self {
            event,
            end: flags & 0x80 != 0,
            volume: flags & 0x3f,
            duration: u16::from_be_bytes([d0, d1]),
        })
    }

    pub fn to_bytes(self) -> [u8; 4] {
        let [d0, d1] = self.duration.to_be_bytes();
        [
            self.event,
            (u8::from(self.end) << 7) | (self.volume & 0x3f),
            d0,
            d1,
        ]
    }
}

/// Turns the stream of event packets into digits: one digit per event,
/// reported at its first end packet (senders repeat the end packet three
/// times, all with the same RTP timestamp).
#[derive(Debug, Default)]
pub struct EventDetector {
    last_reported: Option<u32>,
}

impl EventDetector {
    /// Feeds one packet's RTP timestamp and payload; returns the digit and
    /// its duration in clock units when an event ends.
    pub fn push(&mut self, rtp_timestamp: u32, payload: &[u8]) -> Option<(char, u16)> {
        let event = TelephoneEvent::parse(payload)?;
        if !event.end || self.last_reported == Some(rtp_timestamp) {
            return None;
        }
        self.last_reported = Some(rtp_timestamp);
        event_digit(event.event).map(|d| (d, event.duration))
    }
}

/// How many times the end of an event is sent (RFC 4733 §2.5.1.4).
const END_REPEATS: u8 = 3;

/// One packet of an outgoing event, sent in place of an audio packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutgoingEvent {
    /// The RTP timestamp of the event's start (the same in all its packets).
    pub timestamp: u32,
    /// Set on the event's first packet.
    pub marker: bool,
    pub payload: [u8; 4],
}

#[derive(Debug, Clone, Copy)]
struct ActiveEvent {
    event: u8,
    /// Wanted length in clock units.
    length: u32,
    start: u32,
    ends_sent: u8,
    first: bool,
}

/// Sends digits as RFC 4733 events inside an audio stream: while an event
/// lasts, each audio packet is replaced by an event packet with the same
/// sequence number, so the stream needs no renumbering.
#[derive(Debug, Default)]
pub struct EventSender {
    queue: std::collections::VecDeque<(u8, u32)>,
    active: Option<ActiveEvent>,
    last_timestamp: Option<u32>,
    /// Clock units per audio packet, learnt from the stream.
    step: u32,
}

/// At most this many digits wait; a flood of requests is refused.
const MAX_QUEUED: usize = 32;

impl EventSender {
    /// Queues `digit` for `length` clock units (clamped to the 16-bit field);
    /// `false` for a character that is no DTMF digit or a full queue.
    pub fn queue(&mut self, digit: char, length: u32) -> bool {
        let Some(event) = digit_event(digit) else {
            return false;
        };
        if self.queue.len() >= MAX_QUEUED {
            return false;
        }
        self.queue
            .push_back((event, length.clamp(1, u32::from(u16::MAX))));
        true
    }

    /// Whether digits are waiting or being sent.
    pub fn busy(&self) -> bool {
        self.active.is_some() || !self.queue.is_empty()
    }

    /// Called for each outgoing audio packet with its RTP timestamp: the
    /// event packet to send instead, if a digit is being sent.
    pub fn replace(&mut self, timestamp: u32) -> Option<OutgoingEvent> {
        if let Some(last) = self.last_timestamp.replace(timestamp) {
            let step = timestamp.wrapping_sub(last);
            if step > 0 && step < 8 * 48_000 {
                self.step = step;
            }
        }
        if self.active.is_none() {
            let (event, length) = self.queue.pop_front()?;
            self.active = Some(ActiveEvent {
                event,
                length,
                start: timestamp,
                ends_sent: 0,
                first: true,
            });
        }
        let active = self.active.as_mut()?;
        // Before the stream showed its packet size, assume 20 ms at 8 kHz.
        let step = if self.step == 0 { 160 } else { self.step };
        let elapsed = timestamp.wrapping_sub(active.start) + step;
        let end = active.ends_sent > 0 || elapsed >= active.length;
        let duration = if end { active.length } else { elapsed };
        let packet = OutgoingEvent {
            timestamp: active.start,
            marker: std::mem::take(&mut active.first),
            payload: TelephoneEvent {
                event: active.event,
                end,
                volume: 10,
                duration: duration.min(u32::from(u16::MAX)) as u16,
            }
            .to_bytes(),
        };
        if end {
            active.ends_sent += 1;
            if active.ends_sent == END_REPEATS {
                self.active = None;
            }
        }
        Some(packet)
    }
}

/// Reads the digit of a SIP INFO body: `Signal=5` lines (dtmf-relay) or a
/// bare digit (application/dtmf).
pub fn info_digit(content_type: &str, body: &str) -> Option<char> {
    let content_type = content_type.trim().to_ascii_lowercase();
    let value = if content_type.starts_with("application/dtmf-relay") {
        body.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            key.trim().eq_ignore_ascii_case("signal").then_some(value)
        })?
    } else if content_type.starts_with("application/dtmf") {
        body
    } else {
        return None;
    };
    let mut chars = value.trim().chars();
    let digit = chars.next()?;
    // `Signal=10`/`11` is how some phones spell * and #.
    let digit = match (digit, chars.as_str()) {
        ('1', "0") => '*',
        ('1', "1") => '#',
        (d, "") => d,
        _ => return None,
    };
    digit_event(digit).map(|_| digit.to_ascii_uppercase())
}

/// The SIP INFO body (`application/dtmf-relay`) carrying a digit, for a
/// phone that takes DTMF only that way.
pub fn relay_body(digit: char, duration_ms: u32) -> String {
    format!("Signal={digit}\r\nDuration={duration_ms}\r\n")
}

/// The payload types and clock rates a description gives
/// `telephone-event` (browsers' keypads: Chromium's at 48 kHz and 8 kHz,
/// Firefox's at 8 kHz only).
pub fn event_payload_types(sdp: &str) -> Vec<(u8, u32)> {
    sdp.lines()
        .filter_map(|line| {
            let (pt, codec) = line.trim().strip_prefix("a=rtpmap:")?.split_once(' ')?;
            let mut parts = codec.split('/');
            if !parts.next()?.eq_ignore_ascii_case("telephone-event") {
                return None;
            }
            Some((pt.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect()
}

/// `sdp` with `telephone-event` at each of `events` (payload type, clock
/// rate) added to its first audio section (the format on its `m=` line,
/// its `rtpmap` and the digits' `fmtp`): for a WebRTC stack that does not
/// announce it itself, or only at some rates. An event is left out when
/// the description has telephone events at its rate already, or when
/// another format of any section takes its payload type (bundled sections
/// share one numbering).
pub fn with_events(sdp: &str, events: &[(u8, u32)]) -> String {
    let announced: Vec<u32> = event_payload_types(sdp)
        .into_iter()
        .map(|(_, rate)| rate)
        .collect();
    let taken = |pt: u8| {
        sdp.lines().any(|line| {
            line.starts_with("m=")
                && line
                    .trim_end()
                    .split(' ')
                    .skip(3)
                    .any(|f| f == pt.to_string())
        })
    };
    let events: Vec<&(u8, u32)> = events
        .iter()
        .filter(|(pt, rate)| !taken(*pt) && !announced.contains(rate))
        .collect();
    if events.is_empty() {
        return sdp.to_owned();
    }
    let newline = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out = String::with_capacity(sdp.len() + 80 * events.len());
    let mut in_audio = false;
    let mut added = false;
    let mut lines = sdp.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        let text = line.trim_end_matches(['\r', '\n']);
        if text.starts_with("m=") {
            in_audio = !added && text.starts_with("m=audio ");
            if in_audio {
                out.push_str(text);
                for (pt, _) in &events {
                    out.push_str(&format!(" {pt}"));
                }
                out.push_str(&line[text.len()..]);
                continue;
            }
        }
        out.push_str(line);
        let section_ends = lines.peek().is_none_or(|next| next.starts_with("m="));
        if in_audio && section_ends {
            if !line.ends_with('\n') {
                out.push_str(newline);
            }
            for (pt, rate) in &events {
                out.push_str(&format!(
                    "a=rtpmap:{pt} telephone-event/{rate}{newline}a=fmtp:{pt} 0-15{newline}"
                ));
            }
            in_audio = false;
            added = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_digits_read_back() {
        for digit in ['0', '9', '*', '#', 'A', 'D'] {
            let body = relay_body(digit, 100);
            assert_eq!(info_digit("application/dtmf-relay", &body), Some(digit));
            assert!(body.contains("Duration=100\r\n"), "{body}");
        }
    }

    #[test]
    fn sent_events_replace_audio_packets_and_read_back_as_digits() {
        let mut sender = EventSender::default();
        assert!(!sender.queue('x', 800));
        assert!(sender.queue('5', 800));
        assert!(sender.queue('#', 400));
        let mut detector = EventDetector::default();
        let mut digits = Vec::new();
        let mut replaced = 0;
        let mut markers = 0;
        for packet in 0..40u32 {
            let timestamp = 1000 + packet * 160;
            if let Some(event) = sender.replace(timestamp) {
                replaced += 1;
                markers += usize::from(event.marker);
                digits.extend(detector.push(event.timestamp, &event.payload));
            }
        }
        // 100 ms = 5 packets, the last one the first of three ends; 50 ms = 3 + 2.
        assert_eq!(replaced, (4 + 3) + (2 + 3));
        assert_eq!(markers, 2);
        assert_eq!(digits, [('5', 800), ('#', 400)]);
        assert!(!sender.busy());
        assert_eq!(sender.replace(1000 + 40 * 160), None);
    }
    use proptest::prelude::*;

    #[test]
    fn digits_round_trip() {
        for digit in "0123456789*#ABCD".chars() {
            assert_eq!(event_digit(digit_event(digit).unwrap()), Some(digit));
        }
        assert_eq!(event_digit(16), None);
    }

    #[test]
    fn one_digit_per_event_despite_repeated_end_packets() {
        let mut detector = EventDetector::default();
        let start = TelephoneEvent {
            event: 5,
            end: false,
            volume: 10,
            duration: 160,
        };
        let end = TelephoneEvent {
            end: true,
            duration: 800,
            ..start
        };
        assert_eq!(detector.push(1000, &start.to_bytes()), None);
        assert_eq!(detector.push(1000, &end.to_bytes()), Some(('5', 800)));
        assert_eq!(detector.push(1000, &end.to_bytes()), None);
        assert_eq!(detector.push(1000, &end.to_bytes()), None);
        let hash = TelephoneEvent { event: 11, ..end };
        assert_eq!(detector.push(2000, &hash.to_bytes()), Some(('#', 800)));
    }

    #[test]
    fn info_bodies() {
        assert_eq!(
            info_digit("application/dtmf-relay", "Signal=5\r\nDuration=160\r\n"),
            Some('5')
        );
        assert_eq!(
            info_digit("Application/DTMF-Relay", "Signal= #\r\n"),
            Some('#')
        );
        assert_eq!(
            info_digit("application/dtmf-relay", "Signal=11\r\n"),
            Some('#')
        );
        assert_eq!(info_digit("application/dtmf", "9"), Some('9'));
        assert_eq!(info_digit("application/dtmf-relay", "Signal=X\r\n"), None);
        assert_eq!(info_digit("text/plain", "Signal=5"), None);
        assert_eq!(info_digit("application/dtmf-relay", "Duration=160"), None);
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(ts in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut detector = EventDetector::default();
            let _ = detector.push(ts, &payload);
        }

        #[test]
        fn arbitrary_descriptions_never_panic(sdp in "(m=audio [0-9 ]{0,8}|a=rtpmap:[0-9]{0,3} [a-zA-Z/0-9-]{0,24}|.{0,12})(\r?\n(m=video 9 x 110|a=rtpmap:1 telephone-event/48000|.{0,12}))*") {
            let _ = event_payload_types(&sdp);
            let _ = with_events(&sdp, &[(110, 48000), (126, 8000)]);
        }

        #[test]
        fn arbitrary_info_bodies_never_panic(body in ".{0,64}") {
            let _ = info_digit("application/dtmf-relay", &body);
            let _ = info_digit("application/dtmf", &body);
        }
    }

    const AUDIO_VIDEO: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:audio0\r\na=rtpmap:111 OPUS/48000/2\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:video0\r\na=rtpmap:96 VP8/90000\r\n";

    #[test]
    fn keypad_events_join_the_audio_section() {
        let with = with_events(AUDIO_VIDEO, &[(110, 48000), (126, 8000)]);
        assert!(
            with.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111 110 126\r\n"),
            "{with}"
        );
        let audio = &with[..with.find("m=video").unwrap()];
        assert!(
            audio.ends_with(
                "a=rtpmap:110 telephone-event/48000\r\na=fmtp:110 0-15\r\n\
                 a=rtpmap:126 telephone-event/8000\r\na=fmtp:126 0-15\r\n"
            ),
            "{with}"
        );
        assert!(with.ends_with(
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:video0\r\na=rtpmap:96 VP8/90000\r\n"
        ));
        assert_eq!(event_payload_types(&with), [(110, 48000), (126, 8000)]);
        // Once per rate is enough; a payload type already taken is left out.
        assert_eq!(with_events(&with, &[(101, 8000)]), with);
        let chromium_rate_only = with_events(AUDIO_VIDEO, &[(110, 48000)]);
        let both = with_events(&chromium_rate_only, &[(110, 48000), (126, 8000)]);
        assert!(
            both.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111 110 126\r\n"),
            "{both}"
        );
        assert_eq!(event_payload_types(&both), [(110, 48000), (126, 8000)]);
        assert_eq!(with_events(AUDIO_VIDEO, &[(111, 48000)]), AUDIO_VIDEO);
        assert!(
            with_events(AUDIO_VIDEO, &[(96, 48000), (101, 8000)])
                .contains("m=audio 9 UDP/TLS/RTP/SAVPF 111 101\r\n")
        );
        // An audio section at the end, without a final newline.
        let audio_only = "v=0\nm=audio 9 RTP/AVP 111\na=rtpmap:111 opus/48000/2";
        assert_eq!(
            with_events(audio_only, &[(101, 8000)]),
            "v=0\nm=audio 9 RTP/AVP 111 101\na=rtpmap:111 opus/48000/2\na=rtpmap:101 telephone-event/8000\na=fmtp:101 0-15\n"
        );
        let firefox = "m=audio 9 RTP/AVP 109 101\r\na=rtpmap:101 telephone-event/8000\r\n";
        assert_eq!(event_payload_types(firefox), [(101, 8000)]);
    }
}
