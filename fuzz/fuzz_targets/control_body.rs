//! What the control plane reads from a heartbeat body before (and after) verifying it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = vigil::control::body::parse(data) {
        assert!(p.seq > 0);
        assert!(vigil::control::body::valid_host_id(&p.host_id).is_ok());
    }
});
