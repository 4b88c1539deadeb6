//! SDES-SRTP keying (RFC 4568): the `a=crypto` attribute of RTP/SAVP
//! streams, and the key parameters `sipsrc`/`sipsink` take
//! (`AES_CM_128_HMAC_SHA1_80 inline:<base64 key||salt>`).
//!
//! Only the two suites every SIP phone offers are supported; both use a
//! 16-byte AES key and a 14-byte salt.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;

/// Bytes of master key plus master salt for the AES-128 suites.
pub const MASTER_KEY_SALT_LEN: usize = 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdesError {
    #[error("a=crypto needs a tag, a suite and key parameters")]
    Incomplete,
    #[error("a=crypto tag {0:?} is not a number of at most 9 digits")]
    BadTag(String),
    #[error("crypto suite {0} is not supported")]
    UnsupportedSuite(String),
    #[error("key parameters must start with inline:")]
    NotInline,
    #[error("the key is not valid base64")]
    BadBase64,
    #[error("the key has {0} bytes; key and salt take 30")]
    BadKeyLength(usize),
    #[error("key lifetime and MKI are not supported")]
    KeyOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CryptoSuite {
    AesCm128HmacSha1_80,
    AesCm128HmacSha1_32,
}

impl CryptoSuite {
    pub fn name(self) -> &'static str {
        match self {
            Self::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Self::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }
}

impl FromStr for CryptoSuite {
    type Err = SdesError;

    fn from_str(name: &str) -> Result<Self, SdesError> {
        [Self::AesCm128HmacSha1_80, Self::AesCm128HmacSha1_32]
            .into_iter()
            .find(|suite| suite.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| SdesError::UnsupportedSuite(name.to_owned()))
    }
}

/// A suite with its master key and salt: one direction's keying.
#[derive(Clone, PartialEq, Eq)]
pub struct SrtpKey {
    pub suite: CryptoSuite,
    pub key_salt: [u8; MASTER_KEY_SALT_LEN],
}

impl SrtpKey {
    /// A fresh random key for `suite`.
    pub fn generate(suite: CryptoSuite) -> Self {
        let mut key_salt = [0u8; MASTER_KEY_SALT_LEN];
        rand::rng().fill_bytes(&mut key_salt);
        Self { suite, key_salt }
    }

    pub fn key(&self) -> &[u8] {
        &self.key_salt[..16]
    }

    pub fn salt(&self) -> &[u8] {
        &self.key_salt[16..]
    }

    fn from_parts(suite: &str, key_params: &str) -> Result<Self, SdesError> {
        let suite: CryptoSuite = suite.parse()?;
        // Several key-params (separated by ';') are allowed; the first is used.
        let first = key_params.split(';').next().unwrap_or_default();
        let inline = first
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("inline:"))
            .map(|_| &first[7..])
            .ok_or(SdesError::NotInline)?;
        let mut parts = inline.split('|');
        let encoded = parts.next().unwrap_or_default();
        // A lifetime of 2^31 or more is what every phone means by "forever";
        // an MKI would change the packet format, which is not supported.
        for option in parts {
            let forever = option
                .strip_prefix("2^")
                .and_then(|e| e.parse::<u32>().ok())
                .is_some_and(|e| e >= 31);
            if !forever {
                return Err(SdesError::KeyOptions);
            }
        }
        let bytes = STANDARD.decode(encoded).map_err(|_| SdesError::BadBase64)?;
        let key_salt = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SdesError::BadKeyLength(bytes.len()))?;
        Ok(Self { suite, key_salt })
    }
}

/// `SUITE inline:KEY`, the form of the elements' `srtp-*-key` properties.
impl FromStr for SrtpKey {
    type Err = SdesError;

    fn from_str(text: &str) -> Result<Self, SdesError> {
        let mut words = text.split_whitespace();
        let (Some(suite), Some(params)) = (words.next(), words.next()) else {
            return Err(SdesError::Incomplete);
        };
        Self::from_parts(suite, params)
    }
}

impl fmt::Display for SrtpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} inline:{}",
            self.suite.name(),
            STANDARD.encode(self.key_salt)
        )
    }
}

/// Keys are secrets: never print them by accident.
impl fmt::Debug for SrtpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SrtpKey({}, <hidden>)", self.suite.name())
    }
}

