//! The RTP timeline a stream goes out to the app on. What comes in may
//! change source mid-call: a transfer or a pickup moves the call to another
//! phone, a PBX re-bridges it, a codec switch starts a new payloader, each
//! with an SSRC and a random timestamp base of its own. Passed on as they
//! are, the app's receiver (one SSRC throughout) sees the timestamps jump:
//! a browser throws away what seems up to seconds old, or waits for what
//! seems ahead, and the user hears a gap. Here a new source continues the
//! timeline where the last one left off, by the time between their packets,
//! and so does a source that restarts its timestamps under its SSRC (see
//! [`Timeline::place`]). Otherwise timestamps pass as they are (unwrapped to
//! 64 bits).

use std::time::Instant;

pub struct Timeline {
    clock_rate: u32,
    source: Option<Source>,
    /// The latest time given out, and when its packet arrived.
    latest: Option<(u64, Instant)>,
}

struct Source {
    ssrc: u32,
    last_timestamp: u32,
    wraps: u64,
    /// Added to the source's unwrapped timestamps.
    offset: u64,
}

impl Timeline {
    pub fn new(clock_rate: u32) -> Timeline {
        Timeline {
            clock_rate: clock_rate.max(1),
            source: None,
            latest: None,
        }
    }

    /// The time on the outgoing timeline of a packet of `ssrc` with
    /// `timestamp` and `marker`, which arrived at `arrival`.
    pub fn place(&mut self, ssrc: u32, timestamp: u32, marker: bool, arrival: Instant) -> u64 {
        let continued = match &mut self.source {
            Some(source) if source.ssrc == ssrc => Some(source.time_of(timestamp)),
            _ => None,
        };
        // A source that restarts its timestamps under the same SSRC marks
        // the packet where they jump (as Asterisk does with its SSRC kept
        // constant); the first packet of a talkspurt, marked too, keeps to
        // the time its packets take to come.
        let restarted = |time: u64| {
            marker
                && self.expected(arrival).is_some_and(|expected| {
                    time.abs_diff(expected) > u64::from(self.clock_rate / 2)
                })
        };
        let time = match continued {
            Some(time) if !restarted(time) => time,
            _ => self.start_source(ssrc, timestamp, arrival),
        };
        if self.latest.is_none_or(|(latest, _)| time > latest) {
            self.latest = Some((time, arrival));
        }
        time
    }

    /// Where a packet arriving at `arrival` would be on the timeline, going
    /// on from the latest packet by the time since it came.
    fn expected(&self, arrival: Instant) -> Option<u64> {
        self.latest.map(|(time, at)| {
            let elapsed = arrival.saturating_duration_since(at);
            let ticks = elapsed.as_nanos() * u128::from(self.clock_rate) / 1_000_000_000;
            time + u64::try_from(ticks).unwrap_or(u64::MAX / 4)
        })
    }

    /// The first source keeps its own timestamps; a later one (or one that
    /// restarted) goes on from the latest packet, at least a tick after it.
    fn start_source(&mut self, ssrc: u32, timestamp: u32, arrival: Instant) -> u64 {
        let time = match (self.expected(arrival), self.latest) {
            (Some(expected), Some((latest, _))) => expected.max(latest + 1),
            _ => u64::from(timestamp),
        };
        self.source = Some(Source {
            ssrc,
            last_timestamp: timestamp,
            wraps: 0,
            offset: time.wrapping_sub(u64::from(timestamp)),
        });
        time
    }
}

impl Source {
    /// A timestamp of this source, unwrapped to 64 bits, on the timeline.
    fn time_of(&mut self, timestamp: u32) -> u64 {
        let forward = timestamp.wrapping_sub(self.last_timestamp) < u32::MAX / 2;
        let wraps = match (forward, timestamp < self.last_timestamp) {
            (true, true) => self.wraps + 1,
            // Late, from before the last wrap.
            (false, false) => self.wraps.saturating_sub(1),
            _ => self.wraps,
        };
        if forward {
            self.last_timestamp = timestamp;
            self.wraps = wraps;
        }
        ((wraps << 32) | u64::from(timestamp)).wrapping_add(self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_source_keeps_its_timestamps_across_a_wrap() {
        let mut timeline = Timeline::new(48_000);
        let at = Instant::now();
        assert_eq!(
            timeline.place(7, u32::MAX - 959, false, at),
            u64::from(u32::MAX - 959)
        );
        assert_eq!(timeline.place(7, 0, false, at), 1 << 32);
        // Late, from before the wrap.
        assert_eq!(
            timeline.place(7, u32::MAX - 1919, false, at),
            u64::from(u32::MAX - 1919)
        );
        assert_eq!(timeline.place(7, 960, false, at), (1 << 32) + 960);
    }

    #[test]
    fn a_new_source_goes_on_by_the_time_between_the_packets() {
        let mut timeline = Timeline::new(48_000);
        let at = Instant::now();
        assert_eq!(timeline.place(1, 1_000_000, false, at), 1_000_000);
        assert_eq!(
            timeline.place(1, 1_000_960, false, at + Duration::from_millis(20)),
            1_000_960
        );
        // Another phone, 40 ms later, with a timestamp base far behind.
        let moved = at + Duration::from_millis(60);
        assert_eq!(timeline.place(2, 5, true, moved), 1_000_960 + 1_920);
        assert_eq!(
            timeline.place(2, 965, false, moved + Duration::from_millis(20)),
            1_000_960 + 1_920 + 960
        );
        // And back to the first, far ahead: it goes on from the latest.
        assert_eq!(
            timeline.place(1, 3_000_000_000, false, moved + Duration::from_millis(40)),
            1_000_960 + 1_920 + 1_920
        );
    }

    #[test]
    fn a_new_source_at_once_still_moves_the_time_on() {
        let mut timeline = Timeline::new(8_000);
        let at = Instant::now();
        assert_eq!(timeline.place(1, 160, false, at), 160);
        assert_eq!(timeline.place(2, 9_999, false, at), 161);
    }

    #[test]
    fn a_marked_jump_restarts_the_source_and_a_talkspurt_does_not() {
        let mut timeline = Timeline::new(48_000);
        let at = Instant::now();
        assert_eq!(timeline.place(1, 48_000, false, at), 48_000);
        // A talkspurt after 1 s of silence: marked, and on time.
        let spoken = at + Duration::from_secs(1);
        assert_eq!(timeline.place(1, 96_000, true, spoken), 96_000);
        // A jump of 3 s back, marked: the stream goes on from here.
        let restarted = spoken + Duration::from_millis(20);
        assert_eq!(timeline.place(1, 0, true, restarted), 96_960);
        assert_eq!(
            timeline.place(1, 960, false, restarted + Duration::from_millis(20)),
            97_920
        );
        // Unmarked, a jump is taken as it is (as a stall's late packets are).
        assert_eq!(
            timeline.place(1, 960 + 144_000, false, restarted),
            97_920 + 144_000
        );
    }
}
