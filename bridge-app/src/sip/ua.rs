//! The user agent: listeners, the rsipstack endpoint, and the dispatch of
//! every incoming request — new calls to [`super::call`], requests inside a
//! dialog to the dialog, OPTIONS answered, the rest refused.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use gst::prelude::*;
use rsipstack::EndpointBuilder;
use rsipstack::dialog::DialogId;
use rsipstack::dialog::dialog::{Dialog, DialogStateSender};
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::resolver::SipResolver;
use rsipstack::sip::prelude::HeadersExt;
use rsipstack::sip::{Header, Host, Method, Scheme, StatusCode, Uri};
use rsipstack::transaction::transaction::Transaction;
use rsipstack::transport::tcp_listener::TcpListenerConnection;
use rsipstack::transport::tls::{TlsConfig, TlsListenerConnection};
use rsipstack::transport::udp::UdpConnection;
use rsipstack::transport::{SipAddr, TransportLayer};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::admission::{Admission, Verdict};
use super::cpu_load::{CpuLoad, LoadAhead};
use super::registrar::{RegisteredContacts, Registrar};
use super::registration::{self, RegistrationStates};
use super::routing::CallRecord;
use super::{Router, SipConfig, Transport, call};

pub(super) const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, REGISTER";
pub(super) const SUPPORTED: &str = "timer, norefersub, replaces";

/// What every call task shares.
pub(super) struct Shared {
    /// As started, with what reloads changed since (see `reconfigure`).
    config: RwLock<Arc<SipConfig>>,
    pub router: Arc<dyn Router>,
    pub admission: Admission,
    pub dialogs: Arc<DialogLayer>,
    /// The Contact URI of the bridge (public address when configured).
    pub contact: rsipstack::sip::Uri,
    pub active_calls: AtomicUsize,
    /// Calls in progress by Call-ID, so shutdown can end them and the
    /// management API can show them.
    pub calls: Mutex<HashMap<String, LiveCall>>,
    pub shutdown: CancellationToken,
    /// Set when the bridge is stopping: new calls are refused, calls in
    /// progress go on.
    pub draining: AtomicBool,
    pub registrar: Option<Arc<Registrar>>,
    /// Finds the SIP servers of a domain (RFC 3263).
    pub resolver: SipResolver,
    pub cpu: Arc<CpuLoad>,
}

/// Why the bridge takes no new call now.
#[derive(Debug, PartialEq)]
pub(super) enum Unavailable {
    /// It is stopping (draining): the calls in progress go on.
    Stopping,
    /// `max_calls` calls already.
    AtMaxCalls(usize),
    /// Its CPU over `max_cpu_percent` of its cores, now or once the calls
    /// starting carry media.
    CpuOver { load: LoadAhead, limit: f64 },
}

impl Unavailable {
    /// What the caller is told, in the 503's Reason or the app's refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Unavailable::Stopping => "the bridge is stopping",
            _ => "the bridge is at capacity",
        }
    }

    /// The headers of the 503 an INVITE or OPTIONS gets: the Reason, and
    /// when the bridge is only busy, when to try again.
    pub fn headers(&self) -> Vec<Header> {
        let reason = Header::Reason(format!("SIP;cause=503;text=\"{}\"", self.reason()).into());
        match self {
            Unavailable::Stopping => vec![reason],
            _ => vec![Header::RetryAfter("10".into()), reason],
        }
    }
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Stopping => write!(f, "the bridge is stopping"),
            Unavailable::AtMaxCalls(calls) => write!(f, "over capacity ({calls} calls)"),
            Unavailable::CpuOver { load, limit } if load.starting > 0 => write!(
                f,
                "over capacity (CPU at {:.1} % of its cores, {:.1} % counting {} {} still starting, over {limit} %)",
                load.now,
                load.expected,
                load.starting,
                if load.starting == 1 { "call" } else { "calls" }
            ),
            Unavailable::CpuOver { load, limit } => write!(
                f,
                "over capacity (CPU at {:.1} % of its cores, over {limit} %)",
                load.now
            ),
        }
    }
}

impl Shared {
    /// The SIP settings as they now are: a call takes them as it starts
    /// and at each renegotiation.
    pub fn config(&self) -> Arc<SipConfig> {
        self.config.read().unwrap().clone()
    }

    /// Counts one more call in progress, unless the bridge takes none now.
    pub fn take_call_slot(&self) -> Result<(), Unavailable> {
        self.refusing_calls(|max_calls| {
            let full = self.active_calls.fetch_add(1, Ordering::Relaxed) >= max_calls;
            if full {
                self.active_calls.fetch_sub(1, Ordering::Relaxed);
            }
            full
        })
    }

