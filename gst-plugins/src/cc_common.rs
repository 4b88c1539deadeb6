//! What `connectycubesink` and `connectycubesrc` share: the call they join
//! (by `session` name), its ICE servers, and the credentials for stand-alone
//! signalling.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_protocol::connectycube::AppCredentials;
use bridge_protocol::ice;
use gst::glib;
use gst::prelude::*;

use crate::call_session::{CallEnd, CallSession, CallSettings, SignallingSettings, WebRtcStack};

const DEFAULT_SESSION: &str = "default";
const DEFAULT_API_URL: &str = "https://api.connectycube.com";
const DEFAULT_CHAT_URL: &str = "wss://chat.connectycube.com:5291";
const DEFAULT_CHAT_DOMAIN: &str = "chat.connectycube.com";
const DEFAULT_ANSWER_TIMEOUT_S: u32 = 60;

#[derive(Debug, Clone)]
struct Settings {
    session: String,
    app_id: u32,
    auth_key: Option<String>,
    auth_secret: Option<String>,
    login: Option<String>,
    password: Option<String>,
    api_url: String,
    chat_url: String,
    chat_domain: String,
    peer: Option<String>,
    answer_timeout: u32,
    stun_server: Option<String>,
    turn_server: Option<String>,
    turn_ca_file: Option<String>,
    ice_transport_policy: gst_webrtc::WebRTCICETransportPolicy,
    public_address: Option<String>,
    stack: WebRtcStack,
}

/// `turn://user:password@host` as `turn://user:***@host`.
fn masked_password(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| {
        let (credentials, host) = rest.rsplit_once('@')?;
        let (user, _) = credentials.split_once(':')?;
        Some(format!("{scheme}://{user}:***@{host}"))
    }) {
        Some(masked) => masked,
        None => url.to_owned(),
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            session: DEFAULT_SESSION.into(),
            app_id: 0,
            auth_key: None,
            auth_secret: None,
            login: None,
            password: None,
            api_url: DEFAULT_API_URL.into(),
            chat_url: DEFAULT_CHAT_URL.into(),
            chat_domain: DEFAULT_CHAT_DOMAIN.into(),
            peer: None,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT_S,
            stun_server: None,
            turn_server: None,
            turn_ca_file: None,
            ice_transport_policy: gst_webrtc::WebRTCICETransportPolicy::All,
            public_address: None,
            stack: WebRtcStack::default(),
        }
    }
}

#[derive(Default)]
pub struct CallProperties {
    settings: Mutex<Settings>,
    call: Mutex<Option<Arc<CallSession>>>,
}

fn string(
    name: &'static str,
    nick: &'static str,
    blurb: &'static str,
    default: Option<&'static str>,
) -> glib::ParamSpec {
    glib::ParamSpecString::builder(name)
        .nick(nick)
        .blurb(blurb)
        .default_value(default)
        .mutable_ready()
        .build()
}

