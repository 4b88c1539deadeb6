//! The management API: `GET /stats` (registrations, mapped users, calls in
//! progress with live RTP and WebRTC figures, the calls ended so far) as
//! JSON, and `GET /metrics`, the same figures for Prometheus, for a bearer
//! token. Off unless `management.listen` is configured.

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
        .route("/metrics", get(metrics_handler))
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
    match refused(&api, &headers) {
        Some(refusal) => refusal,
        None => axum::Json((api.stats)()).into_response(),
    }
}

async fn metrics_handler(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    match refused(&api, &headers) {
        Some(refusal) => refusal,
        None => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            prometheus_text(&(api.stats)()),
        )
            .into_response(),
    }
}

/// The 401 for a request without the token.
fn refused(api: &Api, headers: &HeaderMap) -> Option<Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    if same_secret(presented.trim().as_bytes(), api.token.as_bytes()) {
        return None;
    }
    let refusal = (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a valid bearer token is required\n",
    );
    Some(refusal.into_response())
}

/// `/stats` in Prometheus's text format: what a dashboard or an alert
/// watches (calls in progress and ended, loss, registrations, sign-ins,
/// the Asterisk link), without per-call detail.
fn prometheus_text(stats: &serde_json::Value) -> String {
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        text.push_str(&format!(
            "# HELP sipcc_{name} {help}\n# TYPE sipcc_{name} {kind}\n"
        ));
        for (labels, value) in samples {
            text.push_str(&format!("sipcc_{name}{labels} {value}\n"));
        }
    };
    let number = |value: &serde_json::Value| value.as_f64().unwrap_or(0.0);
    let count =
        |value: &serde_json::Value| value.as_object().map_or(0, serde_json::Map::len) as f64;
    let ended = &stats["calls_ended"];
    let gauge = |value: f64| vec![(String::new(), value)];
    metric(
        "calls_active",
        "gauge",
        "Calls in progress.",
        gauge(number(&stats["active_calls"])),
    );
    metric(
        "draining",
        "gauge",
        "1 while the bridge takes no new call.",
        gauge(f64::from(u8::from(stats["draining"] == true))),
    );
    metric(
        "cpu_percent",
        "gauge",
        "The bridge's CPU over the last 3 s, percent of the cores it may use (sip.max_cpu_percent refuses new calls above it).",
        gauge(number(&stats["cpu_percent"])),
    );
    let by_status = ended["by_status"].as_object().into_iter().flatten();
    metric(
        "calls_ended_total",
        "counter",
        "Calls ended, by the SIP status the caller got (200: answered).",
        by_status
            .map(|(status, calls)| (label("status", status), number(calls)))
            .collect(),
    );
    metric(
        "call_seconds_total",
        "counter",
        "Time answered calls lasted.",
        gauge(number(&ended["answered_seconds"])),
    );
    metric(
        "rtp_packets_received_total",
        "counter",
        "RTP packets ended calls received from phones.",
        gauge(number(&ended["rtp_packets_received"])),
    );
    metric(
        "rtp_packets_lost_total",
        "counter",
        "RTP packets of ended calls lost on the way from phones.",
        gauge(number(&ended["rtp_packets_lost"])),
    );
    let registrations = stats["registrations"].as_object().into_iter().flatten();
    metric(
        "sip_account_registered",
        "gauge",
        "1 while the SIP account is registered with its server.",
        registrations
            .map(|(account, state)| {
                let registered = state.as_str() == Some("registered");
                (label("account", account), f64::from(u8::from(registered)))
            })
            .collect(),
    );
    let phones = stats["phones"].as_object().into_iter().flatten();
    metric(
        "phones_registered",
        "gauge",
        "Phones registered with the bridge, by extension.",
        phones
            .map(|(extension, phones)| {
                let phones = phones.as_array().map_or(0, Vec::len) as f64;
                (label("extension", extension), phones)
            })
            .collect(),
    );
    metric(
        "users_signed_in",
        "gauge",
        "Mapped users signed in to ConnectyCube.",
        gauge(count(&stats["connectycube_signed_in"])),
    );
    if let Some(state) = stats["asterisk"]["state"].as_str() {
        metric(
            "asterisk_connected",
            "gauge",
            "1 while the bridge is logged in to Asterisk's AMI.",
            gauge(f64::from(u8::from(state == "logged in"))),
        );
    }
    text
}

/// `{name="value"}`, the value escaped as Prometheus's text format asks.
fn label(name: &str, value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{{{name}=\"{escaped}\"}}")
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
    use super::{prometheus_text, same_secret};

    #[test]
    fn only_the_exact_token_passes() {
        let token = b"0123456789abcdef";
        assert!(same_secret(token, token));
        assert!(!same_secret(b"0123456789abcdeF", token));
        assert!(!same_secret(b"0123456789abcde", token));
        assert!(!same_secret(b"0123456789abcdef0", token));
        assert!(!same_secret(b"", token));
    }

    #[test]
    fn metrics_follow_the_stats() {
        let stats = serde_json::json!({
            "draining": false,
            "active_calls": 2,
            "cpu_percent": 12.5,
            "registrations": {"trunk": "registered", "pbx\"2": "failed: 403 Forbidden"},
            "phones": {"alice": [{"contact": "sip:alice@192.0.2.1"}, {"contact": "sip:a@x"}]},
            "connectycube_signed_in": {"alice": 1001, "bob": 1002},
            "calls_ended": {
                "by_status": {"200": 3, "486": 1},
                "answered_seconds": 61.5,
                "rtp_packets_received": 3075,
                "rtp_packets_lost": 4,
            },
            "asterisk": {"state": "logged in"},
        });
        let text = prometheus_text(&stats);
        for sample in [
            "sipcc_calls_active 2\n",
            "sipcc_draining 0\n",
            "sipcc_cpu_percent 12.5\n",
            "sipcc_calls_ended_total{status=\"200\"} 3\n",
            "sipcc_calls_ended_total{status=\"486\"} 1\n",
            "sipcc_call_seconds_total 61.5\n",
            "sipcc_rtp_packets_received_total 3075\n",
            "sipcc_rtp_packets_lost_total 4\n",
            "sipcc_sip_account_registered{account=\"trunk\"} 1\n",
            "sipcc_sip_account_registered{account=\"pbx\\\"2\"} 0\n",
            "sipcc_phones_registered{extension=\"alice\"} 2\n",
            "sipcc_users_signed_in 2\n",
            "sipcc_asterisk_connected 1\n",
            "# TYPE sipcc_calls_ended_total counter\n",
        ] {
            assert!(text.contains(sample), "{sample:?} in\n{text}");
        }
        // Without Asterisk configured, no such metric; nothing at all panics.
        let bare = prometheus_text(&serde_json::json!({}));
        assert!(!bare.contains("asterisk"), "{bare}");
        assert!(bare.contains("sipcc_calls_active 0\n"), "{bare}");
    }
}
