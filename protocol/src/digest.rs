//! SIP digest authentication (RFC 3261 §22, RFC 8760 for SHA-256) on the
//! server side: reading `Authorization` values and checking their response.

use md5::Md5;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    /// The token as RFC 8760 spells it.
    pub fn token(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        match token.to_ascii_uppercase().as_str() {
            "MD5" => Some(Algorithm::Md5),
            "SHA-256" | "SHA256" => Some(Algorithm::Sha256),
            _ => None,
        }
    }

    fn hash(self, input: &str) -> String {
        match self {
            Algorithm::Md5 => hex::encode(Md5::digest(input.as_bytes())),
            Algorithm::Sha256 => hex::encode(Sha256::digest(input.as_bytes())),
        }
    }
}

/// The parameters of a `Digest` credentials value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Algorithm,
    /// `(qop, cnonce, nc)` when qop=auth was used.
    pub qop: Option<(String, String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("not Digest credentials")]
    NotDigest,
    #[error("credentials lack {0}")]
    Missing(&'static str),
    #[error("unsupported algorithm {0:?}")]
    Algorithm(String),
    #[error("unsupported qop {0:?}")]
    Qop(String),
}

impl Credentials {
    /// Reads `Digest username="…", realm="…", …`.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        let rest = value
            .trim_start()
            .strip_prefix("Digest")
            .or_else(|| value.trim_start().strip_prefix("digest"))
            .ok_or(DigestError::NotDigest)?;
        let params = parse_params(rest);
        let get = |name: &'static str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let need = |name: &'static str| get(name).ok_or(DigestError::Missing(name));
        let algorithm = match get("algorithm") {
            None => Algorithm::Md5,
            Some(token) => Algorithm::parse(&token).ok_or(DigestError::Algorithm(token))?,
        };
        let qop = match get("qop") {
            None => None,
            Some(qop) if qop.eq_ignore_ascii_case("auth") => {
                Some((qop, need("cnonce")?, need("nc")?))
            }
            Some(other) => return Err(DigestError::Qop(other)),
        };
        Ok(Self {
            username: need("username")?,
            realm: need("realm")?,
            nonce: need("nonce")?,
            uri: need("uri")?,
            response: need("response")?.to_ascii_lowercase(),
            algorithm,
            qop,
        })
    }

    /// Whether `response` proves knowledge of `password` for `method`.
    pub fn verify(&self, method: &str, password: &str) -> bool {
        let expected = response(
            self.algorithm,
            &self.username,
            &self.realm,
            password,
            method,
            &self.uri,
            &self.nonce,
            self.qop
                .as_ref()
                .map(|(q, c, n)| (q.as_str(), c.as_str(), n.as_str())),
        );
        constant_time_eq(expected.as_bytes(), self.response.as_bytes())
    }
}

/// The digest response (RFC 3261 §22.4 / RFC 8760).
#[allow(clippy::too_many_arguments)]
pub fn response(
    algorithm: Algorithm,
    username: &str,
    realm: &str,
    password: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    qop: Option<(&str, &str, &str)>,
) -> String {
    let ha1 = algorithm.hash(&format!("{username}:{realm}:{password}"));
    let ha2 = algorithm.hash(&format!("{method}:{uri}"));
    match qop {
        Some((qop, cnonce, nc)) => {
            algorithm.hash(&format!("{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"))
        }
        None => algorithm.hash(&format!("{ha1}:{nonce}:{ha2}")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `key=value` pairs separated by commas; values may be quoted.
fn parse_params(text: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',', '\r', '\n']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            value = quoted[..end].to_owned();
            rest = quoted.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        params.push((key, value));
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_2617_example() {
        // RFC 2617 §3.5's HTTP example, adapted: the hash rule is the same.
        let expected = response(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            Some(("auth", "0a4f113b", "00000001")),
        );
        assert_eq!(expected, "6629fae49393a05397450978507c4ef1");
    }

    #[test]
    fn verifies_md5_and_sha256_credentials() {
        for algorithm in [Algorithm::Md5, Algorithm::Sha256] {
            let r = response(
                algorithm,
                "alice",
                "bridge",
                "secret",
                "INVITE",
                "sip:echo@127.0.0.1",
                "n1",
                Some(("auth", "c1", "00000001")),
            );
            let value = format!(
                "Digest username=\"alice\",realm=\"bridge\", nonce=\"n1\", uri=\"sip:echo@127.0.0.1\", response=\"{r}\", algorithm={}, qop=auth, cnonce=\"c1\", nc=00000001",
                algorithm.token()
            );
            let credentials = Credentials::parse(&value).unwrap();
            assert_eq!(credentials.algorithm, algorithm);
            assert!(credentials.verify("INVITE", "secret"));
            assert!(!credentials.verify("INVITE", "guess"));
            assert!(!credentials.verify("REGISTER", "secret"));
        }
    }

    #[test]
    fn refuses_what_it_cannot_check() {
        assert_eq!(Credentials::parse("Basic abc"), Err(DigestError::NotDigest));
        assert_eq!(
            Credentials::parse("Digest username=\"a\""),
            Err(DigestError::Missing("realm"))
        );
        assert!(matches!(
            Credentials::parse(
                "Digest username=a, realm=r, nonce=n, uri=u, response=x, algorithm=SHA-512"
            ),
            Err(DigestError::Algorithm(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_values_never_panic(value in ".{0,200}") {
            let _ = Credentials::parse(&value);
            let _ = Credentials::parse(&format!("Digest {value}"));
        }
    }
}
