//! `/replica?lag=`: any query value parses or is refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(l) = vigil::http::routing::parse_lag(s) {
            let v = match l {
                vigil::http::routing::LagLimit::Bytes(b) => b,
                vigil::http::routing::LagLimit::Seconds(s) => s,
            };
            assert!(v >= 0.0 && !v.is_nan(), "{s:?} -> {v}");
        }
    }
});
