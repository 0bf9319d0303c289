//! Threshold classification: a value against `warn` and `crit` in the kind's direction.
//!
//! A value equal to a threshold is at that level (the contract's boundaries are inclusive).
//! A missing threshold never trips. Classification is monotonic: a worse value never gives
//! a better status (property-tested below).

use super::Status;

/// Which way is worse for a kind's primary value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// More is worse (lag, used space, age).
    HigherIsWorse,
    /// Less is worse (time left on a certificate, memory available).
    LowerIsWorse,
}

/// `warn` and `crit` in the kind's base unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// At or beyond this, warning.
    pub warn: Option<f64>,
    /// At or beyond this, critical.
    pub crit: Option<f64>,
    /// Which way is worse.
    pub direction: Direction,
}

impl Thresholds {
    /// Thresholds where more is worse.
    pub fn higher(warn: Option<f64>, crit: Option<f64>) -> Self {
        Thresholds {
            warn,
            crit,
            direction: Direction::HigherIsWorse,
        }
    }

    /// Thresholds where less is worse.
    pub fn lower(warn: Option<f64>, crit: Option<f64>) -> Self {
        Thresholds {
            warn,
            crit,
            direction: Direction::LowerIsWorse,
        }
    }

    /// Classifies `value`. NaN cannot be compared and is `unknown`.
    pub fn classify(&self, value: f64) -> Status {
        if value.is_nan() {
            return Status::Unknown;
        }
        let reached = |t: Option<f64>| match (t, self.direction) {
            (Some(t), Direction::HigherIsWorse) => value >= t,
            (Some(t), Direction::LowerIsWorse) => value <= t,
            (None, _) => false,
        };
        if reached(self.crit) {
            Status::Critical
        } else if reached(self.warn) {
            Status::Warning
        } else {
            Status::Ok
        }
    }

    /// Whether `warn` and `crit` are in the right order for the direction.
    pub fn is_ordered(&self) -> bool {
        match (self.warn, self.crit, self.direction) {
            (Some(w), Some(c), Direction::HigherIsWorse) => w <= c,
            (Some(w), Some(c), Direction::LowerIsWorse) => w >= c,
            _ => true,
        }
    }
}

/// `warn`/`crit` as written, or the kind's defaults when both are omitted; when only one is
/// given, the other stays unset and never trips.
pub(crate) fn or_defaults(
    warn: Option<f64>,
    crit: Option<f64>,
    default_warn: f64,
    default_crit: f64,
) -> (Option<f64>, Option<f64>) {
    match (warn, crit) {
        (None, None) => (Some(default_warn), Some(default_crit)),
        given => given,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn boundaries_are_inclusive() {
        let t = Thresholds::higher(Some(0.8), Some(0.9));
        assert_eq!(t.classify(0.79), Status::Ok);
        assert_eq!(t.classify(0.8), Status::Warning);
        assert_eq!(t.classify(0.9), Status::Critical);
        let t = Thresholds::lower(Some(14.0), Some(2.0));
        assert_eq!(t.classify(15.0), Status::Ok);
        assert_eq!(t.classify(14.0), Status::Warning);
        assert_eq!(t.classify(2.0), Status::Critical);
        assert_eq!(t.classify(f64::NAN), Status::Unknown);
    }

    #[test]
    fn order_follows_direction() {
        assert!(Thresholds::higher(Some(1.0), Some(2.0)).is_ordered());
        assert!(!Thresholds::higher(Some(2.0), Some(1.0)).is_ordered());
        assert!(Thresholds::lower(Some(2.0), Some(1.0)).is_ordered());
        assert!(!Thresholds::lower(Some(1.0), Some(2.0)).is_ordered());
    }

    proptest! {
        #[test]
        fn worse_value_never_gives_better_status(
            a in 0.0f64..1e6, b in 0.0f64..1e6, w in 0.0f64..1e6, c in 0.0f64..1e6, higher: bool,
        ) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let (w, c) = if higher { (w.min(c), w.max(c)) } else { (w.max(c), w.min(c)) };
            let t = Thresholds { warn: Some(w), crit: Some(c), direction: if higher { Direction::HigherIsWorse } else { Direction::LowerIsWorse } };
            let (better, worse) = if higher { (lo, hi) } else { (hi, lo) };
            prop_assert!(t.classify(better).severity() <= t.classify(worse).severity());
        }

        #[test]
        fn value_at_threshold_is_at_that_level(w in 0.0f64..1e6, d in 0.0f64..1e6) {
            let t = Thresholds::higher(Some(w), Some(w + d + 1.0));
            prop_assert_eq!(t.classify(w), Status::Warning);
            prop_assert_eq!(t.classify(w + d + 1.0), Status::Critical);
        }
    }
}
