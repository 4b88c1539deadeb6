//! The sandbox's REST API: the routes the JS SDK calls (connectycube-protocol.md §2).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State as AxumState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
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

/// `POST /calls/reject.json` (the SDK's optional `callRejectRequest`).
pub async fn call_reject(
    AxumState(state): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    token_session(&state, &headers)?;
    parse_body(&body)?;
    Ok(axum::Json(json!({})).into_response())
}
