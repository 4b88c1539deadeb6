//! ConnectyCube P2P call signals (`WebRTCVideoChat` headline messages), read
//! and written exactly as the JS SDK 6.1.2 does (connectycube-protocol.md §4).

use super::xml::Element;

pub const MODULE_IDENTIFIER: &str = "WebRTCVideoChat";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalType {
    Call,
    Accept,
    Reject,
    HangUp,
    IceCandidates,
    IceRestart,
    IceRestartAccept,
}

impl SignalType {
    pub fn as_str(self) -> &'static str {
        match self {
            SignalType::Call => "call",
            SignalType::Accept => "accept",
            SignalType::Reject => "reject",
            SignalType::HangUp => "hangUp",
            SignalType::IceCandidates => "iceCandidates",
            SignalType::IceRestart => "iceRestart",
            SignalType::IceRestartAccept => "iceRestartAccept",
        }
    }

    fn parse(text: &str) -> Option<SignalType> {
        Some(match text {
            "call" => SignalType::Call,
            "accept" => SignalType::Accept,
            "reject" => SignalType::Reject,
            "hangUp" => SignalType::HangUp,
            "iceCandidates" => SignalType::IceCandidates,
            "iceRestart" => SignalType::IceRestart,
            "iceRestartAccept" => SignalType::IceRestartAccept,
            _ => return None,
        })
    }
}

/// `callType`: 1 video, 2 audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallType {
    Video = 1,
    Audio = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceCandidate {
    pub sdp_mline_index: u32,
    pub sdp_mid: String,
    pub candidate: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSignal {
    pub signal_type: SignalType,
    pub session_id: String,
    pub call_type: CallType,
    /// Must equal the sender's user id: the SDK matches offers by it.
    pub caller_id: u64,
    pub opponent_ids: Vec<u64>,
    pub sdp: Option<String>,
    pub candidates: Vec<IceCandidate>,
    /// The app's `userInfo` object, flattened to strings as the SDK sees it.
    pub user_info: Vec<(String, String)>,
    pub platform: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error("not a call signal (no WebRTCVideoChat extraParams)")]
    NotASignal,
    #[error("signal carries <delay>: an offline copy, ignored as the SDK does")]
    Delayed,
    #[error("unknown signalType {0:?}")]
    UnknownType(String),
    #[error("signal has no usable sender: from={0:?}")]
    BadSender(String),
    #[error("signal field {field}: {problem}")]
    BadField {
        field: &'static str,
        problem: String,
    },
}

/// A signal as received: who sent it (from the server-stamped `from`), and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSignal {
    pub from_user_id: u64,
    pub signal: CallSignal,
}

/// The user id in a JID's local part `{uid}-{appId}@…`, as the SDK reads it.
pub fn user_id_from_jid(jid: &str) -> Option<u64> {
    jid.split('@').next()?.split('-').next()?.parse().ok()
}

/// The bare JID of a user: `{uid}-{appId}@{domain}`.
pub fn user_jid(user_id: u64, app_id: u64, domain: &str) -> String {
    format!("{user_id}-{app_id}@{domain}")
}

impl CallSignal {
    pub fn new(
        signal_type: SignalType,
        session_id: &str,
        call_type: CallType,
        caller_id: u64,
        opponent_ids: Vec<u64>,
    ) -> Self {
        CallSignal {
            signal_type,
            session_id: session_id.to_owned(),
            call_type,
            caller_id,
            opponent_ids,
            sdp: None,
            candidates: Vec::new(),
            user_info: Vec::new(),
            platform: "web".to_owned(),
        }
    }

