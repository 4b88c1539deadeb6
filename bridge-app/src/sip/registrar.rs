//! The bridge as registrar for its own extensions (the embedded default):
//! phones REGISTER with digest, and calls from the app side find them here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rsipstack::sip::prelude::HeadersExt;
use rsipstack::sip::{Header, StatusCode};
use rsipstack::transaction::transaction::Transaction;
use rsipstack::transport::SipAddr;
use rsipstack::transport::connection::SipConnection;
use tracing::info;

use super::admission::{Admission, Verdict};
use super::ua::{refuse, reply, source_of};

const MIN_EXPIRES: u32 = 60;
const MAX_EXPIRES: u32 = 3600;

/// Where a registered extension is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The phone's Contact URI.
    pub contact: String,
    /// Where its REGISTER came from, where requests to it go: a phone
    /// behind a NAT names its private address in Contact, and one on TCP
    /// or TLS is reached over the connection it opened (as Kamailio's
    /// `fix_nated_register` and Asterisk's `rewrite_contact` do).
    pub source: Option<SipAddr>,
    expires_at: Instant,
}

#[derive(Default)]
pub struct Registrar {
    bindings: Mutex<HashMap<String, Binding>>,
}

impl Registrar {
    /// The live binding of `user`, if any.
    pub fn lookup(&self, user: &str) -> Option<Binding> {
        let bindings = self.bindings.lock().unwrap();
        bindings
            .get(&user.to_ascii_lowercase())
            .filter(|b| b.expires_at > Instant::now())
            .cloned()
    }

    pub async fn handle(&self, admission: &Admission, tx: &mut Transaction) {
        let Some(source) = source_of(tx) else { return };
        if !admission.within_rate(source) {
            refuse(tx, &Verdict::RateLimited).await;
            return;
        }
        let user = match admission.authenticate(&tx.original) {
            Verdict::Admit { user: Some(user) } => user,
            // Digest always names a user; anything else is not a registration.
            Verdict::Admit { user: None } => {
                reply(tx, StatusCode::Forbidden, vec![]).await;
                return;
            }
            verdict => {
                refuse(tx, &verdict).await;
                return;
            }
        };
        let aor = tx
            .original
            .to_header()
            .ok()
            .and_then(|to| to.uri().ok())
            .and_then(|uri| uri.auth.map(|a| a.user))
            .unwrap_or_default();
        if !aor.eq_ignore_ascii_case(&user) {
            info!("REGISTER of {aor:?} by {user:?} from {source}: 403");
            reply(tx, StatusCode::Forbidden, vec![]).await;
            return;
        }
        let contact_value = tx.original.header_value("Contact");
        let header_expires = tx
            .original
            .header_value("Expires")
            .and_then(|v| v.trim().parse::<u32>().ok());
        let key = user.to_ascii_lowercase();
        let Some(contact_value) = contact_value else {
            // A query: report the current binding.
            let headers = self.contact_headers(&key);
            reply(tx, StatusCode::OK, headers).await;
            return;
        };
        let (contact, contact_expires) = parse_contact(&contact_value);
        let expires = contact_expires.or(header_expires).unwrap_or(MAX_EXPIRES);
        if contact == "*" || expires == 0 {
            self.bindings.lock().unwrap().remove(&key);
            info!("registrar: {user} unregistered");
            reply(tx, StatusCode::OK, vec![]).await;
            return;
        }
        if expires < MIN_EXPIRES {
            let headers = vec![Header::MinExpires(MIN_EXPIRES.to_string().into())];
            reply(tx, StatusCode::IntervalTooBrief, headers).await;
            return;
        }
        let expires = expires.min(MAX_EXPIRES);
        let binding = Binding {
            contact: contact.clone(),
            source: request_source(tx),
            expires_at: Instant::now() + Duration::from_secs(expires.into()),
        };
        let reached = match &binding.source {
            Some(source) => format!(" (reached at {source})"),
            None => String::new(),
        };
        let fresh = self
            .bindings
            .lock()
            .unwrap()
            .insert(key.clone(), binding.clone())
            .is_none_or(|old| (old.contact, old.source) != (binding.contact, binding.source));
        if fresh {
            info!("registrar: {user} registered at {contact}{reached} for {expires} s");
        }
        let headers = self.contact_headers(&key);
        reply(tx, StatusCode::OK, headers).await;
    }

    fn contact_headers(&self, key: &str) -> Vec<Header> {
        let bindings = self.bindings.lock().unwrap();
        bindings
            .get(key)
            .map(|b| {
                let left = b
                    .expires_at
                    .saturating_duration_since(Instant::now())
                    .as_secs();
                vec![Header::Contact(
                    format!("<{}>;expires={left}", b.contact).into(),
                )]
            })
            .unwrap_or_default()
    }
}

/// Where a request came from, as responses go back (RFC 3261 §18.2.2,
/// RFC 3581): the peer of its connection, or the source the transport
/// wrote into its top Via (`received`, `rport`).
fn request_source(tx: &Transaction) -> Option<SipAddr> {
    let connection = tx.connection.as_ref()?;
    if connection.is_reliable() {
        return connection.get_remote_addr().cloned();
    }
    let via = tx.original.via_header().ok()?;
    let (transport, addr) = SipConnection::parse_target_from_via(via).ok()?;
    Some(SipAddr::new(transport, addr))
}

/// The URI and `expires` parameter of a Contact value (first contact only).
fn parse_contact(value: &str) -> (String, Option<u32>) {
    let value = value.trim();
    if value == "*" {
        return ("*".into(), None);
    }
    let (uri, params) = match (value.find('<'), value.find('>')) {
        (Some(open), Some(close)) if open < close => (&value[open + 1..close], &value[close + 1..]),
        _ => value.split_once(';').unwrap_or((value, "")),
    };
    let expires = params
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("expires"))
        .and_then(|(_, v)| v.trim().trim_end_matches(',').parse().ok());
    (uri.trim().to_owned(), expires)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacts_parse() {
        assert_eq!(
            parse_contact("<sip:alice@127.0.0.1:5095;transport=udp>;expires=60"),
            ("sip:alice@127.0.0.1:5095;transport=udp".into(), Some(60))
        );
        assert_eq!(
            parse_contact("\"Alice\" <sip:alice@10.0.0.1>"),
            ("sip:alice@10.0.0.1".into(), None)
        );
        assert_eq!(
            parse_contact("sip:bob@10.0.0.2;expires=0"),
            ("sip:bob@10.0.0.2".into(), Some(0))
        );
        assert_eq!(parse_contact("*"), ("*".into(), None));
    }
}
