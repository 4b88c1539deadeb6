//! The sandbox's REST API: the routes the JS SDK calls (connectycube-protocol.md §2),
//! and its push notifications (subscriptions and events).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bridge_protocol::connectycube::signaling::{MODULE_IDENTIFIER, user_jid};
use bridge_protocol::connectycube::xml::Element;
use serde_json::{Value, json};

use super::state::{SignInError, State};

type Shared = AxumState<Arc<State>>;

/// An error answer in ConnectyCube's shape: `{"errors":{"base":[message]}}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            axum::Json(json!({ "errors": { "base": [self.1] } })),
        )
            .into_response()
    }
}

fn error(status: StatusCode, message: &str) -> ApiError {
    ApiError(status, message.to_owned())
}

fn session_expired() -> ApiError {
    // The SDK fires its sessionExpired callback on exactly this answer.
    error(StatusCode::UNAUTHORIZED, "Required session does not exist")
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(error(StatusCode::BAD_REQUEST, "body must be a JSON object"));
    }
    Ok(value)
}

fn token_session(state: &State, headers: &HeaderMap) -> Result<super::state::Session, ApiError> {
    headers
        .get("CB-Token")
        .and_then(|t| t.to_str().ok())
        .and_then(|t| state.session(t))
        .ok_or_else(session_expired)
}

/// The session of `CB-Token`, which must be a user's (not an application's).
fn user_session(state: &State, headers: &HeaderMap) -> Result<super::state::Session, ApiError> {
    let session = token_session(state, headers)?;
    if session.user_id == 0 {
        return Err(error(StatusCode::FORBIDDEN, "a user session is required"));
    }
    Ok(session)
}

fn sign_in_error(e: SignInError) -> ApiError {
    match e {
        SignInError::WrongPassword => error(StatusCode::UNAUTHORIZED, "Unauthorized"),
        e => error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
    }
}

/// `POST /session.json`: an application session, or a user's (created on first use).
pub async fn create_session(AxumState(state): Shared, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    if body["application_id"].as_u64() != Some(state.app_id)
        || body["auth_key"].as_str() != Some(state.auth_key.as_str())
    {
        tracing::warn!("sandbox: session refused: unknown application id or auth key");
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "Unknown application id or auth key",
        ));
    }
    // Legacy signed sessions carry nonce/timestamp/signature: accepted and ignored.
    let user = &body["user"];
    let user_id = if user.is_null() {
        0
    } else {
        state
            .sign_in(
                user["login"].as_str(),
                user["email"].as_str(),
                user["password"].as_str().unwrap_or_default(),
            )
            .map_err(sign_in_error)?
            .id
    };
    let session = state.new_session(user_id);
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "session": state.session_json(&session) })),
    )
        .into_response())
}

/// `GET /session.json`.
pub async fn get_session(
    AxumState(state): Shared,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let session = token_session(&state, &headers)?;
    Ok(axum::Json(json!({ "session": state.session_json(&session) })).into_response())
}

/// `DELETE /session.json` and `DELETE /login.json`.
pub async fn destroy_session(AxumState(state): Shared, headers: HeaderMap) -> StatusCode {
    if let Some(token) = headers.get("CB-Token").and_then(|t| t.to_str().ok()) {
        state.directory.lock().unwrap().sessions.remove(token);
    }
    StatusCode::OK
}

/// `POST /login.json`: signs a user into an application session.
pub async fn login(
    AxumState(state): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let session = token_session(&state, &headers)?;
    let body = parse_body(&body)?;
    let user = state
        .sign_in(
            body["login"].as_str(),
            body["email"].as_str(),
            body["password"].as_str().unwrap_or_default(),
        )
        .map_err(sign_in_error)?;
    if let Some(s) = state
        .directory
        .lock()
        .unwrap()
        .sessions
        .get_mut(&session.token)
    {
        s.user_id = user.id;
    }
    Ok(axum::Json(json!({ "user": user.to_json() })).into_response())
}

#[derive(serde::Deserialize)]
pub struct ByLogin {
    login: String,
}

