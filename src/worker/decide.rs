//! What happens to one delivery, decided without I/O.
//!
//! Each stage of the pipeline ([`super::delivery`]) asks one of these
//! functions and gets back a decision: run on, wait, or end the delivery with
//! a [`Verdict`] — the state the client is told (if any) and how the message
//! is settled. Keeping the decisions pure makes Celery's rules (expiry,
//! revoke, ETA, unknown tasks, malformed bodies, what a run stores) testable
//! on their own; the pipeline only applies them.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{error, warn};

use crate::backend::ReplyTarget;
use crate::config::UnknownTaskPolicy;
use crate::protocol::message::{peek_task_id, peek_task_name};
use crate::protocol::{decode_task, ExceptionInfo, RawMessage, ResultMeta, TaskMessage, Value};
use crate::tasks::{ErrorKind, Output, Task, TaskError};

/// How a message is settled on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with it for good.
    Ack,
    /// Rejected without requeue: dead-lettered where the queue has a DLX,
    /// else dropped by the broker. Only after the client was told why.
    Reject,
    /// Back onto its queue now (another worker, or this one later, takes it).
    Requeue,
    /// Left unsettled: the broker returns it to its queue when the connection
    /// closes (warm shutdown, a lost channel whose ack already failed).
    Leave,
}

/// How a delivery ends without running its task.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The state stored for the client first, and where it goes.
    pub report: Option<(ResultMeta, ReplyTarget)>,
    /// Then the settlement.
    pub settle: Settle,
}

impl Verdict {
    /// Settle without telling the client anything.
    pub fn settle(settle: Settle) -> Self {
        Verdict {
            report: None,
            settle,
        }
    }
}

fn target(msg: &TaskMessage) -> ReplyTarget {
    ReplyTarget {
        reply_to: msg.reply_to.clone(),
    }
}

/// Stage 1: the body. A message that is not a valid task gets a FAILURE when
/// its id can still be read, and is rejected without requeue so it can never
/// loop.
// The Ok variant (a whole TaskMessage) is larger still; nothing to gain by boxing.
#[allow(clippy::result_large_err)]
pub fn decode(raw: &RawMessage) -> Result<TaskMessage, Verdict> {
    let e = match decode_task(raw) {
        Ok(msg) => return Ok(msg),
        Err(e) => e,
    };
    let id = peek_task_id(raw);
    let name = peek_task_name(raw);
    error!(
        task_id = id.as_deref().unwrap_or("?"),
        task = name.as_deref().unwrap_or("?"),
        queue = %raw.routing_key,
        content_type = raw.content_type.as_deref().unwrap_or("?"),
        "rejecting malformed message: {e}"
    );
    let report = id.map(|id| {
        let target = ReplyTarget {
            reply_to: raw.reply_to.clone(),
        };
        (ResultMeta::failure(&id, e.exception(), None), target)
    });
    Err(Verdict {
        report,
        settle: Settle::Reject,
    })
}

/// What stage 2 found for the task name.
pub enum Route {
    /// A task this worker runs.
    Run(Arc<dyn Task>),
    /// Not registered here: pass the message on to this queue, unchanged.
    Forward(String),
    /// Not registered here: the delivery ends.
    End(Verdict),
}

/// Stage 2: the task name, as the registry resolved it (`task`). Unknown
/// names fail with Celery's `NotRegistered` (and the message is rejected) or
/// are forwarded, as `--unknown-tasks` says.
pub fn route(
    msg: &TaskMessage,
    queue: &str,
    task: Option<Arc<dyn Task>>,
    policy: &UnknownTaskPolicy,
) -> Route {
    if let Some(task) = task {
        return Route::Run(task);
    }
    match policy {
        UnknownTaskPolicy::Fail => {
            error!(
                task_id = %msg.id, queue = %queue,
                "received unregistered task {:?}; failing it (NotRegistered)", msg.name
            );
            let meta = ResultMeta::failure(&msg.id, ExceptionInfo::not_registered(&msg.name), None);
            Route::End(Verdict {
                report: Some((meta, target(msg))),
                settle: Settle::Reject,
            })
        }
        UnknownTaskPolicy::Forward(q) => Route::Forward(q.clone()),
    }
}

