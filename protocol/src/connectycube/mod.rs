//! A ConnectyCube client that speaks as the JS SDK 6.1.2 does: REST sessions,
//! chat over XMPP-over-WebSocket, and P2P call signalling.

pub mod rest;
pub mod signaling;
pub mod xml;
pub mod xmpp;

/// The application's keys, from the ConnectyCube dashboard.
#[derive(Clone)]
pub struct AppCredentials {
    pub app_id: u64,
    pub auth_key: String,
    /// Only for the signed legacy session form; the JS SDK 6 never uses it.
    pub auth_secret: Option<String>,
}

impl std::fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppCredentials")
            .field("app_id", &self.app_id)
            .field("auth_key", &"<redacted>")
            .field(
                "auth_secret",
                &self.auth_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How a user signs in. Secrets never reach `Debug` output (and so no log).
#[derive(Clone)]
pub enum UserCredentials {
    Login {
        login: String,
        password: String,
    },
    Email {
        email: String,
        password: String,
    },
    /// An existing session token.
    Token(String),
}

impl std::fmt::Debug for UserCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserCredentials::Login { login, .. } => {
                write!(f, "Login({login:?}, password: <redacted>)")
            }
            UserCredentials::Email { email, .. } => {
                write!(f, "Email({email:?}, password: <redacted>)")
            }
            UserCredentials::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}