    /// Why a new call would be refused now, if it would: what an OPTIONS
    /// is answered with, as an INVITE would be (RFC 3261 §11.2), so that
    /// a proxy's load balancer takes the bridge out of its rotation.
    pub fn unavailable(&self) -> Option<Unavailable> {
        self.refusing_calls(|max_calls| self.active_calls.load(Ordering::Relaxed) >= max_calls)
            .err()
    }

    /// The CPU load with the calls whose media has not started yet (a
    /// call shows its media to the management API once it has).
    fn load_ahead(&self) -> LoadAhead {
        let (carrying, starting) = {
            let calls = self.calls.lock().unwrap();
            let carrying = calls.values().filter(|c| c.view.is_some()).count();
            (carrying, calls.len() - carrying)
        };
        self.cpu.ahead(carrying, starting)
    }

    /// Stopping, its CPU over the limit, or full: `full` is given
    /// `max_calls`.
    fn refusing_calls(&self, full: impl FnOnce(usize) -> bool) -> Result<(), Unavailable> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Unavailable::Stopping);
        }
        let config = self.config();
        let limit = config.max_cpu_percent;
        if limit > 0.0 {
            let load = self.load_ahead();
            if load.expected > limit {
                return Err(Unavailable::CpuOver { load, limit });
            }
        }
        if full(config.max_calls) {
            return Err(Unavailable::AtMaxCalls(config.max_calls));
        }
        Ok(())
    }
}

/// A call in progress as the rest of the bridge sees it.
pub(super) struct LiveCall {
    pub stop: CancellationToken,
    /// The call's record so far and where its live statistics come from
    /// (`sipsrc`, and `connectycubesink` when bridged); `None` while the
    /// call is still being set up.
    pub view: Option<(CallRecord, gst::Element, Option<gst::Element>)>,
    /// The highest CSeq the other party has used in this dialog (0: none
    /// yet), so that a request out of order gets its 500 (RFC 3261 §12.2.2).
    pub remote_cseq: u32,
    /// The call's SIP dialog, and where an INVITE naming it in `Replaces`
    /// goes (RFC 3891: another phone takes this one's place).
    pub replaceable: Option<Replaceable>,
    /// Told when the caller PRACKs our reliable 180 (RFC 3262), when its
    /// INVITE required one: the 180 is sent again until then.
    pub prack: Option<Arc<tokio::sync::Notify>>,
}

/// A call's dialog as an INVITE with `Replaces` may name it.
pub(super) struct Replaceable {
    /// The call's dialog; while the bridge's call rings, those of its
    /// ringing phones.
    pub dialogs: Vec<DialogId>,
    /// Still ringing (a call the bridge placed): a phone picking it up
    /// takes it; otherwise it is answered.
    pub early: bool,
    pub to: mpsc::UnboundedSender<Transaction>,
}

impl LiveCall {
    fn to_json(&self, call_id: &str) -> serde_json::Value {
        let Some((record, sip, app)) = &self.view else {
            return json!({ "call_id": call_id, "state": "setting up" });
        };
        let mut record = record.clone();
        record.ended = std::time::SystemTime::now();
        let mut view = record.to_json();
        let object = view.as_object_mut().expect("a record is an object");
        for done_only in ["end", "status", "cause"] {
            object.remove(done_only);
        }
        let state = if record.answered.is_some() {
            "answered"
        } else {
            "ringing"
        };
        object.insert("state".into(), state.into());
        object.insert("rtp".into(), structure_json(&sip.property("stats")));
        if let Some(app) = app {
            object.insert("webrtc".into(), structure_json(&app.property("stats")));
        }
        view
    }
}

/// The plain fields of a GStreamer `stats` structure as JSON.
fn structure_json(structure: &gst::Structure) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    for (name, value) in structure.iter() {
        let json = if let Ok(v) = value.get::<u64>() {
            v.into()
        } else if let Ok(v) = value.get::<i64>() {
            v.into()
        } else if let Ok(v) = value.get::<u32>() {
            v.into()
        } else if let Ok(v) = value.get::<i32>() {
            v.into()
        } else if let Ok(v) = value.get::<f64>() {
            ((v * 1000.0).round() / 1000.0).into()
        } else if let Ok(v) = value.get::<bool>() {
            v.into()
        } else if let Ok(v) = value.get::<String>() {
            v.into()
        } else {
            continue;
        };
        object.insert(name.replace('-', "_"), json);
    }
    object.into()
}