impl CallProperties {
    pub fn properties() -> Vec<glib::ParamSpec> {
        vec![
            string(
                "session",
                "Session",
                "Name shared by the connectycubesink/src elements of one call (one RTCPeerConnection)",
                Some(DEFAULT_SESSION),
            ),
            glib::ParamSpecUInt::builder("app-id")
                .nick("Application id")
                .blurb("ConnectyCube application id (stand-alone signalling)")
                .mutable_ready()
                .build(),
            string(
                "auth-key",
                "Auth key",
                "ConnectyCube application auth key",
                None,
            ),
            string(
                "auth-secret",
                "Auth secret",
                "Auth secret: sessions are then signed (legacy form)",
                None,
            ),
            string(
                "login",
                "Login",
                "Login of the ConnectyCube user this pipeline signs in as; set it for stand-alone signalling",
                None,
            ),
            string("password", "Password", "That user's password", None),
            string(
                "api-url",
                "API URL",
                "REST endpoint (endpoints.api_url)",
                Some(DEFAULT_API_URL),
            ),
            string(
                "chat-url",
                "Chat URL",
                "XMPP WebSocket endpoint (chatProtocol.websocket)",
                Some(DEFAULT_CHAT_URL),
            ),
            string(
                "chat-domain",
                "Chat domain",
                "JID domain (endpoints.chat)",
                Some(DEFAULT_CHAT_DOMAIN),
            ),
            string(
                "peer",
                "Peer",
                "User id or login to call; unset: answer the first incoming call",
                None,
            ),
            glib::ParamSpecUInt::builder("answer-timeout")
                .nick("Answer timeout")
                .blurb("Seconds to wait for the peer to answer (or for a call to come)")
                .minimum(1)
                .default_value(DEFAULT_ANSWER_TIMEOUT_S)
                .mutable_ready()
                .build(),
            string(
                "stun-server",
                "STUN server",
                "stun://host[:port]: asked where this machine is seen from outside a NAT",
                None,
            ),
            glib::ParamSpecEnum::builder_with_default("webrtc-stack", WebRtcStack::default())
                .nick("WebRTC stack")
                .blurb(
                    "What carries the call: a webrtcbin of its own (audio, video, STUN/TURN), \
                     or the threads all calls share (Opus audio, STUN/TURN; far cheaper)",
                )
                .mutable_ready()
                .build(),
            string(
                "turn-server",
                "TURN server",
                "turn://user:password@host:port[?transport=tcp], or turns://user:password@host:port \
                 (TLS over TCP)",
                None,
            ),
            string(
                "turn-ca-file",
                "TURN CA file",
                "PEM file of the certificates a turns:// server's is checked against (its CA's, \
                 or its own self-signed one); the public CAs when unset (webrtc-stack=shared)",
                None,
            ),
            glib::ParamSpecEnum::builder_with_default(
                "ice-transport-policy",
                gst_webrtc::WebRTCICETransportPolicy::All,
            )
            .nick("ICE transport policy")
            .blurb(
                "all: every candidate; relay: only the TURN server's relayed address \
                 (nothing of the local network is offered)",
            )
            .mutable_ready()
            .build(),
            string(
                "public-address",
                "Public address",
                "The IP address peers reach this machine at when it is behind a one-to-one NAT \
                 (a cloud VM's public address): every local port is also offered there",
                None,
            ),
            glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                .nick("Statistics")
                .blurb("Connection and ICE state, packets, loss, jitter, RTT and bytes of the call")
                .read_only()
                .build(),
        ]
    }

    pub fn set_property(&self, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        let text = || {
            value
                .get::<Option<String>>()
                .unwrap()
                .filter(|t| !t.is_empty())
        };
        match pspec.name() {
            "session" => s.session = text().unwrap_or_else(|| DEFAULT_SESSION.into()),
            "app-id" => s.app_id = value.get().unwrap(),
            "auth-key" => s.auth_key = text(),
            "auth-secret" => s.auth_secret = text(),
            "login" => s.login = text(),
            "password" => s.password = text(),
            "api-url" => s.api_url = text().unwrap_or_else(|| DEFAULT_API_URL.into()),
            "chat-url" => s.chat_url = text().unwrap_or_else(|| DEFAULT_CHAT_URL.into()),
            "chat-domain" => s.chat_domain = text().unwrap_or_else(|| DEFAULT_CHAT_DOMAIN.into()),
            "peer" => s.peer = text(),
            "answer-timeout" => s.answer_timeout = value.get().unwrap(),
            "stun-server" => s.stun_server = text(),
            "turn-server" => s.turn_server = text(),
            "turn-ca-file" => s.turn_ca_file = text(),
            "ice-transport-policy" => s.ice_transport_policy = value.get().unwrap(),
            "public-address" => s.public_address = text(),
            "webrtc-stack" => s.stack = value.get().unwrap(),
            other => unreachable!("not a call property: {other}"),
        }
    }

