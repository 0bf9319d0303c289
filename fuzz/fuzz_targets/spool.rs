//! The spool's recovery reads whatever is on disk after a crash, a power cut or bit rot:
//! any segment bytes open without a panic, every record returned passed its checksums, and
//! the spool accepts appends afterwards.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::heartbeat::spool::Spool;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    // The first byte picks the layout: one segment, or two (split at the second byte).
    let (seg1, seg2) = match data.split_first() {
        Some((b, rest)) if b % 2 == 1 && !rest.is_empty() => {
            let at = usize::from(rest[0]).min(rest.len());
            (&rest[..at], Some(&rest[at..]))
        }
        Some((_, rest)) => (rest, None),
        None => (data, None),
    };
    std::fs::write(dir.path().join("00000000000000000001.seg"), seg1).expect("write");
    if let Some(s) = seg2 {
        std::fs::write(dir.path().join("00000000000000001000.seg"), s).expect("write");
    }
    let Ok(mut spool) = Spool::open(dir.path(), 1 << 20) else {
        return;
    };
    let records = spool.peek_oldest(usize::MAX).unwrap_or_default();
    let mut last = 0;
    for (seq, _) in &records {
        assert!(*seq > last, "records out of order");
        last = *seq;
    }
    let next = spool.last_seq() + 1;
    if next < u64::MAX / 2 {
        spool.append(next, b"{}").expect("append after recovery");
        let again = spool.peek_oldest(usize::MAX).expect("peek");
        assert_eq!(again.last().map(|r| r.0), Some(next));
    }
});