/// A running SIP user agent. Dropping it (or [`UserAgent::shutdown`]) ends
/// every call with BYE and closes the listeners.
pub struct UserAgent {
    shared: Arc<Shared>,
    addresses: Vec<SocketAddr>,
    registrations: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    registration_stop: CancellationToken,
    registration_states: RegistrationStates,
}

impl UserAgent {
    pub async fn start(config: SipConfig, router: Arc<dyn Router>) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let transports = TransportLayer::new(shutdown.child_token());
        let external = |address: SocketAddr| {
            config
                .public_address
                .map(|public| SocketAddr::new(public, address.port()))
        };
        let mut addresses = Vec::new();
        for listener in &config.listeners {
            let address = listener.address;
            match listener.transport {
                Transport::Udp => {
                    let connection = UdpConnection::create_connection(
                        address,
                        external(address),
                        Some(shutdown.child_token()),
                    )
                    .await
                    .with_context(|| format!("cannot listen for SIP on udp {address}"))?;
                    transports.add_transport(connection.into());
                }
                Transport::Tcp => {
                    let connection = TcpListenerConnection::new(address, external(address))
                        .await
                        .with_context(|| format!("cannot listen for SIP on tcp {address}"))?;
                    transports.add_transport(connection.into());
                }
                Transport::Tls => {
                    let files = config
                        .tls
                        .as_ref()
                        .context("sip.tls: a TLS listener needs a certificate and key")?;
                    let read = |path: &std::path::Path| {
                        std::fs::read(path)
                            .with_context(|| format!("sip.tls: cannot read {}", path.display()))
                    };
                    let tls = TlsConfig {
                        cert: Some(read(&files.certificate)?),
                        key: Some(read(&files.key)?),
                        ..Default::default()
                    };
                    let connection = TlsListenerConnection::new(address, external(address), tls)
                        .await
                        .with_context(|| format!("cannot listen for SIP on tls {address}"))?;
                    transports.add_transport(connection.into());
                }
            }
            info!(
                "SIP listening on {} {address}",
                format!("{:?}", listener.transport).to_lowercase()
            );
            addresses.push(address);
        }

        let registrar = config.registrar.then(|| Arc::new(Registrar::default()));
        let mut endpoint = EndpointBuilder::new();
        endpoint
            .with_cancel_token(shutdown.child_token())
            .with_transport_layer(transports)
            .with_user_agent(concat!("sip-cc-bridge/", env!("CARGO_PKG_VERSION")))
            .with_inspector(Box::new(super::digest_names::DigestAlgorithmNames))
            .with_allows(
                ALLOW
                    .split(", ")
                    .filter_map(|m| m.parse::<Method>().ok())
                    .collect(),
            );
        if let Some(registrar) = &registrar {
            endpoint.with_target_locator(Box::new(RegisteredContacts(registrar.clone())));
        }
        let endpoint = endpoint.build();
        let mut incoming = endpoint.incoming_transactions()?;
        let dialogs = Arc::new(DialogLayer::new(endpoint.inner.clone()));
        let first = addresses.first().context("sip: no listener configured")?;
        let contact_host =
            SocketAddr::new(config.public_address.unwrap_or(first.ip()), first.port());
        let contact = format!("sip:bridge@{contact_host}")
            .as_str()
            .try_into()
            .context("cannot build the Contact URI")?;
        let shared = Arc::new(Shared {
            admission: Admission::new(config.admission.clone()),
            registrar,
            config: RwLock::new(Arc::new(config)),
            router,
            dialogs,
            contact,
            active_calls: AtomicUsize::new(0),
            calls: Mutex::default(),
            shutdown: shutdown.clone(),
            draining: AtomicBool::new(false),
            resolver: SipResolver::new(),
            cpu: CpuLoad::new(),
        });
        tokio::spawn(shared.cpu.clone().sample(shutdown.child_token()));

        if let Some(registrar) = &shared.registrar {
            let settings = shared.clone();
            tokio::spawn(registrar.clone().qualify(
                endpoint.inner.clone(),
                shared.contact.clone(),
                move || settings.config().qualify_interval,
                shutdown.child_token(),
            ));
        }
        let registration_stop = CancellationToken::new();
        let registration_states = RegistrationStates::default();
        let registrations = shared
            .config()
            .accounts
            .iter()
            .map(|account| {
                registration::spawn(
                    endpoint.inner.clone(),
                    shared.resolver.clone(),
                    account.clone(),
                    shared.config().outbound_proxy.clone(),
                    registration_states.clone(),
                    registration_stop.clone(),
                )
            })
            .collect();

