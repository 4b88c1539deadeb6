//! Call transfer asked by the phone (REFER, RFC 3515): where the call goes,
//! read from `Refer-To`, and the phone told how it goes (NOTIFY with a
//! `message/sipfrag` body), in order, off the call's own task. And the
//! dialog a phone's INVITE with `Replaces` takes the place of (RFC 3891).

use std::sync::Arc;
use std::time::Duration;

use rsipstack::dialog::DialogId;
use rsipstack::dialog::dialog::DialogState;
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::sip::Header;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// How long the first NOTIFY waits for the REFER's 202 to leave.
const ACCEPTED_FIRST: Duration = Duration::from_millis(20);

/// Longest `Refer-To` value taken; real ones are far shorter.
const MAX_REFER_TO: usize = 1024;

/// Where a REFER sends the call: the target's user part, and the
/// `Replaces` header an attended transfer embeds in the URI (RFC 3891).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ReferTarget {
    pub user: String,
    pub replaces: Option<String>,
}

impl ReferTarget {
    /// Reads a `Refer-To` value: `<sip:bob@pbx?Replaces=…>` or `sip:bob@pbx`.
    pub fn parse(refer_to: &str) -> Result<ReferTarget, String> {
        let value = refer_to.trim();
        if value.len() > MAX_REFER_TO {
            return Err("Refer-To is too long".into());
        }
        let uri = match (value.find('<'), value.rfind('>')) {
            (Some(open), Some(close)) if open < close => &value[open + 1..close],
            // An addr-spec carries neither headers nor parameters of its own.
            _ => value.split(';').next().unwrap_or_default(),
        };
        let (address, headers) = uri.split_once('?').unwrap_or((uri, ""));
        let scheme_end = address.find(':').ok_or("Refer-To is not a SIP URI")?;
        if !["sip", "sips"]
            .iter()
            .any(|scheme| address[..scheme_end].eq_ignore_ascii_case(scheme))
        {
            return Err("Refer-To is not a SIP URI".into());
        }
        let (user, _host) = address[scheme_end + 1..]
            .split_once('@')
            .ok_or("Refer-To names no user")?;
        let user = unescape(user)?;
        let dialable = |c: char| c.is_ascii_alphanumeric() || "+-_.*#".contains(c);
        if user.is_empty() || !user.chars().all(dialable) {
            return Err(format!("Refer-To user {user:?} is not a number or name"));
        }
        let replaces = headers
            .split('&')
            .filter_map(|header| header.split_once('='))
            .find(|(name, _)| name.eq_ignore_ascii_case("Replaces"))
            .map(|(_, value)| unescape(value))
            .transpose()?;
        Ok(ReferTarget { user, replaces })
    }
}

/// The dialog an INVITE's `Replaces` header names (RFC 3891 §6.1): its
/// Call-ID and tags, `to_tag` being the tag of the one receiving it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Replaces {
    pub call_id: String,
    pub to_tag: String,
    pub from_tag: String,
    /// Only an early dialog may be replaced, not a call in progress.
    pub early_only: bool,
}

impl Replaces {
    /// Reads `call-id;to-tag=…;from-tag=…[;early-only]`.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.len() > MAX_REFER_TO {
            return Err("Replaces is too long".into());
        }
        let mut parts = value.split(';').map(str::trim);
        let call_id = parts.next().unwrap_or_default();
        if call_id.is_empty() || call_id.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("Replaces names no Call-ID".into());
        }
        let (mut to_tag, mut from_tag, mut early_only) = (None, None, false);
        for parameter in parts {
            let (name, tag) = match parameter.split_once('=') {
                Some((name, tag)) => (name.trim(), Some(tag.trim())),
                None => (parameter, None),
            };
            let slot = if name.eq_ignore_ascii_case("to-tag") {
                &mut to_tag
            } else if name.eq_ignore_ascii_case("from-tag") {
                &mut from_tag
            } else {
                early_only |= name.eq_ignore_ascii_case("early-only");
                continue;
            };
            *slot = tag.filter(|t| !t.is_empty()).map(str::to_owned);
        }
        let (Some(to_tag), Some(from_tag)) = (to_tag, from_tag) else {
            return Err("Replaces lacks its to-tag or from-tag".into());
        };
        Ok(Replaces {
            call_id: call_id.to_owned(),
            to_tag,
            from_tag,
            early_only,
        })
    }

    /// Whether it names `dialog`: its to-tag is our tag, its from-tag the
    /// other party's, whichever side began the dialog.
    pub fn names(&self, dialog: &DialogId) -> bool {
        self.call_id == dialog.call_id
            && self.to_tag == dialog.local_tag
            && self.from_tag == dialog.remote_tag
    }
}

