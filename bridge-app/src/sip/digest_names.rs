//! rsipstack's digest client spells SHA-256 as `SHA256`, which neither
//! parses the `algorithm=SHA-256` of real challenges (RFC 7616/8760) nor is
//! understood by servers in an answer. This inspector translates at the
//! edge: challenges coming in, credentials going out. The digest itself
//! does not hash the name, so only the spelling changes.

use rsipstack::sip::{Header, SipMessage};
use rsipstack::transaction::endpoint::MessageInspector;
use rsipstack::transport::SipAddr;

pub struct DigestAlgorithmNames;

impl MessageInspector for DigestAlgorithmNames {
    fn before_send(&self, mut message: SipMessage, _: Option<&SipAddr>) -> SipMessage {
        if let SipMessage::Request(request) = &mut message {
            for header in request.headers.iter_mut() {
                match header {
                    Header::Authorization(value) => {
                        *header = Header::Authorization(to_standard(value.value()).into())
                    }
                    Header::ProxyAuthorization(value) => {
                        *header = Header::ProxyAuthorization(to_standard(value.value()).into())
                    }
                    _ => {}
                }
            }
        }
        message
    }

    fn after_received(&self, mut message: SipMessage, _: Option<&SipAddr>) -> SipMessage {
        if let SipMessage::Response(response) = &mut message {
            for header in response.headers.iter_mut() {
                match header {
                    Header::WwwAuthenticate(value) => {
                        *header = Header::WwwAuthenticate(to_rsip(value.value()).into())
                    }
                    Header::ProxyAuthenticate(value) => {
                        *header = Header::ProxyAuthenticate(to_rsip(value.value()).into())
                    }
                    _ => {}
                }
            }
        }
        message
    }
}

/// Rewrites the value of the `algorithm` parameter with `rename`.
fn rename_algorithm(header: &str, rename: impl Fn(&str) -> Option<&'static str>) -> String {
    header
        .split(',')
        .map(|param| {
            let Some((name, value)) = param.split_once('=') else {
                return param.to_owned();
            };
            // The first parameter also carries the scheme: "Digest algorithm=…".
            let key = name.rsplit(' ').next().unwrap_or(name);
            let bare = value.trim().trim_matches('"');
            match rename(bare) {
                Some(new) if key.trim().eq_ignore_ascii_case("algorithm") => {
                    format!("{name}={new}")
                }
                _ => param.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn to_rsip(header: &str) -> String {
    rename_algorithm(header, |name| {
        if name.eq_ignore_ascii_case("SHA-256") {
            Some("SHA256")
        } else if name.eq_ignore_ascii_case("SHA-256-sess") {
            Some("SHA256-sess")
        } else {
            None
        }
    })
}

fn to_standard(header: &str) -> String {
    rename_algorithm(header, |name| {
        if name.eq_ignore_ascii_case("SHA256") {
            Some("SHA-256")
        } else if name.eq_ignore_ascii_case("SHA256-sess") {
            Some("SHA-256-sess")
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_and_answers_are_translated_both_ways() {
        let challenge = r#"Digest realm="k", nonce="abc", qop="auth", algorithm=SHA-256"#;
        assert_eq!(
            to_rsip(challenge),
            r#"Digest realm="k", nonce="abc", qop="auth", algorithm=SHA256"#
        );
        let first = r#"Digest algorithm="SHA-256",realm="k""#;
        assert_eq!(to_rsip(first), r#"Digest algorithm=SHA256,realm="k""#);
        // MD5 and unknown parameters stay as they are.
        let md5 = r#"Digest realm="k", nonce="SHA-256", algorithm=MD5"#;
        assert_eq!(to_rsip(md5), md5);

        let answer = r#"Digest username="echo", realm="k", response="f00", algorithm=SHA256"#;
        assert_eq!(
            to_standard(answer),
            r#"Digest username="echo", realm="k", response="f00", algorithm=SHA-256"#
        );
    }
}
