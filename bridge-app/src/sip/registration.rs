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
use rsipstack::sip::Host;
use rsipstack::transaction::endpoint::EndpointInnerRef;
use rsipstack::transport::SipAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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

/// Keeps `account` registered until `stop` is cancelled, then unregisters;
/// through `proxy` (`sip.outbound_proxy`) when there is one.
pub fn spawn(
    endpoint: EndpointInnerRef,
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
        if let Some(proxy) = &proxy {
            // rsipstack's registration takes the proxy's IP: a name is
            // resolved when the registration starts.
            loop {
                match proxy_socket(proxy).await {
                    Ok(address) => {
                        registration.outbound_proxy = Some(address);
                        break;
                    }
                    Err(e) => record(format!("failed: outbound proxy {proxy}: {e}")),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
        registration
            .keep_alive(
                registrar.clone(),
                account.expires,
                stop.clone(),
                |outcome| match outcome {
                    RefreshOutcome::Registered(_) => record("registered".into()),
                    RefreshOutcome::Rejected(response) => {
                        record(format!("failed: {}", response.status_code))
                    }
                    RefreshOutcome::Failed(error) => record(format!("failed: {error}")),
                },
            )
            .await;
        let unregister = registration.register(registrar, Some(0));
        match tokio::time::timeout(Duration::from_secs(2), unregister).await {
            Ok(Ok(_)) => record("unregistered".into()),
            Ok(Err(e)) => record(format!("failed: un-REGISTER: {e}")),
            Err(_) => record("failed: un-REGISTER timed out".into()),
        }
    })
}

/// The address of `proxy`, its port or SIP's default.
async fn proxy_socket(proxy: &SipAddr) -> Result<SocketAddr, String> {
    let port = proxy
        .addr
        .port
        .unwrap_or_else(|| proxy.r#type.unwrap_or_default().default_port())
        .into();
    match &proxy.addr.host {
        Host::IpAddr(ip) => Ok(SocketAddr::new(*ip, port)),
        Host::Domain(name) => tokio::net::lookup_host((name.to_string(), port))
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| "no address".to_owned()),
    }
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