        let serving = endpoint.inner.clone();
        tokio::spawn(async move {
            if let Err(e) = serving.serve().await {
                warn!("SIP endpoint stopped: {e}");
            }
        });
        let dispatcher = shared.clone();
        tokio::spawn(async move {
            // The endpoint lives as long as this loop.
            let _endpoint = endpoint;
            loop {
                tokio::select! {
                    _ = dispatcher.shutdown.cancelled() => break,
                    tx = incoming.recv() => match tx {
                        Some(tx) => dispatch(&dispatcher, tx).await,
                        None => break,
                    },
                }
            }
        });
        Ok(Self {
            shared,
            addresses,
            registrations: Mutex::new(registrations),
            registration_stop,
            registration_states,
        })
    }

    /// A handle for placing calls toward SIP phones.
    pub fn dialer(&self) -> Dialer {
        Dialer {
            shared: self.shared.clone(),
        }
    }

    /// Each account's state: `registered`, `failed: <reason>`, …
    pub fn registrations(&self) -> HashMap<String, String> {
        self.registration_states.lock().unwrap().clone()
    }

    /// Applies a reloaded configuration, whose keys beyond those a reload
    /// may change (`SipSection::reloaded`) are as the bridge started with:
    /// who is admitted (trusted servers and users; the phones of users no
    /// longer there are not rung again), and the settings calls take as
    /// they start. Calls in progress go on as they are.
    pub fn reconfigure(&self, settings: SipConfig) {
        let shared = &self.shared;
        let admission = settings.admission.clone();
        *shared.config.write().unwrap() = Arc::new(settings);
        let users: Vec<String> = admission.users.keys().cloned().collect();
        // First, so that no phone of a user taken out registers after the purge.
        shared.admission.reconfigure(admission);
        if let Some(registrar) = &shared.registrar {
            let keep = |user: &str| users.iter().any(|known| known.eq_ignore_ascii_case(user));
            for user in registrar.forget_all_but(keep) {
                info!("registrar: {user} is no longer a user; its phones are forgotten");
            }
        }
    }

    /// The addresses SIP listens on.
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    pub fn active_calls(&self) -> usize {
        self.shared.active_calls.load(Ordering::Relaxed)
    }

    /// Registrations, the phones registered with the bridge, and calls in
    /// progress with their live media statistics, for the management API.
    pub fn stats(&self) -> serde_json::Value {
        let calls: Vec<serde_json::Value> = self
            .shared
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|(call_id, call)| call.to_json(call_id))
            .collect();
        json!({
            "draining": self.shared.draining.load(Ordering::Relaxed),
            "active_calls": self.active_calls(),
            "cpu_percent": self.shared.cpu.percent(),
            "cpu_cores": self.shared.cpu.cores(),
            "registrations": self.registrations(),
            "phones": self.shared.registrar.as_ref().map(|r| r.phones()),
            "calls": calls,
        })
    }

    /// Takes no new call (INVITEs get 503, apps' calls are refused) and
    /// unregisters every account, so that servers route calls elsewhere;
    /// the calls in progress go on.
    pub async fn drain(&self) {
        info!(
            "draining: {} call(s) in progress go on, new calls get 503",
            self.active_calls()
        );
        self.shared.draining.store(true, Ordering::Relaxed);
        self.unregister().await;
    }

    async fn unregister(&self) {
        self.registration_stop.cancel();
        let registrations = std::mem::take(&mut *self.registrations.lock().unwrap());
        for registration in registrations {
            let _ = registration.await;
        }
    }

    /// Ends every call with BYE, waits (up to 2 s) for them to finish,
    /// unregisters every account, then closes the listeners.
    pub async fn shutdown(&self) {
        let calls: Vec<CancellationToken> = self
            .shared
            .calls
            .lock()
            .unwrap()
            .values()
            .map(|call| call.stop.clone())
            .collect();
        for call in calls {
            call.cancel();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.active_calls() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.unregister().await;
        self.shared.shutdown.cancel();
    }
}

impl Drop for UserAgent {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Places calls toward SIP phones (for apps calling a SIP user).
#[derive(Clone)]
pub struct Dialer {
    shared: Arc<Shared>,
}

impl Dialer {
    /// Where `user`'s phone is called: see [`phone_route`].
    pub fn route(&self, user: &str) -> Option<PhoneRoute> {
        phone_route(&self.shared, user)
    }

    /// Why `user`, to whom there is no route, cannot be called.
    pub fn unreachable(&self, user: &str) -> String {
        let registered = self
            .shared
            .registrar
            .as_ref()
            .map_or(0, |r| r.registered(user));
        match registered {
            0 => format!("{user} has no phone registered"),
            _ => format!("{user}'s registered phones do not answer"),
        }
    }

