//! The bridge as registrar for its own extensions (the embedded default):
//! phones REGISTER with digest, and calls from the app side find them here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rsipstack::sip::prelude::HeadersExt;
use rsipstack::sip::{Header, StatusCode, Uri};
use rsipstack::transaction::endpoint::TargetLocator;
use rsipstack::transaction::transaction::Transaction;
use rsipstack::transport::SipAddr;
use tracing::info;

use super::admission::{Admission, Verdict};
use super::ua::{behind_nat, port, refuse, reply, request_source, source_of};

const MIN_EXPIRES: u32 = 60;
const MAX_EXPIRES: u32 = 3600;
const NAT_MAX_EXPIRES: u32 = 60;

/// Where a registered extension is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The phone's Contact URI.
    pub contact: String,
    /// Where its REGISTER came from, where requests to its Contact go
    /// ([`RegisteredContacts`]).
    source: Option<SipAddr>,
    expires_at: Instant,
}

impl Binding {
    fn is_live(&self) -> bool {
        self.expires_at > Instant::now()
    }
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
            .filter(|b| b.is_live())
            .cloned()
    }

    /// Where the phone whose live registration names `uri` as its Contact
    /// registered from.
    fn source_of_contact(&self, uri: &Uri) -> Option<SipAddr> {
        let bindings = self.bindings.lock().unwrap();
        bindings
            .values()
            .filter(|b| b.is_live())
            .find(|b| Uri::try_from(b.contact.as_str()).is_ok_and(|c| same_contact(&c, uri)))
            .and_then(|b| b.source.clone())
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
        // Behind a NAT over UDP, the phone's refreshes also keep the NAT's
        // mapping open, which many routers close after a minute or two.
        let longest = if behind_nat(tx).is_some() {
            NAT_MAX_EXPIRES
        } else {
            MAX_EXPIRES
        };
        let expires = expires.min(longest);
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

/// Requests to a registered phone's Contact go where its REGISTER came
/// from, as responses do: a phone behind a NAT names its private address
/// in Contact, and one on TCP or TLS is reached over the connection it
/// opened (as Kamailio's registrar with `fix_nated_register`, and Asterisk
/// with `rewrite_contact`, do). This covers the bridge's INVITEs to it, and
/// the ACKs and in-dialog requests of its calls either way. Any other URI
/// is reached as it says.
pub struct RegisteredContacts(pub Arc<Registrar>);

#[async_trait::async_trait]
impl TargetLocator for RegisteredContacts {
    async fn locate(&self, uri: &Uri) -> rsipstack::Result<SipAddr> {
        match self.0.source_of_contact(uri) {
            Some(source) => Ok(source),
            None => SipAddr::try_from(uri),
        }
    }
}

/// The same user at the same host and port (a missing port is SIP's
/// default): a phone's Contact may carry other parameters in its INVITEs
/// and answers than in its REGISTER.
fn same_contact(a: &Uri, b: &Uri) -> bool {
    let user = |uri: &Uri| uri.auth.as_ref().map(|auth| auth.user.clone());
    user(a) == user(b) && a.host_with_port.host == b.host_with_port.host && port(a) == port(b)
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
    fn a_contact_is_the_same_whatever_its_parameters() {
        let uri = |text: &str| Uri::try_from(text).unwrap();
        let registered = uri("sip:alice@192.168.1.10;transport=udp");
        assert!(same_contact(
            &registered,
            &uri("sip:alice@192.168.1.10:5060;ob")
        ));
        assert!(!same_contact(&registered, &uri("sip:bob@192.168.1.10")));
        assert!(!same_contact(
            &registered,
            &uri("sip:alice@192.168.1.10:5062")
        ));
        assert!(!same_contact(&registered, &uri("sip:alice@192.168.1.11")));
    }

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