/// Which canvas fields (`callbacks`, `errbacks`, `chain`, `chord`) the
/// message carries, empty ones left out.
pub fn canvas(msg: &TaskMessage) -> Vec<&'static str> {
    ["callbacks", "errbacks", "chain", "chord"]
        .into_iter()
        .filter(|k| match msg.embed.get(k) {
            None | Some(Value::None) => false,
            Some(Value::List(v)) | Some(Value::Tuple(v)) => !v.is_empty(),
            Some(_) => true,
        })
        .collect()
}

/// Stage 2b: Celery canvas for a task that cannot run it (one of om-worker's
/// own, with no Python task of that name to run it instead). A message carrying
/// callbacks (`link`), errbacks (`link_error`), a `chain` or a `chord`
/// would have them silently dropped if only its task ran, so it is failed
/// (`NotImplementedError`, which the client re-raises) and rejected instead.
pub fn unsupported_canvas(msg: &TaskMessage) -> Option<Verdict> {
    let present = canvas(msg);
    (!present.is_empty()).then(|| canvas_refusal(msg, &present))
}

/// The refusal of [`unsupported_canvas`] for the `present` canvas fields.
pub fn canvas_refusal(msg: &TaskMessage, present: &[&str]) -> Verdict {
    let what = present.join(", ");
    error!(
        task_id = %msg.id, task = %msg.name,
        "message carries Celery canvas ({what}) for a task that cannot run it; failing it"
    );
    let exc = ExceptionInfo::new(
        "builtins",
        "NotImplementedError",
        format!(
            "om-worker runs Celery canvas only in omega|ml's Python tasks, and its kernel \
             Python has no task {:?} (this message carries: {what}); send it to a queue \
             served by a Python worker",
            msg.name
        ),
    );
    Verdict {
        report: Some((ResultMeta::failure(&msg.id, exc, None), target(msg))),
        settle: Settle::Reject,
    }
}

/// What stage 3 decided about running now.
#[derive(Debug, Clone)]
pub enum Admit {
    /// Run it (once a slot is free).
    Now,
    /// Its ETA is this far ahead: hold it unacked until then.
    HoldFor(Duration),
    /// Expired before it could run: REVOKED("expired"), acked, as Celery does.
    Expired(Verdict),
    /// Revoked by remote control: REVOKED("revoked"), acked, as Celery does.
    Revoked(Verdict),
}

/// Stage 3, on receipt and again when an ETA hold ends: expiry first, then
/// revoke, then the ETA (Celery's `Request` order).
pub fn admit(msg: &TaskMessage, now: DateTime<Utc>, revoked: bool) -> Admit {
    if let Some(expires) = msg.expires.filter(|e| now > *e) {
        warn!(task_id = %msg.id, task = %msg.name, "expired at {expires}; revoked");
        return Admit::Expired(revoked_verdict(msg, "expired"));
    }
    if revoked {
        return Admit::Revoked(revoked_by_control(msg));
    }
    match msg.eta.map(|eta| (eta - now).to_std()) {
        Some(Ok(wait)) if !wait.is_zero() => Admit::HoldFor(wait),
        _ => Admit::Now,
    }
}

/// The verdict for a task revoked by remote control before it started.
pub fn revoked_by_control(msg: &TaskMessage) -> Verdict {
    warn!(task_id = %msg.id, task = %msg.name, "revoked by remote control; not running it");
    revoked_verdict(msg, "revoked")
}

fn revoked_verdict(msg: &TaskMessage, reason: &str) -> Verdict {
    Verdict {
        report: Some((ResultMeta::revoked(&msg.id, reason), target(msg))),
        settle: Settle::Ack,
    }
}

