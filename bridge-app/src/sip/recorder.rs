//! The recording of a video call: one MPEG-TS file holding the mix of both
//! voices (Opus), the phone's H.264 and the H.264 going to the phone (the
//! app's picture). The call's audio and video pipelines hand their streams
//! over through appsinks; each buffer is stamped on arrival with the
//! recorder's own running time, so the tracks line up whatever pipeline
//! they come from. MPEG-TS needs no index: the file plays even if the
//! bridge stops without finalizing it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use gst::prelude::*;
use tracing::warn;

use super::media::Drained;

/// What a call's pipelines hand to the recorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// Both voices mixed, `audio/x-raw` S16LE.
    Voices,
    /// H.264 from the phone.
    PhoneVideo,
    /// H.264 to the phone.
    AppVideo,
}

impl Track {
    fn source_name(self) -> &'static str {
        match self {
            Track::Voices => "voices",
            Track::PhoneVideo => "phone_video",
            Track::AppVideo => "app_video",
        }
    }
}

/// At most this much of a track waits for the muxer; older data is dropped.
const BACKLOG: u64 = 4 * 1024 * 1024;

pub struct Recorder {
    pipeline: gst::Pipeline,
    path: PathBuf,
    drained: Drained,
}

impl Recorder {
    pub fn start(path: &Path) -> anyhow::Result<Arc<Recorder>> {
        let source = |track: Track| {
            format!(
                "appsrc name={} is-live=true format=time max-bytes={BACKLOG} leaky-type=downstream",
                track.source_name()
            )
        };
        let description = format!(
            "mpegtsmux name=mux latency=200000000 ! filesink location=\"{}\" \
             {} ! queue ! audioconvert ! audioresample ! opusenc ! mux. \
             {} ! h264parse ! video/x-h264,stream-format=byte-stream,alignment=au ! queue ! mux. \
             {} ! h264parse ! video/x-h264,stream-format=byte-stream,alignment=au ! queue ! mux.",
            path.display(),
            source(Track::Voices),
            source(Track::PhoneVideo),
            source(Track::AppVideo),
        );
        let pipeline = gst::parse::launch(&description)
            .context("cannot build the recorder")?
            .downcast::<gst::Pipeline>()
            .map_err(|_| anyhow!("not a pipeline"))?;
        let recorder = Arc::new(Recorder {
            pipeline,
            path: path.to_owned(),
            drained: Drained::default(),
        });
        let drained = recorder.drained.clone();
        let bus = recorder.pipeline.bus().expect("a pipeline has a bus");
        bus.set_sync_handler(move |_, message| {
            match message.view() {
                gst::MessageView::Eos(_) => drained.set(),
                gst::MessageView::Error(error) => {
                    warn!("recording: {} ({:?})", error.error(), error.debug());
                }
                _ => {}
            }
            gst::BusSyncReply::Drop
        });
        recorder
            .pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| anyhow!("the recorder did not start"))?;
        Ok(recorder)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Feeds `track` from `sink` (an appsink in one of the call's pipelines).
    pub fn feed(self: &Arc<Self>, sink: &gst_app::AppSink, track: Track) {
        let Some(source) = self
            .pipeline
            .by_name(track.source_name())
            .and_downcast::<gst_app::AppSrc>()
        else {
            return;
        };
        let pipeline = self.pipeline.downgrade();
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let (Some(pipeline), Some(buffer)) =
                        (pipeline.upgrade(), sample.buffer_owned())
                    else {
                        return Ok(gst::FlowSuccess::Ok);
                    };
                    let caps = sample.caps_owned();
                    if source.caps() != caps {
                        source.set_caps(caps.as_ref());
                    }
                    let mut buffer = buffer;
                    let now = pipeline.current_running_time();
                    let stamped = buffer.make_mut();
                    stamped.set_pts(now);
                    stamped.set_dts(now);
                    // A full backlog drops data; the call's media never waits for the file.
                    let _ = source.push_buffer(buffer);
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
    }

    /// Ends every track and waits (3 s at most) for the file to be written.
    pub fn finish(&self) {
        for track in [Track::Voices, Track::PhoneVideo, Track::AppVideo] {
            if let Some(source) = self
                .pipeline
                .by_name(track.source_name())
                .and_downcast::<gst_app::AppSrc>()
            {
                let _ = source.end_of_stream();
            }
        }
        self.drained.wait(Duration::from_secs(3));
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}
