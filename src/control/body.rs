//! The few fields of a heartbeat body the receiver reads; the rest is kept as sent.
//!
//! A receiver validates `v`, `host_id`, `seq` and `state` (CONTRACT "Heartbeats") and
//! refuses a body without them. For the `/v1/hosts` filters it also reads `kernel`,
//! `image.id` and each `checks[].status`, leniently: a value of another shape than
//! expected is ignored rather than refused, so agents of other versions interoperate.
//!
//! Parsing is one pass of serde_json over the bytes with borrowed strings and
//! [`serde::de::IgnoredAny`] for everything else: it runs on every request, next to a
//! ~40 µs signature check, and must stay small beside it. A duplicated top-level field
//! (two `host_id`s) is refused by serde, so what was verified is what is read.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::lifecycle::HostState;

/// The heartbeat document version this receiver understands.
pub const VERSION: u64 = 1;
/// Longest `host_id` accepted (in bytes).
pub const MAX_HOST_ID: usize = 255;

/// Check statuses as bits of [`Summary::check_statuses`].
pub const STATUSES: [&str; 4] = ["ok", "warning", "critical", "unknown"];

/// The bit of a check status name, if it is one.
pub fn status_bit(name: &str) -> Option<u8> {
    STATUSES.iter().position(|s| *s == name).map(|i| 1u8 << i)
}

/// What the receiver reads from a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// `host_id`.
    pub host_id: String,
    /// `seq` (at least 1).
    pub seq: u64,
    /// The filterable facts.
    pub summary: Summary,
}

/// The facts `/v1/hosts` filters on, read once at receipt (and again at replay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `state`: the reported state.
    pub state: HostState,
    /// `kernel`, when a string.
    pub kernel: Option<String>,
    /// `image.id`, when a string.
    pub image_id: Option<String>,
    /// A bit per status present among `checks[].status` (see [`status_bit`]).
    pub check_statuses: u8,
}

/// Why a body is not a heartbeat this receiver can take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, or a required field missing or of the wrong type.
    #[error("invalid heartbeat body: {0}")]
    Invalid(String),
    /// `v` is not [`VERSION`].
    #[error("unsupported heartbeat version v={0} (this receiver takes v=1)")]
    Version(u64),
    /// `host_id` is empty, too long or holds characters outside `[A-Za-z0-9._:@-]`.
    #[error("invalid host_id: {0}")]
    HostId(String),
    /// `seq` is 0.
    #[error("seq must be at least 1")]
    Seq,
}

/// Whether `id` is a host id this control plane accepts: 1 to 255 of `[A-Za-z0-9._:@-]`
/// (it appears in URLs, `/v1/hosts/ID`, and in file names of nothing).
pub fn valid_host_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_HOST_ID {
        return Err(format!("must be 1 to {MAX_HOST_ID} characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed (letters, digits, '.', '_', ':', '@' and '-' are)"
        ));
    }
    Ok(())
}

/// Reads the required fields and the summary from a body.
///
/// # Errors
/// [`BodyError`] for anything but a v1 heartbeat with a valid `host_id`, `seq` and `state`.
pub fn parse(body: &[u8]) -> Result<Parsed, BodyError> {
    let raw: Raw<'_> =
        serde_json::from_slice(body).map_err(|e| BodyError::Invalid(e.to_string()))?;
    if raw.v != VERSION {
        return Err(BodyError::Version(raw.v));
    }
    valid_host_id(&raw.host_id).map_err(BodyError::HostId)?;
    if raw.seq == 0 {
        return Err(BodyError::Seq);
    }
    Ok(Parsed {
        host_id: raw.host_id.into_owned(),
        seq: raw.seq,
        summary: Summary {
            state: raw.state,
            kernel: raw.kernel.0,
            image_id: raw.image.0,
            check_statuses: raw.checks.0,
        },
    })
}

#[derive(Deserialize)]
struct Raw<'a> {
    v: u64,
    #[serde(borrow)]
    host_id: std::borrow::Cow<'a, str>,
    seq: u64,
    state: HostState,
    #[serde(default)]
    kernel: LStr,
    #[serde(default)]
    image: LImage,
    #[serde(default)]
    checks: LChecks,
}

/// Any JSON value: `Some` for a string, `None` for anything else (consumed).
#[derive(Default)]
struct LStr(Option<String>);

