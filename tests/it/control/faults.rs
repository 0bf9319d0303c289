//! Fault injection against the real `vigil control` (file store): abusive clients, and
//! kill -9 at random moments under a load of signed heartbeats, 100 times.
//!
//! Both run over plain HTTP on loopback ([`Plane::plain`]): the abusive clients speak raw
//! HTTP/1.1 on the socket. TLS changes nothing the tests look at: the receiver takes a
//! connection's slot at `accept`, before the handshake, and the handshake reads through the
//! same slot, so a connection that never starts (or never finishes) TLS is idle and evicted
//! exactly like one that never sends its headers (see `vigil::control::server`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use vigil::control::store::file::FileStore;
use vigil::control::store::{HostFilter, Page, Store};

use super::{Load, Plane, body, key, post};
use crate::util::{
    HealthProbe, RssWatch, assert_refused_heads, assert_status, oversized_heads, raise_nofile,
    read_until_closed, rss_kib, slowloris, status_code, try_http,
};

/// Idle connections the flood opens: about twice the receiver's default
/// `max_connections` (1024).
const FLOOD: usize = 2000;
/// The default `max_connections`.
const MAX_CONNECTIONS: usize = 1024;
/// The most a signed heartbeat may take to be answered 200 while the flood holds every
/// slot: verify and one fsync take milliseconds; a second more covers a loaded 2-core
/// machine and the wait for evicted connections to close. Without eviction it waits
/// behind the flood for the 10 s header-read timeout.
const HEARTBEAT_BOUND: Duration = Duration::from_secs(2);
/// The most a `/health` may take meanwhile (the agent's test uses the same bound).
const HEALTH_BOUND: Duration = Duration::from_secs(1);
/// The receiver's header-read timeout (`control::server::HEADER_READ_TIMEOUT`).
const HEADER_READ_TIMEOUT: Duration = vigil::control::server::HEADER_READ_TIMEOUT;

/// How many of `conns` the receiver has closed (EOF or reset), without waiting.
fn closed(conns: &mut [TcpStream]) -> usize {
    conns
        .iter_mut()
        .filter_map(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            Some(match s.read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            })
            .filter(|c| *c)
        })
        .count()
}

/// A signed heartbeat posted on `rt`; its status and how long the answer took.
fn timed_post(
    rt: &tokio::runtime::Runtime,
    c: &vigil::heartbeat::client::HeartbeatClient,
    seq: u64,
) -> (u16, Duration) {
    let t = Instant::now();
    let (code, v) = rt.block_on(post(c, &key(1), &body("db-1", seq, "available")));
    assert_eq!(code, 200, "heartbeat {seq}: {v}");
    (code, t.elapsed())
}

