//! RFC 3550 receiver statistics for one remote source: extended sequence
//! numbers (A.1), loss (A.3), interarrival jitter (A.8), plus the duplicates
//! and reordering a gateway operator wants to see.

use std::time::Instant;

const MAX_DROPOUT: u16 = 3000;
const MAX_MISORDER: u16 = 100;
/// How many recent sequence numbers are remembered to recognise duplicates.
const SEEN_WINDOW: usize = 1024;

/// What the sequence-number check made of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Next in order, or after a gap (loss).
    InOrder,
    /// Older than the highest seen and not seen before.
    Reordered,
    /// Seen already: drop it.
    Duplicate,
    /// A jump too large to be loss (RFC 3550 A.1): dropped until the source
    /// confirms the new sequence with a second packet.
    Resync,
}

#[derive(Debug)]
pub struct ReceiverStats {
    pub ssrc: u32,
    base_seq: u32,
    max_seq: u16,
    /// Until the first packet, `max_seq` is only the expected one.
    awaiting_first: bool,
    cycles: u32,
    bad_seq: Option<u16>,
    /// Packets received once (duplicates are not counted).
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    lost_before_restart: i64,
    expected_prior: u64,
    received_prior: u64,
    /// Interarrival jitter in RTP timestamp units (kept as f64, reported as u32).
    jitter: f64,
    last_transit: Option<f64>,
    clock_rate: u32,
    epoch: Instant,
    seen: Box<[u32; SEEN_WINDOW]>,
}

impl ReceiverStats {
    pub fn new(ssrc: u32, seq: u16, clock_rate: u32) -> Self {
        let mut stats = ReceiverStats {
            ssrc,
            base_seq: 0,
            max_seq: 0,
            awaiting_first: true,
            cycles: 0,
            bad_seq: None,
            received: 0,
            duplicates: 0,
            reordered: 0,
            lost_before_restart: 0,
            expected_prior: 0,
            received_prior: 0,
            jitter: 0.0,
            last_transit: None,
            clock_rate,
            epoch: Instant::now(),
            seen: Box::new([u32::MAX; SEEN_WINDOW]),
        };
        stats.restart(seq);
        stats
    }

    fn restart(&mut self, seq: u16) {
        self.base_seq = u32::from(seq);
        self.max_seq = seq;
        self.awaiting_first = true;
        self.cycles = 0;
        self.bad_seq = None;
        self.seen.fill(u32::MAX);
    }

