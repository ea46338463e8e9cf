//! An in-memory [`Ledger`] for tests of the worker's own decisions: records
//! who holds which task, and can be switched "down" as an unreachable
//! MongoDB would be. The real ledger is tested against SecantusDB.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Begin, Ledger, LedgerError};
use crate::protocol::RawMessage;

#[derive(Default)]
struct State {
    /// task id → owner.
    records: HashMap<String, String>,
    down: bool,
    begins: usize,
    renewals: usize,
    finished: Vec<String>,
}

struct Inner {
    owner: String,
    lease: Duration,
    state: Mutex<State>,
    changed: Notify,
}

/// The in-memory ledger of the worker `owner`. Clones share one store.
#[derive(Clone)]
pub struct MemoryLedger {
    inner: Arc<Inner>,
}

impl MemoryLedger {
    /// An empty ledger for `owner` with leases of `lease`.
    pub fn new(owner: &str, lease: Duration) -> Self {
        MemoryLedger {
            inner: Arc::new(Inner {
                owner: owner.to_owned(),
                lease,
                state: Mutex::default(),
                changed: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `task_id` as held by another worker, `owner`.
    pub fn hold(&self, task_id: &str, owner: &str) {
        self.lock()
            .records
            .insert(task_id.to_owned(), owner.to_owned());
    }

    /// Whether a record for `task_id` exists.
    pub fn contains(&self, task_id: &str) -> bool {
        self.lock().records.contains_key(task_id)
    }

    /// While down, every call fails as with an unreachable MongoDB.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
        self.inner.changed.notify_waiters();
    }

    /// `begin` calls so far, failed ones included.
    pub fn begins(&self) -> usize {
        self.lock().begins
    }

    /// Successful `renew` calls so far.
    pub fn renewals(&self) -> usize {
        self.lock().renewals
    }

    /// Task ids finished so far, in order.
    pub fn finished(&self) -> Vec<String> {
        self.lock().finished.clone()
    }

    /// Waits until `done` holds (checked after every call).
    pub async fn wait_until(&self, done: impl Fn(&MemoryLedger) -> bool) {
        loop {
            let changed = self.inner.changed.notified();
            if done(self) {
                return;
            }
            changed.await;
        }
    }

    fn call<T>(&self, op: &'static str, f: impl FnOnce(&mut State) -> T) -> Result<T, LedgerError> {
        let r = {
            let mut st = self.lock();
            if op == "begin" {
                st.begins += 1;
            }
            if st.down {
                Err(LedgerError::Unavailable {
                    op,
                    reason: "memory ledger is down".into(),
                })
            } else {
                Ok(f(&mut st))
            }
        };
        self.inner.changed.notify_waiters();
        r
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn begin(&self, task_id: &str, _raw: &RawMessage) -> Result<Begin, LedgerError> {
        let owner = self.inner.owner.clone();
        self.call("begin", |st| match st.records.get(task_id) {
            Some(holder) if *holder != owner => Begin::HeldBy(holder.clone()),
            _ => {
                st.records.insert(task_id.to_owned(), owner);
                Begin::Run
            }
        })
    }

    async fn renew(&self, task_id: &str) -> Result<bool, LedgerError> {
        let owner = self.inner.owner.clone();
        self.call("renew", |st| {
            let ours = st.records.get(task_id) == Some(&owner);
            if ours {
                st.renewals += 1;
            }
            ours
        })
    }

    async fn finish(&self, task_id: &str) -> Result<(), LedgerError> {
        let owner = self.inner.owner.clone();
        self.call("finish", |st| {
            if st.records.get(task_id) == Some(&owner) {
                st.records.remove(task_id);
                st.finished.push(task_id.to_owned());
            }
        })
    }

    fn lease(&self) -> Duration {
        self.inner.lease
    }
}
