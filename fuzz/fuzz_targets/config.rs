//! The agent's and the control plane's config parsers: any text gives a config or a
//! `FILE:LINE:COL: key: message` error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = vigil::config::parse(Path::new("fuzz.toml"), text) {
        // Every problem line names the file.
        assert!(
            e.to_string().lines().all(|l| l.starts_with("fuzz.toml")),
            "{e}"
        );
    }
    let _ = vigil::control::config::parse(Path::new("fuzz.toml"), text);
});
