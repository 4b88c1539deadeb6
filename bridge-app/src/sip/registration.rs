//! Registration of the bridge's accounts at their registrar: digest on
//! 401/407, refresh before the granted expiry, backoff while the registrar
//! is unreachable or refuses, and un-REGISTER on shutdown. Each account's
//! state is logged when it changes and readable for the stats.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rsipstack::dialog::authenticate::Credential;
use rsipstack::dialog::registration::{RefreshOutcome, Registration};
use rsipstack::resolver::SipResolver;
use rsipstack::sip::{Host, Param, StatusCode, Transport, Uri};
use rsipstack::transaction::endpoint::EndpointInnerRef;
use rsipstack::transport::SipAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ua::{next_hop, servers_of};

/// One account the bridge registers.
#[derive(Clone)]
pub struct Account {
    pub username: String,
    pub password: String,
    /// The registrar, e.g. `sip:pbx.example.com` or `sip:127.0.0.1:5062`.
    pub registrar: String,
    /// Expiry asked for, in seconds.
    pub expires: u32,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("registrar", &self.registrar)
            .field("expires", &self.expires)
            .finish()
    }
}

impl Account {
    /// Reads `USER:PASSWORD@REGISTRAR` (the registrar may be `host:port`).
    pub fn parse(text: &str) -> Result<Account, String> {
        let (credentials, registrar) = text
            .rsplit_once('@')
            .ok_or("expected USER:PASSWORD@REGISTRAR")?;
        let (username, password) = credentials
            .split_once(':')
            .ok_or("expected USER:PASSWORD@REGISTRAR")?;
        if username.is_empty() || registrar.is_empty() {
            return Err("expected USER:PASSWORD@REGISTRAR".into());
        }
        let registrar = if registrar.starts_with("sip:") || registrar.starts_with("sips:") {
            registrar.to_owned()
        } else {
            format!("sip:{registrar}")
        };
        Ok(Account {
            username: username.to_owned(),
            password: password.to_owned(),
            registrar,
            expires: 600,
        })
    }
}

/// Account states by `user@registrar`: `registered`, `failed: <reason>`, …
pub type RegistrationStates = Arc<Mutex<HashMap<String, String>>>;

/// How long a registration whose every server failed waits before it
/// resolves and tries them again.
const ROUND_PAUSE: Duration = Duration::from_secs(30);

/// Keeps `account` registered until `stop` is cancelled, then unregisters;
/// through `proxy` (`sip.outbound_proxy`) when there is one. A registrar
/// (or proxy) named in DNS may have several servers (RFC 3263: SRV targets
/// by priority, then its addresses): the account registers at the first
/// that takes it, and goes on to the next when one cannot be reached or
/// answers 503 (RFC 3263 §4.3).
pub fn spawn(
    endpoint: EndpointInnerRef,
    resolver: SipResolver,
    account: Account,
    proxy: Option<SipAddr>,
    states: RegistrationStates,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let name = format!("{}@{}", account.username, account.registrar);
        let registrar = match rsipstack::sip::Uri::try_from(account.registrar.as_str()) {
            Ok(uri) => uri,
            Err(e) => {
                let state = format!("failed: bad registrar {:?}: {e}", account.registrar);
                warn!("registration {name}: {state}");
                states.lock().unwrap().insert(name, state);
                return;
            }
        };
        let credential = Credential {
            username: account.username.clone(),
            password: account.password.clone(),
            realm: None,
            auth_username: None,
        };
        let mut registration = Registration::new(endpoint, Some(credential));
        let record = |state: String| {
            let mut states = states.lock().unwrap();
            if states.get(&name) != Some(&state) {
                if state == "registered" {
                    info!("registration {name}: {state}");
                } else {
                    warn!("registration {name}: {state}");
                }
                states.insert(name.clone(), state);
            }
        };
        let first_hop = proxy.clone().or_else(|| next_hop(&registrar));
        let mut registered_at = registrar.clone();
        'rounds: loop {
            let servers: Vec<Option<SipAddr>> = match &first_hop {
                None => vec![None],
                Some(hop) => {
                    let found = servers_of(&resolver, hop).await;
                    if !found.is_empty() {
                        found.into_iter().map(Some).collect()
                    } else if matches!(hop.addr.host, Host::IpAddr(_)) {
                        vec![Some(hop.clone())]
                    } else if proxy.is_some() {
                        // Never around the proxy: the registrar's domain may
                        // resolve only behind it.
                        record(format!("failed: outbound proxy {hop}: not found"));
                        vec![]
                    } else {
                        // rsipstack resolves the registrar, and says why not.
                        vec![None]
                    }
                }
            };
            let several = servers.len() > 1;
            for server in servers {
                registration.outbound_proxy = server.as_ref().and_then(socket_of);
                registered_at = over_transport(&registrar, server.as_ref());
                let attempt = stop.child_token();
                registration
                    .keep_alive(
                        registered_at.clone(),
                        account.expires,
                        attempt.clone(),
                        |outcome| {
                            let server_failed = match outcome {
                                RefreshOutcome::Registered(_) => {
                                    record("registered".into());
                                    false
                                }
                                RefreshOutcome::Rejected(response) => {
                                    record(format!("failed: {}", response.status_code));
                                    response.status_code == StatusCode::ServiceUnavailable
                                }
                                RefreshOutcome::Failed(error) => {
                                    record(format!("failed: {error}"));
                                    true
                                }
                            };
                            if server_failed && several {
                                attempt.cancel();
                            }
                        },
                    )
                    .await;
                if stop.is_cancelled() {
                    break 'rounds;
                }
                if let Some(server) = &server {
                    info!("registration {name}: {server} failed");
                }
            }
            info!("registration {name}: no server took it; again in {ROUND_PAUSE:?}");
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(ROUND_PAUSE) => {}
            }
        }
        let unregister = registration.register(registered_at, Some(0));
        match tokio::time::timeout(Duration::from_secs(2), unregister).await {
            Ok(Ok(_)) => record("unregistered".into()),
            Ok(Err(e)) => record(format!("failed: un-REGISTER: {e}")),
            Err(_) => record("failed: un-REGISTER timed out".into()),
        }
    })
}

/// The socket address of a server named by its IP address (its port, or
/// its transport's default).
fn socket_of(server: &SipAddr) -> Option<SocketAddr> {
    let Host::IpAddr(ip) = server.addr.host else {
        return None;
    };
    let port = server
        .addr
        .port
        .unwrap_or_else(|| server.r#type.unwrap_or_default().default_port());
    Some(SocketAddr::new(ip, port.into()))
}

/// The registrar's URI, naming the transport of `server` (an SRV target
/// over TCP or TLS) when it names none: rsipstack takes the REGISTER's
/// transport from the URI.
fn over_transport(registrar: &Uri, server: Option<&SipAddr>) -> Uri {
    let mut uri = registrar.clone();
    let named = uri.params.iter().any(|p| matches!(p, Param::Transport(_)));
    if let Some(transport) = server.and_then(|s| s.r#type)
        && transport != Transport::Udp
        && !named
    {
        uri.params.push(Param::Transport(transport));
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_parse_and_hide_their_password() {
        let account = Account::parse("echo:p@ss@127.0.0.1:5062").unwrap();
        assert_eq!(account.username, "echo");
        assert_eq!(account.password, "p@ss");
        assert_eq!(account.registrar, "sip:127.0.0.1:5062");
        assert!(!format!("{account:?}").contains("p@ss"));
        assert!(Account::parse("nopassword@host").is_err());
        assert!(Account::parse(":x@host").is_err());
    }
}