impl<'de> Deserialize<'de> for LStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LStr, E> {
                Ok(LStr(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LStr, E> {
                Ok(LStr(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<LStr, E> {
                Ok(LStr(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<LStr, E> {
                Ok(LStr(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<LStr, E> {
                Ok(LStr(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<LStr, E> {
                Ok(LStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<LStr, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LStr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<LStr, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads the string member `name` of an object; any other shape gives `None`.
fn member_str<'de, D: Deserializer<'de>>(d: D, name: &'static str) -> Result<LStr, D::Error> {
    struct V(&'static str);
    impl<'de> Visitor<'de> for V {
        type Value = LStr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<LStr, A::Error> {
            let mut out = LStr(None);
            while let Some(k) = a.next_key::<std::borrow::Cow<'de, str>>()? {
                if k == self.0 && out.0.is_none() {
                    out = a.next_value::<LStr>()?;
                } else {
                    a.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<LStr, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(LStr(None))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<LStr, E> {
            Ok(LStr(None))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<LStr, E> {
            Ok(LStr(None))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<LStr, E> {
            Ok(LStr(None))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<LStr, E> {
            Ok(LStr(None))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<LStr, E> {
            Ok(LStr(None))
        }
        fn visit_unit<E: de::Error>(self) -> Result<LStr, E> {
            Ok(LStr(None))
        }
    }
    d.deserialize_any(V(name))
}

/// `image`: its `id` when it is an object with a string `id`.
#[derive(Default)]
struct LImage(Option<String>);

impl<'de> Deserialize<'de> for LImage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        member_str(d, "id").map(|s| LImage(s.0))
    }
}

/// One entry of `checks`: its `status`.
struct LCheck(Option<String>);

impl<'de> Deserialize<'de> for LCheck {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        member_str(d, "status").map(|s| LCheck(s.0))
    }
}

/// `checks`: the bits of the statuses present, when it is an array.
#[derive(Default)]
struct LChecks(u8);

impl<'de> Deserialize<'de> for LChecks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LChecks;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<LChecks, A::Error> {
                let mut bits = 0;
                while let Some(LCheck(s)) = a.next_element::<LCheck>()? {
                    bits |= s.as_deref().and_then(status_bit).unwrap_or(0);
                }
                Ok(LChecks(bits))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<LChecks, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LChecks(0))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LChecks, E> {
                Ok(LChecks(0))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LChecks, E> {
                Ok(LChecks(0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<LChecks, E> {
                Ok(LChecks(0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<LChecks, E> {
                Ok(LChecks(0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<LChecks, E> {
                Ok(LChecks(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<LChecks, E> {
                Ok(LChecks(0))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_required_fields_and_the_summary() {
        let p = parse(
            br#"{"v":1,"host_id":"db-1","seq":7,"state":"available","kernel":"6.1.0-18-amd64",
                "image":{"id":"debian","version":"12"},"labels":{"a":"b"},
                "checks":[{"name":"x","status":"ok"},{"name":"y","status":"critical"}]}"#,
        )
        .unwrap();
        assert_eq!(p.host_id, "db-1");
        assert_eq!(p.seq, 7);
        assert_eq!(p.summary.state, HostState::Available);
        assert_eq!(p.summary.kernel.as_deref(), Some("6.1.0-18-amd64"));
        assert_eq!(p.summary.image_id.as_deref(), Some("debian"));
        assert_eq!(
            p.summary.check_statuses,
            status_bit("ok").unwrap() | status_bit("critical").unwrap()
        );
    }

    #[test]
    fn optional_fields_of_another_shape_are_ignored() {
        let p = parse(
            br#"{"v":1,"host_id":"h","seq":1,"state":"uncertain","kernel":5,
                "image":"debian","checks":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(p.summary.kernel, None);
        assert_eq!(p.summary.image_id, None);
        assert_eq!(p.summary.check_statuses, 0);
        let p = parse(
            br#"{"v":1,"host_id":"h","seq":1,"state":"available","checks":[1,"x",{"status":7},{"status":"unknown"}]}"#,
        )
        .unwrap();
        assert_eq!(p.summary.check_statuses, status_bit("unknown").unwrap());
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        type Case = (&'static [u8], fn(&BodyError) -> bool);
        let cases: &[Case] = &[
            (b"", |e| matches!(e, BodyError::Invalid(_))),
            (b"[]", |e| matches!(e, BodyError::Invalid(_))),
            (b"{\"v\":1}", |e| matches!(e, BodyError::Invalid(_))),
            (
                br#"{"v":2,"host_id":"h","seq":1,"state":"available"}"#,
                |e| *e == BodyError::Version(2),
            ),
            (
                br#"{"v":1,"host_id":"","seq":1,"state":"available"}"#,
                |e| matches!(e, BodyError::HostId(_)),
            ),
            (
                br#"{"v":1,"host_id":"a/b","seq":1,"state":"available"}"#,
                |e| matches!(e, BodyError::HostId(_)),
            ),
            (
                br#"{"v":1,"host_id":"h","seq":0,"state":"available"}"#,
                |e| *e == BodyError::Seq,
            ),
            (
                br#"{"v":1,"host_id":"h","seq":-1,"state":"available"}"#,
                |e| matches!(e, BodyError::Invalid(_)),
            ),
            (
                br#"{"v":1,"host_id":"h","seq":1,"state":"sleeping"}"#,
                |e| matches!(e, BodyError::Invalid(_)),
            ),
            // A second host_id could make the verified body say two things.
            (
                br#"{"v":1,"host_id":"h","host_id":"g","seq":1,"state":"available"}"#,
                |e| matches!(e, BodyError::Invalid(_)),
            ),
        ];
        for (body, ok) in cases {
            let e = parse(body).unwrap_err();
            assert!(ok(&e), "{}: {e:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn host_ids_are_url_safe() {
        assert!(valid_host_id("4f1c0b6e2a9d4e7f8a3b5c6d7e8f9012").is_ok());
        assert!(valid_host_id("db-eu-1.17@x:y_z").is_ok());
        for bad in ["", "a b", "a/b", "a?b", "ä", &"x".repeat(256)] {
            assert!(valid_host_id(bad).is_err(), "{bad:?}");
        }
    }
}
