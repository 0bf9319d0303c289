//! A one-shot alarm that wakes the runtime once, at its deadline.
//!
//! tokio's timer wheel files a deadline seconds away in a coarse level and wakes the
//! runtime at that level's slot boundaries to move it to a finer one, so a 15 s sleep
//! costs up to three wakeups. On an idle agent, where a round is a handful of short
//! checks, those were about a third of all wakeups (counted with `strace -f` on a round
//! of the side-by-side check set). A timerfd armed for the deadline is one epoll event
//! at the deadline, so the long sleeps (a check's next slot, the systemd status tick) use
//! one. Short timeouts stay on tokio's timer: they are cancelled before they cascade.
//!
//! Without a timerfd (the fd limit reached, no epoll reactor) an alarm falls back to
//! tokio's timer and behaves the same, only with the extra wakeups.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::time::TimeSpec;
use nix::sys::timer::{Expiration, TimerSetTimeFlags};
use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, sleep_until};

/// One timerfd, re-armed for each sleep. Dropping a sleep leaves it armed; the next
/// [`Alarm::sleep_until`] re-arms it (which clears any expiry) before waiting.
pub struct Alarm {
    fd: Option<AsyncFd<Timer>>,
}

/// A timerfd as tokio's reactor registers it (by raw fd).
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Alarm {
    /// A new alarm. Must be called inside a tokio runtime with I/O enabled.
    pub fn new() -> Self {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .ok()
        .and_then(|fd| {
            // SAFETY: `register_with_interest` needs the fd to stay open and the same while
            // registered: the TimerFd owns its descriptor from creation to drop and never
            // replaces it, and the AsyncFd owns the TimerFd for the registration's life.
            #[allow(unsafe_code)]
            let registered =
                unsafe { AsyncFd::register_with_interest(Timer(fd), Interest::READABLE) };
            registered.ok()
        });
        Alarm { fd }
    }

    /// Whether the timerfd is in use (false: tokio's timer is).
    #[cfg(test)]
    fn is_timerfd(&self) -> bool {
        self.fd.is_some()
    }

    /// Returns at `deadline`, at once if it has passed. Cancel-safe: dropping the future
    /// just abandons this sleep.
    pub async fn sleep_until(&mut self, deadline: Instant) {
        let Some(fd) = &self.fd else {
            return sleep_until(deadline).await;
        };
        // tokio's Instant is CLOCK_MONOTONIC, the timerfd's clock: a relative expiry from
        // now lands on the deadline (to the microsecond it took to get here).
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let armed = fd.get_ref().0.set(
            Expiration::OneShot(TimeSpec::from_duration(left)),
            TimerSetTimeFlags::empty(),
        );
        if armed.is_err() {
            return sleep_until(deadline).await;
        }
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return sleep_until(deadline).await;
            };
            // The read takes the expiry. EAGAIN (readiness left over from an earlier,
            // abandoned sleep) clears the readiness and waits again.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(Ok(())) => return,
                Ok(Err(_)) => return sleep_until(deadline).await,
                Err(_would_block) => {}
            }
        }
    }
}

impl Default for Alarm {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_at_the_deadline_not_before() {
        let mut alarm = Alarm::new();
        assert!(alarm.is_timerfd());
        for ms in [30u64, 1, 80] {
            let start = Instant::now();
            let deadline = start + Duration::from_millis(ms);
            alarm.sleep_until(deadline).await;
            let woke = Instant::now();
            assert!(woke >= deadline, "woke {:?} early", deadline - woke);
            // Generous: a loaded CI machine may run us late, never early.
            assert!(
                woke - deadline < Duration::from_secs(2),
                "woke {:?} late",
                woke - deadline
            );
        }
    }

    #[tokio::test]
    async fn a_past_deadline_returns_at_once() {
        let mut alarm = Alarm::new();
        let past = Instant::now() - Duration::from_secs(1);
        tokio::time::timeout(Duration::from_secs(5), alarm.sleep_until(past))
            .await
            .expect("a past deadline must not wait");
    }

    #[tokio::test]
    async fn an_abandoned_sleep_does_not_end_the_next_one_early() {
        let mut alarm = Alarm::new();
        // Armed for 20 ms, then dropped at 1 ms: its expiry fires with nobody waiting.
        let short = Instant::now() + Duration::from_millis(20);
        let _ = tokio::time::timeout(Duration::from_millis(1), alarm.sleep_until(short)).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        // The leftover readiness must not end this sleep before its own deadline.
        let deadline = Instant::now() + Duration::from_millis(150);
        alarm.sleep_until(deadline).await;
        assert!(Instant::now() >= deadline);
    }

    #[tokio::test]
    async fn many_alarms_each_wake_on_their_own_deadline() {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..20u64 {
            tasks.push(tokio::spawn(async move {
                let mut alarm = Alarm::new();
                let deadline = start + Duration::from_millis(10 * i);
                alarm.sleep_until(deadline).await;
                Instant::now() >= deadline
            }));
        }
        for t in tasks {
            assert!(
                t.await.expect("alarm task"),
                "an alarm woke before its deadline"
            );
        }
    }
}