/// 2,000 idle TCP connections, 1 MiB of headers four times, a 16 MiB chunked body, a body
/// declared 16 MiB long and never sent, and a slowloris against one receiver: a signed
/// heartbeat from an enrolled host is still answered 200 within [`HEARTBEAT_BOUND`] with
/// every flood connection open, `/health` answers every 50 ms request within
/// [`HEALTH_BOUND`] throughout, the flood is evicted rather than queued in front of real
/// clients, oversized heads get 431 (or a close), oversized bodies 413 (the declared one
/// at once, without waiting for the body timeout), the slowloris is cut off at the
/// header-read timeout, and the receiver is the same process at the end.
///
/// The RSS bound, baseline + 48 MiB: the receiver holds at most `max_connections` (1024)
/// connections, each a task, hyper's connection state and its 8 KiB read buffer (~20 KiB
/// in all in a debug build: ~20 MiB); the four oversized heads cost at most hyper's
/// ~400 KiB buffer cap each (~1.6 MiB), an oversized body at most the 1 MiB limit; the
/// rest is the allocator's arenas on two threads and the churn of evicted connections.
/// Measured: +32 MiB (debug build, 2 cores). Holding all 2,000 flood connections (~40 MiB)
/// and buffering the 4 MiB of heads and the 16 MiB body would break it.
///
/// Nothing lost: every heartbeat sent is answered 200, none waits behind the flood, and
/// the receiver neither crashes nor restarts.
#[test]
fn abusive_clients_do_not_starve_heartbeats_or_grow_the_receivers_memory() {
    raise_nofile(FLOOD as u64 + 1024);
    let plane = Plane::plain("");
    plane.enroll("db-1", &key(1));
    let mut rx = plane.start();
    let pid = rx.child.id();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = plane.client();
    let mut seq = 0;
    // Warm up the allocator, the listener and the store first.
    for _ in 0..20 {
        assert_eq!(try_http(plane.addr, "GET", "/health", None).unwrap().0, 200);
        seq += 1;
        timed_post(&rt, &c, seq);
    }
    let baseline = rss_kib(pid);
    let rss = RssWatch::start(pid);
    let probe = HealthProbe::start(plane.addr);

    // The flood: connect, never send a byte.
    let t = Instant::now();
    let mut idle = Vec::with_capacity(FLOOD);
    let mut refused = 0;
    for _ in 0..FLOOD {
        match TcpStream::connect_timeout(&plane.addr, Duration::from_secs(2)) {
            Ok(s) => idle.push(s),
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "flood: {} connected, {refused} not, in {:?}",
        idle.len(),
        t.elapsed()
    );
    assert_eq!(idle.len(), FLOOD, "{refused} flood connections refused");
    // Past the cap, the longest-idle are closed to make room, not queued.
    let t = Instant::now();
    let mut evicted = closed(&mut idle);
    while evicted < FLOOD - MAX_CONNECTIONS {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "only {evicted} of {FLOOD} idle connections closed at a cap of {MAX_CONNECTIONS}"
        );
        std::thread::sleep(Duration::from_millis(50));
        evicted = closed(&mut idle);
    }
    // With every remaining flood connection open, heartbeats and the endpoints answer.
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        seq += 1;
        let (_, took) = timed_post(&rt, &c, seq);
        slowest = slowest.max(took);
        let t = Instant::now();
        let (code, text) = try_http(plane.addr, "GET", "/metrics", None).unwrap();
        assert_eq!(code, 200, "{text}");
        assert!(
            t.elapsed() < HEALTH_BOUND,
            "/metrics took {:?}",
            t.elapsed()
        );
    }
    eprintln!("flood: {evicted} evicted; slowest heartbeat during it {slowest:?}");
    assert!(
        slowest < HEARTBEAT_BOUND,
        "a heartbeat took {slowest:?} behind the flood"
    );

    // Oversized headers: 1 MiB of one header, four at once.
    assert_refused_heads(&oversized_heads(
        plane.addr,
        b"POST /v1/heartbeats HTTP/1.1\r\nHost: x\r\n",
    ));

    // A body declared 16 MiB long: refused from its Content-Length at once, not after the
    // 30 s body timeout (and not busy, unevictable, all that time).
    let body_len = 16 * 1024 * 1024;
    let mut s = TcpStream::connect(plane.addr).unwrap();
    let t = Instant::now();
    s.write_all(
        format!(
            "POST /v1/heartbeats HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {body_len}\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .unwrap();
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(10));
    assert_status(&resp, 413);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "413 after {:?}",
        t.elapsed()
    );

    // 16 MiB actually sent, chunked (no length to refuse it by): cut at the 1 MiB limit.
    let mut s = TcpStream::connect(plane.addr).unwrap();
    s.write_all(
        b"POST /v1/heartbeats HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b' '; 64 * 1024];
            let mut sent = 0;
            for _ in 0..(body_len / chunk.len()) {
                let head = format!("{:x}\r\n", chunk.len());
                if s.write_all(head.as_bytes()).is_err()
                    || s.write_all(&chunk).is_err()
                    || s.write_all(b"\r\n").is_err()
                {
                    break;
                }
                sent += chunk.len();
            }
            sent
        })
    };
    let (resp, _) = read_until_closed(&mut s, Duration::from_secs(10));
    assert_status(&resp, 413);
    drop(s);
    let sent = writer.join().unwrap();
    eprintln!("chunked body: {} KiB sent before the close", sent / 1024);

    // The flood goes: the slowloris below must meet the header-read timeout, not an
    // eviction made for a newer connection.
    drop(idle);
    let (closed_after, mut slow) = slowloris(plane.addr, HEADER_READ_TIMEOUT * 2);
    assert!(
        closed_after < HEADER_READ_TIMEOUT + Duration::from_secs(4),
        "slowloris held for {closed_after:?}"
    );
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let code = status_code(&rest);
    assert!(
        code.is_none() || code == Some(408),
        "slowloris answered {code:?}"
    );

    probe.finish(HEALTH_BOUND, "abusive clients against the control plane");
    let peak = rss.finish();
    eprintln!("control plane abusive clients: RSS baseline {baseline} KiB, peak {peak} KiB");
    assert!(
        peak <= baseline + 48 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB"
    );
    assert!(
        rx.child.try_wait().unwrap().is_none(),
        "the receiver exited: {}",
        rx.logs()
    );
    assert_eq!(rx.child.id(), pid);
    seq += 1;
    timed_post(&rt, &c, seq);
    let (code, v) = try_http(plane.addr, "GET", "/v1/hosts/db-1", None).unwrap();
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["seq"], seq, "every heartbeat stored: {v}");
}

/// Rounds of start, load, kill -9.
const KILLS: usize = 100;
/// Hosts sending at once.
const HOSTS: usize = 8;

