//! Session timers (RFC 4028) of the calls phones place to the bridge: how
//! long a session lasts unless refreshed, and which side refreshes it.

use std::time::Duration;

use rsipstack::sip::prelude::HeadersExt;
use rsipstack::sip::{Header, Request};
use tokio::time::Instant;

/// Which side of the call refreshes its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refresher {
    Phone,
    Bridge,
}

/// A call's session timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SessionTimer {
    pub interval: u32,
    pub refresher: Refresher,
    /// The phone does session timers itself (`Supported: timer`); when it
    /// does not, a proxy on the way asked for the timer, and the bridge
    /// refreshes.
    pub phone_supports: bool,
}

impl SessionTimer {
    /// The timer a phone's request asks for with `Session-Expires`: `None`
    /// when absent or unreadable. The phone refreshes when it does session
    /// timers and did not ask the bridge to (`refresher=uas`, RFC 4028 §9).
    pub fn requested(request: &Request) -> Option<Self> {
        let value = request
            .header_value("Session-Expires")
            // `x` is its compact form.
            .or_else(|| request.header_value("x"))?;
        let mut parts = value.split(';');
        let interval = parts.next()?.trim().parse().ok()?;
        let asks_bridge = parts.any(|p| {
            p.trim().split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("refresher") && v.trim() == "uas"
            })
        });
        let phone_supports = request.header_contains_token("Supported", "timer")
            || request.header_contains_token("Require", "timer");
        Some(Self {
            interval,
            refresher: if phone_supports && !asks_bridge {
                Refresher::Phone
            } else {
                Refresher::Bridge
            },
            phone_supports,
        })
    }

    /// [`requested`](Self::requested), refused with the `Min-SE` header for
    /// a 422 (RFC 4028 §8.1) when its interval is below `min_se` seconds.
    pub fn requested_within(request: &Request, min_se: u32) -> Result<Option<Self>, Header> {
        match Self::requested(request) {
            Some(timer) if timer.interval < min_se => Err(Header::MinSE(min_se.to_string().into())),
            timer => Ok(timer),
        }
    }

    /// When the session is over unless refreshed: the interval less a
    /// margin (RFC 4028 §10: a third, at most 32 s).
    pub fn deadline(self) -> Instant {
        let interval = u64::from(self.interval);
        Instant::now() + Duration::from_secs(interval - (interval / 3).min(32))
    }

    /// When the bridge, as refresher, refreshes next: half the interval
    /// from now (RFC 4028 §10).
    pub fn refresh_due(self) -> Instant {
        Instant::now() + Duration::from_secs(u64::from(self.interval / 2).max(1))
    }

    /// For the bridge's responses to the phone's requests: the refresher
    /// named by its role in that transaction.
    pub fn response_header(self) -> Header {
        let refresher = match self.refresher {
            Refresher::Phone => "uac",
            Refresher::Bridge => "uas",
        };
        Header::SessionExpires(format!("{};refresher={refresher}", self.interval).into())
    }

    /// For the bridge's own refreshes, which it sends as their UAC.
    pub fn refresh_header(self) -> Header {
        Header::SessionExpires(format!("{};refresher=uac", self.interval).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sip::invite_with;

    #[test]
    fn the_refresher_follows_rfc_4028() {
        let timer = |headers| SessionTimer::requested(&invite_with(headers));
        let phone = timer("Supported: timer\r\nSession-Expires: 1800;refresher=uac\r\n").unwrap();
        assert_eq!(
            (phone.interval, phone.refresher, phone.phone_supports),
            (1800, Refresher::Phone, true)
        );
        assert_eq!(
            timer("Supported: replaces, timer\r\nSession-Expires: 90\r\n")
                .unwrap()
                .refresher,
            Refresher::Phone,
            "the phone does timers and left the choice to the bridge"
        );
        assert_eq!(
            timer("Supported: timer\r\nSession-Expires: 90;refresher=uas\r\n")
                .unwrap()
                .refresher,
            Refresher::Bridge,
            "the phone asked the bridge to refresh"
        );
        // A proxy asked for the timer; the phone knows nothing of it.
        let proxy = timer("Session-Expires: 1800\r\n").unwrap();
        assert_eq!(
            (proxy.refresher, proxy.phone_supports),
            (Refresher::Bridge, false)
        );
        assert_eq!(
            timer("x: 120\r\nSupported: timer\r\n").unwrap(),
            SessionTimer {
                interval: 120,
                refresher: Refresher::Phone,
                phone_supports: true
            },
            "the compact form"
        );
        assert_eq!(timer("Session-Expires: soon\r\n"), None);
        assert_eq!(timer(""), None);
    }

    #[test]
    fn an_interval_below_min_se_is_refused_naming_it() {
        let within =
            |headers, min_se| SessionTimer::requested_within(&invite_with(headers), min_se);
        let refused = within("Session-Expires: 30\r\n", 90).unwrap_err();
        assert_eq!(refused.to_string(), "Min-SE: 90");
        assert_eq!(
            within("Session-Expires: 90\r\n", 90)
                .unwrap()
                .unwrap()
                .interval,
            90
        );
        assert_eq!(within("", 90).unwrap(), None);
    }

    #[test]
    fn each_header_names_the_refresher_by_its_role() {
        let bridge = SessionTimer {
            interval: 90,
            refresher: Refresher::Bridge,
            phone_supports: false,
        };
        assert_eq!(bridge.response_header().value(), "90;refresher=uas");
        assert_eq!(bridge.refresh_header().value(), "90;refresher=uac");
        let phone = SessionTimer {
            refresher: Refresher::Phone,
            ..bridge
        };
        assert_eq!(phone.response_header().value(), "90;refresher=uac");
    }
}
