//! The heartbeat spool from outside: named corruption scenarios written as damaged files
//! (vector `disk_v2/tests/known_errors.rs`), overflow with a tiny `spool_max`, a full
//! tmpfs, and a writer process SIGKILLed at random moments.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vigil::heartbeat::spool::{RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, Spool, SpoolError};

use crate::util::{is_root, tempdir};

/// A deterministic body, so a record read back can be checked byte for byte.
fn body(seq: u64) -> Vec<u8> {
    let len = 20 + (seq.wrapping_mul(7919) % 700) as usize;
    (0..len)
        .map(|i| (seq as u8).wrapping_mul(17).wrapping_add(i as u8))
        .collect()
}

fn seqs(spool: &mut Spool) -> Vec<u64> {
    let all = spool.peek_oldest(usize::MAX).unwrap();
    for (seq, b) in &all {
        assert_eq!(b, &body(*seq), "seq {seq} read back intact");
    }
    all.into_iter().map(|(s, _)| s).collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|d| d.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// A spool in `dir` holding `n_segments` segments of three 100-byte records each (seq
/// from 1), closed again; returns the newest seq.
fn spool_with(dir: &Path, n_segments: u64) -> u64 {
    let mut spool = Spool::open(dir, SCENARIO_MAX).unwrap();
    let mut seq = 0;
    for _ in 0..n_segments * 3 {
        seq += 1;
        spool.append(seq, &fixed(seq)).unwrap();
    }
    assert_eq!(segments(dir).len() as u64, n_segments);
    seq
}

/// A body that makes a 100-byte record.
fn fixed(seq: u64) -> Vec<u8> {
    vec![seq as u8; 100 - RECORD_HEADER_LEN as usize]
}

fn fixed_seqs(spool: &mut Spool) -> Vec<u64> {
    let all = spool.peek_oldest(usize::MAX).unwrap();
    for (seq, b) in &all {
        assert_eq!(b, &fixed(*seq), "seq {seq} read back intact");
    }
    all.into_iter().map(|(s, _)| s).collect()
}

/// segment_max = 350 bytes: three 100-byte records (308 bytes with the header) a segment.
const SCENARIO_MAX: u64 = 8 * 350;

fn flip(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

fn record_offset(i: u64) -> u64 {
    SEGMENT_HEADER_LEN + i * 100
}

#[test]
fn truncated_record_is_skipped_and_cut_off() {
    let dir = tempdir();
    spool_with(dir.path(), 2);
    let last = segments(dir.path()).pop().unwrap();
    let f = OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(record_offset(2) + 37).unwrap();
    drop(f);

    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 2, 3, 4, 5]);
    assert_eq!(spool.corrupt_skipped_total(), 1);
    assert_eq!(fs::metadata(&last).unwrap().len(), record_offset(2));
    spool.append(7, &fixed(7)).unwrap();
    drop(spool);
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 2, 3, 4, 5, 7]);
    assert_eq!(spool.corrupt_skipped_total(), 0);
}

#[test]
fn flipped_byte_in_a_body_loses_that_record_only() {
    let dir = tempdir();
    spool_with(dir.path(), 2);
    let first = segments(dir.path()).remove(0);
    flip(&first, record_offset(1) + RECORD_HEADER_LEN + 10);
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 3, 4, 5, 6]);
    assert_eq!(spool.corrupt_skipped_total(), 1);
}

#[test]
fn flipped_byte_in_a_header_loses_the_rest_of_that_segment_only() {
    let dir = tempdir();
    spool_with(dir.path(), 2);
    let first = segments(dir.path()).remove(0);
    flip(&first, record_offset(1) + 2); // the length field: framing is lost
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 4, 5, 6]);
    assert_eq!(spool.corrupt_skipped_total(), 1);
    assert_eq!(fs::metadata(&first).unwrap().len(), record_offset(1));
}

#[test]
fn missing_segment_file_leaves_the_others_in_order() {
    let dir = tempdir();
    let last = spool_with(dir.path(), 3);
    fs::remove_file(&segments(dir.path())[1]).unwrap();
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 2, 3, 7, 8, 9]);
    spool.append(last + 1, &fixed(last + 1)).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 2, 3, 7, 8, 9, 10]);
}

#[test]
fn segment_deleted_while_open_counts_its_records_as_lost() {
    let dir = tempdir();
    spool_with(dir.path(), 3);
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    fs::remove_file(&segments(dir.path())[0]).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [4, 5, 6, 7, 8, 9]);
    assert_eq!(spool.corrupt_skipped_total(), 3);
    assert_eq!(spool.records(), 6);
}

#[test]
fn zero_length_segment_files_are_removed() {
    let dir = tempdir();
    spool_with(dir.path(), 2);
    // One in the middle of the queue, and the newest emptied as by a crash at creation.
    fs::write(dir.path().join("00000000000000000002.seg"), b"").unwrap();
    let newest = segments(dir.path()).pop().unwrap();
    fs::write(&newest, b"").unwrap();
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 2, 3]);
    assert_eq!(segments(dir.path()).len(), 1);
    spool.append(7, &fixed(7)).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 2, 3, 7]);
}