/// Last stage: what a finished run stores. SUCCESS unless the client asked to
/// ignore results; a FAILURE always (Celery's `store_errors_even_if_ignored`,
/// as omega|ml configures it); RETRY for a task that republished itself;
/// nothing for `Reject`/`Ignore`; REVOKED("terminated") when
/// `revoke(terminate=True)` stopped the run, whatever the task returned.
pub fn outcome_report(
    msg: &TaskMessage,
    outcome: Result<Output, TaskError>,
    terminated: bool,
) -> Option<ResultMeta> {
    if terminated {
        return Some(ResultMeta::revoked(&msg.id, "terminated"));
    }
    match outcome {
        Ok(_) if msg.ignore_result == Some(true) => None,
        Ok(Output::Value(value)) => Some(ResultMeta::success(&msg.id, value)),
        Ok(Output::Serialized(value)) => Some(ResultMeta::success_serialized(&msg.id, value)),
        Err(err) => match err.kind {
            ErrorKind::Failure => Some(ResultMeta::failure(&msg.id, err.exception, err.traceback)),
            ErrorKind::Retry => Some(ResultMeta::retry(&msg.id, err.exception, err.traceback)),
            ErrorKind::Rejected | ErrorKind::Ignored => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::State;

    fn msg() -> TaskMessage {
        TaskMessage {
            id: "t1".into(),
            name: "omegaml.tasks.omega_ping".into(),
            args: vec![],
            kwargs: vec![],
            embed: Value::None,
            reply_to: Some("reply-q".into()),
            eta: None,
            expires: None,
            hard_time_limit: None,
            soft_time_limit: None,
            retries: 0,
            root_id: None,
            parent_id: None,
            group: None,
            group_index: None,
            ignore_result: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: None,
            shadow: None,
            protocol: 2,
        }
    }

    fn status(v: &Verdict) -> Option<State> {
        v.report.as_ref().map(|(m, _)| m.status)
    }

    #[test]
    fn expiry_wins_over_revoke_and_eta() {
        let now = Utc::now();
        let mut m = msg();
        m.expires = Some(now - chrono::Duration::seconds(1));
        m.eta = Some(now + chrono::Duration::seconds(60));
        let Admit::Expired(v) = admit(&m, now, true) else {
            panic!("expected Expired");
        };
        assert_eq!(v.settle, Settle::Ack);
        assert_eq!(status(&v), Some(State::Revoked));
        let (meta, target) = v.report.expect("report");
        assert_eq!(
            meta.result.repr(),
            ExceptionInfo::revoked("expired").to_value().repr()
        );
        assert_eq!(target.reply_to.as_deref(), Some("reply-q"));
    }

    #[test]
    fn revoke_before_eta_then_eta_hold_then_now() {
        let now = Utc::now();
        let mut m = msg();
        m.eta = Some(now + chrono::Duration::seconds(30));
        assert!(matches!(admit(&m, now, true), Admit::Revoked(v) if v.settle == Settle::Ack));
        match admit(&m, now, false) {
            Admit::HoldFor(d) => assert_eq!(d, Duration::from_secs(30)),
            other => panic!("expected HoldFor, got {other:?}"),
        }
        // At (or after) the ETA, and for a past ETA: run now.
        assert!(matches!(
            admit(&m, now + chrono::Duration::seconds(30), false),
            Admit::Now
        ));
        m.eta = Some(now - chrono::Duration::seconds(5));
        assert!(matches!(admit(&m, now, false), Admit::Now));
        // Not yet expired: runs.
        m.expires = Some(now + chrono::Duration::seconds(5));
        assert!(matches!(admit(&m, now, false), Admit::Now));
    }

    #[test]
    fn unknown_task_fails_or_forwards() {
        let m = msg();
        match route(&m, "q", None, &UnknownTaskPolicy::Fail) {
            Route::End(v) => {
                assert_eq!(v.settle, Settle::Reject);
                let (meta, _) = v.report.expect("a FAILURE for the client");
                assert_eq!(meta.status, State::Failure);
                assert!(
                    meta.result.repr().contains("NotRegistered"),
                    "{}",
                    meta.result.repr()
                );
            }
            _ => panic!("expected End"),
        }
        assert!(matches!(
            route(&m, "q", None, &UnknownTaskPolicy::Forward("other".into())),
            Route::Forward(q) if q == "other"
        ));
        let ping = crate::tasks::Registry::builtin().get(&m.name);
        assert!(matches!(
            route(&m, "q", ping, &UnknownTaskPolicy::Fail),
            Route::Run(_)
        ));
    }

    #[test]
    fn malformed_with_and_without_an_id() {
        let mut raw = RawMessage {
            body: b"{not json".to_vec(),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            reply_to: Some("r".into()),
            ..RawMessage::default()
        };
        let v = decode(&raw).expect_err("malformed");
        assert_eq!(v.settle, Settle::Reject);
        assert!(v.report.is_none(), "no id, nobody to tell");
        raw.correlation_id = Some("abc".into());
        raw.headers.insert("id".into(), Value::from("abc"));
        let v = decode(&raw).expect_err("malformed");
        assert_eq!(v.settle, Settle::Reject);
        let (meta, target) = v.report.expect("FAILURE for abc");
        assert_eq!(
            (meta.task_id.as_str(), meta.status),
            ("abc", State::Failure)
        );
        assert_eq!(target.reply_to.as_deref(), Some("r"));
    }

    #[test]
    fn canvas_is_refused_not_dropped() {
        let mut m = msg();
        m.embed = Value::dict([
            ("callbacks", Value::None),
            ("errbacks", Value::None),
            ("chain", Value::None),
            ("chord", Value::None),
        ]);
        assert!(unsupported_canvas(&m).is_none(), "no canvas");
        m.embed = Value::dict([("chain", Value::List(vec![]))]);
        assert!(unsupported_canvas(&m).is_none(), "an empty chain");
        m.embed = Value::dict([
            (
                "chain",
                Value::List(vec![Value::dict([("task", Value::from("x"))])]),
            ),
            (
                "callbacks",
                Value::List(vec![Value::dict([("task", Value::from("y"))])]),
            ),
        ]);
        let v = unsupported_canvas(&m).expect("refused");
        assert_eq!(v.settle, Settle::Reject);
        let (meta, _) = v.report.expect("FAILURE");
        assert_eq!(meta.status, State::Failure);
        let r = meta.result.repr();
        assert!(
            r.contains("NotImplementedError") && r.contains("callbacks, chain"),
            "{r}"
        );
    }

    #[test]
    fn outcome_reports() {
        let mut m = msg();
        let ok = || Ok(Output::from(Value::from("pong")));
        let failed = || Err(TaskError::type_error("bad"));
        assert_eq!(
            outcome_report(&m, ok(), false).map(|r| r.status),
            Some(State::Success)
        );
        assert_eq!(
            outcome_report(&m, failed(), false).map(|r| r.status),
            Some(State::Failure)
        );
        assert_eq!(
            outcome_report(&m, ok(), true).map(|r| r.status),
            Some(State::Revoked)
        );
        m.ignore_result = Some(true);
        assert!(outcome_report(&m, ok(), false).is_none(), "ignored result");
        assert_eq!(
            outcome_report(&m, failed(), false).map(|r| r.status),
            Some(State::Failure),
            "errors are stored even when results are ignored"
        );
    }

    #[test]
    fn retry_is_stored_reject_and_ignore_are_not() {
        let m = msg();
        let ended = |kind| {
            Err(TaskError {
                kind,
                ..TaskError::new("builtins", "RuntimeError", "again")
            })
        };
        let retry = outcome_report(&m, ended(ErrorKind::Retry), false).expect("stored");
        assert_eq!(retry.status, State::Retry);
        assert!(retry.date_done.is_none(), "RETRY is not a ready state");
        assert!(
            retry.result.repr().contains("RuntimeError"),
            "the cause is kept"
        );
        assert!(outcome_report(&m, ended(ErrorKind::Rejected), false).is_none());
        assert!(outcome_report(&m, ended(ErrorKind::Ignored), false).is_none());
        assert_eq!(
            outcome_report(&m, ended(ErrorKind::Retry), true).map(|r| r.status),
            Some(State::Revoked),
            "a terminated run is REVOKED whatever it ended with"
        );
    }

    #[test]
    fn canvas_lists_the_fields_present() {
        let mut m = msg();
        assert!(canvas(&m).is_empty());
        m.embed = Value::dict([
            ("callbacks", Value::None),
            ("errbacks", Value::List(vec![])),
            ("chain", Value::List(vec![Value::from("x")])),
            ("chord", Value::from("body")),
        ]);
        assert_eq!(canvas(&m), vec!["chain", "chord"]);
    }
}
