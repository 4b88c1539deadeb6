//! The bridge: the SIP leg and ConnectyCube joined by the user mapping.
//! Every mapped extension's ConnectyCube user is signed in (chat open) for
//! as long as the bridge runs; a SIP call to a mapped extension becomes a
//! `call` from the caller's user (or the gateway user) to the extension's
//! user; every call ends in one CDR line.

pub mod app_caller;
pub mod app_leg;
pub mod asterisk;
pub mod cdr;
pub mod identity;
pub mod presence;
pub mod totals;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{Config, UserMapping, sandbox_address};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::sip::{
    self, Account, AdmissionConfig, AppCaller, CallRecord, Caller, Destination, Dialer, Listener,
    OutboundCall, Router, Services, SipConfig, TlsFiles, Transport, UserAgent,
};
use app_caller::ConnectyCubeCaller;
use app_leg::{ConnectyCubeLeg, PlacedSessions, refuse_mesh_link};
use asterisk::{AmiSettings, AsteriskLink};
use cdr::CdrWriter;
use identity::{Identity, IncomingCall};
use presence::Presence;
use totals::CallTotals;

pub struct Bridge {
    pub sip: UserAgent,
    /// The embedded ConnectyCube sandbox, when configured.
    pub sandbox: Option<Sandbox>,
    router: Arc<BridgeRouter>,
    /// Keeps Asterisk told of the app users' states, when configured.
    asterisk: Option<AsteriskLink>,
    /// Held by a reload: one at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl Bridge {
    /// Starts everything `config` asks for; `adjust` has the last word on
    /// the SIP leg's settings (command-line options).
    pub async fn start(
        config: Config,
        adjust: impl FnOnce(&mut SipConfig),
    ) -> anyhow::Result<Bridge> {
        let cc = &config.connectycube;
        let sandbox = if cc.sandbox {
            let listen =
                sandbox_address(cc).context("connectycube.api_url: no address for the sandbox")?;
            Some(
                Sandbox::start(SandboxConfig {
                    listen,
                    app_id: cc.app_id,
                    auth_key: cc.auth_key.clone(),
                    domain: cc.chat_domain.clone(),
                    sdk_path: None,
                })
                .await?,
            )
        } else {
            None
        };

        if let Some(directory) = &config.recording.directory {
            std::fs::create_dir_all(directory).with_context(|| {
                format!("recording.directory: cannot create {}", directory.display())
            })?;
        }
        let (incoming, incoming_calls) = mpsc::unbounded_channel();
        let presence = Presence::new(config.users.iter().map(|u| u.extension.as_str()));
        let identities = Arc::new(Identities::new(presence.clone()));
        for user in &config.users {
            identities.sign_in(cc, user, &incoming).await;
        }
        // After the first sign-ins, so Asterisk first hears how they went.
        let asterisk = asterisk_link(&config, &presence);
        let gateway = match (&cc.gateway_login, &cc.gateway_password) {
            (Some(login), Some(password)) => {
                let ignore = Box::new(|_| {});
                match Identity::sign_in(cc, login, password, incoming.clone(), ignore).await {
                    Ok(identity) => Some(identity),
                    Err(e) => {
                        warn!("gateway user {login:?}: {e}; calls from unmapped numbers will fail");
                        None
                    }
                }
            }
            _ => None,
        };
        let router = Arc::new(BridgeRouter {
            answer_timeout: Duration::from_secs(cc.answer_timeout_s),
            identities,
            gateway,
            services: Services::line_checks(),
            placed: PlacedSessions::default(),
            cdr: CdrWriter::open(config.cdr.path.as_deref())?,
            totals: CallTotals::default(),
            config: RwLock::new(Arc::new(config.clone())),
            incoming,
        });
        tokio::spawn(retry_sign_ins(Arc::downgrade(&router)));
        let mut sip_settings = sip_config(&config);
        adjust(&mut sip_settings);
        let sip = UserAgent::start(sip_settings, router.clone()).await?;
        tokio::spawn(dial_out(router.clone(), sip.dialer(), incoming_calls));
        Ok(Bridge {
            sip,
            sandbox,
            router,
            asterisk,
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// Applies the configuration `read` gives (SIGHUP) to the running
    /// bridge: the user mapping (users added sign in to ConnectyCube, users
    /// taken out sign out and their phones are forgotten, changed
    /// credentials sign in again), who is admitted (`sip.trusted`, the
    /// phones' passwords; `adjust` as at the start), the `[sip]` settings
    /// new calls take (`SipSection::reloaded`), which new calls are
    /// recorded, and where CDRs go (the file is opened again, for log
    /// rotation). Calls in progress go on as they are. The rest takes
    /// effect at the next start: each section changed is named in the log.
    /// A configuration with a mistake is refused whole. Reloads run one at
    /// a time, each reading the configuration as it then is.
    pub async fn reload(
        &self,
        read: impl FnOnce() -> anyhow::Result<Config>,
        adjust: impl FnOnce(&mut SipConfig),
    ) {
        let _one_at_a_time = self.reloading.lock().await;
        let config = match read() {
            Ok(config) => config,
            Err(e) => {
                warn!("reload refused, the bridge goes on as it was: {e}");
                return;
            }
        };
        let router = &self.router;
        let old = router.config();
        for section in old.fixed_sections_changed(&config) {
            warn!("reload: [{section}] changed; it takes effect when the bridge restarts");
        }
        let recording = match &config.recording.directory {
            Some(directory) if config.recording != old.recording => {
                match std::fs::create_dir_all(directory) {
                    Ok(()) => config.recording,
                    Err(e) => {
                        warn!(
                            "reload: recording.directory: cannot create {}: {e}; recording stays as it was",
                            directory.display()
                        );
                        old.recording.clone()
                    }
                }
            }
            _ => config.recording,
        };
        // Opened again even when unchanged: a log rotation may have moved
        // the file away.
        let cdr = match router.cdr.reopen(config.cdr.path.as_deref()) {
            Ok(()) => config.cdr,
            Err(e) => {
                warn!("reload: {e}; CDRs go on where they went");
                old.cdr.clone()
            }
        };
        let applied = Arc::new(Config {
            users: config.users,
            cdr,
            sip: old.sip.reloaded(&config.sip),
            recording,
            ..(*old).clone()
        });
        let mut sip_settings = sip_config(&applied);
        adjust(&mut sip_settings);
        self.sip.reconfigure(sip_settings);

        let is_new = |user: &&UserMapping| old.user_by_extension(&user.extension).is_none();
        let added: Vec<&UserMapping> = applied.users.iter().filter(is_new).collect();
        let changed: Vec<&UserMapping> = applied
            .users
            .iter()
            .filter(|user| {
                old.user_by_extension(&user.extension)
                    .is_some_and(|before| before != *user)
            })
            .collect();
        let removed: Vec<&UserMapping> = old
            .users
            .iter()
            .filter(|user| applied.user_by_extension(&user.extension).is_none())
            .collect();
        let identities = &router.identities;
        for user in &added {
            identities.presence.add(&user.extension);
        }
        let signs_in_again = |user: &&&UserMapping| {
            old.user_by_extension(&user.extension).is_none_or(|before| {
                (&before.login, &before.password) != (&user.login, &user.password)
            })
        };
        for user in added.iter().chain(&changed).filter(signs_in_again) {
            identities
                .sign_in(&applied.connectycube, user, &router.incoming)
                .await;
        }
        // Routed from now on; then the users taken out go, so that a
        // retried sign-in finishing meanwhile finds them gone.
        *router.config.write().unwrap() = applied.clone();
        for user in &removed {
            identities.sign_out(&user.extension);
        }
        let names = |users: &[&UserMapping]| match users {
            [] => "none".to_owned(),
            users => users
                .iter()
                .map(|u| u.extension.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        info!(
            "reload: users added: {}; changed: {}; taken out: {}",
            names(&added),
            names(&changed),
            names(&removed)
        );
    }

    /// Ends every call with BYE, unregisters, and tells Asterisk the app
    /// users are out of reach.
    pub async fn shutdown(&self) {
        self.sip.shutdown().await;
        if let Some(asterisk) = &self.asterisk {
            asterisk.stop().await;
        }
    }

    /// The SIP leg's registrations and calls, which mapped users are
    /// signed in to ConnectyCube, the calls ended so far, and the
    /// Asterisk link (for the management API).
    pub fn stats(&self) -> serde_json::Value {
        let mut stats = self.sip.stats();
        let signed_in: serde_json::Map<String, serde_json::Value> = self
            .signed_in()
            .into_iter()
            .map(|(extension, user_id)| (extension, user_id.into()))
            .collect();
        stats["connectycube_signed_in"] = signed_in.into();
        stats["calls_ended"] = self.router.totals.to_json();
        if let Some(asterisk) = &self.asterisk {
            stats["asterisk"] = asterisk.status();
        }
        stats
    }

    /// How long the calls in progress may go on once the bridge is told
    /// to stop (`sip.drain_timeout_s` as last loaded).
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.router.config().sip.drain_timeout_s)
    }

    /// Mapped extensions whose ConnectyCube user is signed in.
    pub fn signed_in(&self) -> Vec<(String, u64)> {
        let mut users: Vec<(String, u64)> = self
            .router
            .identities
            .signed_in
            .read()
            .unwrap()
            .iter()
            .map(|(extension, identity)| (extension.clone(), identity.user_id))
            .collect();
        users.sort();
        users
    }
}

/// The SIP leg's settings from the bridge's configuration.
fn sip_config(config: &Config) -> SipConfig {
    let s = &config.sip;
    let mut listeners: Vec<Listener> = [Transport::Udp, Transport::Tcp]
        .into_iter()
        .map(|transport| Listener {
            transport,
            address: s.listen,
        })
        .collect();
    if let Some(address) = s.tls_listen {
        listeners.push(Listener {
            transport: Transport::Tls,
            address,
        });
    }
    let accounts = match (&s.username, &s.password, &s.domain) {
        (Some(username), Some(password), Some(domain)) => vec![Account {
            username: username.clone(),
            password: password.clone(),
            registrar: format!("sip:{domain}"),
            expires: 600,
        }],
        _ => Vec::new(),
    };
    SipConfig {
        listeners,
        tls: s
            .tls_certificate
            .clone()
            .zip(s.tls_key.clone())
            .map(|(certificate, key)| TlsFiles { certificate, key }),
        public_address: s.public_address,
        stun_server: config.connectycube.stun_server.clone(),
        // Checked with the configuration.
        turn_server: config
            .connectycube
            .turn_server
            .as_deref()
            .and_then(|url| url.parse().ok()),
        turn_ca_file: config.connectycube.turn_ca_file.clone(),
        relay_only: config.connectycube.relay_only,
        // RTP binds where SIP listens.
        media_address: s.listen.ip(),
        admission: AdmissionConfig {
            trusted: s.trusted.clone(),
            realm: "sip-cc-bridge".into(),
            users: config
                .users
                .iter()
                .filter_map(|u| Some((u.extension.clone(), u.sip_password.clone()?)))
                .collect(),
            requests_per_second: 50.0,
            sha256: s.digest_sha256,
        },
        domain: s.domain.clone(),
        // Checked with the configuration.
        outbound_proxy: s
            .outbound_proxy
            .as_deref()
            .and_then(|proxy| crate::sip::proxy_address(proxy).ok()),
        accounts,
        registrar: s.registrar,
        qualify_interval: Duration::from_secs(s.qualify_interval_s),
        max_calls: s.max_calls,
        max_cpu_percent: s.max_cpu_percent,
        video: s.video,
        webrtc_stack: s.webrtc_stack,
        answer_delay: Duration::ZERO,
        no_answer_timeout: Duration::from_millis(s.no_answer_timeout_ms),
        rtp_timeout: Duration::from_millis(s.rtp_timeout_ms),
        jitter_buffer: Duration::from_millis(s.jitter_buffer_ms),
        opus_complexity: s.opus_complexity,
        offer_srtp: s.offer_srtp,
        early_media: s.early_media,
        ..SipConfig::embedded_default()
    }
}

/// The AMI link `config` asks for.
fn asterisk_link(config: &Config, presence: &Arc<Presence>) -> Option<AsteriskLink> {
    let asterisk = &config.asterisk;
    let settings = AmiSettings {
        address: asterisk.ami_address()?,
        // Checked with the configuration; a CA file gone since is logged.
        transport: asterisk
            .transport()
            .inspect_err(|why| warn!("asterisk.tls_ca_file: {why}: no link to Asterisk"))
            .ok()?,
        username: asterisk.username.clone()?,
        secret: asterisk.secret.clone()?,
        device_prefix: asterisk.device_prefix.clone(),
    };
    Some(AsteriskLink::start(settings, presence.clone()))
}

/// The ConnectyCube users the bridge acts as, by extension.
struct Identities {
    signed_in: RwLock<HashMap<String, Arc<Identity>>>,
    /// Mapped extensions whose sign-in failed, with why (retried).
    unavailable: Mutex<HashMap<String, String>>,
    presence: Arc<Presence>,
}

impl Identities {
    fn new(presence: Arc<Presence>) -> Self {
        Identities {
            signed_in: RwLock::default(),
            unavailable: Mutex::default(),
            presence,
        }
    }

    async fn sign_in(
        &self,
        cc: &crate::config::ConnectyCubeSection,
        user: &crate::config::UserMapping,
        incoming: &mpsc::UnboundedSender<IncomingCall>,
    ) {
        let key = user.extension.to_ascii_lowercase();
        let (presence, extension) = (self.presence.clone(), user.extension.clone());
        let chat_state = Box::new(move |online| presence.set_signed_in(&extension, online));
        let identity = Identity::sign_in(
            cc,
            &user.login,
            &user.password,
            incoming.clone(),
            chat_state,
        );
        match identity.await {
            Ok(identity) => {
                info!(
                    "mapping {} ↔ ConnectyCube user {} ({}): signed in",
                    user.extension, identity.user_id, user.login
                );
                self.unavailable.lock().unwrap().remove(&key);
                self.signed_in.write().unwrap().insert(key, identity);
                self.presence.set_signed_in(&user.extension, true);
            }
            Err(e) => {
                // After a reload's change of credentials the user signed in
                // before is no longer the one mapped.
                self.signed_in.write().unwrap().remove(&key);
                let mut unavailable = self.unavailable.lock().unwrap();
                if unavailable.get(&key) != Some(&e) {
                    warn!(
                        "mapping {} ↔ ConnectyCube {:?}: {e}",
                        user.extension, user.login
                    );
                }
                unavailable.insert(key, e);
                self.presence.set_signed_in(&user.extension, false);
            }
        }
    }

    /// `extension` is no longer mapped: its user signs out once the calls
    /// in progress that act as it end.
    fn sign_out(&self, extension: &str) {
        let key = extension.to_ascii_lowercase();
        self.signed_in.write().unwrap().remove(&key);
        self.unavailable.lock().unwrap().remove(&key);
        self.presence.set_signed_in(extension, false);
    }

    fn get(&self, extension: &str) -> Option<Arc<Identity>> {
        self.signed_in
            .read()
            .unwrap()
            .get(&extension.to_ascii_lowercase())
            .cloned()
    }

    fn problem(&self, extension: &str) -> String {
        self.unavailable
            .lock()
            .unwrap()
            .get(&extension.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default()
    }

    fn extension_of(&self, user_id: u64) -> Option<String> {
        self.signed_in
            .read()
            .unwrap()
            .iter()
            .find(|(_, identity)| identity.user_id == user_id)
            .map(|(extension, _)| extension.clone())
    }
}

/// Mappings that could not sign in (ConnectyCube unreachable at start, a
/// password changed later) are tried again every 30 s while the bridge runs.
async fn retry_sign_ins(router: Weak<BridgeRouter>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let Some(router) = router.upgrade() else {
            return;
        };
        let pending: Vec<String> = router
            .identities
            .unavailable
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let config = router.config();
        for extension in pending {
            if let Some(user) = config.user_by_extension(&extension) {
                let identities = &router.identities;
                identities
                    .sign_in(&config.connectycube, user, &router.incoming)
                    .await;
                // A reload took the user out meanwhile.
                if router.config().user_by_extension(&extension).is_none() {
                    identities.sign_out(&extension);
                }
            }
        }
    }
}

struct BridgeRouter {
    /// Replaced whole by a reload.
    config: RwLock<Arc<Config>>,
    /// Where the users' new calls go (for users signed in later).
    incoming: mpsc::UnboundedSender<IncomingCall>,
    identities: Arc<Identities>,
    gateway: Option<Arc<Identity>>,
    services: Services,
    placed: PlacedSessions,
    answer_timeout: Duration,
    cdr: CdrWriter,
    totals: CallTotals,
}

impl BridgeRouter {
    fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    /// The extension the bridge acts for as ConnectyCube user `user_id`
    /// (mapped still: a sign-in may finish after a reload took it out).
    fn extension_of(&self, user_id: u64) -> Option<String> {
        self.identities
            .extension_of(user_id)
            .filter(|extension| self.config().user_by_extension(extension).is_some())
    }

    /// A new file for a call of `extension`, when its calls are recorded.
    fn recording_path(&self, extension: &str, recorded: bool) -> Option<std::path::PathBuf> {
        let config = self.config();
        let recording = &config.recording;
        if !(recording.enabled || recorded) {
            return None;
        }
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = format!("{seconds}-{extension}-{:08x}.wav", rand::random::<u32>());
        Some(recording.directory.as_ref()?.join(name))
    }

    fn mapping_of(&self, user_id: u64) -> Option<UserMapping> {
        self.config()
            .user_by_extension(&self.extension_of(user_id)?)
            .cloned()
    }
}

impl Router for BridgeRouter {
    fn route(&self, target: &str, caller: &Caller) -> Option<Destination> {
        let config = self.config();
        let Some(mapping) = config.user_by_extension(target) else {
            return self.services.route(target, caller);
        };
        let key = mapping.extension.to_ascii_lowercase();
        let Some(callee) = self.identities.get(&key) else {
            let problem = self.identities.problem(&key);
            warn!(
                "call to {target}: mapping {} ↔ {:?} unusable: {problem}",
                mapping.extension, mapping.login
            );
            return Some(Destination::App {
                leg: Box::new(Unavailable(format!(
                    "ConnectyCube user of {} cannot sign in",
                    mapping.extension
                ))),
                record_to: None,
            });
        };
        let from = self
            .identities
            .get(&caller.user)
            .or_else(|| self.gateway.clone());
        let Some(from) = from else {
            warn!(
                "call to {target} from unmapped {}: no gateway user configured",
                caller.uri
            );
            return None;
        };
        let mut user_info = vec![("callerNumber".to_owned(), caller.user.clone())];
        if let Some(name) = &caller.display_name {
            user_info.push(("callerName".to_owned(), name.clone()));
        }
        Some(Destination::App {
            leg: Box::new(
                ConnectyCubeLeg::new(
                    from,
                    callee.user_id,
                    mapping
                        .display_name
                        .clone()
                        .unwrap_or_else(|| mapping.login.clone()),
                    user_info,
                    self.placed.clone(),
                    self.answer_timeout,
                )
                .with_presence(self.identities.presence.ringing(&mapping.extension)),
            ),
            record_to: self.recording_path(&mapping.extension, mapping.record),
        })
    }

    fn call_ended(&self, record: &CallRecord) {
        self.cdr.write(record);
        self.totals.count(record);
    }
}

/// A mapped user the bridge cannot act for: every call gets 503.
struct Unavailable(String);

impl sip::AppSide for Unavailable {
    fn describe(&self) -> String {
        self.0.clone()
    }

    fn hang_up(&mut self, _reason: &str) {}
}

impl sip::AppLeg for Unavailable {
    fn ring(
        &mut self,
        _webrtc: gst::Element,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<tokio::sync::oneshot::Receiver<String>, sip::Refusal>,
    > {
        let reason = self.0.clone();
        Box::pin(async move {
            Err(sip::Refusal {
                status: 503,
                reason,
            })
        })
    }
}

/// App calls toward SIP: each `call` to a mapped user rings that
/// extension's phone (its registration with the bridge, else
/// `sip:<extension>@<sip.domain>`). Calls the bridge placed itself are not
/// new calls.
async fn dial_out(
    router: Arc<BridgeRouter>,
    dialer: Dialer,
    mut incoming: mpsc::UnboundedReceiver<IncomingCall>,
) {
    while let Some(IncomingCall { identity, received }) = incoming.recv().await {
        let session = received.signal.session_id.clone();
        if router.placed.lock().unwrap().contains(&session) {
            continue;
        }
        let Some(extension) = router.extension_of(identity.user_id) else {
            continue;
        };
        if received.signal.caller_id != received.from_user_id {
            // Another opponent's link in a group call (the SDK sends it
            // under the caller's id) whose caller's own call is not ours.
            refuse_mesh_link(&identity, &received);
            continue;
        }
        // From now on the SDK's redials reach this call, not this loop.
        let signals = identity.subscribe(&session);
        let caller_id = received.from_user_id;
        let mut caller = ConnectyCubeCaller::new(identity.clone(), received, signals);
        let Some(route) = dialer.route(&extension) else {
            let why = dialer.unreachable(&extension);
            info!("ConnectyCube user {caller_id} calls {extension}: {why}");
            caller.refuse(480, &why);
            continue;
        };
        let (from_user, from_display) = match router.mapping_of(caller_id) {
            Some(mapping) => (mapping.extension.clone(), mapping.display_name.clone()),
            None => (format!("cc-{caller_id}"), None),
        };
        let caller = caller.with_presence(router.identities.presence.in_use(&from_user));
        info!(
            "ConnectyCube user {caller_id} calls {extension}: dialling {}",
            route.targets.join(", ")
        );
        dialer.call(OutboundCall {
            route,
            record_to: router.recording_path(
                &extension,
                router
                    .config()
                    .user_by_extension(&extension)
                    .is_some_and(|m| m.record),
            ),
            from_user,
            from_display,
            app: Box::new(caller),
        });
    }
}
