//! What an H.264 receiver decodes, from its format parameters (RFC 6184,
//! section 8.1) and the limits of its level (H.264 Annex A, Table A-1):
//! a desk phone of level 1.3 decodes CIF at most, and a picture larger than
//! its level allows may show as nothing at all.

/// A level's limits: `level_idc`, macroblocks per second (MaxMBPS), per
/// frame (MaxFS), and the Baseline profile's bitrate in kbit/s (MaxBR).
/// Level 1b is `level_idc` 9 here (see [`Limits::from_fmtp`]).
const LEVELS: [(u8, u32, u32, u32); 20] = [
    (9, 1_485, 99, 128),
    (10, 1_485, 99, 64),
    (11, 3_000, 396, 192),
    (12, 6_000, 396, 384),
    (13, 11_880, 396, 768),
    (20, 11_880, 396, 2_000),
    (21, 19_800, 792, 4_000),
    (22, 20_250, 1_620, 4_000),
    (30, 40_500, 1_620, 10_000),
    (31, 108_000, 3_600, 14_000),
    (32, 216_000, 5_120, 20_000),
    (40, 245_760, 8_192, 20_000),
    (41, 245_760, 8_192, 50_000),
    (42, 522_240, 8_704, 50_000),
    (50, 589_824, 22_080, 135_000),
    (51, 983_040, 36_864, 240_000),
    (52, 2_073_600, 36_864, 240_000),
    (60, 4_177_920, 139_264, 240_000),
    (61, 8_355_840, 139_264, 480_000),
    (62, 16_711_680, 139_264, 800_000),
];

/// Level 3.1, taken where a format names no `profile-level-id`. RFC 6184
/// says level 1 then (QCIF at 15 frames a second); WebRTC's engines take
/// 3.1 too, as formats without parameters come from receivers that
/// decode far more.
const UNNAMED_LEVEL: u8 = 31;

/// What one H.264 receiver takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The level, as `level_idc` (31 for 3.1; 9 for 1b).
    pub level: u8,
    pub max_macroblocks_per_second: u32,
    pub max_frame_macroblocks: u32,
    pub max_bitrate_kbps: u32,
    /// Packetization mode 0 (the default): each NAL unit in a packet of
    /// its own, neither fragmented (FU-A) nor aggregated (STAP-A).
    pub single_nal_units: bool,
}

impl Limits {
    /// The limits a format's `a=fmtp` gives: its `profile-level-id`'s
    /// level, raised by `max-mbps`, `max-fs` and `max-br` (which can only
    /// add to the level's), and its `packetization-mode`. Values that do
    /// not parse are ignored.
    pub fn from_fmtp(fmtp: Option<&str>) -> Limits {
        let parameter = |name: &'static str| fmtp.and_then(|fmtp| parameter(fmtp, name));
        let level = parameter("profile-level-id")
            .and_then(level_of_profile_level_id)
            .unwrap_or(UNNAMED_LEVEL);
        // The highest level not above the one named (an unknown one between two).
        let &(level, mbps, fs, br) = LEVELS
            .iter()
            .rev()
            .find(|(idc, ..)| *idc <= level)
            .unwrap_or(&LEVELS[0]);
        let raised = |name: &'static str, floor: u32| {
            parameter(name)
                .and_then(|value| value.parse::<u32>().ok())
                .map_or(floor, |value| value.max(floor))
        };
        Limits {
            level,
            max_macroblocks_per_second: raised("max-mbps", mbps),
            max_frame_macroblocks: raised("max-fs", fs),
            max_bitrate_kbps: raised("max-br", br),
            single_nal_units: packetization_mode(fmtp) == 0,
        }
    }

    /// The level as written: "3.1", "1b".
    pub fn level_name(&self) -> String {
        match self.level {
            9 => "1b".to_owned(),
            level => format!("{}.{}", level / 10, level % 10),
        }
    }

    /// The largest picture of `width`×`height`'s shape, no larger than it,
    /// that this receiver decodes at `frame_rate` frames a second: within
    /// the level's frame size and macroblock rate, and neither side longer
    /// than √(8 × MaxFS) macroblocks (Annex A.3.1). Both sides even, at
    /// least 16.
    pub fn fit(&self, width: u32, height: u32, frame_rate: u32) -> (u32, u32) {
        let (width, height) = (width.max(16), height.max(16));
        let frame = self
            .max_frame_macroblocks
            .min(self.max_macroblocks_per_second / frame_rate.max(1))
            .max(1);
        // Macroblocks across or down.
        let side = f64::from(self.max_frame_macroblocks.saturating_mul(8))
            .sqrt()
            .floor() as u32;
        let (w, h) = (f64::from(width), f64::from(height));
        let longest = f64::from(width.max(height));
        let mut scale = (f64::from(frame) * 256.0 / (w * h))
            .sqrt()
            .min(f64::from(side * 16) / longest)
            .min(1.0);
        loop {
            let even = |length: f64| ((length * scale) as u32 & !1).max(16);
            let fitted = (even(w), even(h));
            let (across, down) = (fitted.0.div_ceil(16), fitted.1.div_ceil(16));
            let fits =
                u64::from(across) * u64::from(down) <= u64::from(frame) && across.max(down) <= side;
            if fits || fitted == (16, 16) {
                return fitted;
            }
            scale *= 0.98;
        }
    }
}

/// A format's packetization mode (0 unless given).
pub fn packetization_mode(fmtp: Option<&str>) -> u8 {
    fmtp.and_then(|fmtp| parameter(fmtp, "packetization-mode"))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// The value of `name` in an `a=fmtp` parameter list.
fn parameter<'a>(fmtp: &'a str, name: &str) -> Option<&'a str> {
    fmtp.split(';')
        .filter_map(|parameter| parameter.split_once('='))
        .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim())
}

