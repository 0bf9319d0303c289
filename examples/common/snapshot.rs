//! A snapshot of `n` ok checks of mixed kinds, as an agent holds between rounds: shared by
//! `examples/heartbeat_cost.rs` and `benches/micro.rs` (included with `#[path]`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use vigil::checks::{Status, Unit};
use vigil::lifecycle::{Lifecycle, LifecycleRecord};
use vigil::state::{CheckView, Hysteresis, Snapshot};

/// `n` checks, each ok with a value and a realistic message.
pub fn snapshot(n: usize) -> Snapshot {
    let kinds = [
        "disk",
        "process",
        "system",
        "postgres.replication",
        "backup.pgbackrest",
    ];
    let checks = (0..n)
        .map(|i| {
            let mut v = CheckView::pending(
                &format!("check-{i:02}"),
                kinds[i % kinds.len()],
                Unit::Ratio,
                Duration::from_secs(10),
                Duration::from_secs(3),
                false,
                Hysteresis::new(3, 3),
            );
            v.hysteresis.observe(Status::Ok);
            v.status = Status::Ok;
            v.value = Some(0.4321 + i as f64);
            v.message = format!("{}% used of /var/lib/postgresql/15/main", 43 + i);
            v.sampled_at = Some(SystemTime::now());
            Arc::new(v)
        })
        .collect();
    Snapshot {
        checks,
        lifecycle: LifecycleRecord {
            v: 1,
            state: Lifecycle::Available,
            reason: String::new(),
            changed_at: String::new(),
        },
        config_error: None,
        first_round_done: true,
    }
}
