//! A tick whose period follows what is under way (the epoch driver's loop, the cluster
//! leader's epoch tick): the next tick comes one period after the last one, so a loop that
//! wakes for other reasons does not move it, and a late tick is not made up for.

use std::time::Duration;
use tokio::time::{Instant, Sleep};

pub(crate) struct Ticker {
    last: Instant,
    sleep: std::pin::Pin<Box<Sleep>>,
}

impl Ticker {
    /// The first tick comes `period` from now (unless [`Ticker::arm`] changes it).
    pub(crate) fn new(period: Duration) -> Self {
        let last = Instant::now();
        Ticker {
            last,
            sleep: Box::pin(tokio::time::sleep_until(last + period)),
        }
    }

    /// The next tick comes `period` after the last one (from now on; call it before each wait).
    pub(crate) fn arm(&mut self, period: Duration) {
        let next = self.last + period;
        if self.sleep.deadline() != next {
            self.sleep.as_mut().reset(next);
        }
    }

    /// How long ago the last tick came.
    pub(crate) fn since_last(&self) -> Duration {
        self.last.elapsed()
    }

    /// Waits for the next tick (cancel-safe: `select!` may drop it), then counts from now.
    pub(crate) async fn tick(&mut self) {
        self.sleep.as_mut().await;
        self.last = Instant::now();
    }
}

/// The period, counted from a tick `since_last` ago, that makes the next tick come 1 ms
/// after `due_ms` (a time of the epoch clocks, whole ms, `now_ms` now; 0 or past: at once),
/// kept between `min` and `max`. An idle epoch loop sleeps until its interval's next epoch
/// is due this way, and no longer than `max`.
pub(crate) fn until_due(
    since_last: Duration,
    due_ms: Option<u64>,
    now_ms: u64,
    min: Duration,
    max: Duration,
) -> Duration {
    match due_ms {
        // 1 ms after: the epoch clocks count whole ms.
        Some(due) => {
            since_last + Duration::from_millis(due.saturating_sub(now_ms).saturating_add(1))
        }
        None => max,
    }
    .clamp(min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tick_comes_one_period_after_the_last_whatever_the_period_was() {
        let mut t = Ticker::new(Duration::from_millis(1));
        let first = t.last;
        // Re-armed before it fires: counted from the last tick, not from the arming.
        t.arm(Duration::from_millis(10));
        assert_eq!(t.sleep.deadline(), first + Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(3)).await;
        t.arm(Duration::from_millis(2));
        assert_eq!(t.sleep.deadline(), first + Duration::from_millis(2));
        // Already due: it comes at once, and the next counts from when it came.
        t.tick().await;
        assert!(t.last >= first + Duration::from_millis(3));
        t.arm(Duration::from_millis(10));
        assert_eq!(t.sleep.deadline(), t.last + Duration::from_millis(10));
        let due = t.sleep.deadline();
        t.tick().await;
        assert!(t.last >= due);
    }

    #[test]
    fn an_idle_loop_ticks_just_after_its_next_epoch_is_due_within_its_bounds() {
        let ms = Duration::from_millis;
        let (min, max) = (ms(1), ms(100));
        // Due in 30 ms, the last tick 5 ms ago: 36 ms after that tick (1 ms after the due time).
        assert_eq!(until_due(ms(5), Some(1_030), 1_000, min, max), ms(36));
        // Due now or overdue: 1 ms from now.
        assert_eq!(until_due(ms(5), Some(1_000), 1_000, min, max), ms(6));
        assert_eq!(until_due(ms(0), Some(900), 1_000, min, max), ms(1));
        // Before the first epoch (due 0): at once.
        assert_eq!(until_due(ms(0), Some(0), 1_000, min, max), min);
        // Far off, or nothing due: the longest period.
        assert_eq!(until_due(ms(5), Some(60_000), 1_000, min, max), max);
        assert_eq!(until_due(ms(5), None, 1_000, min, max), max);
    }
}