/// The level of a `profile-level-id` (six hex digits: profile, constraint
/// flags, level). Level 1b is level 11 with constraint_set3 in the
/// Baseline, Main and Extended profiles (RFC 6184, section 8.1), or 9.
fn level_of_profile_level_id(value: &str) -> Option<u8> {
    if value.len() != 6 || !value.is_ascii() {
        return None;
    }
    let byte = |at: usize| u8::from_str_radix(&value[at..at + 2], 16).ok();
    let (profile, constraints, level) = (byte(0)?, byte(2)?, byte(4)?);
    let one_b = level == 11 && constraints & 0x10 != 0 && matches!(profile, 66 | 77 | 88);
    Some(if one_b { 9 } else { level })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn macroblocks((width, height): (u32, u32)) -> u32 {
        width.div_ceil(16) * height.div_ceil(16)
    }

    #[test]
    fn levels_come_from_the_profile_level_id() {
        let cif_phone = Limits::from_fmtp(Some("profile-level-id=42e00d"));
        assert_eq!(cif_phone.level_name(), "1.3");
        assert_eq!(cif_phone.max_frame_macroblocks, 396);
        assert_eq!(cif_phone.max_bitrate_kbps, 768);
        assert!(cif_phone.single_nal_units);
        let hd_phone = Limits::from_fmtp(Some("profile-level-id=42801F; packetization-mode=1"));
        assert_eq!(hd_phone.level_name(), "3.1");
        assert!(!hd_phone.single_nal_units);
        // constraint_set3 with level 11 in Baseline is level 1b, in High it is 1.1.
        assert_eq!(
            Limits::from_fmtp(Some("profile-level-id=42f00b")).level_name(),
            "1b"
        );
        assert_eq!(
            Limits::from_fmtp(Some("profile-level-id=64100b")).level_name(),
            "1.1"
        );
        // An unknown level between two is the one below.
        assert_eq!(
            Limits::from_fmtp(Some("profile-level-id=42e019")).level_name(),
            "2.2"
        );
    }

    #[test]
    fn formats_without_a_level_are_taken_at_3_1() {
        for fmtp in [
            None,
            Some("packetization-mode=1"),
            Some("profile-level-id=xyz"),
        ] {
            let limits = Limits::from_fmtp(fmtp);
            assert_eq!(limits.level_name(), "3.1", "{fmtp:?}");
            assert_eq!(limits.fit(1280, 720, 30), (1280, 720), "{fmtp:?}");
        }
    }

    #[test]
    fn max_fs_and_max_mbps_only_raise_the_level() {
        let raised = Limits::from_fmtp(Some(
            "profile-level-id=42e00d;max-fs=1620;max-mbps=40500;max-br=2000",
        ));
        assert_eq!(raised.max_frame_macroblocks, 1620);
        assert_eq!(raised.max_macroblocks_per_second, 40500);
        assert_eq!(raised.max_bitrate_kbps, 2000);
        let lowered = Limits::from_fmtp(Some("profile-level-id=42e01f;max-fs=99;max-br=oops"));
        assert_eq!(lowered.max_frame_macroblocks, 3600);
        assert_eq!(lowered.max_bitrate_kbps, 14000);
    }

    #[test]
    fn pictures_shrink_to_the_level_keeping_their_shape() {
        let cif_phone = Limits::from_fmtp(Some("profile-level-id=42e00d"));
        // 391 macroblocks (CIF has 396), 23 across (at most 56).
        assert_eq!(cif_phone.fit(640, 480, 30), (360, 270));
        assert_eq!(cif_phone.fit(176, 144, 30), (176, 144));
        let sd_phone = Limits::from_fmtp(Some("profile-level-id=42e01e"));
        // Level 3 decodes 1620 macroblocks a frame, but 1350 at 30 frames a second.
        let fitted = sd_phone.fit(1280, 720, 30);
        assert!(macroblocks(fitted) <= 1350, "{fitted:?}");
        assert!(fitted.0 >= 740, "{fitted:?}");
        assert_eq!(sd_phone.fit(640, 480, 30), (640, 480));
        // A very wide picture is held to √(8 × MaxFS) macroblocks across.
        let strip = cif_phone.fit(4000, 40, 30);
        assert!(strip.0 <= 56 * 16, "{strip:?}");
    }

    proptest! {
        #[test]
        fn fitted_pictures_are_decodable_and_keep_their_shape(
            width in 16u32..4096,
            height in 16u32..4096,
            level in proptest::sample::select(LEVELS.map(|(idc, ..)| idc).to_vec()),
            frame_rate in 1u32..60,
        ) {
            let limits = Limits::from_fmtp(Some(&format!("profile-level-id=4200{level:02x}")));
            let fitted = limits.fit(width, height, frame_rate);
            prop_assert!(fitted.0 <= width.max(16) && fitted.1 <= height.max(16));
            prop_assert!(fitted.0.is_multiple_of(2) && fitted.1.is_multiple_of(2));
            let frame = limits.max_frame_macroblocks.min(limits.max_macroblocks_per_second / frame_rate);
            prop_assert!(macroblocks(fitted) <= frame.max(1) || fitted == (16, 16));
        }

        #[test]
        fn arbitrary_fmtp_never_panics(fmtp in ".{0,64}") {
            let limits = Limits::from_fmtp(Some(&fmtp));
            let _ = limits.fit(640, 480, 30);
            let _ = limits.level_name();
        }
    }
}
