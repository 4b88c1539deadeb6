//! Each mapped extension's app user as the bridge sees them: signed in to
//! ConnectyCube or not, rung by a SIP call, on a call. Calls hold a
//! [`CallPresence`] for as long as they last, so however a call ends its
//! user's state follows. Watchers (the Asterisk link) are told of changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// A user's state in Asterisk's device-state names (the values of
/// `DEVICE_STATE()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    NotInUse,
    InUse,
    Ringing,
    /// On a call, and rung by another.
    RingInUse,
    /// Not signed in to ConnectyCube, or its chat reconnecting: calls to
    /// the user fail.
    Unavailable,
}

impl DeviceState {
    pub fn asterisk_name(self) -> &'static str {
        match self {
            DeviceState::NotInUse => "NOT_INUSE",
            DeviceState::InUse => "INUSE",
            DeviceState::Ringing => "RINGING",
            DeviceState::RingInUse => "RINGINUSE",
            DeviceState::Unavailable => "UNAVAILABLE",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Activity {
    signed_in: bool,
    ringing: u32,
    in_use: u32,
}

impl Activity {
    fn state(self) -> DeviceState {
        match (self.in_use > 0, self.ringing > 0) {
            (true, true) => DeviceState::RingInUse,
            (true, false) => DeviceState::InUse,
            (false, true) => DeviceState::Ringing,
            (false, false) if self.signed_in => DeviceState::NotInUse,
            (false, false) => DeviceState::Unavailable,
        }
    }
}

pub struct Presence {
    /// By extension, as configured.
    users: Mutex<BTreeMap<String, Activity>>,
    changes: watch::Sender<()>,
}

impl Presence {
    /// Every mapped extension, none signed in yet.
    pub fn new<'a>(extensions: impl IntoIterator<Item = &'a str>) -> Arc<Self> {
        let users = extensions
            .into_iter()
            .map(|extension| (extension.to_owned(), Activity::default()))
            .collect();
        Arc::new(Presence {
            users: Mutex::new(users),
            changes: watch::channel(()).0,
        })
    }

    /// A user mapped since the start (a reloaded configuration), not
    /// signed in yet.
    pub fn add(&self, extension: &str) {
        let mut users = self.users.lock().unwrap();
        if !users
            .keys()
            .any(|known| known.eq_ignore_ascii_case(extension))
        {
            users.insert(extension.to_owned(), Activity::default());
            self.changes.send_replace(());
        }
    }

    /// Marks changed whenever a user's state may have changed.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Every user's state, by extension.
    pub fn states(&self) -> Vec<(String, DeviceState)> {
        self.users
            .lock()
            .unwrap()
            .iter()
            .map(|(extension, activity)| (extension.clone(), activity.state()))
            .collect()
    }

    /// Whether the user is signed in with its chat online.
    pub fn set_signed_in(&self, extension: &str, signed_in: bool) {
        self.update(extension, |activity| activity.signed_in = signed_in);
    }

    /// A SIP call rings `extension`'s app user until it is answered or ends.
    pub fn ringing(self: &Arc<Self>, extension: &str) -> Option<CallPresence> {
        self.call(extension, false)
    }

    /// `extension`'s app user calls out: in use from the start.
    pub fn in_use(self: &Arc<Self>, extension: &str) -> Option<CallPresence> {
        self.call(extension, true)
    }

    fn call(self: &Arc<Self>, extension: &str, answered: bool) -> Option<CallPresence> {
        let extension = self.configured_name(extension)?;
        self.update(&extension, |activity| match answered {
            true => activity.in_use += 1,
            false => activity.ringing += 1,
        });
        Some(CallPresence {
            presence: self.clone(),
            extension,
            answered,
        })
    }

    /// Extensions match without case, as the rest of the mapping does.
    fn configured_name(&self, extension: &str) -> Option<String> {
        self.users
            .lock()
            .unwrap()
            .keys()
            .find(|known| known.eq_ignore_ascii_case(extension))
            .cloned()
    }

    fn update(&self, extension: &str, change: impl FnOnce(&mut Activity)) {
        let mut users = self.users.lock().unwrap();
        let Some(activity) = users
            .iter_mut()
            .find(|(known, _)| known.eq_ignore_ascii_case(extension))
            .map(|(_, activity)| activity)
        else {
            return;
        };
        let before = activity.state();
        change(activity);
        if activity.state() != before {
            self.changes.send_replace(());
        }
    }
}

/// One call's part in its user's state, taken back when dropped.
pub struct CallPresence {
    presence: Arc<Presence>,
    extension: String,
    answered: bool,
}

impl CallPresence {
    /// The app user took the call: from ringing to in use.
    pub fn answered(&mut self) {
        if !std::mem::replace(&mut self.answered, true) {
            self.presence.update(&self.extension, |activity| {
                activity.ringing -= 1;
                activity.in_use += 1;
            });
        }
    }
}

impl Drop for CallPresence {
    fn drop(&mut self) {
        let answered = self.answered;
        self.presence
            .update(&self.extension, |activity| match answered {
                true => activity.in_use -= 1,
                false => activity.ringing -= 1,
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(presence: &Presence, extension: &str) -> DeviceState {
        presence
            .states()
            .into_iter()
            .find(|(e, _)| e == extension)
            .unwrap()
            .1
    }

    #[test]
    fn calls_move_their_user_through_asterisks_states_and_back() {
        let presence = Presence::new(["alice", "bob"]);
        let mut changes = presence.subscribe();
        assert_eq!(state_of(&presence, "alice"), DeviceState::Unavailable);
        presence.set_signed_in("ALICE", true);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(state_of(&presence, "alice"), DeviceState::NotInUse);

        let mut first = presence.ringing("Alice").unwrap();
        assert_eq!(state_of(&presence, "alice"), DeviceState::Ringing);
        first.answered();
        first.answered();
        assert_eq!(state_of(&presence, "alice"), DeviceState::InUse);
        let second = presence.ringing("alice").unwrap();
        assert_eq!(state_of(&presence, "alice"), DeviceState::RingInUse);
        drop(second);
        assert_eq!(state_of(&presence, "alice"), DeviceState::InUse);
        drop(first);
        assert_eq!(state_of(&presence, "alice"), DeviceState::NotInUse);
        assert!(changes.has_changed().unwrap());

        let calling = presence.in_use("alice").unwrap();
        assert_eq!(state_of(&presence, "alice"), DeviceState::InUse);
        drop(calling);
        assert_eq!(state_of(&presence, "bob"), DeviceState::Unavailable);
        assert!(presence.ringing("carol").is_none(), "not mapped");
    }
}