#[test]
fn garbage_files_in_the_directory() {
    let dir = tempdir();
    spool_with(dir.path(), 2);
    // A foreign file is left alone; garbage under a segment's name is set aside.
    fs::write(dir.path().join("notes.txt"), b"not a segment").unwrap();
    let fake = dir.path().join("00000000000000000005.seg");
    fs::write(&fake, [0xabu8; 300]).unwrap();
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [1, 2, 3, 4, 5, 6]);
    assert_eq!(spool.corrupt_skipped_total(), 1);
    assert_eq!(
        fs::read(dir.path().join("notes.txt")).unwrap(),
        b"not a segment"
    );
    assert!(!fake.exists());
    assert_eq!(
        fs::read(dir.path().join("00000000000000000005.seg.bad")).unwrap(),
        [0xabu8; 300]
    );
}

#[test]
fn corrupt_ack_file_means_redelivery_not_loss() {
    let dir = tempdir();
    spool_with(dir.path(), 2);
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    spool.ack(4).unwrap(); // deletes the first segment; seq 4 is acked inside the second
    assert_eq!(fixed_seqs(&mut spool), [5, 6]);
    drop(spool);
    let ack = dir.path().join("ack");
    flip(&ack, 9);
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(
        fixed_seqs(&mut spool),
        [4, 5, 6],
        "at least once: 4 comes back"
    );
    assert_eq!(spool.corrupt_skipped_total(), 1);
    assert!(dir.path().join("ack.bad").exists());
    spool.ack(5).unwrap();
    drop(spool);
    let mut spool = Spool::open(dir.path(), SCENARIO_MAX).unwrap();
    assert_eq!(fixed_seqs(&mut spool), [6]);
    assert_eq!(spool.corrupt_skipped_total(), 0);
}

#[test]
fn overflow_with_a_tiny_spool_max_drops_the_oldest_and_counts_exactly() {
    let dir = tempdir();
    // 100-byte records, segment_max = 1000 / 8 = 125: one record a segment (108 bytes),
    // nine segments fit in 1000 bytes.
    let mut spool = Spool::open(dir.path(), 1000).unwrap();
    for seq in 1..=20 {
        spool.append(seq, &fixed(seq)).unwrap();
        assert!(spool.bytes() <= 1000);
    }
    assert_eq!(spool.dropped_total(), 11);
    assert_eq!(fixed_seqs(&mut spool), (12..=20).collect::<Vec<_>>());

    // Four records a segment (408 bytes of 500); acked records are not counted as drops.
    let dir = tempdir();
    let mut spool = Spool::open(dir.path(), 4000).unwrap();
    for seq in 1..=36 {
        spool.append(seq, &fixed(seq)).unwrap();
    }
    assert_eq!(spool.dropped_total(), 0);
    spool.ack(1).unwrap();
    for seq in 37..=100 {
        spool.append(seq, &fixed(seq)).unwrap();
        assert!(spool.bytes() <= 4000);
    }
    let left = fixed_seqs(&mut spool);
    assert_eq!(left.last(), Some(&100));
    assert_eq!(
        left,
        (left[0]..=100).collect::<Vec<_>>(),
        "a contiguous newest suffix"
    );
    assert_eq!(spool.dropped_total(), 100 - 1 - left.len() as u64);
    assert_eq!((spool.dropped_total() + 1) % 4, 0, "whole segments");

    assert!(matches!(
        spool.append(101, &vec![0; 4000]),
        Err(SpoolError::TooLarge { seq: 101, .. })
    ));
}

