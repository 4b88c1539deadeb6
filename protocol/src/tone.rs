//! Tone measurement (Goertzel): which frequency dominates a recording, and
//! how strong a given tone is in it. Used by the line-check extensions and by
//! every test that proves audio crossed the bridge.

use std::f64::consts::PI;

/// Relative power of `frequency` in `samples` (normalised so that a full-scale
/// sine at that frequency gives about 0.5).
pub fn tone_power(samples: &[f32], sample_rate: u32, frequency: f64) -> f64 {
    if samples.is_empty() || sample_rate == 0 {
        return 0.0;
    }
    let coefficient = 2.0 * (2.0 * PI * frequency / f64::from(sample_rate)).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = f64::from(x) + coefficient * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coefficient * s1 * s2;
    2.0 * power / (samples.len() as f64).powi(2)
}

/// RMS level of the samples (full scale = 1.0).
pub fn rms(samples: &[f32]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    (samples.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
}

/// The strongest frequency between 50 Hz and 4 kHz (or Nyquist), to 1 Hz,
/// or `None` for silence.
pub fn dominant_frequency(samples: &[f32], sample_rate: u32) -> Option<f64> {
    if rms(samples) < 1e-3 {
        return None;
    }
    let top = 4000.0f64.min(f64::from(sample_rate) / 2.0 - 10.0);
    let strongest = |power: &dyn Fn(f64) -> f64, from: f64, to: f64, step: f64| {
        let mut best = (from, 0.0);
        let mut f = from;
        while f <= to {
            let p = power(f);
            if p > best.1 {
                best = (f, p);
            }
            f += step;
        }
        best.0
    };
    // A Goertzel filter over N samples is rate/N Hz wide: the 10 Hz coarse
    // grid uses 0.1 s pieces (10 Hz wide, so no tone falls between two
    // steps), summed over the recording; the 1 Hz pass uses all of it.
    let piece = (sample_rate as usize / 10).clamp(1, samples.len());
    let coarse_power = |f: f64| {
        samples
            .chunks_exact(piece)
            .map(|chunk| tone_power(chunk, sample_rate, f))
            .sum::<f64>()
    };
    let coarse = strongest(&coarse_power, 50.0, top, 10.0);
    let fine_power = |f: f64| tone_power(samples, sample_rate, f);
    Some(strongest(
        &fine_power,
        (coarse - 10.0).max(1.0),
        coarse + 10.0,
        1.0,
    ))
}

/// A voice-like test signal: a glottal pulse train whose pitch glides
/// between 100 and 220 Hz, shaped by three formants that move from vowel to
/// vowel, in syllables of about 250 ms with short pauses, and a little
/// breath noise, at `rate` Hz: what benches feed codecs where a tone would
/// make them pick another mode than speech does.
pub fn voice_like(rate: u32, seconds: usize) -> Vec<i16> {
    let rate_hz = f64::from(rate);
    let mut noise_state = 0x1234_5678_u32;
    let mut noise = move || {
        noise_state ^= noise_state << 13;
        noise_state ^= noise_state >> 17;
        noise_state ^= noise_state << 5;
        f64::from(noise_state) / f64::from(u32::MAX) - 0.5
    };
    let vowels = [
        [730.0, 1090.0, 2440.0],
        [270.0, 2290.0, 3010.0],
        [570.0, 840.0, 2410.0],
        [530.0, 1840.0, 2480.0],
    ];
    // Two-pole resonators, one per formant.
    let mut resonators = [[0.0_f64; 2]; 3];
    let mut phase = 0.0_f64;
    (0..rate as usize * seconds)
        .map(|n| {
            let t = n as f64 / rate_hz;
            let syllable = (t * 4.0) as usize;
            let within = t * 4.0 - syllable as f64;
            let envelope = if within < 0.8 {
                (std::f64::consts::PI * within / 0.8).sin()
            } else {
                0.0
            };
            let pitch = 160.0 + 60.0 * (t * 0.7 * std::f64::consts::TAU).sin();
            phase += pitch / rate_hz;
            let pulse = if phase >= 1.0 {
                phase -= 1.0;
                1.0
            } else {
                0.0
            };
            let mut sample = pulse + 0.02 * noise();
            let mut output = 0.0;
            for (resonator, frequency) in resonators.iter_mut().zip(vowels[syllable % 4]) {
                let radius: f64 = 0.97;
                let theta = std::f64::consts::TAU * frequency / rate_hz;
                let y = sample + 2.0 * radius * theta.cos() * resonator[0]
                    - radius * radius * resonator[1];
                resonator[1] = resonator[0];
                resonator[0] = y;
                output += y;
                sample *= 0.5;
            }
            (output * envelope * 600.0).clamp(-32000.0, 32000.0) as i16
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(frequency: f64, rate: u32, seconds: f64) -> Vec<f32> {
        (0..(f64::from(rate) * seconds) as usize)
            .map(|i| (0.5 * (2.0 * PI * frequency * i as f64 / f64::from(rate)).sin()) as f32)
            .collect()
    }

    #[test]
    fn the_voice_like_signal_has_syllables_pauses_and_a_voice_pitch() {
        let voice = voice_like(8000, 2);
        assert_eq!(voice.len(), 16000);
        let as_f32 = |s: &[i16]| {
            s.iter()
                .map(|&x| f32::from(x) / 32768.0)
                .collect::<Vec<_>>()
        };
        // A syllable is loud; its last fifth (the pause) is silent.
        let loud = rms(&as_f32(&voice[400..1200]));
        assert!(loud > 0.01, "{loud}");
        assert!(rms(&as_f32(&voice[1700..1950])) < 0.001);
        // The same voice at another rate lasts as long.
        assert_eq!(voice_like(48000, 1).len(), 48000);
    }

    #[test]
    fn finds_the_tone() {
        // Off the 10 Hz grid too, over windows long enough to be narrow.
        for (f, rate, seconds) in [
            (440.0, 8000, 0.5),
            (880.0, 48000, 0.5),
            (1000.0, 16000, 0.5),
            (523.0, 48000, 1.0),
            (587.0, 8000, 2.0),
        ] {
            let found = dominant_frequency(&sine(f, rate, seconds), rate).unwrap();
            assert!((found - f).abs() <= 2.0, "{f} Hz at {rate}: found {found}");
        }
    }

    #[test]
    fn tells_two_tones_apart() {
        let mix: Vec<f32> = sine(440.0, 8000, 1.0)
            .iter()
            .zip(sine(1000.0, 8000, 1.0))
            .map(|(a, b)| a + b)
            .collect();
        assert!(tone_power(&mix, 8000, 440.0) > 0.05);
        assert!(tone_power(&mix, 8000, 1000.0) > 0.05);
        assert!(tone_power(&mix, 8000, 700.0) < 0.001);
    }

    #[test]
    fn silence_has_no_frequency() {
        assert_eq!(dominant_frequency(&vec![0.0; 8000], 8000), None);
    }
}
