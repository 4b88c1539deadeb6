//! The sandbox's users, sessions and connected chat resources.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct User {
    pub id: u64,
    pub login: Option<String>,
    pub email: Option<String>,
    pub password: String,
    pub full_name: String,
}

impl User {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "login": self.login,
            "email": self.email,
            "full_name": self.full_name,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    /// 0 for an application session with no user.
    pub user_id: u64,
    pub token: String,
    pub created: u64,
}

/// A bound chat resource: where to deliver that user's stanzas.
pub struct Resource {
    pub jid: String,
    pub connection: u64,
    pub deliver: mpsc::UnboundedSender<String>,
}

/// A device a user subscribed for push notifications.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: u64,
    pub user_id: u64,
    /// `apns`, `apns_voip`, `gcm` or `web`.
    pub channel: String,
    pub environment: String,
    pub platform: String,
    pub udid: String,
    /// A web device's push endpoint, where the sandbox delivers.
    pub web_endpoint: Option<String>,
}

#[derive(Default)]
pub struct Directory {
    pub users: Vec<User>,
    pub sessions: HashMap<String, Session>,
    pub resources: HashMap<u64, Vec<Resource>>,
    pub subscriptions: Vec<Subscription>,
    next_id: u64,
}

impl Directory {
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    #[error("wrong password for an existing user")]
    WrongPassword,
    #[error("login, email or password missing")]
    Incomplete,
}

pub struct State {
    pub app_id: u64,
    pub auth_key: String,
    pub domain: String,
    pub directory: Mutex<Directory>,
}

impl State {
    pub fn new(app_id: u64, auth_key: String, domain: String) -> Self {
        State {
            app_id,
            auth_key,
            domain,
            directory: Mutex::new(Directory {
                next_id: 1000,
                ..Default::default()
            }),
        }
    }

    /// A user's first session creates it; later ones must give the same password.
    pub fn sign_in(
        &self,
        login: Option<&str>,
        email: Option<&str>,
        password: &str,
    ) -> Result<User, SignInError> {
        if password.is_empty() || (login.is_none() && email.is_none()) {
            return Err(SignInError::Incomplete);
        }
        let mut directory = self.directory.lock().unwrap();
        let existing = directory.users.iter().find(|u| {
            (login.is_some() && u.login.as_deref() == login)
                || (email.is_some() && u.email.as_deref() == email)
        });
        if let Some(user) = existing {
            return if user.password == password {
                Ok(user.clone())
            } else {
                Err(SignInError::WrongPassword)
            };
        }
        let user = User {
            id: directory.next_id(),
            login: login.map(str::to_owned),
            email: email.map(str::to_owned),
            password: password.to_owned(),
            full_name: login.or(email).unwrap_or_default().to_owned(),
        };
        directory.users.push(user.clone());
        Ok(user)
    }

    pub fn new_session(&self, user_id: u64) -> Session {
        let mut directory = self.directory.lock().unwrap();
        let session = Session {
            id: directory.next_id(),
            user_id,
            token: format!("{:032x}", rand::random::<u128>()),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        directory
            .sessions
            .insert(session.token.clone(), session.clone());
        session
    }

    pub fn session(&self, token: &str) -> Option<Session> {
        self.directory.lock().unwrap().sessions.get(token).cloned()
    }

    pub fn user(&self, id: u64) -> Option<User> {
        self.directory
            .lock()
            .unwrap()
            .users
            .iter()
            .find(|u| u.id == id)
            .cloned()
    }

    pub fn user_by_login(&self, login: &str) -> Option<User> {
        self.directory
            .lock()
            .unwrap()
            .users
            .iter()
            .find(|u| u.login.as_deref() == Some(login))
            .cloned()
    }

    /// Chat password check: the user's password, or any live token of that user.
    pub fn chat_password_ok(&self, user_id: u64, password: &str) -> bool {
        let directory = self.directory.lock().unwrap();
        directory
            .users
            .iter()
            .any(|u| u.id == user_id && u.password == password)
            || directory
                .sessions
                .get(password)
                .is_some_and(|s| s.user_id == user_id)
    }

    pub fn session_json(&self, session: &Session) -> Value {
        let mut value = json!({
            "id": session.id,
            "user_id": session.user_id,
            "application_id": self.app_id,
            "token": session.token,
            "ts": session.created,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        });
        if let Some(user) = self.user(session.user_id) {
            value["user"] = user.to_json();
        }
        value
    }
}
