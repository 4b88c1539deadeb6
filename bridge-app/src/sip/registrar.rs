//! The bridge as registrar for its own extensions (the embedded default):
//! phones REGISTER with digest, and calls from the app side find them here.
//! An extension may have several phones (a desk phone and a softphone):
//! each registration is a binding of its own, and calls ring them all.
//! Registered phones are asked OPTIONS now and then (qualify, as
//! Asterisk's `qualify_frequency`): one that stops answering is not rung
//! until it answers or registers again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rsipstack::sip::prelude::HeadersExt;
use rsipstack::sip::{Header, Method, SipMessage, StatusCode, StatusCodeKind, Uri, typed};
use rsipstack::transaction::endpoint::{EndpointInnerRef, TargetLocator};
use rsipstack::transaction::key::{TransactionKey, TransactionRole};
use rsipstack::transaction::make_tag;
use rsipstack::transaction::transaction::Transaction;
use rsipstack::transport::SipAddr;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::admission::{Admission, Verdict};
use super::ua::{behind_nat, port, refuse, reply, request_source, source_of, warning};

const MIN_EXPIRES: u32 = 60;
const MAX_EXPIRES: u32 = 3600;
const NAT_MAX_EXPIRES: u32 = 60;
/// Phones one extension may register at once: a phone that registers
/// beyond them takes the place of the one whose registration ends first
/// (a phone that restarted on another port leaves its old binding behind).
const MAX_BINDINGS: usize = 10;
/// How long a registered phone may take to answer the bridge's OPTIONS.
const QUALIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the registrar looks whether a round of OPTIONS is due, by
/// the interval as now configured.
const QUALIFY_CHECK: Duration = Duration::from_secs(1);

/// Where a registered extension is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The phone's Contact URI.
    pub contact: String,
    /// The phone's `+sip.instance` (RFC 5626): the same phone, whatever
    /// Contact it registers with next.
    instance: Option<String>,
    /// Where its REGISTER came from, where requests to its Contact go
    /// ([`RegisteredContacts`]).
    source: Option<SipAddr>,
    expires_at: Instant,
    /// It answered the bridge's last OPTIONS (or has registered since).
    reachable: bool,
}

impl Binding {
    fn is_live(&self) -> bool {
        self.expires_at > Instant::now()
    }

    /// The same phone as `contact` (with `instance`) registers.
    fn is_phone(&self, contact: &Uri, instance: Option<&str>) -> bool {
        match (instance, &self.instance) {
            (Some(instance), Some(own)) => instance == own,
            _ => Uri::try_from(self.contact.as_str()).is_ok_and(|own| same_contact(&own, contact)),
        }
    }
}

#[derive(Default)]
pub struct Registrar {
    /// Each extension's phones, the latest registered first.
    bindings: Mutex<HashMap<String, Vec<Binding>>>,
}