    pub fn call(&self, request: call::OutboundCall) {
        call::outgoing(self.shared.clone(), request);
    }
}

/// Where a user's phones are called, and through which proxy.
#[derive(Debug, Clone)]
pub struct PhoneRoute {
    /// Request-URIs, rung at once: each phone registered with the bridge
    /// (the latest registered first), or the user at `sip.domain`.
    pub targets: Vec<String>,
    pub proxy: Option<SipAddr>,
}

/// The outbound proxy of `sip.outbound_proxy`: `host`, `host:port`, or a
/// SIP URI (`sip:host[:port][;transport=tcp]`; `sips:` is TLS). A name is
/// resolved for each call, by its DNS SRV records when no port is given
/// (RFC 3263).
pub fn proxy_address(text: &str) -> Result<SipAddr, String> {
    let text = text.trim();
    let secure = text.starts_with("sips:");
    let uri = if secure || text.starts_with("sip:") {
        text.to_owned()
    } else {
        format!("sip:{text}")
    };
    let invalid = || format!("{text:?} is not host, host:port or a SIP URI");
    let uri = rsipstack::sip::Uri::try_from(uri.as_str()).map_err(|_| invalid())?;
    let valid_host = match &uri.host_with_port.host {
        rsipstack::sip::Host::IpAddr(_) => true,
        rsipstack::sip::Host::Domain(name) => {
            let name = name.to_string();
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        }
    };
    if uri.auth.is_some() || !valid_host {
        return Err(invalid());
    }
    let mut address = SipAddr::try_from(&uri).map_err(|_| invalid())?;
    if secure {
        address.r#type = Some(rsipstack::sip::Transport::Tls);
    }
    Ok(address)
}

/// Where `user`'s phones are called: their registrations with the bridge
/// (each reached where it registered from: `RegisteredContacts`), else
/// `sip:<user>@<sip.domain>` (through the outbound proxy, if any); `None`
/// without either.
pub(super) fn phone_route(shared: &Shared, user: &str) -> Option<PhoneRoute> {
    let registered = shared
        .registrar
        .as_ref()
        .map(|r| r.lookup(user))
        .unwrap_or_default();
    if !registered.is_empty() {
        let targets = registered.into_iter().map(|b| b.contact).collect();
        return Some(PhoneRoute {
            targets,
            proxy: None,
        });
    }
    let config = shared.config();
    let domain = config.domain.as_ref()?;
    Some(PhoneRoute {
        targets: vec![format!("sip:{user}@{domain}")],
        proxy: config.outbound_proxy.clone(),
    })
}

/// The next hop of a request to `uri` without a proxy: its host, over TLS
/// for a `sips:` URI (RFC 3263 §4.1).
pub(super) fn next_hop(uri: &Uri) -> Option<SipAddr> {
    let mut next_hop = SipAddr::try_from(uri).ok()?;
    if uri.scheme == Some(Scheme::Sips) {
        next_hop
            .r#type
            .get_or_insert(rsipstack::sip::Transport::Tls);
    }
    Some(next_hop)
}

/// The servers a request to `next_hop` may go to, in the order to try them
/// (RFC 3263: SRV targets by priority and weight, then the name's
/// addresses); none when `next_hop` is an address, or when the name is not
/// found (the transport layer then reports why).
pub(super) async fn servers_of(resolver: &SipResolver, next_hop: &SipAddr) -> VecDeque<SipAddr> {
    let Host::Domain(domain) = &next_hop.addr.host else {
        return VecDeque::new();
    };
    let secure = next_hop.r#type == Some(rsipstack::sip::Transport::Tls);
    match resolver
        .lookup(domain, next_hop.addr.port, next_hop.r#type, secure)
        .await
    {
        Ok(targets) => targets
            .into_iter()
            .map(|target| SipAddr {
                r#type: Some(target.transport),
                ..SipAddr::from(target.addr)
            })
            .collect(),
        Err(e) => {
            debug!("{next_hop}: {e}");
            VecDeque::new()
        }
    }
}

/// A Warning header (RFC 3261 §20.43) saying why, as this bridge (399:
/// miscellaneous; 304: media type not available).
pub(super) fn warning(code: u16, text: &str) -> Header {
    let text = text.replace('"', "'");
    Header::Warning(format!("{code} sip-cc-bridge \"{text}\"").into())
}

/// A request's CSeq number.
pub(super) fn cseq_of(request: &rsipstack::sip::Request) -> Option<u32> {
    request.cseq_header().ok().and_then(|c| c.seq().ok())
}

/// Where a request came from, where responses go (RFC 3261 §18.2.2,
/// RFC 3581): its packet's source, or the peer of its connection.
pub(super) fn request_source(tx: &Transaction) -> Option<SipAddr> {
    tx.connection.as_ref()?.get_remote_addr().cloned()
}

/// The address a request came from.
pub(super) fn source_of(tx: &Transaction) -> Option<IpAddr> {
    request_source(tx)
        .and_then(|source| SocketAddr::try_from(source.addr).ok())
        .map(|source| source.ip())
}

/// The port of `uri`, SIP's default when it names none.
pub(super) fn port(uri: &Uri) -> u16 {
    uri.host_with_port.port.map(u16::from).unwrap_or_else(|| {
        let transport = if uri.scheme == Some(Scheme::Sips) {
            rsipstack::sip::Transport::Tls
        } else {
            rsipstack::sip::Transport::Udp
        };
        transport.default_port().into()
    })
}

/// The dialog of an INVITE the bridge answers. A phone that sent it
/// straight (one Via) over UDP from another address than its Contact names
/// is behind a NAT: the bridge's requests in the call go where it sent
/// from, as responses do (as Kamailio's `fix_nated_contact` does).
pub(super) fn server_invite(
    shared: &Shared,
    tx: &Transaction,
    states: DialogStateSender,
) -> anyhow::Result<InviteDialog> {
    let dialog = shared.dialogs.get_or_create_server_invite(
        tx,
        states,
        None,
        Some(shared.contact.clone()),
    )?;
    if let Some(target) = behind_nat(tx) {
        debug!(
            "{}: the caller is behind a NAT, reached at {target}",
            tx.original.uri
        );
        Dialog::Invite(dialog.clone())
            .set_remote_target(target, tx.original.contact_header().ok().cloned());
    }
    Ok(dialog)
}

/// The Contact of a request sent straight over UDP, at the address it came
/// from, when it names another one.
pub(super) fn behind_nat(tx: &Transaction) -> Option<Uri> {
    if tx.connection.as_ref()?.is_reliable() {
        return None;
    }
    let vias: usize = tx
        .original
        .headers
        .iter()
        .filter_map(|header| match header {
            Header::Via(via) => Some(via.value().split(',').count()),
            _ => None,
        })
        .sum();
    let source = request_source(tx)?;
    let mut contact = tx
        .original
        .typed_contact_headers()
        .ok()?
        .into_iter()
        .next()?
        .uri;
    let reached_as_named = contact.host_with_port.host == source.addr.host
        && Some(port(&contact)) == source.addr.port.map(u16::from);
    if vias != 1 || reached_as_named {
        return None;
    }
    contact.host_with_port = source.addr;
    Some(contact)
}

async fn dispatch(shared: &Arc<Shared>, mut tx: Transaction) {
    let in_dialog = tx
        .original
        .to_header()
        .ok()
        .and_then(|to| to.tag().ok().flatten())
        .is_some();
    let method = tx.original.method;
    debug!("{method} {} (in dialog: {in_dialog})", tx.original.uri);
    if let Err(problem) = check_request(&tx.original) {
        info!("{method} {}: {problem}, 400", tx.original.uri);
        let warning = warning(399, &problem.to_string());
        reply(&mut tx, StatusCode::BadRequest, vec![warning]).await;
        return;
    }
    if in_dialog {
        if let Err(highest) = in_order(shared, &tx.original) {
            info!("{method} {}: CSeq below {highest}, 500", tx.original.uri);
            let warning = warning(399, "CSeq out of order");
            reply(&mut tx, StatusCode::ServerInternalError, vec![warning]).await;
            return;
        }
        if method == Method::PRack {
            note_prack(shared, &tx.original);
        }
        match shared.dialogs.match_dialog(&tx) {
            // Handled before the next request is taken: an ACK handled
            // after the re-INVITE right behind it would be dropped as old.
            Some(Dialog::Invite(mut dialog)) if method == Method::Ack => {
                if let Err(e) = dialog.handle(&mut tx).await {
                    debug!("in-dialog ACK: {e}");
                }
            }
            Some(Dialog::Invite(mut dialog)) => {
                tokio::spawn(async move {
                    if !matches!(method, Method::Bye | Method::PRack | Method::Cancel)
                        && let Some((status, headers)) = not_established(&dialog).await
                    {
                        info!("{method} {}: {status}", tx.original.uri);
                        reply(&mut tx, status, headers).await;
                        return;
                    }
                    if let Err(e) = dialog.handle(&mut tx).await {
                        debug!("in-dialog {method}: {e}");
                    }
                });
            }
            _ => reply(&mut tx, StatusCode::CallTransactionDoesNotExist, vec![]).await,
        }
        return;
    }
    match method {
        Method::Invite => call::incoming(shared.clone(), tx),
        Method::Options => {
            let Some(source) = source_of(&tx) else { return };
            if !shared.admission.within_rate(source) {
                return;
            }
            if let Some(unavailable) = shared.unavailable() {
                reply(
                    &mut tx,
                    StatusCode::ServiceUnavailable,
                    unavailable.headers(),
                )
                .await;
                return;
            }
            let headers = vec![
                Header::Allow(ALLOW.into()),
                Header::Accept("application/sdp".into()),
                Header::Supported(SUPPORTED.into()),
            ];
            reply(&mut tx, StatusCode::OK, headers).await;
        }
        Method::Register if shared.registrar.is_some() => {
            if let Some(registrar) = &shared.registrar {
                registrar.handle(&shared.admission, &mut tx).await;
            }
        }
        Method::Bye | Method::Info | Method::Update => {
            reply(&mut tx, StatusCode::CallTransactionDoesNotExist, vec![]).await
        }
        _ => {
            let headers = vec![Header::Allow(ALLOW.into())];
            reply(&mut tx, StatusCode::MethodNotAllowed, headers).await;
        }
    }
}

/// How long a request on an answered dialog waits for its ACK: the 2xx is
/// sent again at most every 4 s (T2), and each brings an ACK.
const ACK_WAIT: Duration = Duration::from_secs(8);

/// Why a dialog cannot take a request (other than BYE, PRACK, CANCEL)
/// now, if it cannot: the stack would leave it unanswered. One answered
/// but not yet acknowledged is waited for: its ACK and a re-INVITE or INFO
/// sent right behind it are handled on different tasks.
async fn not_established(dialog: &InviteDialog) -> Option<(StatusCode, Vec<Header>)> {
    let deadline = tokio::time::Instant::now() + ACK_WAIT;
    loop {
        let state = dialog.state();
        if state.is_confirmed() {
            return None;
        }
        if state.is_terminated() {
            let ended = vec![warning(399, "the call has ended")];
            return Some((StatusCode::CallTransactionDoesNotExist, ended));
        }
        if !state.waiting_ack() || tokio::time::Instant::now() >= deadline {
            let later = vec![
                Header::RetryAfter("1".into()),
                warning(399, "the call is not established yet"),
            ];
            return Some((StatusCode::ServerInternalError, later));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records the CSeq of a new in-dialog request, or returns the highest one
/// seen when the request comes after a later one. ACK and CANCEL repeat
/// their INVITE's number and are not new requests.
fn in_order(shared: &Shared, request: &rsipstack::sip::Request) -> Result<(), u32> {
    if matches!(request.method, Method::Ack | Method::Cancel) {
        return Ok(());
    }
    let (Ok(call_id), Some(cseq)) = (request.call_id_header(), cseq_of(request)) else {
        return Ok(());
    };
    let mut calls = shared.calls.lock().unwrap();
    let Some(call) = calls.get_mut(call_id.value()) else {
        return Ok(());
    };
    if cseq < call.remote_cseq {
        return Err(call.remote_cseq);
    }
    call.remote_cseq = cseq;
    Ok(())
}

/// A PRACK: the call it belongs to stops sending its reliable 180.
fn note_prack(shared: &Shared, request: &rsipstack::sip::Request) {
    let Ok(call_id) = request.call_id_header() else {
        return;
    };
    if let Some(prack) = shared
        .calls
        .lock()
        .unwrap()
        .get(call_id.value())
        .and_then(|call| call.prack.as_ref())
    {
        prack.notify_one();
    }
}

/// Longest header value accepted; real ones are far shorter.
const MAX_HEADER_LEN: usize = 2048;
const MAX_HEADERS: usize = 64;

/// Mandatory headers present (RFC 3261 §8.1.1) and nothing oversized.
fn check_request(request: &rsipstack::sip::Request) -> Result<(), String> {
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        if request.header_value(name).is_none_or(|v| v.is_empty()) {
            return Err(format!("missing {name}"));
        }
    }
    // A dialog needs somewhere to send its requests.
    if request.method == Method::Invite && request.header_value("Contact").is_none() {
        return Err("missing Contact".to_owned());
    }
    if request.headers.iter().count() > MAX_HEADERS {
        return Err(format!("more than {MAX_HEADERS} headers"));
    }
    if let Some(header) = request
        .headers
        .iter()
        .find(|h| h.value().len() > MAX_HEADER_LEN)
    {
        return Err(format!(
            "{} header longer than {MAX_HEADER_LEN} bytes",
            header.name()
        ));
    }
    Ok(())
}

pub(super) async fn reply(tx: &mut Transaction, status: StatusCode, headers: Vec<Header>) {
    if let Err(e) = tx.reply_with(status.clone(), headers, None).await {
        debug!("cannot send {status}: {e}");
    }
}

/// Verdicts that end a request before it becomes a call.
pub(super) async fn refuse(tx: &mut Transaction, verdict: &Verdict) {
    match verdict {
        Verdict::Admit { .. } => {}
        Verdict::Challenge(challenges) => {
            let headers = challenges
                .iter()
                .map(|c| Header::WwwAuthenticate(c.as_str().into()))
                .collect();
            reply(tx, StatusCode::Unauthorized, headers).await;
        }
        Verdict::Forbidden => reply(tx, StatusCode::Forbidden, vec![]).await,
        Verdict::RateLimited => {
            reply(
                tx,
                StatusCode::ServiceUnavailable,
                vec![Header::RetryAfter("5".into())],
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const INVITE: &str = "INVITE sip:echo@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:echo@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContact: <sip:a@10.0.0.9>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";

    fn parse(bytes: &[u8]) -> Option<rsipstack::sip::Request> {
        match rsipstack::sip::SipMessage::try_from(bytes).ok()? {
            rsipstack::sip::SipMessage::Request(request) => Some(request),
            rsipstack::sip::SipMessage::Response(_) => None,
        }
    }

    #[test]
    fn well_formed_requests_pass_and_incomplete_ones_are_named() {
        assert_eq!(check_request(&parse(INVITE.as_bytes()).unwrap()), Ok(()));
        let without_contact = INVITE.replace("Contact: <sip:a@10.0.0.9>\r\n", "");
        assert_eq!(
            check_request(&parse(without_contact.as_bytes()).unwrap()),
            Err("missing Contact".to_owned())
        );
        let huge = INVITE.replace(
            "Max-Forwards: 70",
            &format!("Subject: {}\r\nMax-Forwards: 70", "x".repeat(5000)),
        );
        assert!(
            check_request(&parse(huge.as_bytes()).unwrap())
                .unwrap_err()
                .contains("Subject")
        );
    }

    #[test]
    fn an_outbound_proxy_is_a_host_a_host_and_port_or_a_sip_uri() {
        use rsipstack::sip::Transport;
        let parsed = |text| {
            let address = proxy_address(text).unwrap();
            (address.r#type, address.addr.to_string())
        };
        assert_eq!(parsed("192.0.2.10"), (None, "192.0.2.10".into()));
        assert_eq!(
            parsed(" sbc.example.com:5080 "),
            (None, "sbc.example.com:5080".into())
        );
        assert_eq!(
            parsed("[2001:db8::1]:5060"),
            (None, "[2001:db8::1]:5060".into())
        );
        assert_eq!(
            parsed("sip:sbc.example.com;transport=tcp;lr"),
            (Some(Transport::Tcp), "sbc.example.com".into())
        );
        assert_eq!(
            parsed("sips:sbc.example.com:5061"),
            (Some(Transport::Tls), "sbc.example.com:5061".into())
        );
        for bad in [
            "",
            "sip:",
            "user@sbc.example.com",
            "sbc example com",
            "host:port",
        ] {
            let error = proxy_address(bad).expect_err(bad);
            assert!(error.contains("host:port or a SIP URI"), "{bad}: {error}");
        }
    }

    proptest! {
        /// Whatever arrives on the SIP port, parsing and checking it never panics.
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Some(request) = parse(&bytes) {
                let _ = check_request(&request);
            }
        }

        /// Valid requests with one line cut, doubled or garbled.
        #[test]
        fn damaged_requests_never_panic(line in 0usize..10, damage in 0u8..3, junk in "[ -~]{0,40}") {
            let mut lines: Vec<String> = INVITE.split("\r\n").map(str::to_owned).collect();
            let line = line.min(lines.len() - 1);
            match damage {
                0 => { lines.remove(line); }
                1 => { let copy = lines[line].clone(); lines.insert(line, copy); }
                _ => lines[line] = junk,
            }
            if let Some(request) = parse(lines.join("\r\n").as_bytes()) {
                let _ = check_request(&request);
            }
        }
    }
}
