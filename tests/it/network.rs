//! The network between a real agent and a real `vigil control`, each in its own network
//! namespace: 30 % packet loss, 2 s latency, a two-minute partition, and a receiver that
//! accepts TCP and never answers. Every heartbeat produced reaches the store once, in
//! order, after the fault heals; the agent's API and checks go on meanwhile; the control
//! plane shows the host `uncertain` while it cannot hear it.
//!
//! # Topology
//! Two namespaces, `vgA<pid><tag>` (the agent) and `vgC<pid><tag>` (the control plane),
//! joined by a veth pair. Each holds a stable /32 on its loopback (`10.99.0.2` the agent,
//! `10.99.0.1` the control plane, which listens there with a certificate for that
//! address), and a host route to the other's /32 picks the path; TCP connections keep
//! their addresses whichever way their packets go. A partition is the control plane's
//! end of the veth pair set down: the agent's packets go out and vanish (a black hole,
//! not a refusal), until the link is set up again and the routes put back.
//!
//! # Why a userspace shaper
//! Loss and latency are `tc qdisc … netem` when the kernel has it, and the test tries
//! that first. The kernel of this project's machines and CI has no netem:
//! `tc qdisc add dev va root netem delay 100ms` answers "Error: Specified qdisc kind is
//! unknown." (and tc classifiers are missing too: "TC classifier not found"). There the
//! test routes the agent's traffic over a second path instead: a TUN device in each
//! namespace, opened by the test, and [`Shaper`] threads that copy IP packets between the
//! two, dropping 30 % of them at random or holding each one 2 s in a FIFO delay line —
//! netem's `loss 30%` and `delay 2s` on both ends, in userspace, with the kernel's real
//! TCP retransmission and congestion control above it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

use crate::util::{self, TestConfig, try_http};

/// The control plane's address (on its namespace's loopback) and port.
const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const CONTROL_PORT: u16 = 8443;
/// The agent's address (on its namespace's loopback).
const AGENT_IP: &str = "10.99.0.2";
/// The veth pair's /30 and the TUN point-to-point addresses.
const VETH_A: &str = "10.77.0.1";
const VETH_C: &str = "10.77.0.2";
const TUN_A: &str = "10.78.0.1";
const TUN_C: &str = "10.78.0.2";
/// `overdue_after` of the control plane.
const OVERDUE: Duration = Duration::from_secs(5);
/// The longest a `/health` answer may take while the network misbehaves.
const FAST: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// Namespaces, links, the shaper.

/// Runs `ip ARGS…`; its stderr on failure.
fn ip_try(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn ip(args: &[&str]) {
    if let Err(e) = ip_try(args) {
        panic!("ip {}: {e}", args.join(" "));
    }
}

/// In namespace `ns`, the route to `to`/32: out of `dev` (through `via`, if given), from
/// `src`.
fn route(ns: &str, to: &str, via: Option<&str>, dev: &str, src: &str) {
    let to = format!("{to}/32");
    let mut args = vec!["-n", ns, "route", "replace", to.as_str()];
    if let Some(via) = via {
        args.extend(["via", via]);
    }
    args.extend(["dev", dev, "src", src]);
    ip(&args);
}

/// Runs `f` on a thread whose network namespace is `ns` (setns(2) is per thread).
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// What the path between the two namespaces does to packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Loss30,
    Delay2s,
}