impl Registrar {
    /// The live bindings of `user` whose phones answer, the latest
    /// registered first.
    pub fn lookup(&self, user: &str) -> Vec<Binding> {
        let bindings = self.bindings.lock().unwrap();
        bindings
            .get(&user.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter(|b| b.is_live() && b.reachable)
            .cloned()
            .collect()
    }

    /// Forgets the phones of every extension `keep` refuses (a user taken
    /// out of the configuration); returns those extensions.
    pub fn forget_all_but(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let mut bindings = self.bindings.lock().unwrap();
        let gone: Vec<String> = bindings
            .keys()
            .filter(|user| !keep(user))
            .cloned()
            .collect();
        for user in &gone {
            bindings.remove(user);
        }
        gone
    }

    /// How many phones `user` has registered, answering or not.
    pub fn registered(&self, user: &str) -> usize {
        let bindings = self.bindings.lock().unwrap();
        bindings
            .get(&user.to_ascii_lowercase())
            .map_or(0, |phones| phones.iter().filter(|b| b.is_live()).count())
    }

    /// Every extension's registered phones, for the management API: each
    /// one's Contact, where it is reached, the seconds its registration has
    /// left, and whether it answers the bridge's OPTIONS.
    pub fn phones(&self) -> serde_json::Value {
        let bindings = self.bindings.lock().unwrap();
        let now = Instant::now();
        let extensions = bindings.iter().filter_map(|(user, phones)| {
            let phones: Vec<_> = phones
                .iter()
                .filter(|b| b.is_live())
                .map(|b| {
                    json!({
                        "contact": b.contact,
                        "reached_at": b.source.as_ref().map(ToString::to_string),
                        "expires_in_s": b.expires_at.saturating_duration_since(now).as_secs(),
                        "answers": b.reachable,
                    })
                })
                .collect();
            (!phones.is_empty()).then(|| (user.clone(), serde_json::Value::from(phones)))
        });
        serde_json::Value::Object(extensions.collect())
    }

    /// Asks every registered phone OPTIONS each `interval()` (as now
    /// configured; zero: never), from `bridge` (the bridge's Contact),
    /// until `stop`; a phone that does not answer
    /// within 5 s is not rung until it answers or registers again. Any
    /// response will do: the phone is there.
    pub async fn qualify(
        self: Arc<Self>,
        endpoint: EndpointInnerRef,
        bridge: Uri,
        interval: impl Fn() -> Duration,
        stop: CancellationToken,
    ) {
        let mut last_round = tokio::time::Instant::now();
        let mut asking = true;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(QUALIFY_CHECK) => {}
            }
            // Read each time, as a reload may change it; while it is zero,
            // every phone is rung.
            let every = interval();
            if every.is_zero() {
                if std::mem::replace(&mut asking, false) {
                    self.forget_answers();
                }
                continue;
            }
            asking = true;
            if last_round.elapsed() < every {
                continue;
            }
            last_round = tokio::time::Instant::now();
            let phones: Vec<(String, Binding)> = {
                let mut bindings = self.bindings.lock().unwrap();
                bindings.retain(|_, phones| {
                    phones.retain(Binding::is_live);
                    !phones.is_empty()
                });
                bindings
                    .iter()
                    .flat_map(|(user, phones)| phones.iter().map(|b| (user.clone(), b.clone())))
                    .collect()
            };
            let asks = phones.into_iter().map(|(user, binding)| {
                let (registrar, endpoint, bridge) =
                    (self.clone(), endpoint.clone(), bridge.clone());
                async move {
                    let answered = tokio::time::timeout(
                        QUALIFY_TIMEOUT,
                        ask_options(&endpoint, &bridge, &binding),
                    )
                    .await
                    .map_err(|_| "no answer".to_owned())
                    .and_then(|answered| answered.map_err(|e| format!("{e:#}")));
                    registrar.mark(&user, &binding.contact, answered);
                }
            });
            futures_util::future::join_all(asks).await;
        }
    }

    /// Every phone counts as answering, as when the registrar asks none.
    fn forget_answers(&self) {
        let mut bindings = self.bindings.lock().unwrap();
        for binding in bindings.values_mut().flatten() {
            binding.reachable = true;
        }
    }

    /// What the phone at `contact` made of the bridge's OPTIONS; a change
    /// is logged.
    fn mark(&self, user: &str, contact: &str, answered: Result<(), String>) {
        let mut bindings = self.bindings.lock().unwrap();
        let Some(binding) = bindings
            .get_mut(user)
            .and_then(|phones| phones.iter_mut().find(|b| b.contact == contact))
        else {
            return;
        };
        match answered {
            Ok(()) if !binding.reachable => {
                binding.reachable = true;
                info!("registrar: {user}'s phone at {contact} answers again");
            }
            Err(why) if binding.reachable => {
                binding.reachable = false;
                info!(
                    "registrar: {user}'s phone at {contact} does not answer OPTIONS ({why}); not rung until it does"
                );
            }
            _ => {}
        }
    }

    /// Where the phone whose live registration names `uri` as its Contact
    /// registered from.
    fn source_of_contact(&self, uri: &Uri) -> Option<SipAddr> {
        let bindings = self.bindings.lock().unwrap();
        bindings
            .values()
            .flatten()
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
        let contact_values = contacts_of(&tx.original);
        let header_expires = tx
            .original
            .header_value("Expires")
            .and_then(|v| v.trim().parse::<u32>().ok());
        let key = user.to_ascii_lowercase();
        if contact_values.is_empty() {
            // A query: report the current bindings.
            let headers = self.contact_headers(&key);
            reply(tx, StatusCode::OK, headers).await;
            return;
        }
        if contact_values.len() > MAX_BINDINGS {
            info!(
                "REGISTER of {user} from {source}: {} Contacts, 400",
                contact_values.len()
            );
            let warning = warning(399, "more Contacts than an extension's phones");
            reply(tx, StatusCode::BadRequest, vec![warning]).await;
            return;
        }
        // Each Contact, with how long it asks for; all or none are taken
        // (RFC 3261 §10.3).
        let mut contacts = Vec::with_capacity(contact_values.len());
        for value in &contact_values {
            let Some(contact) = parse_contact(value) else {
                info!("REGISTER of {user} from {source}: unusable Contact {value:?}, 400");
                let warning = warning(399, "unusable Contact");
                reply(tx, StatusCode::BadRequest, vec![warning]).await;
                return;
            };
            let expires = contact.expires.or(header_expires).unwrap_or(MAX_EXPIRES);
            contacts.push((contact, expires));
        }
        if contacts.iter().any(|(contact, _)| contact.uri.is_none()) {
            // `*`: every binding of the extension goes (RFC 3261 §10.2.2).
            if contacts.len() > 1 || contacts[0].1 != 0 {
                let warning = warning(399, "Contact * goes alone, with Expires: 0");
                reply(tx, StatusCode::BadRequest, vec![warning]).await;
                return;
            }
            self.bindings.lock().unwrap().remove(&key);
            info!("registrar: {user} unregistered every phone");
            reply(tx, StatusCode::OK, vec![]).await;
            return;
        }
        if contacts
            .iter()
            .any(|(_, expires)| (1..MIN_EXPIRES).contains(expires))
        {
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
        let source = request_source(tx);
        for (contact, expires) in contacts {
            let Some((contact_text, uri)) = contact.uri else {
                continue;
            };
            let instance = contact.instance;
            if expires == 0 {
                if let Some(phones) = self.bindings.lock().unwrap().get_mut(&key) {
                    phones.retain(|b| !b.is_phone(&uri, instance.as_deref()));
                }
                info!("registrar: {user} unregistered {contact_text}");
                continue;
            }
            let expires = expires.min(longest);
            let binding = Binding {
                contact: contact_text,
                instance,
                source: source.clone(),
                expires_at: Instant::now() + Duration::from_secs(expires.into()),
                reachable: true,
            };
            let reached = match &binding.source {
                Some(source) => format!(" (reached at {source})"),
                None => String::new(),
            };
            let contact_text = binding.contact.clone();
            let bound = {
                let mut bindings = self.bindings.lock().unwrap();
                bind(bindings.entry(key.clone()).or_default(), binding, &uri)
            };
            if let Some(gone) = bound.displaced {
                info!(
                    "registrar: {user} has {MAX_BINDINGS} phones; {} makes way",
                    gone.contact
                );
            }
            if bound.fresh {
                info!("registrar: {user} registered at {contact_text}{reached} for {expires} s");
            }
        }
        let headers = self.contact_headers(&key);
        reply(tx, StatusCode::OK, headers).await;
    }

    /// The extension's bindings, as a registrar's 200 OK lists them
    /// (RFC 3261 §10.3 step 8).
    fn contact_headers(&self, key: &str) -> Vec<Header> {
        let bindings = self.bindings.lock().unwrap();
        bindings
            .get(key)
            .into_iter()
            .flatten()
            .filter(|b| b.is_live())
            .map(|b| {
                let left = b
                    .expires_at
                    .saturating_duration_since(Instant::now())
                    .as_secs();
                Header::Contact(format!("<{}>;expires={left}", b.contact).into())
            })
            .collect()
    }
}