    /// The `<message type="headline">` stanza carrying this signal to `to_jid`.
    pub fn to_stanza(&self, to_jid: &str, message_id: &str) -> Element {
        let mut params = Element::new("extraParams").attr("xmlns", "jabber:client");
        if !self.user_info.is_empty() {
            let mut info = Element::new("userInfo");
            for (key, value) in &self.user_info {
                info.children
                    .push(Element::new(key.as_str()).text(value.as_str()));
            }
            params.children.push(info);
        }
        params
            .children
            .push(Element::new("sessionID").text(self.session_id.as_str()));
        let restart = matches!(
            self.signal_type,
            SignalType::IceRestart | SignalType::IceRestartAccept
        );
        if !restart {
            params
                .children
                .push(Element::new("callType").text((self.call_type as u8).to_string()));
            params
                .children
                .push(Element::new("callerID").text(self.caller_id.to_string()));
            let mut opponents = Element::new("opponentsIDs");
            for id in &self.opponent_ids {
                opponents
                    .children
                    .push(Element::new("opponentID").text(id.to_string()));
            }
            params.children.push(opponents);
        }
        if let Some(sdp) = &self.sdp {
            params.children.push(Element::new("sdp").text(sdp.as_str()));
        }
        if !self.candidates.is_empty() {
            let mut list = Element::new("iceCandidates");
            for c in &self.candidates {
                list.children.push(
                    Element::new("iceCandidate")
                        // Always a number: older SDKs int.parse() this field.
                        .child(Element::new("sdpMLineIndex").text(c.sdp_mline_index.to_string()))
                        .child(Element::new("sdpMid").text(c.sdp_mid.as_str()))
                        .child(Element::new("candidate").text(c.candidate.as_str())),
                );
            }
            params.children.push(list);
        }
        params
            .children
            .push(Element::new("moduleIdentifier").text(MODULE_IDENTIFIER));
        params
            .children
            .push(Element::new("signalType").text(self.signal_type.as_str()));
        params
            .children
            .push(Element::new("platform").text(self.platform.as_str()));
        Element::new("message")
            .attr("to", to_jid)
            .attr("type", "headline")
            .attr("id", message_id)
            .attr("xmlns", "jabber:client")
            .child(params)
    }