/// A small tmpfs, unmounted (lazily if busy) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status();
        if !ok.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn full_disk_refuses_the_append_and_loses_nothing_spooled() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempdir();
    let fs_dir = dir.path().join("fs");
    let _mount = Tmpfs::mount(&fs_dir, "48k");
    let spool_dir = fs_dir.join("spool");
    // spool_max above the file system's size, so the disk fills before the cap drops;
    // 8 KiB segments, so delivering half of the records frees whole segments.
    let mut spool = Spool::open(&spool_dir, 64 * 1024).unwrap();
    let mut stored = Vec::new();
    let mut seq = 0;
    let err = loop {
        seq += 1;
        match spool.append(seq, &body(seq)) {
            Ok(()) => stored.push(seq),
            Err(e) => break e,
        }
        assert!(seq < 10_000, "the tmpfs never filled");
    };
    assert!(err.is_disk_full(), "{err:?}");
    assert!(
        format!("{err}").contains(spool_dir.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(seqs(&mut spool), stored);
    assert_eq!(spool.dropped_total(), 0);
    // Keep going: a smaller record may still fit a partly used page; every failure is
    // a clean "disk full" and changes nothing.
    for _ in 0..20 {
        seq += 1;
        match spool.append(seq, &body(seq)) {
            Ok(()) => stored.push(seq),
            Err(e) => assert!(e.is_disk_full(), "{e:?}"),
        }
    }
    assert_eq!(seqs(&mut spool), stored);
    drop(spool);

    let mut spool = Spool::open(&spool_dir, 64 * 1024).unwrap();
    assert_eq!(seqs(&mut spool), stored, "all of it after a restart");
    assert_eq!(
        spool.corrupt_skipped_total(),
        0,
        "no torn record left behind"
    );

    // Delivering the older half frees its segments; appends work again.
    let half = stored[stored.len() / 2];
    spool.ack(half).unwrap();
    seq += 1;
    spool.append(seq, &body(seq)).unwrap();
    let mut want: Vec<u64> = stored.into_iter().filter(|&s| s > half).collect();
    want.push(seq);
    assert_eq!(seqs(&mut spool), want);
}

/// Set in the child process of the crash test: the spool directory to append to.
const CRASH_CHILD_ENV: &str = "VIGIL_SPOOL_CRASH_CHILD";
/// 256 KiB: 32 KiB segments, so the child rotates often.
const CRASH_MAX: u64 = 256 * 1024;

/// Not a test by itself: the crash test runs this binary with `CRASH_CHILD_ENV` set, and
/// then this appends (and now and then acknowledges) until it is SIGKILLed, announcing
/// each step on stdout: `A seq` after an append returned, `W seq` before an ack and `K seq`
/// after it returned.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) else {
        return;
    };
    let mut spool = Spool::open(Path::new(&dir), CRASH_MAX).unwrap();
    let mut out = std::io::stdout().lock();
    let mut seq = spool.last_seq();
    loop {
        seq += 1;
        spool.append(seq, &body(seq)).unwrap();
        writeln!(out, "A {seq}").unwrap();
        out.flush().unwrap();
        if seq % 8 == 0 {
            let up_to = seq - 3;
            writeln!(out, "W {up_to}").unwrap();
            out.flush().unwrap();
            spool.ack(up_to).unwrap();
            writeln!(out, "K {up_to}").unwrap();
            out.flush().unwrap();
        }
    }
}

#[test]
fn kill_9_at_random_moments_loses_at_most_the_record_in_flight() {
    let dir = tempdir();
    let spool_dir = dir.path().join("spool");
    let mut present: Vec<u64> = Vec::new();
    let mut last_seq = 0;
    let mut torn = 0;
    let mut appended_total = 0;
    for round in 0..50 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "spool::crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_ENV, &spool_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("A ") {
                    // The receiver is gone after the first one; that is fine.
                    let _ = tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        // Most rounds die mid-append; every fifth may die during start-up or recovery.
        if round % 5 != 0 {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("the child appended nothing");
        }
        let until = Instant::now() + Duration::from_micros(fastrand::u64(0..40_000));
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();

        let mut appended = BTreeSet::new();
        let (mut will_ack, mut acked) = (0, 0);
        for line in &lines {
            // libtest prints "test spool::crash_child ... " with no newline first.
            let mut words = line.split_whitespace().rev();
            let (Some(n), Some(tag)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match tag {
                "A" => {
                    appended.insert(n);
                }
                "W" => will_ack = n,
                "K" => acked = n,
                _ => {}
            }
        }
        appended_total += appended.len();

        let mut spool = Spool::open(&spool_dir, CRASH_MAX).unwrap();
        let got = seqs(&mut spool); // checks every body byte for byte
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "round {round}: order or duplicates: {got:?}"
        );
        assert!(
            spool.corrupt_skipped_total() <= 1,
            "round {round}: one record in flight at most"
        );
        torn += spool.corrupt_skipped_total();
        assert_eq!(spool.dropped_total(), 0);

        let in_flight = last_seq.max(appended.last().copied().unwrap_or(0)) + 1;
        let known: BTreeSet<u64> = present
            .iter()
            .copied()
            .chain(appended.iter().copied())
            .collect();
        for &s in &got {
            assert!(
                s > acked,
                "round {round}: seq {s} was acknowledged (up to {acked})"
            );
            assert!(
                known.contains(&s) || s == in_flight,
                "round {round}: seq {s} was never appended; got {got:?}, known {known:?}, \
                 last_seq {last_seq}, lines {lines:?}"
            );
        }
        let got_set: BTreeSet<u64> = got.iter().copied().collect();
        for &s in known.iter().filter(|&&s| s > will_ack) {
            assert!(got_set.contains(&s), "round {round}: durable seq {s} lost");
        }
        present = got;
        last_seq = spool.last_seq();
    }
    eprintln!("50 kills: {appended_total} appends confirmed, {torn} torn records skipped");
    assert!(appended_total > 0);
}
