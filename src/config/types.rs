//! Validating value types used in the config: durations, byte sizes and ratios.
//!
//! Each type validates while it is deserialized ("parse, don't validate"), so a bad value
//! is reported by the toml crate with the value's own line and column. The same parsers
//! serve the HTTP API (`/replica?lag=16MB`) and the command line (`--for 15m`).
//!
//! Sizes follow PostgreSQL's convention so values copied from `postgresql.conf` or Patroni
//! mean the same here: a bare number is bytes, `kB`/`MB`/`GB`/`TB` are powers of 1024, and
//! the IEC spellings `KiB`/`MiB`/`GiB`/`TiB` are accepted with the same meaning. Unit names
//! are case-sensitive, as in PostgreSQL.

use std::fmt;
use std::time::Duration as StdDuration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A span of time written as `"500ms"`, `"10s"`, `"15m"`, `"2h"` or `"14d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub StdDuration);

impl Duration {
    /// Builds a duration from whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Duration(StdDuration::from_secs(secs))
    }

    /// Builds a duration from milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(StdDuration::from_millis(ms))
    }

    /// The wrapped standard duration.
    pub fn get(self) -> StdDuration {
        self.0
    }
}

/// Parses a duration such as `"10s"`; a unit is required.
///
/// # Errors
/// A message naming the accepted forms when `s` is not a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration: expected a number and a unit, e.g. \"10s\"".into());
    }
    // humantime's own message lists every spelling it accepts; ours names the usual ones.
    humantime::parse_duration(t).map(Duration).map_err(|_| {
        format!(
            "invalid duration {s:?}: expected a number and a unit (ms, s, m, h, d), \
             e.g. \"500ms\", \"10s\", \"15m\", \"2h\", \"14d\""
        )
    })
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"10s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A number of bytes, written the PostgreSQL way (`"16MB"` is 16 × 1024² bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("kB", 1 << 10),
    ("KiB", 1 << 10),
    ("MB", 1 << 20),
    ("MiB", 1 << 20),
    ("GB", 1 << 30),
    ("GiB", 1 << 30),
    ("TB", 1 << 40),
    ("TiB", 1 << 40),
];

/// Parses a size such as `"16MB"`, `"1.5GiB"` or `"4096"` (bytes).
///
/// # Errors
/// A message naming the accepted units when `s` is not a size.
pub fn parse_size(s: &str) -> Result<ByteSize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim_start());
    let bad = || {
        format!(
            "invalid size {s:?}: expected a number of bytes or a number with a unit \
             (kB, MB, GB, TB = powers of 1024; KiB, MiB, GiB, TiB also accepted)"
        )
    };
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
        return Err(bad());
    }
    let mult = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(bad)?
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"));
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let bytes = (f * mult as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size {s:?} is too large"));
    }
    Ok(ByteSize(bytes as u64))
}

impl fmt::Display for ByteSize {
    /// Renders with the largest unit that divides the value exactly, so that the text
    /// parses back to the same number of bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in [
            ("TB", 1u64 << 40),
            ("GB", 1 << 30),
            ("MB", 1 << 20),
            ("kB", 1 << 10),
        ] {
            if self.0 >= mult && self.0 % mult == 0 {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"16MB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A ratio between 0 and 1, written as a percentage (`"80%"`).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Ratio(pub f64);

/// Parses a percentage such as `"80%"` or `"99.5%"` into a ratio.
///
/// # Errors
/// A message when `s` is not a percentage between 0% and 100%.
pub fn parse_ratio(s: &str) -> Result<Ratio, String> {
    let t = s.trim();
    let Some(num) = t.strip_suffix('%') else {
        return Err(format!(
            "invalid ratio {s:?}: expected a percentage such as \"80%\""
        ));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid ratio {s:?}: expected a percentage such as \"80%\""))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!(
            "invalid ratio {s:?}: a percentage must be between 0% and 100%"
        ));
    }
    Ok(Ratio(v / 100.0))
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", (self.0 * 1e6).round() / 1e4)
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Ratio;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage string such as \"80%\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ratio, E> {
                parse_ratio(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A plain non-negative number (load per core, a process count).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                if v.is_finite() && v >= 0.0 {
                    Ok(Number(v))
                } else {
                    Err(E::custom("expected a non-negative number"))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                self.visit_f64(v as f64)
            }
        }
        d.deserialize_any(V)
    }
}

/// A threshold value the classifier compares against, in the kind's base unit
/// (bytes, seconds, a ratio or a plain number).
pub trait ThresholdValue: Copy {
    /// The value in the kind's base unit.
    fn base(self) -> f64;
}

impl ThresholdValue for Duration {
    fn base(self) -> f64 {
        self.0.as_secs_f64()
    }
}
impl ThresholdValue for ByteSize {
    fn base(self) -> f64 {
        self.0 as f64
    }
}
impl ThresholdValue for Ratio {
    fn base(self) -> f64 {
        self.0
    }
}
impl ThresholdValue for Number {
    fn base(self) -> f64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_follow_postgresql_units() {
        assert_eq!(parse_size("16MB"), Ok(ByteSize(16 << 20)));
        assert_eq!(parse_size("16MiB"), Ok(ByteSize(16 << 20)));
        assert_eq!(parse_size("1kB"), Ok(ByteSize(1024)));
        assert_eq!(parse_size("4096"), Ok(ByteSize(4096)));
        assert_eq!(parse_size("1.5GB"), Ok(ByteSize(3 << 29)));
        assert_eq!(parse_size("2 TB"), Ok(ByteSize(2 << 40)));
        assert_eq!(parse_size("0"), Ok(ByteSize(0)));
    }

    #[test]
    fn sizes_reject_wrong_case_and_unknown_units() {
        for bad in [
            "16mb",
            "16KB",
            "16 M",
            "MB",
            "",
            "-1",
            "1.MB",
            ".5MB",
            "16MBx",
            "99999999999TB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("14d"), Ok(Duration::from_secs(14 * 86400)));
        for bad in ["10", "", "ten seconds", "10 parsecs", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ratios_are_percentages_within_bounds() {
        assert_eq!(parse_ratio("80%"), Ok(Ratio(0.8)));
        assert_eq!(parse_ratio("0%"), Ok(Ratio(0.0)));
        for bad in ["80", "101%", "-1%", "%", "0.8"] {
            assert!(parse_ratio(bad).is_err(), "{bad:?} should be refused");
        }
    }

    proptest! {
        #[test]
        fn size_display_parses_back(n in 0u64..(1u64 << 50)) {
            let s = ByteSize(n).to_string();
            prop_assert_eq!(parse_size(&s), Ok(ByteSize(n)));
        }

        #[test]
        fn size_units_scale_by_1024(n in 0u64..1_000_000, i in 0usize..4) {
            let (unit, mult) = [("kB", 1u64 << 10), ("MB", 1 << 20), ("GB", 1 << 30), ("TB", 1 << 40)][i];
            prop_assert_eq!(parse_size(&format!("{n}{unit}")), Ok(ByteSize(n * mult)));
        }

        #[test]
        fn duration_display_parses_back(ms in 1u64..(100 * 86_400_000)) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&d.to_string()), Ok(d));
        }

        #[test]
        fn ratio_display_parses_back(p in 0u32..=10_000) {
            let r = Ratio(f64::from(p) / 10_000.0);
            let back = parse_ratio(&r.to_string()).unwrap();
            prop_assert!((back.0 - r.0).abs() < 1e-9);
        }
    }
}