    pub fn property(&self, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        match pspec.name() {
            "session" => s.session.to_value(),
            "app-id" => s.app_id.to_value(),
            "auth-key" => s.auth_key.to_value(),
            // Secrets are write-only.
            "auth-secret" | "password" => None::<String>.to_value(),
            "login" => s.login.to_value(),
            "api-url" => s.api_url.to_value(),
            "chat-url" => s.chat_url.to_value(),
            "chat-domain" => s.chat_domain.to_value(),
            "peer" => s.peer.to_value(),
            "answer-timeout" => s.answer_timeout.to_value(),
            "stun-server" => s.stun_server.to_value(),
            // Its password is a secret: shown masked (pipeline dumps list
            // the properties set).
            "turn-server" => s.turn_server.as_deref().map(masked_password).to_value(),
            "turn-ca-file" => s.turn_ca_file.to_value(),
            "ice-transport-policy" => s.ice_transport_policy.to_value(),
            "public-address" => s.public_address.to_value(),
            "webrtc-stack" => s.stack.to_value(),
            "stats" => self
                .call
                .lock()
                .unwrap()
                .as_ref()
                .map_or_else(
                    || gst::Structure::new_empty("connectycube-stats"),
                    |c| c.stats(),
                )
                .to_value(),
            other => unreachable!("not a call property: {other}"),
        }
    }

    /// Joins the call, and lets `element` emit `local-description` for it;
    /// with `login` set this element also brings the signalling.
    pub fn join(&self, element: &gst::Element) -> Result<Arc<CallSession>, gst::ErrorMessage> {
        let s = self.settings.lock().unwrap().clone();
        let signalling = match &s.login {
            None => None,
            Some(login) => {
                let missing = |key: &str| {
                    gst::error_msg!(
                        gst::ResourceError::Settings,
                        ("{key} is needed with login (stand-alone signalling)")
                    )
                };
                if s.app_id == 0 {
                    return Err(missing("app-id"));
                }
                Some(SignallingSettings {
                    app: AppCredentials {
                        app_id: s.app_id.into(),
                        auth_key: s.auth_key.clone().ok_or_else(|| missing("auth-key"))?,
                        auth_secret: s.auth_secret.clone(),
                    },
                    login: login.clone(),
                    password: s.password.clone().ok_or_else(|| missing("password"))?,
                    api_url: s.api_url.clone(),
                    chat_url: s.chat_url.clone(),
                    chat_domain: s.chat_domain.clone(),
                    peer: s.peer.clone(),
                    answer_timeout: Duration::from_secs(s.answer_timeout.into()),
                })
            }
        };
        if let Some(Err(e)) = s.stun_server.as_deref().map(ice::stun_host_and_port) {
            return Err(gst::error_msg!(
                gst::ResourceError::Settings,
                ("stun-server {e}")
            ));
        }
        let public_address = match &s.public_address {
            None => None,
            Some(address) => Some(address.parse().map_err(|_| {
                gst::error_msg!(
                    gst::ResourceError::Settings,
                    ("public-address {address:?} is not an IP address")
                )
            })?),
        };
        let call = CallSession::acquire(
            &s.session,
            &CallSettings {
                stun_server: s.stun_server,
                turn_server: s.turn_server,
                turn_ca_file: s.turn_ca_file,
                relay_only: s.ice_transport_policy == gst_webrtc::WebRTCICETransportPolicy::Relay,
                public_address,
                signalling,
                stack: s.stack,
            },
        )?;
        forward_local_descriptions(element, &call);
        *self.call.lock().unwrap() = Some(call.clone());
        Ok(call)
    }

    pub fn leave(&self, element: &gst::Element) {
        if let Some(call) = self.call.lock().unwrap().take() {
            call.remove_description_listener(listener_id(element));
        }
    }

    pub fn call(&self) -> Option<Arc<CallSession>> {
        self.call.lock().unwrap().clone()
    }
}

/// The elements whose implementation carries [`CallProperties`].
pub trait HasCall {
    fn call_properties(&self) -> &CallProperties;
}

