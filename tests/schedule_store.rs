//! Scheduling against real servers: SecantusDB (MongoDB wire protocol,
//! started with scripts/secantus.sh on a free port) and Redis as the broker.
//!
//! Covers `om.jobs.schedule()` semantics (config['run-at'], PENDING trigger
//! replaced, history kept, base time from job_runs, path-level updates only),
//! the job listing `execute_scripts` uses, and `execute_scripts` firing:
//! the `run_omegaml_job` messages on the broker and the re-scheduled
//! triggers. Fails loudly when SecantusDB, the venv or Redis is missing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use mongodb::bson::{doc, Bson, Document};
use om_worker::broker::redis::{RedisBroker, RedisOptions};
use om_worker::broker::Broker;
use om_worker::protocol::{decode_task, Value};
use om_worker::schedule::{self, cron, ScheduleError};
use om_worker::store::{naive_as_bson, Store};
use om_worker::tasks::execute_scripts::{ExecuteScripts, Parent};

/// A free 127.0.0.1 port, picked once per test binary (a fixed port collides with any other
/// SecantusDB or mongod a developer runs).
fn port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free local port")
    })
}
const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Stops our SecantusDB when the test ends, however it ends.
struct Secantus;

impl Secantus {
    fn start() -> Secantus {
        let dir = root().join("target").join(format!("secantus-{}", port()));
        let out = Command::new(root().join("scripts/secantus.sh"))
            .args(["start", "--port", &port().to_string(), "--dir"])
            .arg(&dir)
            .output()
            .expect("scripts/secantus.sh runs");
        assert!(
            out.status.success(),
            "SecantusDB did not start on port {} (scripts/secantus.sh; needs the venv):\n{}\n{}",
            port(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Secantus
    }
}

impl Drop for Secantus {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/secantus.sh"))
            .args(["stop", "--port", &port().to_string()])
            .output();
    }
}

fn dt(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").expect("test datetime")
}

fn job_doc(name: &str, attributes: Document) -> Document {
    let now = naive_as_bson(dt("2024-01-01 09:00:00"));
    doc! {
        "name": name, "bucket": "omegaml", "prefix": "jobs/", "kind": "script.ipynb",
        "kind_meta": {}, "attributes": attributes, "s3file": {},
        "created": now, "modified": now,
    }
}

fn pending(run_at: &str) -> Document {
    schedule::scheduled_trigger(dt(run_at))
}

async fn attrs(db: &mongodb::Database, name: &str) -> Document {
    db.collection::<Document>("metadata")
        .find_one(doc! {"name": name})
        .await
        .expect("find")
        .expect("job exists")
        .get_document("attributes")
        .cloned()
        .expect("attributes")
}

fn triggers(a: &Document) -> Vec<Document> {
    a.get_array("triggers")
        .expect("triggers")
        .iter()
        .map(|t| t.as_document().expect("trigger doc").clone())
        .collect()
}

fn run_at_of(t: &Document) -> NaiveDateTime {
    schedule::bson_naive(*t.get_datetime("run-at").expect("run-at is a date"))
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_and_fire_against_secantusdb_and_redis() {
    let _server = Secantus::start();
    let dbname = format!(
        "omw_sched_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let url = format!("mongodb://127.0.0.1:{}/{dbname}", port());
    let store = Store::connect(&url, Duration::from_secs(10))
        .await
        .expect("connect");
    store.ping().await.expect("SecantusDB answers");
    let db = store.database().clone();
    let meta = db.collection::<Document>("metadata");

    let q_default = format!("omw-test-sched-{}", uuid::Uuid::new_v4().simple());
    let q_gpu = format!("omw-test-sched-gpu-{}", uuid::Uuid::new_v4().simple());
    meta.insert_many([
        job_doc("sched.ipynb", doc! {"job": {"status": "finished"}}),
        job_doc(
            ".hidden.ipynb",
            doc! {"require": {"label": &q_gpu}, "config": {"run-at": "0 * * * *"},
                  "triggers": [pending("2024-01-01 10:00:00")]},
        ),
        job_doc(
            "results/sched.ipynb_2024-01-01 10:00:00.ipynb",
            doc! {"triggers": [pending("2024-01-01 10:00:00")]},
        ),
        job_doc("_temp.ipynb", doc! {"triggers": [pending("2024-01-01 10:00:00")]}),
        job_doc(
            "broken.ipynb",
            doc! {"triggers": [{"event-kind": "scheduled", "event": "x", "run-at": "soon", "status": "PENDING"}]},
        ),
    ])
    .await
    .expect("insert jobs");

    // --- schedule(): never run -> base is utcnow
    let before = chrono::Utc::now().naive_utc();
    let job = schedule::schedule(&store, "omegaml", "sched", Some("*/5 * * * *"), None)
        .await
        .expect("schedule");
    assert_eq!(job.name, "sched.ipynb");
    assert!(job
        .metadata_repr()
        .starts_with("<Metadata: Metadata(name=sched.ipynb,bucket=omegaml,prefix=jobs/,kind=script.ipynb,created=2024-01-01 09:00:00)"));
    let a = attrs(&db, "sched.ipynb").await;
    assert_eq!(
        a.get_document("config").expect("config"),
        &doc! {"run-at": "*/5 * * * *"}
    );
    assert_eq!(
        a.get_document("job").expect("job untouched"),
        &doc! {"status": "finished"},
        "schedule must $set paths, not replace attributes"
    );
    let t = triggers(&a);
    assert_eq!(t.len(), 1);
    let next = run_at_of(&t[0]);
    assert_eq!(
        next,
        cron::next_after("*/5 * * * *", before).expect("cron"),
        "base is utcnow for a job that never ran"
    );
    assert_eq!(t[0].get_str("status"), Ok("PENDING"));
    assert_eq!(t[0].get_str("event-kind"), Ok("scheduled"));
    assert_eq!(
        t[0].get_str("event"),
        Ok(schedule::isoformat(next).as_str())
    );

    // --- schedule() again: base = job_runs[-1].ts, history kept, PENDING replaced
    meta.update_one(
        doc! {"name": "sched.ipynb"},
        doc! {"$set": {
            "attributes.job_runs": [{"status": "OK", "ts": naive_as_bson(dt("2024-01-01 10:02:30"))}],
            "attributes.triggers": [
                {"event-kind": "scheduled", "event": "old", "run-at": naive_as_bson(dt("2024-01-01 09:55:00")), "status": "OK"},
                pending("2024-01-01 09:59:00"),
            ],
        }},
    )
    .await
    .expect("update");
    schedule::schedule(&store, "omegaml", "sched.ipynb", None, None)
        .await
        .expect("schedule from config");
    let t = triggers(&attrs(&db, "sched.ipynb").await);
    assert_eq!(t.len(), 2, "{t:?}");
    assert_eq!(t[0].get_str("event"), Ok("old"));
    assert_eq!(run_at_of(&t[1]), dt("2024-01-01 10:05:00"));
    assert_eq!(t[1].get_str("event"), Ok("2024-01-01T10:05:00"));

    // --- errors as omega|ml raises them
    assert!(matches!(
        schedule::schedule(&store, "omegaml", "nope", Some("* * * * *"), None).await,
        Err(ScheduleError::NoSuchJob(_))
    ));
    assert!(matches!(
        schedule::schedule(&store, "omegaml", "_temp", None, None).await,
        Err(ScheduleError::NoRunAt)
    ));
    assert!(matches!(
        schedule::schedule(&store, "omegaml", "_temp", Some("0 0 30 2 *"), None).await,
        Err(ScheduleError::Cron(cron::CronError::NoNextDate(_)))
    ));

    // --- the listing execute_scripts sees
    let mut names: Vec<String> = store
        .list_schedule_jobs("omegaml")
        .await
        .expect("list")
        .into_iter()
        .map(|j| j.name)
        .collect();
    names.sort();
    assert_eq!(names, [".hidden.ipynb", "broken.ipynb", "sched.ipynb"]);

    // --- execute_scripts: nothing due before run-at
    let broker: Arc<dyn Broker> = Arc::new(
        RedisBroker::connect(REDIS_URL, RedisOptions::default())
            .await
            .expect("Redis broker at 127.0.0.1:6379"),
    );
    let task = ExecuteScripts::new(store.clone(), Arc::clone(&broker), q_default.clone());
    let early = task
        .fire_due("omegaml", Value::None, dt("2024-01-01 09:59:59"), None)
        .await
        .expect("fire");
    assert!(early.sent.is_empty(), "{:?}", early.sent);
    assert_eq!(early.problems.len(), 1, "the broken trigger is reported");

    // --- due: sched (default queue) and .hidden (its require label)
    let now = dt("2024-01-01 10:07:00");
    let parent = Parent {
        id: "exec-id".into(),
        root_id: "root-id".into(),
    };
    let report = task
        .fire_due("omegaml", Value::None, now, Some(parent))
        .await
        .expect("fire");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let mut sent: Vec<(String, String)> = report
        .sent
        .iter()
        .map(|s| (s.job.clone(), s.queue.clone()))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            (".hidden.ipynb".to_owned(), q_gpu.clone()),
            ("sched.ipynb".to_owned(), q_default.clone())
        ]
    );

    // re-scheduled with last_run=now; the fired PENDING trigger is gone
    let t = triggers(&attrs(&db, "sched.ipynb").await);
    assert_eq!(t.len(), 2, "{t:?}");
    assert_eq!(t[0].get_str("status"), Ok("OK"));
    assert_eq!(t[1].get_str("status"), Ok("PENDING"));
    assert_eq!(run_at_of(&t[1]), dt("2024-01-01 10:10:00"));
    let t = triggers(&attrs(&db, ".hidden.ipynb").await);
    assert_eq!(t.len(), 1);
    assert_eq!(run_at_of(&t[0]), dt("2024-01-01 11:00:00"));

    // the messages on the broker: run_omegaml_job(name, event=...)
    let mut rx = broker
        .consume(&[q_default.clone(), q_gpu.clone()], 10)
        .await
        .expect("consume");
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a run_omegaml_job message within 10 s")
            .expect("channel open");
        let msg = decode_task(&d.message).expect("decodes");
        d.acker.ack().await.expect("ack");
        assert_eq!(msg.name, "omegaml.notebook.tasks.run_omegaml_job");
        assert_eq!(msg.parent_id.as_deref(), Some("exec-id"));
        assert_eq!(msg.root_id.as_deref(), Some("root-id"));
        assert_eq!(msg.kwarg("timeout"), Some(&Value::None));
        assert_eq!(msg.kwarg("__bucket"), Some(&Value::None));
        assert_eq!(d.message.content_type.as_deref(), Some("application/json"));
        got.push((
            d.message.routing_key.clone(),
            msg.args.clone(),
            msg.kwarg("event").cloned(),
        ));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want = vec![
        (
            q_default.clone(),
            vec![Value::Str("sched.ipynb".into())],
            Some(Value::Str("2024-01-01T10:05:00".into())),
        ),
        (
            q_gpu.clone(),
            vec![Value::Str(".hidden.ipynb".into())],
            Some(Value::Str("2024-01-01T10:00:00".into())),
        ),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want);
    broker.stop_consuming().await.expect("stop");
    broker.close().await.expect("close");

    // --- NotebookTask.on_success for schedule_omegaml_job
    let id = store
        .schedule_job("omegaml", "sched")
        .await
        .expect("find")
        .expect("exists")
        .id;
    store
        .mark_schedule_task(
            id,
            "SUCCESS",
            "tid-1",
            Some(Bson::String("*/5 * * * *".into())),
        )
        .await
        .expect("mark");
    let a = attrs(&db, "sched.ipynb").await;
    assert_eq!(a.get_str("state"), Ok("SUCCESS"));
    assert_eq!(a.get_str("task_id"), Ok("tid-1"));
    assert_eq!(a.get_str("last_run_time"), Ok("*/5 * * * *"));
    assert!(!a.contains_key("next_run_time"));
    assert_eq!(a.get_document("job"), Ok(&doc! {"status": "finished"}));
    store
        .mark_schedule_task(id, "FAILURE", "tid-2", None)
        .await
        .expect("mark");
    let a = attrs(&db, "sched.ipynb").await;
    assert!(!a.contains_key("last_run_time"), "None is $unset");

    // cleanup: our database and the kombu bindings of our queues
    db.drop().await.expect("drop test db");
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    for q in [&q_default, &q_gpu] {
        let _: () = redis::cmd("DEL")
            .arg(q.as_str())
            .arg(format!("_kombu.binding.{q}"))
            .arg(format!("_kombu.binding_permanent.{q}"))
            .query_async(&mut con)
            .await
            .expect("del");
    }
}
