//! Where a task's time went, logged as one `task timings` line per task
//! (bench/ reads it from the JSON log).

use std::time::{Duration, Instant};

use tracing::info;

/// The steps of a delivery whose durations [`Timings`] records.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Ledger,
    Ack,
    Started,
    Run,
    Result,
    LedgerFinish,
}

/// Received → slot, then each [`Step`].
pub struct Timings {
    last: Instant,
    /// Received → slot acquired (ETA holds and queueing for a slot).
    wait_slot: Duration,
    steps: [Duration; 6],
}

impl Timings {
    /// Starts timing at the slot, for a message received at `received_at`.
    pub fn new(received_at: Instant) -> Self {
        let now = Instant::now();
        Timings {
            last: now,
            wait_slot: now - received_at,
            steps: [Duration::ZERO; 6],
        }
    }

    /// `step` ended now.
    pub fn mark(&mut self, step: Step) {
        let now = Instant::now();
        self.steps[step as usize] = now - self.last;
        self.last = now;
    }

    /// Logs the `task timings` line.
    pub fn log(&self, task_id: &str) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let [ledger, ack, started, run, result, ledger_finish] = self.steps.map(ms);
        info!(
            task_id,
            wait_slot_ms = ms(self.wait_slot),
            ledger_ms = ledger,
            ack_ms = ack,
            started_ms = started,
            run_ms = run,
            result_ms = result,
            ledger_finish_ms = ledger_finish,
            "task timings"
        );
    }
}