/// `GET /users/by_login.json?login=…` (the SDK's `users.get({login})`).
pub async fn user_by_login(
    AxumState(state): Shared,
    headers: HeaderMap,
    Query(query): Query<ByLogin>,
) -> Result<Response, ApiError> {
    token_session(&state, &headers)?;
    let user = state.user_by_login(&query.login).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "Entity you are looking for was not found",
        )
    })?;
    Ok(axum::Json(json!({ "user": user.to_json() })).into_response())
}

/// `POST /calls/reject.json` (the SDK's `callRejectRequest`, which a
/// closed app sends from its call screen, having no chat): the `reject`
/// goes on to `recipientId`'s chat from the rejecting user, with what the
/// request carries (its session, platform and `userInfo`).
pub async fn call_reject(
    AxumState(state): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let session = user_session(&state, &headers)?;
    let body = parse_body(&body)?;
    let session_id = field(&body, &["sessionID"])?;
    let recipient = match &body["recipientId"] {
        Value::Number(id) => id.as_u64(),
        Value::String(id) => id.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "recipientId must be a user id",
        )
    })?;
    let mut params = Element::new("extraParams").attr("xmlns", "jabber:client");
    if let Some(info) = body["userInfo"].as_object().filter(|info| !info.is_empty()) {
        let mut user_info = Element::new("userInfo");
        for (key, value) in info {
            let name_ok = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !name_ok {
                return Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("userInfo key {key:?} is not a plain name"),
                ));
            }
            let text = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            user_info
                .children
                .push(Element::new(key.as_str()).text(text));
        }
        params.children.push(user_info);
    }
    let platform = body["platform"].as_str().unwrap_or("web");
    for (name, text) in [
        ("sessionID", session_id),
        ("moduleIdentifier", MODULE_IDENTIFIER),
        ("signalType", "reject"),
        ("platform", platform),
    ] {
        params.children.push(Element::new(name).text(text));
    }
    let stanza = Element::new("message")
        .attr("to", user_jid(recipient, state.app_id, &state.domain))
        .attr(
            "from",
            user_jid(session.user_id, state.app_id, &state.domain),
        )
        .attr("type", "headline")
        .attr("id", format!("{:024x}", rand::random::<u128>() >> 32))
        .attr("xmlns", "jabber:client")
        .child(params);
    super::chat::deliver(&state, recipient, &stanza.to_string());
    Ok(axum::Json(json!({})).into_response())
}

/// A string field of `value` at `path`, or an error naming it.
fn field<'a>(value: &'a Value, path: &[&str]) -> Result<&'a str, ApiError> {
    path.iter()
        .try_fold(value, |value, key| value.get(key))
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
        .ok_or_else(|| {
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("{} is required", path.join(".")),
            )
        })
}

/// `POST /subscriptions.json` (the SDK's `pushnotifications.subscriptions.create`):
/// the user's device, to receive push notifications.
pub async fn create_subscription(
    AxumState(state): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let session = user_session(&state, &headers)?;
    let body = parse_body(&body)?;
    let channel = field(&body, &["notification_channel"])?.to_owned();
    let environment = field(&body, &["push_token", "environment"])?.to_owned();
    let platform = field(&body, &["device", "platform"])?.to_owned();
    let udid = field(&body, &["device", "udid"])?.to_owned();
    let web_endpoint = match channel.as_str() {
        "web" => {
            let endpoint = field(&body, &["push_token", "web_endpoint"])?;
            // Posted to by the sandbox itself: only on this machine.
            let local = reqwest::Url::parse(endpoint).is_ok_and(|url| {
                url.scheme() == "http"
                    && match url.host_str() {
                        Some("localhost") => true,
                        Some(host) => host
                            .trim_matches(['[', ']'])
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback()),
                        None => false,
                    }
            });
            if !local {
                return Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "push_token.web_endpoint: the sandbox delivers only to http:// endpoints on this machine",
                ));
            }
            Some(endpoint.to_owned())
        }
        "apns" | "apns_voip" | "gcm" => {
            field(&body, &["push_token", "client_identification_sequence"])?;
            None
        }
        other => {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("unknown notification_channel {other:?}"),
            ));
        }
    };
    let subscription = {
        let mut directory = state.directory.lock().unwrap();
        // A device subscribes once per channel: a new token replaces the old.
        directory
            .subscriptions
            .retain(|s| !(s.user_id == session.user_id && s.udid == udid && s.channel == channel));
        let subscription = super::state::Subscription {
            id: directory.next_id(),
            user_id: session.user_id,
            channel,
            environment,
            platform,
            udid,
            web_endpoint,
        };
        directory.subscriptions.push(subscription.clone());
        subscription
    };
    Ok(axum::Json(json!([{
        "subscription": {
            "id": subscription.id,
            "notification_channel": { "name": subscription.channel },
            "device": {
                "udid": subscription.udid,
                "platform": { "name": subscription.platform },
            },
        }
    }]))
    .into_response())
}

