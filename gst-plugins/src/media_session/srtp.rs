//! SDES-SRTP (RFC 3711 with keys from RFC 4568 `a=crypto`): the session
//! protects what it sends and unprotects what it receives, RTP and RTCP
//! alike, so everything above it sees plain packets.

use std::sync::Mutex;

use bridge_protocol::sdes::{CryptoSuite, SrtpKey};
use webrtc_srtp::context::Context;
use webrtc_srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use webrtc_srtp::protection_profile::ProtectionProfile;

use super::rtcp;

/// Packets within this many of the newest are checked against replay.
const REPLAY_WINDOW: usize = 128;

pub struct Protection {
    send_key: SrtpKey,
    receive_key: SrtpKey,
    send: Mutex<Context>,
    receive: Mutex<Context>,
}

impl Protection {
    pub fn new(send_key: SrtpKey, receive_key: SrtpKey) -> Result<Self, String> {
        let send = context(&send_key, false)?;
        let receive = context(&receive_key, true)?;
        Ok(Self {
            send_key,
            receive_key,
            send: Mutex::new(send),
            receive: Mutex::new(receive),
        })
    }

    /// Whether these are the keys in use (a re-INVITE often repeats them;
    /// keeping the contexts keeps their rollover counters).
    pub fn has_keys(&self, send_key: &SrtpKey, receive_key: &SrtpKey) -> bool {
        self.send_key == *send_key && self.receive_key == *receive_key
    }

    pub fn protect_rtp(&self, packet: &[u8]) -> Result<Vec<u8>, String> {
        let mut context = self.send.lock().unwrap();
        context
            .encrypt_rtp(packet)
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }

    pub fn protect_rtcp(&self, packet: &[u8]) -> Result<Vec<u8>, String> {
        let mut context = self.send.lock().unwrap();
        context
            .encrypt_rtcp(packet)
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }

    /// Authenticates and decrypts one received datagram, RTP or RTCP.
    pub fn unprotect(&self, datagram: &[u8]) -> Result<Vec<u8>, String> {
        let mut context = self.receive.lock().unwrap();
        let plain = if rtcp::looks_like_rtcp(datagram) {
            context.decrypt_rtcp(datagram)
        } else {
            context.decrypt_rtp(datagram)
        };
        plain.map(|b| b.to_vec()).map_err(|e| e.to_string())
    }
}

fn context(key: &SrtpKey, replay_protection: bool) -> Result<Context, String> {
    let profile = match key.suite {
        CryptoSuite::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
        CryptoSuite::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
    };
    let (srtp_options, srtcp_options) = if replay_protection {
        (
            Some(srtp_replay_protection(REPLAY_WINDOW)),
            Some(srtcp_replay_protection(REPLAY_WINDOW)),
        )
    } else {
        (None, None)
    };
    Context::new(key.key(), key.salt(), profile, srtp_options, srtcp_options)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(seq: u16) -> Vec<u8> {
        let mut packet = vec![0x80, 0, 0, 0, 0, 0, 0, 160, 0x12, 0x34, 0x56, 0x78];
        packet[2..4].copy_from_slice(&seq.to_be_bytes());
        packet.extend([0xd5; 160]);
        packet
    }

    #[test]
    fn both_ends_agree_and_tampering_is_caught() {
        for suite in [
            CryptoSuite::AesCm128HmacSha1_80,
            CryptoSuite::AesCm128HmacSha1_32,
        ] {
            let a_to_b = SrtpKey::generate(suite);
            let b_to_a = SrtpKey::generate(suite);
            let a = Protection::new(a_to_b.clone(), b_to_a.clone()).unwrap();
            let b = Protection::new(b_to_a, a_to_b).unwrap();
            let sent = a.protect_rtp(&rtp(1)).unwrap();
            assert_ne!(&sent[12..172], &rtp(1)[12..]);
            assert_eq!(b.unprotect(&sent).unwrap(), rtp(1));
            // The same packet again is a replay.
            assert!(b.unprotect(&sent).is_err());

            let mut tampered = a.protect_rtp(&rtp(2)).unwrap();
            tampered[20] ^= 1;
            assert!(b.unprotect(&tampered).is_err());

            let report = rtcp::build_bye(0x1234_5678, "x@y");
            let sent = b.protect_rtcp(&report).unwrap();
            assert_eq!(a.unprotect(&sent).unwrap(), report);
        }
    }
}
