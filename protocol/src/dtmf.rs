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

#[cfg(test)]
mod tests {
    use super::*;
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
        fn arbitrary_info_bodies_never_panic(body in ".{0,64}") {
            let _ = info_digit("application/dtmf-relay", &body);
            let _ = info_digit("application/dtmf", &body);
        }
    }
}
