//! `sip-cc-bridge analyze`: what tone a recording holds.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bridge_protocol::tone;

/// Reads a WAV file as mono f32 samples (channels averaged) and its rate.
pub fn read_wav_mono(path: &Path) -> anyhow::Result<(Vec<f32>, u32)> {
    let mut reader =
        hound::WavReader::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels.max(1));
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>()?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()?
        }
    };
    let mono = interleaved
        .chunks(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    Ok((mono, spec.sample_rate))
}

pub fn run(files: &[PathBuf], expect: Option<f64>) -> anyhow::Result<()> {
    let mut off = Vec::new();
    for path in files {
        let (samples, rate) = read_wav_mono(path)?;
        // Skip the first 200 ms: codecs and jitter buffers start with silence.
        let body = &samples[(rate as usize / 5).min(samples.len())..];
        let frequency = tone::dominant_frequency(body, rate);
        let seconds = samples.len() as f64 / f64::from(rate);
        match frequency {
            Some(f) => println!(
                "{}: {f:.0} Hz, level {:.3}, {seconds:.2} s at {rate} Hz",
                path.display(),
                tone::rms(body)
            ),
            None => println!("{}: silence, {seconds:.2} s at {rate} Hz", path.display()),
        }
        if let Some(expected) = expect
            && frequency.is_none_or(|f| (f - expected).abs() > expected * 0.05)
        {
            off.push(path.display().to_string());
        }
    }
    if !off.is_empty() {
        bail!(
            "not the expected {} Hz tone: {}",
            expect.unwrap_or_default(),
            off.join(", ")
        );
    }
    Ok(())
}
