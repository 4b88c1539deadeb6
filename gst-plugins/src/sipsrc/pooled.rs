//! `sipsrc shared-threads=true`: the receiving source's work done on the
//! plugin's shared media threads instead of a thread of its own per call.
//! A task woken by the socket's readiness handles each datagram as the
//! receiver's own thread would, and pushes through a pad of no element
//! into the rest of the bin.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gst::prelude::*;
use gst::subclass::prelude::*;
use tokio::io::Interest;
use tokio::sync::oneshot;

use super::SipReceiver;
use crate::CAT;
use crate::media_session::MediaSession;

/// How often statistics and the RTP timeout are looked at.
const HOUSEKEEPING: Duration = Duration::from_millis(100);
/// Datagrams handled per wake-up before other calls get their turn.
const BATCH: usize = 32;

pub(super) struct PooledReception {
    pad: gst::Pad,
    /// Dropping it stops the task.
    running: Mutex<Option<oneshot::Sender<()>>>,
    /// Stream-start and segment went out.
    announced: Arc<AtomicBool>,
}

impl PooledReception {
    pub(super) fn new(receiver: &SipReceiver) -> Self {
        let weak = receiver.downgrade();
        let pad = gst::Pad::builder(gst::PadDirection::Src)
            .name("shared-threads")
            .event_function(move |_, _, event| {
                if crate::is_key_frame_request(&event)
                    && let Some(receiver) = weak.upgrade()
                {
                    receiver.imp().request_key_frame();
                }
                true
            })
            .query_function(|pad, _, query| crate::live_source_query(pad, query).unwrap_or(false))
            .build();
        PooledReception {
            pad,
            running: Mutex::new(None),
            announced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Where the received packets leave.
    pub(super) fn pad(&self) -> &gst::Pad {
        &self.pad
    }

    /// Joins the session (READY → PAUSED).
    pub(super) fn prepare(&self, receiver: &SipReceiver) -> Result<(), gst::ErrorMessage> {
        receiver.imp().begin()?;
        let _ = self.pad.set_active(true);
        Ok(())
    }

    /// Starts receiving (PAUSED → PLAYING).
    pub(super) fn start(&self, receiver: &SipReceiver, owner: &gst::Element, eos_on_bye: bool) {
        let Some(session) = receiver.imp().session() else {
            return;
        };
        let (running, stopped) = oneshot::channel();
        *self.running.lock().unwrap() = Some(running);
        let task = Reception {
            receiver: receiver.clone(),
            owner: owner.clone(),
            session,
            pad: self.pad.clone(),
            eos_on_bye,
            announced: self.announced.clone(),
        };
        crate::MEDIA_POOL
            .for_element(owner)
            .spawn(task.run(stopped));
    }

    /// Stops receiving (PLAYING → PAUSED).
    pub(super) fn pause(&self) {
        self.running.lock().unwrap().take();
    }

    /// An EOS sent to `sipsrc` (which finishes a recording): receiving
    /// stops and the EOS goes downstream, after stream-start and segment
    /// if nothing was received yet.
    pub(super) fn end_of_stream(&self, owner: &gst::Element) {
        self.pause();
        announce(&self.pad, owner, &self.announced, None);
        self.pad.push_event(gst::event::Eos::new());
    }

    /// Leaves the session (PAUSED → READY).
    pub(super) fn release(&self, receiver: &SipReceiver) {
        self.pause();
        let _ = self.pad.set_active(false);
        self.announced.store(false, Ordering::SeqCst);
        receiver.imp().end();
    }
}

struct Reception {
    receiver: SipReceiver,
    owner: gst::Element,
    session: Arc<MediaSession>,
    pad: gst::Pad,
    eos_on_bye: bool,
    announced: Arc<AtomicBool>,
}

impl Reception {
    async fn run(self, mut stopped: oneshot::Receiver<()>) {
        let readiness = self
            .session
            .rtp_socket_for_readiness()
            .and_then(tokio::net::UdpSocket::from_std);
        let readiness = match readiness {
            Ok(readiness) => readiness,
            Err(e) => {
                gst::error!(CAT, obj = self.owner, "cannot wait on the RTP socket: {e}");
                return;
            }
        };
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = housekeeping.tick() => {
                    self.receiver.imp().housekeeping(&self.session);
                    if self.eos_on_bye && self.session.bye_received() {
                        gst::info!(CAT, obj = self.owner, "the peer said BYE: end of stream");
                        self.pad.push_event(gst::event::Eos::new());
                        break;
                    }
                }
                ready = readiness.readable() => {
                    if ready.is_err() {
                        break;
                    }
                    for _ in 0..BATCH {
                        let received = readiness.try_io(Interest::READABLE, || {
                            self.session.try_recv_rtp(|from, data| {
                                self.receiver.imp().on_datagram(&self.session, from, data)
                            })
                        });
                        match received {
                            Ok(Some(Some((buffer, caps)))) => self.push(buffer, caps),
                            // Rejected by SRTP, or RTCP: counted, nothing to push.
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            // An ICMP error reported on the socket: read on.
                            Err(e) => gst::debug!(CAT, obj = self.owner, "receive error: {e}"),
                        }
                    }
                }
            }
        }
        drop(readiness);
        self.session.set_rtp_blocking();
    }

    fn push(&self, mut buffer: gst::Buffer, caps: Option<gst::Caps>) {
        announce(&self.pad, &self.owner, &self.announced, caps);
        // Stamped with its arrival, as the receiver's own thread would.
        let buffer_mut = buffer.make_mut();
        buffer_mut.set_pts(self.owner.current_running_time());
        if let Err(e) = self.pad.push(buffer) {
            gst::trace!(CAT, obj = self.owner, "push: {e:?}");
        }
    }
}

/// Stream-start and segment before the first packet (or EOS), and new caps
/// ahead of the packets they describe.
fn announce(pad: &gst::Pad, owner: &gst::Element, announced: &AtomicBool, caps: Option<gst::Caps>) {
    // Read before written: every packet passes here.
    let first = !announced.load(Ordering::Acquire) && !announced.swap(true, Ordering::SeqCst);
    if first {
        let id = pad.create_stream_id(owner, Some("rtp"));
        pad.push_event(gst::event::StreamStart::new(&id));
    }
    if let Some(caps) = caps {
        pad.push_event(gst::event::Caps::new(&caps));
    }
    if first {
        let segment = gst::FormattedSegment::<gst::ClockTime>::new();
        pad.push_event(gst::event::Segment::new(&segment));
    }
}