/// What registering a phone did to its extension's bindings.
struct Bound {
    /// A new phone, or one now reached elsewhere: worth a log line.
    fresh: bool,
    /// The phone that made way for it (at `MAX_BINDINGS`).
    displaced: Option<Binding>,
}

/// Adds `binding` (its Contact parsed as `uri`) to an extension's phones,
/// the latest first, or refreshes the binding of the same phone.
fn bind(phones: &mut Vec<Binding>, binding: Binding, uri: &Uri) -> Bound {
    phones.retain(Binding::is_live);
    let instance = binding.instance.clone();
    if let Some(known) = phones
        .iter()
        .position(|b| b.is_phone(uri, instance.as_deref()))
    {
        let old = std::mem::replace(&mut phones[known], binding);
        let now = &phones[known];
        return Bound {
            fresh: (&old.contact, &old.source) != (&now.contact, &now.source),
            displaced: None,
        };
    }
    let displaced = if phones.len() >= MAX_BINDINGS {
        (0..phones.len())
            .min_by_key(|&i| phones[i].expires_at)
            .map(|ending| phones.remove(ending))
    } else {
        None
    };
    phones.insert(0, binding);
    Bound {
        fresh: true,
        displaced,
    }
}

/// One OPTIONS to a registered phone, sent where its REGISTER came from;
/// `Ok` once it responds (a provisional response aside).
async fn ask_options(
    endpoint: &EndpointInnerRef,
    bridge: &Uri,
    binding: &Binding,
) -> anyhow::Result<()> {
    let contact = Uri::try_from(binding.contact.as_str())?;
    let target = match &binding.source {
        Some(source) => source.clone(),
        None => SipAddr::try_from(&contact)?,
    };
    // The Via names the transport the request goes out on.
    let (connection, _) = endpoint.transport_layer.lookup(&target, None).await?;
    let via = endpoint.get_via(Some(connection.get_addr().clone()), None)?;
    let from = typed::From {
        display_name: None,
        uri: bridge.clone(),
        params: vec![],
    }
    .with_tag(make_tag());
    let to = typed::To {
        display_name: None,
        uri: contact.clone(),
        params: vec![],
    };
    let request = endpoint.make_request(Method::Options, contact, via, from, to, 1, None);
    let key = TransactionKey::from_request(&request, TransactionRole::Client)?;
    let mut tx = Transaction::new_client(key, request, endpoint.clone(), Some(connection));
    tx.destination = Some(target);
    tx.send().await?;
    while let Some(message) = tx.receive().await {
        if let SipMessage::Response(response) = message
            && response.status_code.kind() != StatusCodeKind::Provisional
        {
            return Ok(());
        }
    }
    anyhow::bail!("no response")
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

/// A REGISTER's Contact (the first, when it names several).
#[derive(Debug, PartialEq)]
struct Contact {
    /// The phone's URI as it wrote it, and parsed; `None` for `*` (all).
    uri: Option<(String, Uri)>,
    expires: Option<u32>,
    instance: Option<String>,
}

/// Every Contact of a request, one by one: each Contact header, and each
/// of the comma-separated ones within a header (commas in quoted names and
/// in angle brackets are no separators).
fn contacts_of(request: &rsipstack::sip::Request) -> Vec<String> {
    request
        .headers
        .iter()
        .filter(|header| header.name().eq_ignore_ascii_case("Contact"))
        .flat_map(|header| split_contacts(header.value()))
        .collect()
}

fn split_contacts(value: &str) -> Vec<String> {
    let mut contacts = Vec::new();
    let mut current = String::new();
    let (mut quoted, mut bracketed, mut escaped) = (false, false, false);
    for c in value.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' if !bracketed => quoted = !quoted,
            '<' if !quoted => bracketed = true,
            '>' if !quoted => bracketed = false,
            ',' if !quoted && !bracketed => {
                contacts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    contacts.push(current);
    contacts
        .into_iter()
        .map(|contact| contact.trim().to_owned())
        .filter(|contact| !contact.is_empty())
        .collect()
}

/// The Contact of a REGISTER; `None` when it names no usable SIP URI.
fn parse_contact(value: &str) -> Option<Contact> {
    let value = value.trim();
    if value == "*" {
        return Some(Contact {
            uri: None,
            expires: None,
            instance: None,
        });
    }
    // Without angle brackets, what follows the URI's first `;` are the
    // Contact's own parameters (RFC 3261 §20.10).
    let (uri, params) = match (value.find('<'), value.find('>')) {
        (Some(open), Some(close)) if open < close => (&value[open + 1..close], &value[close + 1..]),
        _ => value.split_once(';').unwrap_or((value, "")),
    };
    let param = |name: &str| {
        params
            .split(';')
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().trim_matches('"').to_owned())
    };
    let text = uri.trim().to_owned();
    let scheme = text.split_once(':')?.0;
    if !(scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips")) {
        return None;
    }
    let parsed = Uri::try_from(text.as_str()).ok()?;
    Some(Contact {
        uri: Some((text, parsed)),
        expires: param("expires").and_then(|v| v.parse().ok()),
        instance: param("+sip.instance"),
    })
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

    fn binding(contact: &str, instance: Option<&str>, seconds: u64) -> (Binding, Uri) {
        let binding = Binding {
            contact: contact.into(),
            instance: instance.map(Into::into),
            source: None,
            expires_at: Instant::now() + Duration::from_secs(seconds),
            reachable: true,
        };
        (binding, Uri::try_from(contact).unwrap())
    }

    #[test]
    fn each_phone_of_an_extension_has_its_binding() {
        let mut phones = Vec::new();
        fn bind_phone(
            phones: &mut Vec<Binding>,
            contact: &str,
            instance: Option<&str>,
            seconds: u64,
        ) -> Bound {
            let (binding, uri) = binding(contact, instance, seconds);
            bind(phones, binding, &uri)
        }
        assert!(bind_phone(&mut phones, "sip:alice@10.0.0.1", None, 60).fresh);
        assert!(bind_phone(&mut phones, "sip:alice@10.0.0.2:5062", None, 60).fresh);
        // A refresh: nothing new. With other parameters: the same phone.
        let refresh = bind_phone(&mut phones, "sip:alice@10.0.0.1", None, 120);
        assert!(!refresh.fresh && refresh.displaced.is_none());
        bind_phone(&mut phones, "sip:alice@10.0.0.1:5060;ob", None, 120);
        let contacts =
            |phones: &[Binding]| phones.iter().map(|b| b.contact.clone()).collect::<Vec<_>>();
        assert_eq!(
            contacts(&phones),
            ["sip:alice@10.0.0.2:5062", "sip:alice@10.0.0.1:5060;ob"]
        );
        // The same instance from a new address: that phone, moved.
        let uuid = Some("<urn:uuid:1>");
        assert!(bind_phone(&mut phones, "sip:alice@10.0.0.3", uuid, 60).fresh);
        assert!(bind_phone(&mut phones, "sip:alice@10.0.0.4", uuid, 60).fresh);
        assert_eq!(phones.len(), 3);
        assert_eq!(phones[0].contact, "sip:alice@10.0.0.4");
        // Beyond the limit, the phone whose registration ends first goes.
        for n in 10..17 {
            bind_phone(&mut phones, &format!("sip:alice@10.0.1.{n}"), None, 300);
        }
        assert_eq!(phones.len(), MAX_BINDINGS);
        let full = bind_phone(&mut phones, "sip:alice@10.0.2.1", None, 300);
        assert_eq!(
            full.displaced.map(|b| b.contact).as_deref(),
            Some("sip:alice@10.0.0.2:5062")
        );
        assert_eq!(phones.len(), MAX_BINDINGS);
        // Expired bindings go when the next phone registers.
        let mut expired = vec![binding("sip:alice@10.0.0.9", None, 0).0];
        bind_phone(&mut expired, "sip:alice@10.0.0.1", None, 60);
        assert_eq!(contacts(&expired), ["sip:alice@10.0.0.1"]);
    }

    #[test]
    fn several_contacts_in_one_header_are_split() {
        assert_eq!(
            split_contacts(
                "<sip:alice@10.0.0.1>;expires=60, \"Desk, 2nd floor\" <sip:alice@10.0.0.2;x=a,b>,sip:alice@10.0.0.3"
            ),
            [
                "<sip:alice@10.0.0.1>;expires=60",
                "\"Desk, 2nd floor\" <sip:alice@10.0.0.2;x=a,b>",
                "sip:alice@10.0.0.3"
            ]
        );
        assert_eq!(
            split_contacts("\"a \\\" , b\" <sip:a@h>"),
            ["\"a \\\" , b\" <sip:a@h>"]
        );
        assert_eq!(split_contacts("*"), ["*"]);
        assert!(split_contacts(" , ").is_empty());
    }

    #[test]
    fn contacts_parse() {
        let contact = |value: &str| {
            parse_contact(value).map(|c| {
                let uri = c.uri.map(|(text, _)| text);
                (uri, c.expires, c.instance)
            })
        };
        assert_eq!(
            contact("<sip:alice@127.0.0.1:5095;transport=UDP>;expires=60"),
            Some((
                Some("sip:alice@127.0.0.1:5095;transport=UDP".into()),
                Some(60),
                None
            ))
        );
        assert_eq!(
            contact(
                "\"Alice\" <sip:alice@10.0.0.1>;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>\""
            ),
            Some((
                Some("sip:alice@10.0.0.1".into()),
                None,
                Some("<urn:uuid:00000000-0000-1000-8000-000A95A0E128>".into())
            ))
        );
        assert_eq!(
            contact("sip:bob@10.0.0.2;expires=0"),
            Some((Some("sip:bob@10.0.0.2".into()), Some(0), None))
        );
        assert_eq!(contact("*"), Some((None, None, None)));
        assert_eq!(contact("<not a uri>"), None);
        assert_eq!(contact(""), None);
    }
}
