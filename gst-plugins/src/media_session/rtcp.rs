//! RTCP for the SIP media session: compound SR/RR + SDES reports, BYE, and
//! reading the peer's reports (RTT from LSR/DLSR, RFC 3550 §6.4.1).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rtcp_types::{
    Bye, Compound, CompoundBuilder, Fir, Packet, PayloadFeedback, Pli, ReceiverReport, ReportBlock,
    RtcpPacketWriter, RtcpPacketWriterExt, Sdes, SdesChunk, SdesItem, SenderReport,
};

const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// Wall-clock time as a 64-bit NTP timestamp.
pub fn ntp_now() -> u64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_unix.as_secs() + NTP_UNIX_OFFSET;
    let fraction = (u64::from(since_unix.subsec_nanos()) << 32) / 1_000_000_000;
    (seconds << 32) | fraction
}

/// The middle 32 bits of an NTP timestamp, the unit of LSR and DLSR.
pub fn ntp_middle(ntp: u64) -> u32 {
    (ntp >> 16) as u32
}

/// A duration in the 1/65536 s unit of DLSR.
pub fn to_ntp_short(duration: Duration) -> u32 {
    (duration.as_secs_f64() * 65536.0).min(f64::from(u32::MAX)) as u32
}

/// What we sent since the session began, for a Sender Report.
#[derive(Debug, Clone, Copy)]
pub struct SenderInfo {
    pub ntp_timestamp: u64,
    pub rtp_timestamp: u32,
    pub packets: u32,
    pub octets: u32,
}

/// One report block about a source we receive.
#[derive(Debug, Clone, Copy)]
pub struct ReportInfo {
    pub ssrc: u32,
    pub fraction_lost: u8,
    pub cumulative_lost: i64,
    pub extended_max_seq: u32,
    pub jitter: u32,
    pub last_sr: u32,
    pub delay_since_last_sr: u32,
}

/// Builds a compound report: SR when we sent media, RR otherwise; then SDES CNAME.
pub fn build_report(
    ssrc: u32,
    cname: &str,
    sender: Option<SenderInfo>,
    report: Option<ReportInfo>,
) -> Vec<u8> {
    let block = report.map(|r| {
        // Cumulative loss is a signed 24-bit field.
        let lost = r.cumulative_lost.clamp(-0x80_0000, 0x7f_ffff) as i32 as u32 & 0xff_ffff;
        ReportBlock::builder(r.ssrc)
            .fraction_lost(r.fraction_lost)
            .cumulative_lost(lost)
            .extended_sequence_number(r.extended_max_seq)
            .interarrival_jitter(r.jitter)
            .last_sender_report_timestamp(r.last_sr)
            .delay_since_last_sender_report_timestamp(r.delay_since_last_sr)
    });
    let sdes =
        Sdes::builder().add_chunk(SdesChunk::builder(ssrc).add_item(SdesItem::builder(1, cname)));
    let compound = match sender {
        Some(s) => {
            let mut sr = SenderReport::builder(ssrc)
                .ntp_timestamp(s.ntp_timestamp)
                .rtp_timestamp(s.rtp_timestamp)
                .packet_count(s.packets)
                .octet_count(s.octets);
            if let Some(b) = block {
                sr = sr.add_report_block(b);
            }
            CompoundBuilder::default().add_packet(sr)
        }
        None => {
            let mut rr = ReceiverReport::builder(ssrc);
            if let Some(b) = block {
                rr = rr.add_report_block(b);
            }
            CompoundBuilder::default().add_packet(rr)
        }
    }
    .add_packet(sdes);
    write(&compound)
}

/// Builds RR + BYE, sent when the local side leaves (RFC 3550 §6.6).
pub fn build_bye(ssrc: u32, cname: &str) -> Vec<u8> {
    let compound = CompoundBuilder::default()
        .add_packet(ReceiverReport::builder(ssrc))
        .add_packet(
            Sdes::builder()
                .add_chunk(SdesChunk::builder(ssrc).add_item(SdesItem::builder(1, cname))),
        )
        .add_packet(Bye::builder().add_source(ssrc));
    write(&compound)
}

/// Builds RR + SDES + PLI + FIR asking the sender of `media_ssrc` for a key
/// frame: phones answer one or the other (RFC 4585 §6.3.1, RFC 5104 §4.3.1).
/// `fir_sequence` must change with every new request.
pub fn build_key_frame_request(
    ssrc: u32,
    cname: &str,
    media_ssrc: u32,
    fir_sequence: u8,
) -> Vec<u8> {
    let compound = CompoundBuilder::default()
        .add_packet(ReceiverReport::builder(ssrc))
        .add_packet(
            Sdes::builder()
                .add_chunk(SdesChunk::builder(ssrc).add_item(SdesItem::builder(1, cname))),
        )
        .add_packet(
            PayloadFeedback::builder_owned(Pli::builder())
                .sender_ssrc(ssrc)
                .media_ssrc(media_ssrc),
        )
        .add_packet(
            PayloadFeedback::builder_owned(Fir::builder().add_ssrc(media_ssrc, fir_sequence))
                .sender_ssrc(ssrc),
        );
    write(&compound)
}

fn write(packet: &impl RtcpPacketWriter) -> Vec<u8> {
    let size = packet
        .calculate_size()
        .expect("reports are built from valid fields");
    let mut buffer = vec![0; size];
    packet
        .write_into(&mut buffer)
        .expect("buffer sized by calculate_size");
    buffer
}

