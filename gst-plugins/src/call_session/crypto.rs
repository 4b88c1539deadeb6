//! The shared WebRTC stack's cryptography: OpenSSL for DTLS (one context
//! for all calls, `super::dtls`) and str0m's OpenSSL provider for deriving
//! SRTP keys (once per call), Rust's for the work done per packet. str0m's
//! OpenSSL provider sets a cipher up again for every packet (and builds a
//! key and a signer for every STUN message), and OpenSSL 3 looks
//! parameters up by name each time: in a profile of passed-through calls,
//! SRTP's AES-GCM took 6 % of the bridge's CPU and STUN's HMAC 3 %.

use std::sync::{Arc, LazyLock, OnceLock};

use super::dtls::SharedContextDtls;
use hmac::{Hmac, Mac};
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sha1::Sha1;
use str0m::config::CryptoProvider;
use str0m::crypto::{
    AeadAes128GcmCipher, AeadAes256GcmCipher, CryptoError, Sha1HmacProvider, SrtpProvider,
    SupportedAeadAes128Gcm, SupportedAeadAes256Gcm, SupportedAes128CmSha1_80,
};

/// What every call's peer connection uses.
pub(super) static CRYPTO: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    static STUN_HMAC: StunHmac = StunHmac;
    static SRTP: OnceLock<Srtp> = OnceLock::new();
    static DTLS: OnceLock<SharedContextDtls> = OnceLock::new();
    let openssl = str0m::crypto::from_feature_flags();
    Arc::new(CryptoProvider {
        srtp_provider: SRTP.get_or_init(|| Srtp {
            openssl: openssl.srtp_provider,
        }),
        sha1_hmac_provider: &STUN_HMAC,
        dtls_provider: DTLS.get_or_init(|| SharedContextDtls::new(openssl.dtls_provider)),
        ..openssl
    })
});

/// STUN's message integrity, on every ICE check and consent request and response.
#[derive(Debug)]
struct StunHmac;

impl Sha1HmacProvider for StunHmac {
    fn sha1_hmac(&self, key: &[u8], payloads: &[&[u8]]) -> [u8; 20] {
        let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes a key of any length");
        for payload in payloads {
            mac.update(payload);
        }
        mac.finalize().into_bytes().into()
    }
}

/// SRTP: the AES-GCM profiles in ring; AES-CM with HMAC-SHA1 and the key
/// derivation (once per call) in OpenSSL.
#[derive(Debug)]
struct Srtp {
    openssl: &'static dyn SrtpProvider,
}

impl SrtpProvider for Srtp {
    fn aes_128_cm_sha1_80(&self) -> &'static dyn SupportedAes128CmSha1_80 {
        self.openssl.aes_128_cm_sha1_80()
    }

    fn aead_aes_128_gcm(&self) -> &'static dyn SupportedAeadAes128Gcm {
        &Gcm
    }

    fn aead_aes_256_gcm(&self) -> &'static dyn SupportedAeadAes256Gcm {
        &Gcm
    }

    fn srtp_aes_128_ecb_round(&self, key: &[u8], input: &[u8], output: &mut [u8]) {
        self.openssl.srtp_aes_128_ecb_round(key, input, output)
    }

    fn srtp_aes_256_ecb_round(&self, key: &[u8], input: &[u8], output: &mut [u8]) {
        self.openssl.srtp_aes_256_ecb_round(key, input, output)
    }
}

/// Makes the AES-GCM ciphers of either key size.
#[derive(Debug)]
struct Gcm;

impl SupportedAeadAes128Gcm for Gcm {
    fn create_cipher(&self, key: [u8; 16], _encrypt: bool) -> Box<dyn AeadAes128GcmCipher> {
        Box::new(GcmCipher::new(UnboundKey::new(&AES_128_GCM, &key)))
    }
}

impl SupportedAeadAes256Gcm for Gcm {
    fn create_cipher(&self, key: [u8; 32], _encrypt: bool) -> Box<dyn AeadAes256GcmCipher> {
        Box::new(GcmCipher::new(UnboundKey::new(&AES_256_GCM, &key)))
    }
}

/// One direction's AES-GCM key (RFC 7714): the output is the cipher text
/// followed by the 16-byte tag.
struct GcmCipher(LessSafeKey);

const TAG_LEN: usize = 16;

impl std::fmt::Debug for GcmCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GcmCipher")
    }
}

impl GcmCipher {
    fn new(key: Result<UnboundKey, ring::error::Unspecified>) -> GcmCipher {
        // The key's length is the algorithm's by the types above.
        GcmCipher(LessSafeKey::new(key.expect("an AES key of its length")))
    }