/// One direction of the userspace shaper: what [`Shaper`] reads from one TUN device it
/// writes to the other, after the fault in force when it was read.
struct Shaper {
    stop: Arc<AtomicBool>,
    mode: Arc<AtomicU8>,
    /// Packets carried and dropped (both directions): the path really was used.
    carried: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Shaper {
    fn start(a: tun_rs::SyncDevice, c: tun_rs::SyncDevice) -> Shaper {
        let (a, c) = (Arc::new(a), Arc::new(c));
        let stop = Arc::new(AtomicBool::new(false));
        let mode = Arc::new(AtomicU8::new(Fault::None as u8));
        let carried = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for (from, to) in [(a.clone(), c.clone()), (c, a)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (stop_r, mode_r, dropped_r) = (stop.clone(), mode.clone(), dropped.clone());
            threads.push(std::thread::spawn(move || {
                let event = tun_rs::InterruptEvent::new().unwrap();
                let mut buf = vec![0u8; 65536];
                while !stop_r.load(Ordering::Relaxed) {
                    // Nothing within 100 ms (or an error): look at `stop` again.
                    let Ok(n) =
                        from.recv_intr_timeout(&mut buf, &event, Some(Duration::from_millis(100)))
                    else {
                        continue;
                    };
                    let now = Instant::now();
                    let due = match mode_r.load(Ordering::Relaxed) {
                        m if m == Fault::Loss30 as u8 && fastrand::f64() < 0.3 => {
                            dropped_r.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        m if m == Fault::Delay2s as u8 => now + Duration::from_secs(2),
                        _ => now,
                    };
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }));
            let (stop_w, carried_w) = (stop.clone(), carried.clone());
            // The delay line: FIFO, each packet released at its due time.
            threads.push(std::thread::spawn(move || {
                while !stop_w.load(Ordering::Relaxed) {
                    let Ok((due, pkt)) = rx.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    let wait = due.saturating_duration_since(Instant::now());
                    std::thread::sleep(wait);
                    // A full queue or a device going away: the packet is lost, as on a wire.
                    if to.send(&pkt).is_ok() {
                        carried_w.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Shaper {
            stop,
            mode,
            carried,
            dropped,
            threads,
        }
    }

    fn set(&self, f: Fault) {
        self.mode.store(f as u8, Ordering::Relaxed);
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The two namespaces and what joins them; all deleted on drop, also after a panic.
struct Net {
    a: String,
    c: String,
    va: String,
    vb: String,
    ta: String,
    tc: String,
    /// `Some` without netem: the TUN path and its shaper.
    shaper: Option<Shaper>,
}

impl Net {
    /// Namespaces and a veth pair, addresses and routes over it; with `faults`, also the
    /// path loss and latency take (netem on the veth pair, else the TUN shaper).
    fn new(tag: &str, faults: bool) -> Net {
        let pid = std::process::id();
        let mut net = Net {
            a: format!("vgA{pid}{tag}"),
            c: format!("vgC{pid}{tag}"),
            va: format!("vga{pid}{tag}"),
            vb: format!("vgb{pid}{tag}"),
            ta: format!("vta{pid}{tag}"),
            tc: format!("vtc{pid}{tag}"),
            shaper: None,
        };
        for n in [&net.va, &net.ta] {
            assert!(n.len() <= 15, "interface name {n} too long");
        }
        ip(&["netns", "add", &net.a]);
        ip(&["netns", "add", &net.c]);
        ip(&[
            "link", "add", &net.va, "netns", &net.a, "type", "veth", "peer", "name", &net.vb,
            "netns", &net.c,
        ]);
        for (ns, lo_ip, dev, dev_ip) in [
            (&net.a, AGENT_IP, &net.va, VETH_A),
            (&net.c, &*CONTROL_IP.to_string(), &net.vb, VETH_C),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{lo_ip}/32"), "dev", "lo"]);
            ip(&["-n", ns, "addr", "add", &format!("{dev_ip}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        net.route_veth();
        if faults && !net.netem_works() {
            net.add_tun_path();
        }
        net
    }

    /// Whether `tc qdisc … netem` works here (then loss and latency are the kernel's).
    fn netem_works(&self) -> bool {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.a, "tc", "qdisc", "add", "dev", &self.va,
            ])
            .args(["root", "netem", "delay", "100ms"])
            .output()
            .expect("ip netns exec tc");
        if out.status.success() {
            self.tc_del();
            return true;
        }
        eprintln!(
            "network: no netem ({}): the userspace TUN shaper takes loss and latency",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        false
    }

    fn tc(&self, ns: &str, dev: &str, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev])
            .args(["root", "netem"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tc netem {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn tc_del(&self) {
        for (ns, dev) in [(&self.a, &self.va), (&self.c, &self.vb)] {
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root",
                ])
                .output();
        }
    }

    /// A TUN device per namespace (made here, then moved: the fd stays attached) and the
    /// shaper between them.
    fn add_tun_path(&mut self) {
        let make = |name: &str| {
            let d = tun_rs::DeviceBuilder::new()
                .name(name)
                .packet_information(false)
                .build_sync()
                .unwrap_or_else(|e| panic!("TUN {name}: {e}"));
            d.set_nonblocking(true).unwrap();
            d
        };
        let (ta, tc) = (make(&self.ta), make(&self.tc));
        for (ns, dev, local, peer) in [
            (&self.a, &self.ta, TUN_A, TUN_C),
            (&self.c, &self.tc, TUN_C, TUN_A),
        ] {
            ip(&["link", "set", dev, "netns", ns]);
            ip(&["-n", ns, "addr", "add", local, "peer", peer, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        self.shaper = Some(Shaper::start(ta, tc));
    }

    fn route_veth(&self) {
        let ctl = CONTROL_IP.to_string();
        route(&self.a, &ctl, Some(VETH_C), &self.va, AGENT_IP);
        route(&self.c, AGENT_IP, Some(VETH_A), &self.vb, &ctl);
    }

    fn route_tun(&self) {
        let ctl = CONTROL_IP.to_string();
        route(&self.a, &ctl, None, &self.ta, AGENT_IP);
        route(&self.c, AGENT_IP, None, &self.tc, &ctl);
    }

    /// Puts `f` on the path between the agent and the control plane.
    fn fault(&self, f: Fault) {
        match &self.shaper {
            Some(s) => {
                s.set(f);
                if f == Fault::None {
                    self.route_veth();
                } else {
                    self.route_tun();
                }
            }
            None => match f {
                Fault::None => self.tc_del(),
                Fault::Loss30 => {
                    self.tc(&self.a, &self.va, &["loss", "30%"]);
                    self.tc(&self.c, &self.vb, &["loss", "30%"]);
                }
                Fault::Delay2s => {
                    self.tc(&self.a, &self.va, &["delay", "2s"]);
                    self.tc(&self.c, &self.vb, &["delay", "2s"]);
                }
            },
        }
    }

    /// The control plane's end of the veth pair down: the agent's packets vanish.
    fn partition(&self) {
        self.fault(Fault::None);
        ip(&["-n", &self.c, "link", "set", &self.vb, "down"]);
    }

    fn heal(&self) {
        ip(&["-n", &self.c, "link", "set", &self.vb, "up"]);
        // Setting a link down flushed the routes through it.
        self.route_veth();
    }

    /// The shaper's (carried, dropped) packet counts.
    fn shaped(&self) -> Option<(usize, usize)> {
        self.shaper.as_ref().map(|s| {
            (
                s.carried.load(Ordering::Relaxed),
                s.dropped.load(Ordering::Relaxed),
            )
        })
    }

    /// Runs `CMD…` in namespace `ns`.
    fn command(ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut s) = self.shaper.take() {
            s.stop();
        }
        let _ = ip_try(&["netns", "del", &self.a]);
        let _ = ip_try(&["netns", "del", &self.c]);
        // Deleting a namespace moves a TUN device whose fd is still open back to the
        // initial one, and takes a veth pair along with it: nothing of ours may remain.
        for dev in [&self.ta, &self.tc, &self.va, &self.vb] {
            let _ = ip_try(&["link", "del", dev]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Processes: `vigil control` and `vigil agent`, each in its namespace.

/// A child killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(ns: &str, args: &[&std::ffi::OsStr], log: PathBuf, rust_log: bool) -> Proc {
        let mut cmd = Net::command(ns);
        cmd.arg(env!("CARGO_BIN_EXE_vigil"))
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("VIGIL_CONFIG")
            .env_remove("VIGIL_CONTROL_CONFIG")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        if rust_log {
            cmd.env("RUST_LOG", "info");
        } else {
            cmd.env_remove("RUST_LOG");
        }
        Proc {
            child: cmd.spawn().expect("ip netns exec vigil"),
            log,
        }
    }

    fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited with {st}:\n{}", self.log.display(), self.logs());
        }
    }

    /// SIGTERM (`ip netns exec` execs the program: the pid is vigil's) and the exit code.
    fn stop(&mut self) -> Option<i32> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        util::poll(Duration::from_secs(20), "a process to exit", || {
            self.child.try_wait().unwrap()
        })
        .code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A CA, a certificate for [`CONTROL_IP`], the control plane's config; and its client.
struct Plane {
    dir: tempfile::TempDir,
    config: PathBuf,
    ca: CertificateDer<'static>,
    ns: String,
}

impl Plane {
    fn new(ns: &str) -> Plane {
        let dir = util::tempdir();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "vigil network test CA");
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![CONTROL_IP.to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        let config = dir.path().join("control.toml");
        std::fs::write(
            &config,
            format!(
                "[control]\nlisten = \"{CONTROL_IP}:{CONTROL_PORT}\"\ntls_cert = \"server.pem\"\n\
                 tls_key = \"server.key\"\nstate_dir = \"state\"\noverdue_after = \"{}s\"\n",
                OVERDUE.as_secs()
            ),
        )
        .unwrap();
        Plane {
            ca: ca.der().clone(),
            dir,
            config,
            ns: ns.to_string(),
        }
    }

    /// `vigil control enroll` (from outside the namespaces: it only writes the store).
    fn enroll(&self, host: &str, public: &str) {
        let out = util::vigil()
            .args([
                "control", "enroll", "--host", host, "--pubkey", public, "-c",
            ])
            .arg(&self.config)
            .env_remove("VIGIL_CONTROL_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) -> Proc {
        let mut p = Proc::spawn(
            &self.ns,
            &["control".as_ref(), "-c".as_ref(), self.config.as_os_str()],
            self.dir.path().join("control.log"),
            true,
        );
        util::poll(Duration::from_secs(20), "vigil control to answer", || {
            p.assert_running();
            self.try_get("/v1/hosts").ok()
        });
        p
    }

    /// GET over TLS from inside the control plane's namespace (the partition does not
    /// cut the operator off from the API).
    fn try_get(&self, path: &str) -> Result<(u16, Value), String> {
        let ca = self.ca.clone();
        in_ns(&self.ns, move || https_get(ca, path))
    }

    fn host(&self, id: &str) -> Value {
        let (code, v) = self
            .try_get(&format!("/v1/hosts/{id}"))
            .unwrap_or_else(|e| panic!("GET /v1/hosts/{id}: {e}"));
        assert_eq!(code, 200, "{v}");
        v
    }

    fn stored_seq(&self, id: &str) -> u64 {
        self.host(id)["seq"].as_u64().unwrap_or(0)
    }

    /// (seq, received_at_ms) of every heartbeat of `host` in the file store's segments,
    /// in the order they were appended (`src/control/store/file.rs`: a 16-byte header,
    /// then frames `len: u32`, `crc: u32`, payload `kind: u8 = 1`, `received_at_ms: u64`,
    /// `seq: u64`, host id as `u16` length + bytes, …).
    fn stored(&self, host: &str) -> Vec<(u64, u64)> {
        let dir = self.dir.path().join("state");
        let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with("wal-") && n.ends_with(".log")
            })
            .collect();
        segments.sort();
        assert!(!segments.is_empty(), "no segments in {}", dir.display());
        let mut out = Vec::new();
        for s in segments {
            let buf = std::fs::read(&s).unwrap();
            let mut at = 16;
            while at + 8 <= buf.len() {
                let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let p = &buf[at + 8..at + 8 + len];
                at += 8 + len;
                if p[0] != 1 {
                    continue;
                }
                let received = u64::from_le_bytes(p[1..9].try_into().unwrap());
                let seq = u64::from_le_bytes(p[9..17].try_into().unwrap());
                let hlen = u16::from_le_bytes(p[17..19].try_into().unwrap()) as usize;
                if &p[19..19 + hlen] == host.as_bytes() {
                    out.push((seq, received));
                }
            }
        }
        out
    }
}

/// One HTTPS GET to the control plane, trusting `ca`; the body parsed as JSON.
fn https_get(ca: CertificateDer<'static>, path: &str) -> Result<(u16, Value), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::IpAddress(IpAddr::V4(CONTROL_IP).into());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let addr = SocketAddr::new(IpAddr::V4(CONTROL_IP), CONTROL_PORT);
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {CONTROL_IP}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match tls.read_to_end(&mut buf) {
        Ok(_) => {}
        // A peer that closes without close_notify: what came is the whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad answer {head:?}"))?;
    // Chunked bodies: the JSON is the one line between the chunk sizes.
    let json = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.lines().nth(1).unwrap_or("")
    } else {
        body
    };
    let v = serde_json::from_str(json).map_err(|e| format!("{path}: {e}: {body}"))?;
    Ok((code, v))
}

/// The agent in namespace `ns`, its config and what the test asks it.
struct AgentIn {
    proc: Proc,
    cfg: TestConfig,
    ns: String,
}

/// Config for an agent with host id `host`: a 1 s disk check, heartbeats every second to
/// the control plane over TLS (its CA), `max_backoff = "2s"` and `timeout`; its key made
/// by `vigil keygen` and enrolled at `plane`.
fn agent_config(plane: &Plane, dir: &Path, host: &str, timeout: &str) -> TestConfig {
    plane.enroll(host, &util::keygen(dir));
    util::write_heartbeat_config(
        dir,
        host,
        "1s",
        &format!("https://{CONTROL_IP}:{CONTROL_PORT}/v1/heartbeats"),
        &plane.dir.path().join("ca.pem"),
        &format!("interval = \"1s\"\nmax_backoff = \"2s\"\ntimeout = {timeout:?}"),
    )
}

impl AgentIn {
    fn start(ns: &str, cfg: TestConfig) -> AgentIn {
        let log = cfg.path.with_extension("log");
        let proc = Proc::spawn(
            ns,
            &["agent".as_ref(), "-c".as_ref(), cfg.path.as_os_str()],
            log,
            false,
        );
        let mut a = AgentIn {
            proc,
            cfg,
            ns: ns.to_string(),
        };
        util::poll(Duration::from_secs(20), "the agent's first round", || {
            a.proc.assert_running();
            match a.try_get("/health") {
                Ok((_, body, _)) if !body.contains("\"starting\"") => Some(()),
                _ => None,
            }
        });
        a
    }

    /// GET from inside the agent's namespace: (status, body, how long it took).
    fn try_get(&self, path: &str) -> std::io::Result<(u16, String, Duration)> {
        let addr = self.cfg.addr;
        in_ns(&self.ns, move || {
            let t = Instant::now();
            let (code, body) = try_http(addr, "GET", path, None)?;
            Ok((code, body, t.elapsed()))
        })
    }

    fn json(&self, path: &str) -> Value {
        let (code, body, _) = self
            .try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.proc.logs()));
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// `/health` must answer 200 (the host itself is fine) within [`FAST`].
    fn assert_health_fast(&self, phase: &str) -> Value {
        let (code, body, took) = self
            .try_get("/health")
            .unwrap_or_else(|e| panic!("{phase}: GET /health: {e}\n{}", self.proc.logs()));
        assert_eq!(code, 200, "{phase}: /health {body}");
        assert!(took < FAST, "{phase}: /health took {took:?}");
        serde_json::from_str(&body).unwrap()
    }

    /// [`Self::assert_health_fast`] once `every` so often, `during` that long.
    fn assert_health_fast_for(&self, phase: &str, during: Duration, every: Duration) {
        let t = Instant::now();
        while t.elapsed() < during {
            self.assert_health_fast(phase);
            std::thread::sleep(every);
        }
    }

    /// The last seq the agent produced.
    fn produced(&self) -> u64 {
        self.json("/heartbeat")["seq"].as_u64().unwrap_or(0)
    }

    fn spooled(&self) -> u64 {
        let h = self.json("/health");
        h["heartbeat"]["spooled"]
            .as_u64()
            .unwrap_or_else(|| panic!("no heartbeat.spooled in {h}"))
    }

    /// `sampled_at` of the disk check.
    fn sampled_at(&self) -> String {
        self.json("/checks/scratch")["sampled_at"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Polls `f` every 250 ms until `Some`, or panics with `what` and `diag()` after `limit`.
fn wait<T>(
    limit: Duration,
    what: &str,
    diag: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// After the agent produced up to seq `produced`: waits until the control plane stored
/// that far and the spool is empty, then the host `available`. Returns `produced`: every
/// seq up to it is stored. (The agent keeps producing meanwhile; a seq produced later may
/// still be on its way when the control plane is stopped, so only this one is certain.)
fn wait_drained(plane: &Plane, agent: &AgentIn, host: &str, limit: Duration) -> u64 {
    let diag = || format!("agent:\n{}\ncontrol:\n", agent.proc.logs());
    let produced = agent.produced();
    wait(limit, "every heartbeat delivered", diag, || {
        (plane.stored_seq(host) >= produced && agent.spooled() == 0).then_some(())
    });
    wait_available(plane, host, Duration::from_secs(10), diag);
    produced
}

/// Waits until the control plane shows `host` available.
fn wait_available(plane: &Plane, host: &str, limit: Duration, diag: impl Fn() -> String) {
    wait(limit, "the host available", diag, || {
        (plane.host(host)["state"] == "available").then_some(())
    });
}

/// The namespaces (see [`Net::new`]), a control plane in `net.c`, and in the temp dir the
/// config of agent `host` enrolled there with heartbeat `timeout` (see [`agent_config`]).
fn set_up(
    tag: &str,
    faults: bool,
    host: &str,
    timeout: &str,
) -> (Net, Plane, tempfile::TempDir, TestConfig) {
    let net = Net::new(tag, faults);
    let plane = Plane::new(&net.c);
    let dir = util::tempdir();
    let cfg = agent_config(&plane, dir.path(), host, timeout);
    (net, plane, dir, cfg)
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn loss_latency_and_a_partition_lose_no_heartbeat_and_the_host_is_uncertain_meanwhile() {
    if util::skip_unless_root("network namespaces") {
        return;
    }
    let started = Instant::now();
    let host = "net-agent-1";
    let (net, plane, _dir, cfg) = set_up("f", true, host, "20s");
    let mut control = plane.start();
    let agent = AgentIn::start(&net.a, cfg);
    let diag = || format!("agent:\n{}", agent.proc.logs());

    // Healthy.
    wait_available(&plane, host, Duration::from_secs(30), diag);

    // Loss, then latency: heartbeats still get through (TCP retransmits), the API and
    // the checks are unaffected.
    for (fault, name) in [
        (Fault::Loss30, "30 % loss"),
        (Fault::Delay2s, "2 s latency"),
    ] {
        let shaped_before = net.shaped();
        net.fault(fault);
        let stored_before = plane.stored_seq(host);
        let sampled_before = agent.sampled_at();
        agent.assert_health_fast_for(name, Duration::from_secs(20), Duration::from_millis(500));
        wait(
            Duration::from_secs(30),
            &format!("a heartbeat stored under {name}"),
            diag,
            || (plane.stored_seq(host) > stored_before).then_some(()),
        );
        assert_ne!(agent.sampled_at(), sampled_before, "{name}: checks stalled");
        if let (Some((c0, d0)), Some((c1, d1))) = (shaped_before, net.shaped()) {
            assert!(c1 > c0, "{name}: nothing went through the shaper");
            if fault == Fault::Loss30 {
                assert!(d1 > d0, "30 % loss dropped nothing");
            }
        }
        eprintln!(
            "network: {name}: stored seq {stored_before} -> {}, shaper {:?}",
            plane.stored_seq(host),
            net.shaped()
        );
    }

    // The faults gone, the backlog drains and the host is available again.
    net.fault(Fault::None);
    wait_drained(&plane, &agent, host, Duration::from_secs(60));

    // A two-minute partition.
    net.partition();
    let cut = Instant::now();
    let produced_at_cut = agent.produced();
    let stored_at_cut = plane.stored_seq(host);
    let mut samples = std::collections::BTreeSet::new();
    let mut uncertain_at = None;
    while cut.elapsed() < Duration::from_secs(120) {
        agent.assert_health_fast("partition");
        samples.insert(agent.sampled_at());
        let h = plane.host(host);
        let state = h["state"].clone();
        // At most the one heartbeat in flight at the cut gets through.
        let stored = h["seq"].as_u64().unwrap_or(0);
        assert!(
            stored <= stored_at_cut + 1,
            "seq {stored} stored through the partition (cut at {stored_at_cut})"
        );
        match uncertain_at {
            None if state == "uncertain" => uncertain_at = Some(cut.elapsed()),
            None => assert!(
                cut.elapsed() < OVERDUE + Duration::from_secs(25),
                "still {state} {:?} into the partition",
                cut.elapsed()
            ),
            Some(_) => assert_eq!(
                state, "uncertain",
                "the host came back during the partition"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let uncertain_at = uncertain_at.expect("the host never turned uncertain");
    let produced_at_heal = agent.produced();
    let spooled_at_heal = agent.spooled();
    assert!(
        produced_at_heal >= produced_at_cut + 100,
        "the agent went on producing: {produced_at_cut} -> {produced_at_heal}"
    );
    assert!(
        spooled_at_heal >= 100,
        "spooled {spooled_at_heal} after a 2 min partition"
    );
    assert!(
        samples.len() >= 100,
        "the check ran {} times in 2 min",
        samples.len()
    );
    eprintln!(
        "network: partition: uncertain after {uncertain_at:?}, produced {produced_at_cut} -> \
         {produced_at_heal}, {spooled_at_heal} spooled"
    );

    // Heal: everything drains in order and the host is back.
    net.heal();
    let healed = Instant::now();
    let produced = wait_drained(&plane, &agent, host, Duration::from_secs(90));
    eprintln!("network: drained {:?} after the heal", healed.elapsed());
    assert_eq!(control.stop(), Some(0), "{}", control.logs());
    util::assert_every_seq_once_in_order(&plane.stored(host), produced);
    eprintln!("network: faults test took {:?}", started.elapsed());
}

#[test]
fn a_receiver_that_accepts_and_never_answers_only_delays_delivery() {
    if util::skip_unless_root("network namespaces") {
        return;
    }
    let host = "net-agent-2";
    let (net, plane, _dir, cfg) = set_up("s", false, host, "3s");

    // The silent receiver: accepts on the control plane's address and holds every socket.
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let listener = in_ns(&net.c, || {
        TcpListener::bind(SocketAddr::new(IpAddr::V4(CONTROL_IP), CONTROL_PORT)).unwrap()
    });
    listener.set_nonblocking(true).unwrap();
    let silent = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        held.push(s);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            // The listener and every held socket close here.
        })
    };

    let agent = AgentIn::start(&net.a, cfg);
    let diag = || format!("agent:\n{}", agent.proc.logs());
    agent.assert_health_fast_for(
        "silent receiver",
        Duration::from_secs(15),
        Duration::from_millis(300),
    );
    let spooled = agent.spooled();
    let conns = accepted.load(Ordering::Relaxed);
    assert!(spooled >= 8, "spooled {spooled} after 15 s");
    assert!(
        conns >= 2,
        "{conns} connections: the agent gave up on the silent one and tried again"
    );
    let error = agent.json("/heartbeat")["error"].clone();
    assert!(error.is_string(), "no delivery error shown: {error}");
    eprintln!("network: silent receiver: {conns} connections held, {spooled} spooled, {error}");

    // The real control plane takes its place.
    stop.store(true, Ordering::Relaxed);
    silent.join().unwrap();
    let mut control = plane.start();
    wait_available(&plane, host, Duration::from_secs(40), diag);
    let produced = wait_drained(&plane, &agent, host, Duration::from_secs(40));
    assert_eq!(control.stop(), Some(0), "{}", control.logs());
    util::assert_every_seq_once_in_order(&plane.stored(host), produced);
}