/// `POST /events.json` (the SDK's `pushnotifications.events.create`): a
/// push notification to the subscribed devices of `user.ids` in the
/// event's environment. The sandbox delivers to web devices by posting the
/// decoded message to their endpoint (unencrypted: no real push service
/// is in reach here); the other channels' pushes are only logged.
pub async fn create_event(
    AxumState(state): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let session = token_session(&state, &headers)?;
    let body = parse_body(&body)?;
    let event = &body["event"];
    let unprocessable = |message: &str| error(StatusCode::UNPROCESSABLE_ENTITY, message);
    if field(event, &["notification_type"])? != "push" {
        return Err(unprocessable("notification_type must be push"));
    }
    let environment = field(event, &["environment"])?;
    if !matches!(environment, "production" | "development") {
        return Err(unprocessable(
            "environment must be production or development",
        ));
    }
    // Comma-separated, as the SDK's types have it; apps also send arrays.
    let ids: Option<Vec<u64>> = match &event["user"]["ids"] {
        Value::String(ids) => ids.split(',').map(|id| id.trim().parse().ok()).collect(),
        Value::Array(ids) => ids
            .iter()
            .map(|id| id.as_u64().or_else(|| id.as_str()?.parse().ok()))
            .collect(),
        Value::Number(id) => id.as_u64().map(|id| vec![id]),
        _ => None,
    };
    let ids = ids
        .filter(|ids| !ids.is_empty())
        .ok_or_else(|| unprocessable("user.ids must list user ids"))?;
    let message = field(event, &["message"])?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(message)
        .map_err(|_| unprocessable("message must be base64"))?;
    let recipients: Vec<super::state::Subscription> = {
        let directory = state.directory.lock().unwrap();
        directory
            .subscriptions
            .iter()
            .filter(|s| ids.contains(&s.user_id) && s.environment == environment)
            .cloned()
            .collect()
    };
    if recipients.is_empty() {
        return Err(unprocessable("No one can receive the message"));
    }
    let text = String::from_utf8_lossy(&payload).into_owned();
    let mut events = Vec::new();
    for recipient in &recipients {
        tracing::info!(
            "sandbox: push from user {} to user {} ({}): {text}",
            session.user_id,
            recipient.user_id,
            recipient.channel
        );
        if let Some(endpoint) = recipient.web_endpoint.clone() {
            tokio::spawn(deliver(endpoint, payload.clone()));
        }
        let id = state.directory.lock().unwrap().next_id();
        events.push(json!({
            "event": {
                "id": id,
                "event_type": "one_shot",
                "message": message,
                "application_id": state.app_id,
                "user_id": session.user_id,
                "environment": environment,
                "notification_channel": { "name": recipient.channel },
            }
        }));
    }
    Ok(axum::Json(Value::Array(events)).into_response())
}

/// Hands a push to a web device's endpoint.
async fn deliver(endpoint: String, payload: Vec<u8>) {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build();
    let sent = match client {
        Ok(client) => client
            .post(&endpoint)
            .header("Content-Type", "application/json")
            .body(payload)
            .send()
            .await
            .and_then(|response| response.error_for_status()),
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        tracing::warn!("sandbox: push to {endpoint} not delivered: {e}");
    }
}