    /// Reads a received message stanza with the SDK's rules: headline type,
    /// WebRTCVideoChat module, no `<delay>`, sender from `from`.
    pub fn from_stanza(message: &Element) -> Result<ReceivedSignal, SignalError> {
        if message.local_name() != "message" || message.get_attr("type") != Some("headline") {
            return Err(SignalError::NotASignal);
        }
        let params = message.find("extraParams").ok_or(SignalError::NotASignal)?;
        if params.find_text("moduleIdentifier") != Some(MODULE_IDENTIFIER) {
            return Err(SignalError::NotASignal);
        }
        if message.find("delay").is_some() {
            return Err(SignalError::Delayed);
        }
        let from = message.get_attr("from").unwrap_or_default();
        let from_user_id =
            user_id_from_jid(from).ok_or_else(|| SignalError::BadSender(from.to_owned()))?;
        let type_text = params.find_text("signalType").unwrap_or_default();
        let signal_type = SignalType::parse(type_text)
            .ok_or_else(|| SignalError::UnknownType(type_text.to_owned()))?;
        let session_id = params
            .find_text("sessionID")
            .filter(|s| !s.is_empty())
            .ok_or(SignalError::BadField {
                field: "sessionID",
                problem: "missing".into(),
            })?
            .to_owned();
        let number = |field: &'static str, text: &str| {
            text.trim()
                .parse::<u64>()
                .map_err(|_| SignalError::BadField {
                    field,
                    problem: format!("{text:?} is not a number"),
                })
        };
        // The SDK reads these by their session and sender alone: an ICE
        // restart carries neither call type nor caller, and a reject sent
        // over REST from a closed app (`/calls/reject.json`, relayed by
        // the server) may not either.
        let by_session = matches!(
            signal_type,
            SignalType::IceRestart
                | SignalType::IceRestartAccept
                | SignalType::Reject
                | SignalType::HangUp
        );
        let call_type = match params.find_text("callType") {
            Some("1") => CallType::Video,
            Some("2") => CallType::Audio,
            None if by_session => CallType::Audio,
            other => {
                return Err(SignalError::BadField {
                    field: "callType",
                    problem: format!("{other:?} is neither 1 nor 2"),
                });
            }
        };
        let caller_id = match params.find_text("callerID") {
            Some(text) => number("callerID", text)?,
            None if by_session => 0,
            None => {
                return Err(SignalError::BadField {
                    field: "callerID",
                    problem: "missing".into(),
                });
            }
        };
        let opponent_ids = params
            .find("opponentsIDs")
            .map(|o| {
                o.children
                    .iter()
                    .map(|c| number("opponentID", &c.text))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let sdp = params.find_text("sdp").map(str::to_owned);
        if matches!(
            signal_type,
            SignalType::Call
                | SignalType::Accept
                | SignalType::IceRestart
                | SignalType::IceRestartAccept
        ) && sdp
            .as_deref()
            .is_none_or(|s| !s.trim_start().starts_with("v=0"))
        {
            return Err(SignalError::BadField {
                field: "sdp",
                problem: "missing or not an SDP body".into(),
            });
        }
        let candidates = params
            .find("iceCandidates")
            .map(|list| {
                list.children
                    .iter()
                    .map(|c| {
                        let index = c.find_text("sdpMLineIndex").unwrap_or_default().trim();
                        Ok(IceCandidate {
                            // The SDK sends index 0 as an empty element.
                            sdp_mline_index: if index.is_empty() {
                                0
                            } else {
                                number("sdpMLineIndex", index)? as u32
                            },
                            sdp_mid: c.find_text("sdpMid").unwrap_or_default().to_owned(),
                            candidate: c.find_text("candidate").unwrap_or_default().to_owned(),
                        })
                    })
                    .collect::<Result<Vec<_>, SignalError>>()
            })
            .transpose()?
            .unwrap_or_default();
        let user_info = params
            .find("userInfo")
            .map(|info| {
                info.children
                    .iter()
                    .map(|c| (c.name.clone(), c.text.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(ReceivedSignal {
            from_user_id,
            signal: CallSignal {
                signal_type,
                session_id,
                call_type,
                caller_id,
                opponent_ids,
                sdp,
                candidates,
                user_info,
                platform: params.find_text("platform").unwrap_or("web").to_owned(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stanzas the server delivered to the SDK in the captured real traffic.
    fn fixture_stanzas(name: &str) -> Vec<Element> {
        let path = format!(
            "{}/tests/fixtures/connectycube-sdk-6.1.2/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"));
        // A logged stanza may span lines (SDP keeps its line breaks).
        let mut stanzas = Vec::new();
        let mut current: Option<String> = None;
        for line in text.split('\n') {
            if let Some(rest) = line.split_once(" S->C ").map(|(_, r)| r) {
                if let Some(done) = current.take() {
                    stanzas.push(done);
                }
                current = Some(rest.to_owned());
            } else if line.starts_with("WS#") || line.starts_with("HTTP") || line.starts_with("WS ")
            {
                if let Some(done) = current.take() {
                    stanzas.push(done);
                }
            } else if let Some(c) = current.as_mut() {
                c.push('\n');
                c.push_str(line);
            }
        }
        stanzas.extend(current);
        stanzas
            .iter()
            .filter(|s| s.starts_with("<message"))
            .map(|s| Element::parse(s).unwrap_or_else(|e| panic!("{e}: {s}")))
            .collect()
    }

    #[test]
    fn reads_every_signal_of_a_real_accepted_call() {
        let signals: Vec<_> = fixture_stanzas("traffic_accept.log")
            .iter()
            .filter_map(|m| CallSignal::from_stanza(m).ok())
            .collect();
        let types: Vec<_> = signals.iter().map(|s| s.signal.signal_type).collect();
        assert!(types.contains(&SignalType::Call));
        assert!(types.contains(&SignalType::Accept));
        assert!(types.contains(&SignalType::IceCandidates));
        assert!(types.contains(&SignalType::HangUp));
        let call = signals
            .iter()
            .find(|s| s.signal.signal_type == SignalType::Call)
            .unwrap();
        assert_eq!(call.from_user_id, 1001);
        assert_eq!(call.signal.caller_id, 1001);
        assert_eq!(call.signal.opponent_ids, [1002]);
        assert_eq!(call.signal.call_type, CallType::Audio);
        assert!(
            call.signal.sdp.as_deref().unwrap().contains("\r\n"),
            "CRLF kept"
        );
        let candidates = signals
            .iter()
            .find(|s| s.signal.signal_type == SignalType::IceCandidates)
            .unwrap();
        assert_eq!(
            candidates.signal.candidates[0].sdp_mline_index, 0,
            "empty index reads as 0"
        );
    }

    #[test]
    fn reads_a_real_reject() {
        let rejected = fixture_stanzas("traffic_reject.log")
            .iter()
            .filter_map(|m| CallSignal::from_stanza(m).ok())
            .any(|s| s.signal.signal_type == SignalType::Reject);
        assert!(rejected);
    }

    #[test]
    fn reads_a_reject_that_names_only_its_session() {
        // What a closed app's REST reject can become: no call type, no caller.
        let stanza = Element::parse(
            "<message from=\"1002-1@localhost\" to=\"1001-1@localhost\" type=\"headline\">\
             <extraParams><sessionID>s-9</sessionID><moduleIdentifier>WebRTCVideoChat</moduleIdentifier>\
             <signalType>reject</signalType><platform>ios</platform></extraParams></message>",
        )
        .unwrap();
        let read = CallSignal::from_stanza(&stanza).unwrap();
        assert_eq!(read.from_user_id, 1002);
        assert_eq!(read.signal.signal_type, SignalType::Reject);
        assert_eq!(read.signal.session_id, "s-9");
        // A call still needs both.
        let call = stanza.to_string().replace(">reject<", ">call<");
        assert!(CallSignal::from_stanza(&Element::parse(&call).unwrap()).is_err());
    }

    #[test]
    fn writes_what_it_reads() {
        let mut signal = CallSignal::new(SignalType::Call, "s-1", CallType::Video, 7, vec![8, 9]);
        signal.sdp = Some("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n".into());
        signal.user_info = vec![("name".into(), "Desk <101>".into())];
        signal.candidates = vec![IceCandidate {
            sdp_mline_index: 0,
            sdp_mid: "0".into(),
            candidate: "candidate:1 1 udp 1 127.0.0.1 5000 typ host".into(),
        }];
        let mut stanza =
            Element::parse(&signal.to_stanza("8-1@localhost", "abc").to_string()).unwrap();
        assert!(
            stanza
                .to_string()
                .contains("<sdpMLineIndex>0</sdpMLineIndex>")
        );
        stanza.set_attr("from", "7-1@localhost/r1");
        let read = CallSignal::from_stanza(&stanza).unwrap();
        assert_eq!(read.from_user_id, 7);
        assert_eq!(read.signal, signal);
    }

    #[test]
    fn refuses_what_the_sdk_ignores_or_cannot_use() {
        let signal = CallSignal::new(SignalType::HangUp, "s", CallType::Audio, 7, vec![8]);
        let mut stanza = signal.to_stanza("8-1@localhost", "x");
        assert!(
            matches!(
                CallSignal::from_stanza(&stanza),
                Err(SignalError::BadSender(_))
            ),
            "no from"
        );
        stanza.set_attr("from", "7-1@localhost/r");
        assert!(CallSignal::from_stanza(&stanza).is_ok());
        stanza.children.push(Element::new("delay"));
        assert_eq!(CallSignal::from_stanza(&stanza), Err(SignalError::Delayed));

        let mut update = CallSignal::new(SignalType::HangUp, "s", CallType::Audio, 7, vec![8])
            .to_stanza("8-1@x", "y");
        update.set_attr("from", "7-1@x/r");
        update.children[0]
            .children
            .iter_mut()
            .find(|c| c.name == "signalType")
            .unwrap()
            .text = "update".into();
        assert_eq!(
            CallSignal::from_stanza(&update),
            Err(SignalError::UnknownType("update".into()))
        );

        let mut garbage_sdp = CallSignal::new(SignalType::Call, "s", CallType::Audio, 7, vec![8]);
        garbage_sdp.sdp = Some("<script>".into());
        let mut stanza = garbage_sdp.to_stanza("8-1@x", "y");
        stanza.set_attr("from", "7-1@x/r");
        assert!(matches!(
            CallSignal::from_stanza(&stanza),
            Err(SignalError::BadField { field: "sdp", .. })
        ));
    }
}