    /// Records a packet that arrived at `arrival`, returning how it fits the sequence.
    pub fn record(
        &mut self,
        seq: u16,
        rtp_timestamp: u32,
        clock_rate: u32,
        arrival: Instant,
    ) -> Arrival {
        let delta = seq.wrapping_sub(self.max_seq);
        let extended = if self.awaiting_first {
            self.awaiting_first = false;
            self.max_seq = seq;
            u32::from(seq)
        } else if delta < MAX_DROPOUT {
            if seq < self.max_seq {
                self.cycles = self.cycles.wrapping_add(1 << 16);
            }
            self.max_seq = seq;
            self.cycles | u32::from(seq)
        } else if delta <= u16::MAX - MAX_MISORDER {
            // A very large jump: the source restarted, or this is garbage.
            if self.bad_seq == Some(seq) {
                // Confirmed: a new sequence. Loss seen so far stays in the total.
                self.lost_before_restart = self.lost();
                self.received = 0;
                self.expected_prior = 0;
                self.received_prior = 0;
                self.restart(seq);
                self.awaiting_first = false;
                u32::from(seq)
            } else {
                self.bad_seq = Some(seq.wrapping_add(1));
                return Arrival::Resync;
            }
        } else {
            // Misordered: it belongs to the current or the previous cycle.
            let cycles = if seq > self.max_seq {
                self.cycles.wrapping_sub(1 << 16)
            } else {
                self.cycles
            };
            cycles | u32::from(seq)
        };

        let slot = &mut self.seen[extended as usize % SEEN_WINDOW];
        if *slot == extended {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        *slot = extended;
        self.received += 1;

        if clock_rate != 0 {
            self.clock_rate = clock_rate;
        }
        self.update_jitter(rtp_timestamp, arrival);

        if extended == (self.cycles | u32::from(self.max_seq)) {
            Arrival::InOrder
        } else {
            self.reordered += 1;
            Arrival::Reordered
        }
    }

    fn update_jitter(&mut self, rtp_timestamp: u32, arrival: Instant) {
        if self.clock_rate == 0 {
            return;
        }
        let arrival_units =
            arrival.duration_since(self.epoch).as_secs_f64() * f64::from(self.clock_rate);
        let transit = arrival_units - f64::from(rtp_timestamp);
        if let Some(last) = self.last_transit {
            let mut d = (transit - last).abs();
            // Timestamps wrap at 2^32: a difference near that is a wrap, not jitter.
            if d > f64::from(u32::MAX) / 2.0 {
                d = (d - f64::from(u32::MAX) - 1.0).abs();
            }
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last_transit = Some(transit);
    }

    pub fn extended_max_seq(&self) -> u32 {
        self.cycles | u32::from(self.max_seq)
    }

    pub fn expected(&self) -> u64 {
        u64::from(
            self.extended_max_seq()
                .wrapping_sub(self.base_seq)
                .wrapping_add(1),
        )
    }

    /// Cumulative number of packets lost (RFC 3550 A.3); never negative since
    /// duplicates are not counted as received.
    pub fn lost(&self) -> i64 {
        self.lost_before_restart + self.expected() as i64 - self.received as i64
    }

    pub fn jitter_units(&self) -> u32 {
        self.jitter as u32
    }

    pub fn jitter_ms(&self) -> f64 {
        if self.clock_rate == 0 {
            0.0
        } else {
            self.jitter * 1000.0 / f64::from(self.clock_rate)
        }
    }

    /// Loss fraction since the previous report, in 1/256 (RFC 3550 A.3), and
    /// starts a new reporting interval.
    pub fn take_fraction_lost(&mut self) -> u8 {
        let expected = self.expected();
        let expected_interval = expected.saturating_sub(self.expected_prior);
        let received_interval = self.received.saturating_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = expected_interval.saturating_sub(received_interval);
        if expected_interval == 0 || lost_interval == 0 {
            0
        } else {
            ((lost_interval << 8) / expected_interval).min(255) as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn feed(stats: &mut ReceiverStats, seqs: &[u16]) -> Vec<Arrival> {
        let now = Instant::now();
        seqs.iter()
            .map(|s| stats.record(*s, u32::from(*s) * 160, 8000, now))
            .collect()
    }

    #[test]
    fn counts_loss_duplicates_and_reordering() {
        let mut stats = ReceiverStats::new(1, 100, 8000);
        let arrivals = feed(&mut stats, &[100, 101, 103, 102, 104, 104, 107]);
        assert_eq!(arrivals[3], Arrival::Reordered);
        assert_eq!(arrivals[5], Arrival::Duplicate);
        assert_eq!(stats.received, 6);
        assert_eq!(stats.duplicates, 1);
        assert_eq!(stats.reordered, 1);
        assert_eq!(stats.lost(), 2); // 105, 106
    }

    #[test]
    fn sequence_wrap_extends_the_counter() {
        let mut stats = ReceiverStats::new(1, 65534, 8000);
        feed(&mut stats, &[65534, 65535, 0, 1]);
        assert_eq!(stats.extended_max_seq(), (1 << 16) | 1);
        assert_eq!(stats.lost(), 0);
    }

    #[test]
    fn a_wild_jump_needs_confirmation() {
        let mut stats = ReceiverStats::new(1, 10, 8000);
        feed(&mut stats, &[10, 11]);
        assert_eq!(feed(&mut stats, &[40000]), [Arrival::Resync]);
        assert_eq!(feed(&mut stats, &[40001]), [Arrival::InOrder]);
        assert_eq!(stats.lost(), 0);
    }

    #[test]
    fn fraction_lost_covers_one_interval() {
        let mut stats = ReceiverStats::new(1, 0, 8000);
        feed(&mut stats, &[0, 1, 3]);
        assert_eq!(stats.take_fraction_lost(), 64); // 1 of 4
        feed(&mut stats, &[4, 5]);
        assert_eq!(stats.take_fraction_lost(), 0);
    }

    #[test]
    fn jitter_converges_on_alternating_delay() {
        let mut stats = ReceiverStats::new(1, 0, 8000);
        let start = Instant::now();
        for i in 0..400u16 {
            let delay = if i % 2 == 1 { 10 } else { 0 };
            let arrival = start + Duration::from_millis(u64::from(i) * 20 + delay);
            stats.record(i, u32::from(i) * 160, 8000, arrival);
        }
        assert!(
            (stats.jitter_ms() - 10.0).abs() < 0.5,
            "{}",
            stats.jitter_ms()
        );
    }
}
