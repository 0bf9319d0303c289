//! The JSON and text that backup tools print: pgBackRest `info --output=json`, WAL-G
//! `backup-list --json --detail`, Barman `list-backups`. A tool printing garbage is an
//! `unknown` check with a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::checks::backup::{barman, pgbackrest, walg};

fuzz_target!(|data: &[u8]| {
    let _ = pgbackrest::parse_info(data, "main");
    let _ = walg::parse_backup_list(data);
    let _ = barman::parse_list_backups(data, "main");
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = pgbackrest::segment_number(s);
        let _ = vigil::checks::backup::parse_rfc3339(s);
    }
});