/// One `a=crypto:<tag> <suite> <key-params> [session-params]` attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoAttribute {
    pub tag: u32,
    pub key: SrtpKey,
}

impl CryptoAttribute {
    /// Parses the attribute value (what follows `a=crypto:`).
    pub fn parse(value: &str) -> Result<Self, SdesError> {
        let mut words = value.split_whitespace();
        let (Some(tag), Some(suite), Some(params)) = (words.next(), words.next(), words.next())
        else {
            return Err(SdesError::Incomplete);
        };
        if tag.is_empty() || tag.len() > 9 || !tag.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SdesError::BadTag(tag.to_owned()));
        }
        // Session parameters (UNENCRYPTED_SRTP, KDR, …) change the protection; refuse them.
        if words.next().is_some() {
            return Err(SdesError::KeyOptions);
        }
        Ok(Self {
            tag: tag.parse().map_err(|_| SdesError::BadTag(tag.to_owned()))?,
            key: SrtpKey::from_parts(suite, params)?,
        })
    }

    /// The attribute value, as written after `a=crypto:`.
    pub fn value(&self) -> String {
        format!("{} {}", self.tag, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 4568 §9.1's example key.
    const RFC_KEY: &str = "WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz";

    #[test]
    fn parses_the_rfc_example() {
        let attribute = CryptoAttribute::parse(&format!(
            "1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|2^20|1:4"
        ));
        assert_eq!(attribute, Err(SdesError::KeyOptions));
        let attribute =
            CryptoAttribute::parse(&format!("1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}")).unwrap();
        assert_eq!(attribute.tag, 1);
        assert_eq!(attribute.key.suite, CryptoSuite::AesCm128HmacSha1_80);
        assert_eq!(&attribute.key.key_salt[..4], b"YS__");
        assert_eq!(
            attribute.value(),
            format!("1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}")
        );
    }

    #[test]
    fn a_lifetime_of_two_to_the_31_is_accepted() {
        let attribute =
            CryptoAttribute::parse(&format!("2 AES_CM_128_HMAC_SHA1_32 inline:{RFC_KEY}|2^31"))
                .unwrap();
        assert_eq!(attribute.key.suite, CryptoSuite::AesCm128HmacSha1_32);
    }

    #[test]
    fn bad_attributes_say_why() {
        assert_eq!(
            CryptoAttribute::parse("1 AES_CM_128_HMAC_SHA1_80"),
            Err(SdesError::Incomplete)
        );
        assert_eq!(
            CryptoAttribute::parse(&format!("x AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}")),
            Err(SdesError::BadTag("x".into()))
        );
        assert_eq!(
            CryptoAttribute::parse(&format!("1 F8_128_HMAC_SHA1_80 inline:{RFC_KEY}")),
            Err(SdesError::UnsupportedSuite("F8_128_HMAC_SHA1_80".into()))
        );
        assert_eq!(
            CryptoAttribute::parse("1 AES_CM_128_HMAC_SHA1_80 inline:!!!"),
            Err(SdesError::BadBase64)
        );
        assert_eq!(
            CryptoAttribute::parse("1 AES_CM_128_HMAC_SHA1_80 inline:AAAA"),
            Err(SdesError::BadKeyLength(3))
        );
        assert_eq!(
            CryptoAttribute::parse(&format!(
                "1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY} UNENCRYPTED_SRTP"
            )),
            Err(SdesError::KeyOptions)
        );
    }

    #[test]
    fn property_form_round_trips_and_debug_hides_the_key() {
        let key = SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80);
        let text = key.to_string();
        assert!(text.starts_with("AES_CM_128_HMAC_SHA1_80 inline:"));
        assert_eq!(text.parse::<SrtpKey>().unwrap(), key);
        assert!(!format!("{key:?}").contains(&text[31..]));
        assert_ne!(key, SrtpKey::generate(CryptoSuite::AesCm128HmacSha1_80));
    }

    proptest::proptest! {
        #[test]
        fn any_attribute_text_is_handled(text in ".{0,200}") {
            let _ = CryptoAttribute::parse(&text);
            let _ = text.parse::<SrtpKey>();
        }
    }
}
