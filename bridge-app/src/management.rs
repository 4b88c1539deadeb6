//! The management API: `GET /stats` (registrations, mapped users, calls in
//! progress with live RTP and WebRTC figures) as JSON, for a bearer token.
//! Off unless `management.listen` is configured.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What `/stats` shows, computed per request.
pub type StatsSource = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

struct Api {
    token: String,
    stats: StatsSource,
}

/// Listens on `listen` until `stop` is cancelled.
pub async fn serve(
    listen: SocketAddr,
    token: String,
    stats: StatsSource,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("management.listen: cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route("/stats", get(stats_handler))
        .with_state(Arc::new(Api { token, stats }));
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            warn!("management API stopped: {e}");
        }
    });
    info!("management API on http://{address}/stats (bearer token required)");
    Ok(address)
}

async fn stats_handler(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !same_secret(presented.trim().as_bytes(), api.token.as_bytes()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a valid bearer token is required\n",
        )
            .into_response();
    }
    axum::Json((api.stats)()).into_response()
}

/// Compares without leaking, through timing, how much of a guess was right.
fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    let differences = presented
        .iter()
        .cycle()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    !presented.is_empty() && presented.len() == expected.len() && differences == 0
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn only_the_exact_token_passes() {
        let token = b"0123456789abcdef";
        assert!(same_secret(token, token));
        assert!(!same_secret(b"0123456789abcdeF", token));
        assert!(!same_secret(b"0123456789abcde", token));
        assert!(!same_secret(b"0123456789abcdef0", token));
        assert!(!same_secret(b"", token));
    }
}