    fn seal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(), CryptoError> {
        let length = input.len();
        if output.len() < length + TAG_LEN {
            return Err(CryptoError::Other("SRTP: no room for the tag".into()));
        }
        output[..length].copy_from_slice(input);
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*iv),
                Aad::from(aad),
                &mut output[..length],
            )
            .map_err(|_| CryptoError::Other("SRTP: AES-GCM sealing failed".into()))?;
        output[length..length + TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(())
    }

    fn open(
        &self,
        iv: &[u8; 12],
        aads: &[&[u8]],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, CryptoError> {
        let Some(length) = input.len().checked_sub(TAG_LEN) else {
            return Err(CryptoError::Other("SRTP: shorter than its tag".into()));
        };
        if output.len() < length {
            return Err(CryptoError::Other(
                "SRTP: no room for the plain text".into(),
            ));
        }
        let (cipher_text, tag) = input.split_at(length);
        output[..length].copy_from_slice(cipher_text);
        let joined;
        let aad = match aads {
            [one] => *one,
            // SRTCP's header and index (once a second, not per packet).
            _ => {
                joined = aads.concat();
                &joined
            }
        };
        let tag = ring::aead::Tag::try_from(tag)
            .map_err(|_| CryptoError::Other("SRTP: bad tag".into()))?;
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*iv),
                Aad::from(aad),
                tag,
                &mut output[..length],
                0..,
            )
            .map_err(|_| CryptoError::Other("SRTP: authentication failed".into()))?;
        Ok(length)
    }
}

/// str0m has a trait per key size, with the same methods.
macro_rules! gcm_cipher_traits {
    ($($cipher_trait:ident),*) => {$(
        impl $cipher_trait for GcmCipher {
            fn encrypt(
                &mut self,
                iv: &[u8; 12],
                aad: &[u8],
                input: &[u8],
                output: &mut [u8],
            ) -> Result<(), CryptoError> {
                self.seal(iv, aad, input, output)
            }

            fn decrypt(
                &mut self,
                iv: &[u8; 12],
                aads: &[&[u8]],
                input: &[u8],
                output: &mut [u8],
            ) -> Result<usize, CryptoError> {
                self.open(iv, aads, input, output)
            }
        }
    )*};
}

gcm_cipher_traits!(AeadAes128GcmCipher, AeadAes256GcmCipher);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_integrity_is_the_hmac_sha1_openssl_computes() {
        // RFC 2202, test case 1.
        let expected = "b617318655057264e28bc0b6fb378c8ef146be00";
        let digest = StunHmac.sha1_hmac(&[0x0b; 20], &[b"Hi ", b"There"]);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
        // A key and a message as ICE makes them, in the pieces str0m passes.
        let openssl = str0m::crypto::from_feature_flags().sha1_hmac_provider;
        let key = b"VOkJxbRl1RmTxUk/WvJxBt";
        let message: Vec<u8> = (0..=255).collect();
        let pieces: [&[u8]; 3] = [&message[..20], &message[20..100], &message[100..]];
        assert_eq!(
            StunHmac.sha1_hmac(key, &pieces),
            openssl.sha1_hmac(key, &pieces)
        );
    }

    /// Seals an RTP packet's payload with our cipher and OpenSSL's for the
    /// same key; the bytes must match, each must open the other's, and a
    /// changed byte must be refused.
    macro_rules! check_against_openssl {
        ($key:expr, $supported:ident, $openssl:ident) => {{
            let key = $key;
            let openssl = str0m::crypto::from_feature_flags().srtp_provider.$openssl();
            let (mut ours, mut ours_open) = (
                $supported::create_cipher(&Gcm, key, true),
                $supported::create_cipher(&Gcm, key, false),
            );
            let (mut theirs, mut theirs_open) = (
                openssl.create_cipher(key, true),
                openssl.create_cipher(key, false),
            );
            let header: Vec<u8> = (0..12).collect();
            let payload: Vec<u8> = (0..97).map(|i| (i * 7) as u8).collect();
            let iv = [9_u8; 12];
            let mut sealed = vec![0; payload.len() + TAG_LEN];
            let mut sealed_by_openssl = sealed.clone();
            ours.encrypt(&iv, &header, &payload, &mut sealed).unwrap();
            theirs
                .encrypt(&iv, &header, &payload, &mut sealed_by_openssl)
                .unwrap();
            assert_eq!(sealed, sealed_by_openssl);
            let mut plain = vec![0; payload.len()];
            let opened = theirs_open.decrypt(&iv, &[&header], &sealed, &mut plain);
            assert_eq!((opened.unwrap(), &plain), (payload.len(), &payload));
            // SRTCP passes its additional data in two pieces.
            let mut plain = vec![0; payload.len()];
            let pieces: [&[u8]; 2] = [&header[..8], &header[8..]];
            let opened = ours_open.decrypt(&iv, &pieces, &sealed_by_openssl, &mut plain);
            assert_eq!((opened.unwrap(), &plain), (payload.len(), &payload));
            sealed[20] ^= 1;
            assert!(
                ours_open
                    .decrypt(&iv, &[&header], &sealed, &mut plain)
                    .is_err()
            );
            assert!(
                ours_open
                    .decrypt(&iv, &[&header], &sealed[..10], &mut plain)
                    .is_err()
            );
        }};
    }

    #[test]
    fn srtp_aes_gcm_seals_as_openssl_does_and_refuses_a_changed_packet() {
        check_against_openssl!([7_u8; 16], SupportedAeadAes128Gcm, aead_aes_128_gcm);
        check_against_openssl!([7_u8; 32], SupportedAeadAes256Gcm, aead_aes_256_gcm);
    }
}
