//! The RTP timeline a stream goes out to the app on. What comes in may
//! change source mid-call: a transfer or a pickup moves the call to another
//! phone, a PBX re-bridges it, a codec switch starts a new payloader, each
//! with an SSRC and a random timestamp base of its own. Passed on as they
//! are, the app's receiver (one SSRC throughout) sees the timestamps jump:
//! a browser throws away what seems up to seconds old, or waits for what
//! seems ahead, and the user hears a gap. Here a new source continues the
//! timeline where the last one left off, by the time between their packets.
//! Within a source, timestamps pass as they are (unwrapped to 64 bits).

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
    /// `timestamp`, which arrived at `arrival`.
    pub fn place(&mut self, ssrc: u32, timestamp: u32, arrival: Instant) -> u64 {
        let time = match &mut self.source {
            Some(source) if source.ssrc == ssrc => {
                let forward = timestamp.wrapping_sub(source.last_timestamp) < u32::MAX / 2;
                let wraps = match (forward, timestamp < source.last_timestamp) {
                    (true, true) => source.wraps + 1,
                    // Late, from before the last wrap.
                    (false, false) => source.wraps.saturating_sub(1),
                    _ => source.wraps,
                };
                if forward {
                    source.last_timestamp = timestamp;
                    source.wraps = wraps;
                }
                ((wraps << 32) | u64::from(timestamp)).wrapping_add(source.offset)
            }
            _ => {
                // The first source keeps its own timestamps; a later one
                // goes on from the latest packet by the time since it came.
                let time = self.latest.map_or(u64::from(timestamp), |(time, at)| {
                    let elapsed = arrival.saturating_duration_since(at);
                    let ticks = elapsed.as_nanos() * u128::from(self.clock_rate) / 1_000_000_000;
                    time + u64::try_from(ticks).unwrap_or(u64::MAX / 4).max(1)
                });
                self.source = Some(Source {
                    ssrc,
                    last_timestamp: timestamp,
                    wraps: 0,
                    offset: time.wrapping_sub(u64::from(timestamp)),
                });
                time
            }
        };
        if self.latest.is_none_or(|(latest, _)| time > latest) {
            self.latest = Some((time, arrival));
        }
        time
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
            timeline.place(7, u32::MAX - 959, at),
            u64::from(u32::MAX - 959)
        );
        assert_eq!(timeline.place(7, 0, at), 1 << 32);
        // Late, from before the wrap.
        assert_eq!(
            timeline.place(7, u32::MAX - 1919, at),
            u64::from(u32::MAX - 1919)
        );
        assert_eq!(timeline.place(7, 960, at), (1 << 32) + 960);
    }

    #[test]
    fn a_new_source_goes_on_by_the_time_between_the_packets() {
        let mut timeline = Timeline::new(48_000);
        let at = Instant::now();
        assert_eq!(timeline.place(1, 1_000_000, at), 1_000_000);
        assert_eq!(
            timeline.place(1, 1_000_960, at + Duration::from_millis(20)),
            1_000_960
        );
        // Another phone, 40 ms later, with a timestamp base far behind.
        let moved = at + Duration::from_millis(60);
        assert_eq!(timeline.place(2, 5, moved), 1_000_960 + 1_920);
        assert_eq!(
            timeline.place(2, 965, moved + Duration::from_millis(20)),
            1_000_960 + 1_920 + 960
        );
        // And back to the first, far ahead: it goes on from the latest.
        assert_eq!(
            timeline.place(1, 3_000_000_000, moved + Duration::from_millis(40)),
            1_000_960 + 1_920 + 1_920
        );
    }

    #[test]
    fn a_new_source_at_once_still_moves_the_time_on() {
        let mut timeline = Timeline::new(8_000);
        let at = Instant::now();
        assert_eq!(timeline.place(1, 160, at), 160);
        assert_eq!(timeline.place(2, 9_999, at), 161);
    }
}