/// The latest stored seq of every host, read from the files of a stopped (killed)
/// receiver the way `vigil control hosts` reads them, with the checks of a start: every
/// segment and snapshot parses, no record is damaged.
async fn stored_on_disk(plane: &Plane) -> HashMap<String, u64> {
    let dir = plane.state_dir();
    let store = FileStore::open_read_only(&dir, true)
        .unwrap_or_else(|e| panic!("the killed receiver's store does not open: {e}"));
    assert_eq!(store.corrupt_records(), 0, "damaged records in {dir:?}");
    let page = Page {
        limit: usize::MAX,
        after: None,
    };
    store
        .hosts(&HostFilter::default(), &page)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.host_id, h.last.map_or(0, |l| l.seq)))
        .collect()
}

/// The file names in `state_dir` that are not the store's own kinds, and the count of
/// snapshot temp files (one may be left by a kill in the middle of a snapshot).
fn unexpected_files(plane: &Plane) -> (Vec<String>, usize) {
    let mut other = Vec::new();
    let mut tmp = 0;
    for e in std::fs::read_dir(plane.state_dir()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let known = name == "lock"
            || name == "enrollment.log"
            || name == "notified.json"
            || (name.starts_with("wal-") && name.ends_with(".log"))
            || (name.starts_with("snapshot-") && name.ends_with(".snap"));
        if name.starts_with(".snapshot-") && name.ends_with(".tmp") {
            tmp += 1;
        } else if !known {
            other.push(name);
        }
    }
    (other, tmp)
}

/// The receiver (file store) killed with SIGKILL [`KILLS`] times, each time 20–200 ms
/// after it starts answering, while [`HOSTS`] hosts post signed heartbeats as fast as it
/// answers them ([`Load`]: failed sends are retried with the same seq, as an agent does).
/// After each kill the store's files are read as a start would (every file parses, no
/// damaged record; at most one snapshot temp file, from a kill mid-snapshot), and the
/// receiver starts again on them; the store snapshots and rotates segments along the way
/// (a start snapshots once more than 8 segments would be replayed).
///
/// Nothing lost: for every host, the seq stored after each kill is at least the highest
/// one answered 200 before it (on disk before the restart, and as the restarted receiver
/// answers) and never above one that was sent; a replay of an accepted seq, freshly
/// signed, is refused with 409 after every restart (no seq reused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_file_store_under_load_never_loses_an_acknowledged_heartbeat() {
    let started = Instant::now();
    let plane = Plane::plain("");
    let hosts: Vec<String> = (0..HOSTS).map(|i| format!("db-{i}")).collect();
    for h in &hosts {
        plane.enroll(h, &key(1));
    }
    let c = plane.client();
    let mut load = Load::start(plane.client(), key(1), &hosts);
    let mut replays = 0;
    let mut max_tmp = 0;
    for round in 1..=KILLS {
        let rx = plane.start();
        // Every host's acknowledged seq is there in the restarted receiver, and sending
        // it again is a replay.
        let acked = load.acked();
        for (i, (h, a)) in acked.iter().enumerate() {
            let (code, v) = try_http(plane.addr, "GET", &format!("/v1/hosts/{h}"), None)
                .unwrap_or_else(|e| panic!("round {round}: GET {h}: {e}"));
            assert_eq!(code, 200, "round {round}: {v}");
            let v: Value = serde_json::from_str(&v).unwrap();
            let stored = v["seq"].as_u64().unwrap_or(0);
            assert!(
                stored >= *a,
                "round {round}: {h} answered 200 up to seq {a}, the receiver has {stored}"
            );
            assert!(stored <= load.sent(i), "round {round}: {h} stored {stored}");
            if *a > 0 && i == round % HOSTS {
                let (code, v) = post(&c, &key(1), &body(h, *a, "available")).await;
                assert_eq!(code, 409, "round {round}: replay of {h} seq {a}: {v}");
                replays += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..=200))).await;
        rx.kill9();
        let acked = load.acked();
        let (other, tmp) = unexpected_files(&plane);
        assert!(
            other.is_empty(),
            "round {round}: unexpected files {other:?}"
        );
        assert!(tmp <= 1, "round {round}: {tmp} snapshot temp files");
        max_tmp = max_tmp.max(tmp);
        let on_disk = stored_on_disk(&plane).await;
        for (i, (h, a)) in acked.iter().enumerate() {
            let stored = on_disk.get(h).copied().unwrap_or(0);
            assert!(
                stored >= *a,
                "round {round}: {h} answered 200 up to seq {a}, {stored} on disk"
            );
            assert!(
                stored <= load.sent(i),
                "round {round}: {h}: {stored} on disk, never sent"
            );
        }
    }
    load.stop().await;
    let total = load.total_acked();
    let segments = std::fs::read_dir(plane.state_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("wal-")
        })
        .count();
    eprintln!(
        "control kill -9: {KILLS} rounds in {:?}; {total} heartbeats answered 200, \
         {replays} replays refused, {segments} segments on disk, \
         at most {max_tmp} snapshot temp file after a kill",
        started.elapsed()
    );
    assert!(
        total >= KILLS as u64,
        "only {total} heartbeats accepted in {KILLS} rounds"
    );
    assert!(replays >= KILLS / 2, "only {replays} replays tried");
}
