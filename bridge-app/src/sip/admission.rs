//! Who may start a call: requests from the configured SIP servers are
//! trusted; anyone else must answer a digest challenge (MD5 or SHA-256,
//! qop=auth) for a configured user. Every source is rate limited first, so a
//! flood costs one table lookup per datagram.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use bridge_protocol::digest::{Algorithm, Credentials};
use rand::Rng;
use rsipstack::sip::{Header, Request};

/// How long a nonce may be answered.
const NONCE_LIFETIME: Duration = Duration::from_secs(300);
/// Most nonces outstanding at once; the oldest go first.
const MAX_NONCES: usize = 4096;
/// Most sources tracked by the rate limiter.
const MAX_SOURCES: usize = 65_536;

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Addresses whose requests need no authentication (the SIP servers).
    pub trusted: Vec<IpAddr>,
    pub realm: String,
    /// Users who may call the bridge directly: name → password.
    pub users: HashMap<String, String>,
    /// New requests per second a source may send (burst: twice as many).
    pub requests_per_second: f64,
    /// Also challenge with SHA-256 (RFC 8760). Off by default: some phones
    /// (baresip 1.x, libre) try to answer every challenge and give up on
    /// one whose algorithm they lack, instead of picking MD5.
    pub sha256: bool,
}

/// The decision on one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// From a trusted server, or authenticated as this user.
    Admit { user: Option<String> },
    /// Answer 401 with these `WWW-Authenticate` values.
    Challenge(Vec<String>),
    /// Credentials that do not verify: answer 403.
    Forbidden,
    /// Over the rate: answer 503 with Retry-After.
    RateLimited,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct Admission {
    /// Replaced whole when the configuration is reloaded.
    config: RwLock<AdmissionConfig>,
    nonces: Mutex<HashMap<String, Instant>>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            config: RwLock::new(config),
            nonces: Mutex::default(),
            buckets: Mutex::default(),
        }
    }

    /// From now on, admits as `config` says (a reloaded configuration's
    /// servers and users); nonces already given stay good.
    pub fn reconfigure(&self, config: AdmissionConfig) {
        *self.config.write().unwrap() = config;
    }

    /// Whether `source` may send one more request now.
    pub fn within_rate(&self, source: IpAddr) -> bool {
        let rate = self.config.read().unwrap().requests_per_second;
        let burst = rate * 2.0;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() >= MAX_SOURCES {
            buckets.retain(|_, b| now.duration_since(b.updated) < Duration::from_secs(10));
        }
        let bucket = buckets.entry(source).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn is_trusted(&self, source: IpAddr) -> bool {
        self.config.read().unwrap().trusted.contains(&source)
    }

    /// Decides on a request that starts something (INVITE, REGISTER).
    pub fn check(&self, request: &Request, source: IpAddr) -> Verdict {
        if !self.within_rate(source) {
            return Verdict::RateLimited;
        }
        if self.is_trusted(source) {
            return Verdict::Admit { user: None };
        }
        self.authenticate(request)
    }

    /// Digest only, whoever the source: for REGISTER, where the server must
    /// know the user is who they say.
    pub fn authenticate(&self, request: &Request) -> Verdict {
        let Some(raw) = request.headers.iter().find_map(|h| match h {
            Header::Authorization(a) => Some(a.value().to_owned()),
            Header::ProxyAuthorization(a) => Some(a.value().to_owned()),
            _ => None,
        }) else {
            return Verdict::Challenge(self.challenge());
        };
        let Ok(credentials) = Credentials::parse(&raw) else {
            return Verdict::Forbidden;
        };
        if !self.take_nonce(&credentials.nonce) {
            // Unknown or expired nonce: a fresh challenge, not a refusal.
            return Verdict::Challenge(self.challenge());
        }
        let method = request.method.to_string();
        let config = self.config.read().unwrap();
        let verified = credentials.realm == config.realm
            && config
                .users
                .get(&credentials.username)
                .is_some_and(|password| credentials.verify(&method, password));
        if verified {
            Verdict::Admit {
                user: Some(credentials.username),
            }
        } else {
            Verdict::Forbidden
        }
    }

    /// A fresh nonce, offered with MD5 first (many phones read only the
    /// first challenge and know only MD5), then SHA-256 when enabled.
    fn challenge(&self) -> Vec<String> {
        let nonce = hex::encode(rand::rng().random::<[u8; 16]>());
        let now = Instant::now();
        let mut nonces = self.nonces.lock().unwrap();
        nonces.retain(|_, issued| now.duration_since(*issued) < NONCE_LIFETIME);
        if nonces.len() >= MAX_NONCES
            && let Some(oldest) = nonces
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(n, _)| n.clone())
        {
            nonces.remove(&oldest);
        }
        nonces.insert(nonce.clone(), now);
        let config = self.config.read().unwrap();
        let realm = &config.realm;
        let algorithms: &[Algorithm] = if config.sha256 {
            &[Algorithm::Md5, Algorithm::Sha256]
        } else {
            &[Algorithm::Md5]
        };
        algorithms
            .iter()
            .map(|algorithm| {
                format!(
                    "Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"",
                    algorithm.token()
                )
            })
            .collect()
    }

    /// A nonce is good for one request (the phone answers each challenge once).
    fn take_nonce(&self, nonce: &str) -> bool {
        let mut nonces = self.nonces.lock().unwrap();
        nonces
            .remove(nonce)
            .is_some_and(|issued| issued.elapsed() < NONCE_LIFETIME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_protocol::digest::response;

    fn admission() -> Admission {
        Admission::new(AdmissionConfig {
            trusted: vec!["10.0.0.1".parse().unwrap()],
            realm: "bridge".into(),
            users: HashMap::from([("alice".to_owned(), "secret".to_owned())]),
            requests_per_second: 5.0,
            sha256: true,
        })
    }

    fn invite(authorization: Option<String>) -> Request {
        let mut text = "INVITE sip:echo@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK1\r\nFrom: <sip:alice@bridge>;tag=1\r\nTo: <sip:echo@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n".to_owned();
        if let Some(a) = authorization {
            text.push_str(&format!("Authorization: {a}\r\n"));
        }
        text.push_str("Content-Length: 0\r\n\r\n");
        Request::try_from(text.as_str()).unwrap()
    }

    fn answer(challenge: &str, algorithm: Algorithm, password: &str) -> String {
        let nonce = challenge
            .split("nonce=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let uri = "sip:echo@127.0.0.1";
        let response = response(
            algorithm,
            "alice",
            "bridge",
            password,
            "INVITE",
            uri,
            nonce,
            Some(("auth", "abc", "00000001")),
        );
        format!(
            "Digest username=\"alice\", realm=\"bridge\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{response}\", algorithm={}, qop=auth, cnonce=\"abc\", nc=00000001",
            algorithm.token()
        )
    }

    #[test]
    fn trusted_servers_need_no_credentials() {
        let admission = admission();
        assert_eq!(
            admission.check(&invite(None), "10.0.0.1".parse().unwrap()),
            Verdict::Admit { user: None }
        );
    }

    #[test]
    fn direct_callers_are_challenged_and_verified_with_md5_and_sha256() {
        let admission = admission();
        let source = "10.0.0.9".parse().unwrap();
        for algorithm in [Algorithm::Md5, Algorithm::Sha256] {
            let Verdict::Challenge(challenges) = admission.check(&invite(None), source) else {
                panic!("expected a challenge");
            };
            assert_eq!(challenges.len(), 2);
            let good = answer(&challenges[0], algorithm, "secret");
            assert_eq!(
                admission.check(&invite(Some(good.clone())), source),
                Verdict::Admit {
                    user: Some("alice".into())
                }
            );
            // A replayed answer gets a new challenge, not a call.
            assert!(matches!(
                admission.check(&invite(Some(good)), source),
                Verdict::Challenge(_)
            ));
        }
        let Verdict::Challenge(challenges) = admission.check(&invite(None), source) else {
            panic!("expected a challenge");
        };
        let wrong = answer(&challenges[0], Algorithm::Md5, "guess");
        assert_eq!(
            admission.check(&invite(Some(wrong)), source),
            Verdict::Forbidden
        );
        assert_eq!(
            admission.check(&invite(Some("Digest garbage".into())), source),
            Verdict::Forbidden
        );
    }

    #[test]
    fn a_flooding_source_is_limited_without_touching_others() {
        let admission = admission();
        let flooder: IpAddr = "10.0.0.66".parse().unwrap();
        let admitted = (0..100).filter(|_| admission.within_rate(flooder)).count();
        assert!(
            (10..=11).contains(&admitted),
            "burst of twice the rate, got {admitted}"
        );
        assert!(admission.within_rate("10.0.0.67".parse().unwrap()));
    }
}