/// Undoes %-escaping; what comes out goes into a SIP message, so no
/// control characters (a CR LF would start another header).
fn unescape(text: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let digits = tail.get(..2).and_then(|d| std::str::from_utf8(d).ok());
            let decoded = digits.and_then(|d| u8::from_str_radix(d, 16).ok());
            bytes.push(decoded.ok_or("a bad %-escape in Refer-To")?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    let text = String::from_utf8(bytes).map_err(|_| "Refer-To is not UTF-8")?;
    if text.chars().any(char::is_control) {
        return Err("a control character in Refer-To".into());
    }
    Ok(text)
}

/// What the transferor is told next: the status line of the transfer's
/// call (`SIP/2.0 180 Ringing`), and whether it is the last word.
pub(super) struct Progress {
    pub status: String,
    pub last: bool,
}

/// Sends the transferor's NOTIFYs one after the other on a task of their
/// own (each waits for its answer, and the call must not). Once the target
/// took the call (the returned sender fired), the transferor's dialog then
/// ends with BYE, after the last NOTIFY: the phone has handed the call over.
pub(super) fn notifier(
    dialog: InviteDialog,
    dialogs: Arc<DialogLayer>,
    call_id: String,
) -> (mpsc::UnboundedSender<Progress>, oneshot::Sender<()>) {
    let (progress, mut updates) = mpsc::unbounded_channel::<Progress>();
    let (bye_after, bye) = oneshot::channel::<()>();
    tokio::spawn(async move {
        // The REFER's 202 is sent by another task: let it go first (RFC
        // 6665 allows either order, but some phones and SIPp mind).
        tokio::time::sleep(ACCEPTED_FIRST).await;
        while let Some(Progress { status, last }) = updates.recv().await {
            // The transferor hung up: nobody to tell.
            if matches!(dialog.state(), DialogState::Terminated(..)) {
                return;
            }
            let state = if last {
                "terminated;reason=noresource"
            } else {
                "active;expires=60"
            };
            let headers = vec![
                Header::Event("refer".into()),
                Header::SubscriptionState(state.into()),
                Header::ContentType("message/sipfrag;version=2.0".into()),
            ];
            let body = format!("SIP/2.0 {status}\r\n").into_bytes();
            if let Err(e) = dialog.notify(Some(headers), Some(body)).await {
                debug!("call {call_id}: NOTIFY ({status}) to the transferor: {e}");
            }
            if last {
                break;
            }
        }
        if bye.await.is_ok() {
            end(&dialog, &dialogs, &call_id).await;
        }
    });
    (progress, bye_after)
}

/// Ends the transferor's dialog once the target took the call.
pub(super) fn hang_up(dialog: InviteDialog, dialogs: Arc<DialogLayer>, call_id: String) {
    tokio::spawn(async move { end(&dialog, &dialogs, &call_id).await });
}

async fn end(dialog: &InviteDialog, dialogs: &DialogLayer, call_id: &str) {
    let reason = Header::Reason("SIP;cause=200;text=\"call transferred\"".into());
    if let Err(e) = dialog.bye_with_headers(Some(vec![reason])).await {
        debug!("call {call_id}: BYE to the transferor: {e}");
    }
    dialogs.remove_dialog(&dialog.id());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blind_transfer_names_its_target() {
        for value in [
            "<sip:alice@pbx.example.com>",
            "\"Alice\" <sips:alice@pbx.example.com;transport=tls>;x=1",
            "sip:alice@10.0.0.1:5060",
        ] {
            let target = ReferTarget::parse(value).unwrap();
            assert_eq!(target.user, "alice", "{value}");
            assert_eq!(target.replaces, None);
        }
        let number = ReferTarget::parse("<sip:%2B4930123@pbx>").unwrap();
        assert_eq!(number.user, "+4930123");
    }

    #[test]
    fn an_attended_transfer_carries_its_replaces_header() {
        let target = ReferTarget::parse(
            "<sip:carol@pbx?Replaces=4ab3%40pc.example%3Bto-tag%3D12%3Bfrom-tag%3D34&Foo=bar>",
        )
        .unwrap();
        assert_eq!(target.user, "carol");
        assert_eq!(
            target.replaces.as_deref(),
            Some("4ab3@pc.example;to-tag=12;from-tag=34")
        );
    }

    #[test]
    fn replaces_names_a_dialog_by_our_tag_and_theirs() {
        let replaces = Replaces::parse("4ab3@pc.example ; to-tag=12;from-tag=34").unwrap();
        assert!(!replaces.early_only);
        let dialog = |local: &str, remote: &str| DialogId {
            call_id: "4ab3@pc.example".into(),
            local_tag: local.into(),
            remote_tag: remote.into(),
        };
        assert!(replaces.names(&dialog("12", "34")));
        assert!(
            !replaces.names(&dialog("34", "12")),
            "the tags as the receiver sees them"
        );
        let early = Replaces::parse("x;from-tag=1;early-only;to-tag=2").unwrap();
        assert!(early.early_only);
        assert_eq!((early.to_tag.as_str(), early.from_tag.as_str()), ("2", "1"));
    }

    #[test]
    fn a_replaces_without_its_dialog_is_refused() {
        for value in [
            "",
            ";to-tag=1;from-tag=2",
            "a b;to-tag=1;from-tag=2",
            "abc;to-tag=1",
            "abc;to-tag=;from-tag=2",
            &format!("{};to-tag=1;from-tag=2", "x".repeat(2000)),
        ] {
            assert!(Replaces::parse(value).is_err(), "{value:?}");
        }
    }

    #[test]
    fn what_cannot_be_dialled_is_refused() {
        for value in [
            "",
            "<tel:+4930123>",
            "<sip:pbx.example.com>",
            "<sip:@pbx>",
            "<sip:al%ice@pbx>",
            "<sip:al%0D%0Aice@pbx>",
            "<sip:a b@pbx>",
            "<sip:carol@pbx?Replaces=a%0D%0AVia:%20x>",
            "<sip:carol@pbx?Replaces=%zz>",
            &format!("<sip:{}@pbx>", "9".repeat(2000)),
        ] {
            assert!(ReferTarget::parse(value).is_err(), "{value:?}");
        }
    }
}