/// What a received compound packet told us.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Incoming {
    /// (sender SSRC, middle 32 bits of its NTP timestamp) of a Sender Report.
    pub sender_report: Option<(u32, u32)>,
    /// Report blocks about `our_ssrc`: (LSR, DLSR, fraction lost, cumulative lost, jitter).
    pub report_about_us: Option<ReportAboutUs>,
    /// SSRCs that said BYE.
    pub bye: Vec<u32>,
    /// The peer lost the picture: a PLI or FIR about `our_ssrc`.
    pub key_frame_requested: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportAboutUs {
    pub last_sr: u32,
    pub delay_since_last_sr: u32,
    pub fraction_lost: u8,
    pub cumulative_lost: i64,
    pub jitter: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid RTCP: {0}")]
pub struct InvalidRtcp(String);

/// Parses a compound packet, keeping what matters for `our_ssrc`.
pub fn parse(data: &[u8], our_ssrc: u32) -> Result<Incoming, InvalidRtcp> {
    let compound = Compound::parse(data).map_err(|e| InvalidRtcp(e.to_string()))?;
    let mut incoming = Incoming::default();
    for packet in compound {
        let packet = packet.map_err(|e| InvalidRtcp(e.to_string()))?;
        let blocks: Vec<_> = match &packet {
            Packet::Sr(sr) => {
                incoming.sender_report = Some((sr.ssrc(), ntp_middle(sr.ntp_timestamp())));
                sr.report_blocks().collect()
            }
            Packet::Rr(rr) => rr.report_blocks().collect(),
            Packet::Bye(bye) => {
                incoming.bye.extend(bye.ssrcs());
                Vec::new()
            }
            Packet::PayloadFeedback(feedback) => {
                // Some phones leave the media SSRC of a PLI at 0.
                let pli = feedback.parse_fci::<Pli>().is_ok()
                    && [0, our_ssrc].contains(&feedback.media_ssrc());
                let fir = feedback
                    .parse_fci::<Fir>()
                    .is_ok_and(|fir| fir.entries().any(|entry| entry.ssrc() == our_ssrc));
                incoming.key_frame_requested |= pli || fir;
                Vec::new()
            }
            _ => Vec::new(),
        };
        if let Some(block) = blocks.iter().find(|b| b.ssrc() == our_ssrc) {
            let raw = block.cumulative_lost();
            // Sign-extend the 24-bit field.
            let cumulative_lost = i64::from(((raw << 8) as i32) >> 8);
            incoming.report_about_us = Some(ReportAboutUs {
                last_sr: block.last_sender_report_timestamp(),
                delay_since_last_sr: block.delay_since_last_sender_report_timestamp(),
                fraction_lost: block.fraction_lost(),
                cumulative_lost,
                jitter: block.interarrival_jitter(),
            });
        }
    }
    Ok(incoming)
}

/// Round-trip time from a report block (RFC 3550 §6.4.1), if the peer had
/// received one of our Sender Reports.
pub fn round_trip_time(report: &ReportAboutUs, arrival_ntp: u64) -> Option<Duration> {
    if report.last_sr == 0 {
        return None;
    }
    let rtt = ntp_middle(arrival_ntp)
        .wrapping_sub(report.last_sr)
        .wrapping_sub(report.delay_since_last_sr);
    // A negative result (clock trouble) wraps to a huge value: ignore it.
    (rtt < 0x8000_0000).then(|| Duration::from_secs_f64(f64::from(rtt) / 65536.0))
}

/// Whether a datagram is RTCP rather than RTP when both share one port (RFC 5761 §4).
pub fn looks_like_rtcp(data: &[u8]) -> bool {
    data.len() >= 8 && data[0] >> 6 == 2 && (192..=223).contains(&data[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_and_gives_rtt() {
        let sent_ntp = ntp_now();
        let sr = build_report(
            0x1111,
            "a@test",
            Some(SenderInfo {
                ntp_timestamp: sent_ntp,
                rtp_timestamp: 8000,
                packets: 50,
                octets: 8000,
            }),
            None,
        );
        let seen_by_peer = parse(&sr, 0x2222).unwrap();
        let (ssrc, lsr) = seen_by_peer.sender_report.unwrap();
        assert_eq!(ssrc, 0x1111);

        // The peer answers 100 ms later, having held the SR for 40 ms.
        let rr = build_report(
            0x2222,
            "b@test",
            None,
            Some(ReportInfo {
                ssrc: 0x1111,
                fraction_lost: 25,
                cumulative_lost: -3,
                extended_max_seq: 70000,
                jitter: 42,
                last_sr: lsr,
                delay_since_last_sr: to_ntp_short(Duration::from_millis(40)),
            }),
        );
        let report = parse(&rr, 0x1111).unwrap().report_about_us.unwrap();
        assert_eq!(report.cumulative_lost, -3);
        assert_eq!(report.jitter, 42);
        let arrival = sent_ntp + ((100u64 << 32) / 1000);
        let rtt = round_trip_time(&report, arrival).unwrap();
        assert!((rtt.as_secs_f64() - 0.060).abs() < 0.001, "{rtt:?}");
    }

    #[test]
    fn bye_is_recognised() {
        let bye = build_bye(7, "x");
        assert!(looks_like_rtcp(&bye));
        assert_eq!(parse(&bye, 1).unwrap().bye, [7]);
    }

    #[test]
    fn a_key_frame_request_is_recognised_by_the_sender_it_names() {
        let request = build_key_frame_request(1, "x", 0xabcd, 3);
        assert!(looks_like_rtcp(&request));
        assert!(parse(&request, 0xabcd).unwrap().key_frame_requested);
        assert!(!parse(&request, 0x1234).unwrap().key_frame_requested);
        assert!(
            !parse(&build_bye(1, "x"), 0xabcd)
                .unwrap()
                .key_frame_requested
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse(&[0x80, 200, 0, 50, 1, 2], 1).is_err());
        assert!(parse(&[], 1).is_err());
    }
}
