//! ConnectyCube REST: sessions (`POST /session.json`), login, push
//! notifications (`POST /events.json`), and a session holder that reuses its
//! token and renews it when the server says it expired.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{AppCredentials, UserCredentials};

const SDK_HEADER: &str = "JS 6.1.2 - Client";
/// Larger REST bodies are refused: nothing the client reads comes close.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("cannot reach {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} answered with a body that is not the expected JSON: {problem}")]
    BadBody { url: String, problem: String },
}

impl RestError {
    /// Whether the server said the session is gone (the SDK's `sessionExpired`).
    pub fn is_session_expired(&self) -> bool {
        matches!(self, RestError::Refused { status: 401, .. })
    }

    /// Whether the credentials themselves were refused.
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            RestError::Refused {
                status: 401 | 403 | 422,
                ..
            }
        )
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub token: String,
    #[serde(default)]
    pub user_id: u64,
    #[serde(default)]
    pub application_id: u64,
}

#[derive(Clone)]
pub struct RestClient {
    http: reqwest::Client,
    api_url: String,
    app: AppCredentials,
}

impl RestClient {
    /// `api_url` as the SDK's `endpoints.api_url`, e.g. `http://127.0.0.1:8080`
    /// or `https://api.connectycube.com`.
    pub fn new(api_url: &str, app: AppCredentials) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(15))
            .build()
            .expect("a default HTTP client builds");
        RestClient {
            http,
            api_url: api_url.trim_end_matches('/').to_owned(),
            app,
        }
    }

    pub fn app(&self) -> &AppCredentials {
        &self.app
    }

    /// `POST /session.json` for a user; signed (legacy form) when the app has an auth secret.
    pub async fn create_session(&self, user: &UserCredentials) -> Result<Session, RestError> {
        let user_fields: Vec<(&str, &str)> = match user {
            UserCredentials::Login { login, password } => {
                vec![("login", login), ("password", password)]
            }
            UserCredentials::Email { email, password } => {
                vec![("email", email), ("password", password)]
            }
            UserCredentials::Token(_) => unreachable!("a token needs no session request"),
        };
        let mut body = json!({
            "application_id": self.app.app_id,
            "auth_key": self.app.auth_key,
            "user": user_fields.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        });
        if let Some(secret) = &self.app.auth_secret {
            let nonce: u32 = rand::random::<u32>() % 1_000_000_000;
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            body["nonce"] = json!(nonce);
            body["timestamp"] = json!(timestamp);
            body["signature"] = json!(legacy_signature(
                secret,
                self.app.app_id,
                &self.app.auth_key,
                nonce,
                timestamp,
                &user_fields
            ));
        }
        let response: Value = self
            .request(reqwest::Method::POST, "session.json", None, Some(body))
            .await?;
        self.parse_session(response, "session.json")
    }

    /// `GET /session.json`: the session behind a token (validates a configured token).
    pub async fn get_session(&self, token: &str) -> Result<Session, RestError> {
        let response = self
            .request(reqwest::Method::GET, "session.json", Some(token), None)
            .await?;
        self.parse_session(response, "session.json")
    }

    /// `POST /login.json` inside an existing (application) session.
    pub async fn login(&self, token: &str, login: &str, password: &str) -> Result<u64, RestError> {
        let response = self
            .request(
                reqwest::Method::POST,
                "login.json",
                Some(token),
                Some(json!({ "login": login, "password": password })),
            )
            .await?;
        response["user"]["id"]
            .as_u64()
            .ok_or_else(|| RestError::BadBody {
                url: self.url("login.json"),
                problem: "no user.id".into(),
            })
    }

    /// `GET /users/by_login.json`: a user's id from their login.
    pub async fn user_id_by_login(&self, token: &str, login: &str) -> Result<u64, RestError> {
        let route = format!("users/by_login.json?login={}", url_escape(login));
        let response = self
            .request(reqwest::Method::GET, &route, Some(token), None)
            .await?;
        response["user"]["id"]
            .as_u64()
            .ok_or_else(|| RestError::BadBody {
                url: self.url(&route),
                problem: "no user.id".into(),
            })
    }

    /// `POST /events.json` (the SDK's `pushnotifications.events.create`): a
    /// push notification to every device the users subscribed in
    /// `environment` (`production` or `development`).
    pub async fn create_event(&self, token: &str, event: &PushEvent<'_>) -> Result<(), RestError> {
        self.request(
            reqwest::Method::POST,
            "events.json",
            Some(token),
            Some(event.to_json()),
        )
        .await
        .map(|_| ())
    }

    /// `DELETE /session.json`.
    pub async fn destroy_session(&self, token: &str) -> Result<(), RestError> {
        self.request(reqwest::Method::DELETE, "session.json", Some(token), None)
            .await
            .map(|_| ())
    }

    fn url(&self, route: &str) -> String {
        format!("{}/{route}", self.api_url)
    }

    fn parse_session(&self, response: Value, route: &str) -> Result<Session, RestError> {
        serde_json::from_value(response["session"].clone()).map_err(|e| RestError::BadBody {
            url: self.url(route),
            problem: format!("no valid session object: {e}"),
        })
    }

    async fn request(
        &self,
        method: reqwest::Method,
        route: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<Value, RestError> {
        let url = self.url(route);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .header("CB-SDK", SDK_HEADER);
        if let Some(token) = token {
            request = request.header("CB-Token", token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|source| RestError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = response.status();
        if response
            .content_length()
            .is_some_and(|l| l as usize > MAX_BODY)
        {
            return Err(RestError::BadBody {
                url,
                problem: "body too large".into(),
            });
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|source| RestError::Unreachable {
                url: url.clone(),
                source,
            })?;
        if bytes.len() > MAX_BODY {
            return Err(RestError::BadBody {
                url,
                problem: "body too large".into(),
            });
        }
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            let body: String = text.chars().take(300).collect();
            return Err(RestError::Refused {
                url,
                status: status.as_u16(),
                body,
            });
        }
        if method == reqwest::Method::DELETE {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| RestError::BadBody {
            url,
            problem: e.to_string(),
        })
    }
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// HMAC-SHA1 over the sorted `key=value&…` string, nested keys as `user[login]`
/// (the legacy form other ConnectyCube SDKs send).
pub fn legacy_signature(
    secret: &str,
    app_id: u64,
    auth_key: &str,
    nonce: u32,
    timestamp: u64,
    user: &[(&str, &str)],
) -> String {
    let mut pairs = vec![
        ("application_id".to_owned(), app_id.to_string()),
        ("auth_key".to_owned(), auth_key.to_owned()),
        ("nonce".to_owned(), nonce.to_string()),
        ("timestamp".to_owned(), timestamp.to_string()),
    ];
    pairs.extend(
        user.iter()
            .map(|(k, v)| (format!("user[{k}]"), v.to_string())),
    );
    pairs.sort();
    let text = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut mac =
        Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(text.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A push notification: `payload` reaches the users' devices as the
/// event's message, the base64 of its JSON, as the SDK's apps send it.
pub struct PushEvent<'a> {
    pub user_ids: &'a [u64],
    pub environment: &'a str,
    pub payload: &'a Value,
}

impl PushEvent<'_> {
    /// The `event` object of `POST /events.json`; `user.ids` is a
    /// comma-separated list, as the SDK's types have it.
    pub fn to_json(&self) -> Value {
        let ids: Vec<String> = self.user_ids.iter().map(u64::to_string).collect();
        let message = base64::engine::general_purpose::STANDARD.encode(self.payload.to_string());
        json!({
            "event": {
                "notification_type": "push",
                "environment": self.environment,
                "user": { "ids": ids.join(",") },
                "message": message,
            }
        })
    }
}

/// A user's session: created once, reused, renewed when it expires.
pub struct UserSession {
    client: RestClient,
    credentials: UserCredentials,
    current: Mutex<Option<Session>>,
}

impl UserSession {
    pub fn new(client: RestClient, credentials: UserCredentials) -> Self {
        UserSession {
            client,
            credentials,
            current: Mutex::new(None),
        }
    }

    pub fn client(&self) -> &RestClient {
        &self.client
    }

    /// The current session, creating one if needed.
    pub async fn session(&self) -> Result<Session, RestError> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref() {
            return Ok(session.clone());
        }
        let session = match &self.credentials {
            UserCredentials::Token(token) => self.client.get_session(token).await?,
            credentials => self.client.create_session(credentials).await?,
        };
        *current = Some(session.clone());
        Ok(session)
    }

    /// Drops the current session so that the next call creates a new one.
    pub async fn renew(&self) -> Result<Session, RestError> {
        self.current.lock().await.take();
        self.session().await
    }

    /// The chat password: the user's password, or the session token.
    pub async fn chat_password(&self) -> Result<String, RestError> {
        Ok(match &self.credentials {
            UserCredentials::Login { password, .. } | UserCredentials::Email { password, .. } => {
                password.clone()
            }
            UserCredentials::Token(_) => self.session().await?.token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_event_carries_its_payload_as_base64_json() {
        let payload = json!({"signal_type": "startCall", "session_id": "s-1"});
        let event = PushEvent {
            user_ids: &[1002, 1003],
            environment: "production",
            payload: &payload,
        }
        .to_json();
        assert_eq!(event["event"]["notification_type"], "push");
        assert_eq!(event["event"]["environment"], "production");
        assert_eq!(event["event"]["user"]["ids"], "1002,1003");
        let message = base64::engine::general_purpose::STANDARD
            .decode(event["event"]["message"].as_str().unwrap())
            .unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&message).unwrap(), payload);
    }

    #[test]
    fn signature_matches_the_legacy_form() {
        // HMAC-SHA1("secret", "application_id=1&auth_key=AK&nonce=5&timestamp=100&user[login]=alice&user[password]=pw")
        let signature = legacy_signature(
            "secret",
            1,
            "AK",
            5,
            100,
            &[("password", "pw"), ("login", "alice")],
        );
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"secret").unwrap();
        mac.update(b"application_id=1&auth_key=AK&nonce=5&timestamp=100&user[login]=alice&user[password]=pw");
        assert_eq!(signature, hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signature.len(), 40);
    }
}