/// Action signals for an application that carries the signalling itself
/// (the pattern of gst-plugins-rs's `Signallable`): it asks for an offer,
/// hands in the peer's SDP and candidates, and hears `local-description`.
/// SDPs carry every local candidate, as ConnectyCube's SDK needs them.
pub fn signals<T>() -> Vec<glib::subclass::Signal>
where
    T: glib::subclass::types::ObjectSubclass + HasCall,
    T::Type: IsA<glib::Object>,
{
    use glib::subclass::types::ObjectSubclassIsExt;
    fn call_of<T: glib::subclass::types::ObjectSubclass + HasCall>(
        value: &glib::Value,
    ) -> Option<Arc<CallSession>>
    where
        T::Type: IsA<glib::Object>,
    {
        let element = value.get::<T::Type>().ok()?;
        element.imp().call_properties().call()
    }
    vec![
        glib::subclass::Signal::builder("create-offer")
            .action()
            .class_handler(|args| {
                if let Some(call) = call_of::<T>(&args[0]) {
                    call.app_create_offer();
                }
                None
            })
            .build(),
        glib::subclass::Signal::builder("set-remote-description")
            .param_types([String::static_type(), String::static_type()])
            .action()
            .class_handler(|args| {
                if let (Some(call), Ok(kind), Ok(sdp)) = (
                    call_of::<T>(&args[0]),
                    args[1].get::<String>(),
                    args[2].get::<String>(),
                ) {
                    call.app_set_remote_description(&kind, sdp);
                }
                None
            })
            .build(),
        glib::subclass::Signal::builder("add-ice-candidate")
            .param_types([u32::static_type(), String::static_type()])
            .action()
            .class_handler(|args| {
                if let (Some(call), Ok(mline), Ok(candidate)) = (
                    call_of::<T>(&args[0]),
                    args[1].get::<u32>(),
                    args[2].get::<String>(),
                ) {
                    call.add_remote_candidate(mline, &candidate);
                }
                None
            })
            .build(),
        glib::subclass::Signal::builder("end-call")
            .param_types([String::static_type()])
            .action()
            .class_handler(|args| {
                if let (Some(call), Ok(reason)) = (call_of::<T>(&args[0]), args[1].get::<String>())
                {
                    call.end(CallEnd::normal(reason));
                }
                None
            })
            .build(),
        glib::subclass::Signal::builder("local-description")
            .param_types([String::static_type(), String::static_type()])
            .build(),
    ]
}

fn listener_id(element: &gst::Element) -> u64 {
    element.as_ptr() as u64
}

fn forward_local_descriptions(element: &gst::Element, call: &CallSession) {
    let weak = element.downgrade();
    call.add_description_listener(
        listener_id(element),
        Box::new(move |kind, sdp| {
            if let Some(element) = weak.upgrade() {
                element.emit_by_name::<()>("local-description", &[&kind, &sdp]);
            }
        }),
    );
}

/// Tells the application that the call is over, and why; returns how the
/// element's stream ends: EOS after a normal end, an error after a failure.
pub fn call_over(element: &gst::Element, end: &CallEnd) -> gst::FlowError {
    gst::info!(crate::CAT, obj = element, "call ended: {}", end.reason);
    let s = gst::Structure::builder("connectycube-call-ended")
        .field("reason", &end.reason)
        .field("error", end.error)
        .build();
    let _ = element.post_message(gst::message::Element::builder(s).src(element).build());
    if end.error {
        gst::element_error!(element, gst::ResourceError::Failed, ("{}", end.reason));
        gst::FlowError::Error
    } else {
        gst::FlowError::Eos
    }
}

#[cfg(test)]
mod tests {
    use gst::prelude::*;

    #[test]
    fn the_turn_servers_password_reads_back_masked() {
        gst::init().unwrap();
        crate::register().unwrap();
        let sink = gst::ElementFactory::make("connectycubesink")
            .property("turn-server", "turn://bridge:s3cret@relay.example:3478")
            .build()
            .unwrap();
        assert_eq!(
            sink.property::<Option<String>>("turn-server").as_deref(),
            Some("turn://bridge:***@relay.example:3478")
        );
    }
}
