//! The sandbox: a local ConnectyCube-compatible service (REST and chat over
//! one loopback port) that the real JS SDK accepts, for demos and tests where
//! ConnectyCube's cloud is out of reach. Point any SDK app at it with
//! `endpoints: {api_url: 'http://localhost:8080', chat: 'localhost'}` and
//! `chatProtocol: {websocket: 'ws://localhost:8080/ws'}`.

mod chat;
mod rest;
mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, State as AxumState};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use state::State;

const SDK_RELATIVE_PATH: &str = "node_modules/connectycube/dist/connectycube.min.js";
const DEMO_PAGE: &str = include_str!("page.html");

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub listen: SocketAddr,
    pub app_id: u64,
    pub auth_key: String,
    /// JID domain; keep it equal to the host apps use (`localhost`).
    pub domain: String,
    /// The SDK's `connectycube.min.js`; found in `node_modules` when unset.
    pub sdk_path: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            app_id: 1,
            auth_key: "sandbox".into(),
            domain: "localhost".into(),
            sdk_path: None,
        }
    }
}

struct Served {
    state: Arc<State>,
    sdk: Option<PathBuf>,
    page: String,
}

/// A running sandbox; stops when dropped.
pub struct Sandbox {
    pub address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl Sandbox {
    /// Binds and starts serving in the background.
    pub async fn start(config: SandboxConfig) -> anyhow::Result<Sandbox> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("sandbox cannot listen on {}: {e}", config.listen))?;
        let address = listener.local_addr()?;
        let sdk = config.sdk_path.clone().or_else(find_sdk);
        match &sdk {
            Some(path) => tracing::info!(
                "sandbox serves the ConnectyCube SDK from {}",
                path.display()
            ),
            None => tracing::warn!(
                "sandbox: {SDK_RELATIVE_PATH} not found (run `npm ci` in the repository); the demo page will not work"
            ),
        }
        let page = DEMO_PAGE
            .replace("__APP_ID__", &config.app_id.to_string())
            .replace(
                "__AUTH_KEY__",
                &config.auth_key.replace(['\'', '\\', '<'], ""),
            )
            .replace("__DOMAIN__", &config.domain.replace(['\'', '\\', '<'], ""));
        let served = Arc::new(Served {
            state: Arc::new(State::new(config.app_id, config.auth_key, config.domain)),
            sdk,
            page,
        });
        let router = router(served);
        let (shutdown, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Sandbox {
            address,
            shutdown: Some(shutdown),
        })
    }
}

fn router(served: Arc<Served>) -> Router {
    let state = served.state.clone();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::CONTENT_TYPE,
            "cb-sdk".parse().unwrap(),
            "cb-token".parse().unwrap(),
            "cb-authkey".parse().unwrap(),
        ]);
    let api = Router::new()
        .route(
            "/session.json",
            post(rest::create_session)
                .get(rest::get_session)
                .delete(rest::destroy_session),
        )
        .route(
            "/login.json",
            post(rest::login).delete(rest::destroy_session),
        )
        .route("/users/by_login.json", get(rest::user_by_login))
        .route("/calls/reject.json", post(rest::call_reject))
        .route("/subscriptions.json", post(rest::create_subscription))
        .route("/events.json", post(rest::create_event))
        .route("/ws", get(chat_upgrade))
        .with_state(state);
    Router::new()
        .route("/", get(page))
        .route("/connectycube.min.js", get(sdk))
        .with_state(served)
        .merge(api)
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(cors)
}

async fn chat_upgrade(
    AxumState(state): AxumState<Arc<State>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Chrome refuses the connection unless the "xmpp" subprotocol is echoed.
    upgrade
        .protocols(["xmpp"])
        .max_message_size(bridge_protocol::connectycube::xml::MAX_STANZA_LEN)
        .on_upgrade(move |socket| chat::serve_connection(socket, state))
}

async fn page(AxumState(served): AxumState<Arc<Served>>) -> Html<String> {
    Html(served.page.clone())
}

async fn sdk(AxumState(served): AxumState<Arc<Served>>) -> Response {
    let Some(path) = &served.sdk else {
        return (
            StatusCode::NOT_FOUND,
            format!("{SDK_RELATIVE_PATH} not installed: run `npm ci` in the repository"),
        )
            .into_response();
    };
    match tokio::fs::read(path).await {
        Ok(bytes) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/javascript"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read {}: {e}", path.display()),
        )
            .into_response(),
    }
}

/// Looks for the SDK in `node_modules` above the working directory and above the executable.
fn find_sdk() -> Option<PathBuf> {
    let from = |start: &Path| {
        start
            .ancestors()
            .map(|dir| dir.join(SDK_RELATIVE_PATH))
            .find(|p| p.is_file())
    };
    std::env::current_dir()
        .ok()
        .and_then(|d| from(&d))
        .or_else(|| std::env::current_exe().ok().and_then(|e| from(&e)))
}
