//! GPU slot assignment and the worker state remote control reads: slot
//! numbers of concurrent runs never collide, so neither do their GPUs;
//! revoke wakes held requests and terminates running ones.

use std::sync::Arc;

use om_worker::cli::WorkerFlags;
use om_worker::config::{Config, FileConfig};
use om_worker::control::commands::{self, Context};
use om_worker::control::state::{Phase, WorkerState};
use om_worker::protocol::{decode_task, Headers, RawMessage, TaskMessage, Value};
use om_worker::tasks::{gpu_env_for_slot, CancelReason, TaskContext};
use tokio_util::sync::CancellationToken;

fn gpus(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn slot_i_gets_gpu_i_mod_n() {
    let two = gpus(&["0", "1"]);
    assert_eq!(gpu_env_for_slot(&two, 0).as_deref(), Some("0"));
    assert_eq!(gpu_env_for_slot(&two, 1).as_deref(), Some("1"));
    assert_eq!(gpu_env_for_slot(&two, 2).as_deref(), Some("0"));
    assert_eq!(gpu_env_for_slot(&two, 5).as_deref(), Some("1"));
    let uuids = gpus(&["GPU-aaa", "GPU-bbb", "GPU-ccc"]);
    assert_eq!(gpu_env_for_slot(&uuids, 4).as_deref(), Some("GPU-bbb"));
    assert_eq!(gpu_env_for_slot(&[], 3), None);
    // N slots on N GPUs: all distinct.
    let four = gpus(&["0", "1", "2", "3"]);
    let mut seen: Vec<String> = (0..4).filter_map(|s| gpu_env_for_slot(&four, s)).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4);
}

fn resolve(flag: Option<&str>, cuda: Option<&str>) -> Config {
    let flags = WorkerFlags {
        gpus: flag.map(str::to_owned),
        ..Default::default()
    };
    let cuda = cuda.map(str::to_owned);
    let env = move |k: &str| {
        if k == "CUDA_VISIBLE_DEVICES" {
            cuda.clone()
        } else {
            None
        }
    };
    Config::resolve(&flags, &env, &FileConfig::default(), "h").expect("resolves")
}

#[test]
fn gpus_flag_and_auto() {
    assert!(resolve(None, Some("0,1")).gpus.is_empty(), "off by default");
    assert_eq!(resolve(Some("0, 1"), None).gpus, gpus(&["0", "1"]));
    assert_eq!(resolve(Some("auto"), Some("2,3")).gpus, gpus(&["2", "3"]));
    assert!(resolve(Some("auto"), None).gpus.is_empty());
    assert!(resolve(Some("auto"), Some("")).gpus.is_empty());
}

fn task(id: &str, eta: Option<&str>) -> (TaskMessage, RawMessage) {
    let mut headers = Headers::new();
    headers.insert("task".into(), Value::Str("omegaml.tasks.omega_ping".into()));
    headers.insert("id".into(), Value::Str(id.into()));
    if let Some(eta) = eta {
        headers.insert("eta".into(), Value::Str(eta.into()));
    }
    let raw = RawMessage {
        body: br#"[[1, 2], {"a": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
            .to_vec(),
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        headers,
        correlation_id: Some(id.into()),
        reply_to: None,
        priority: Some(0),
        delivery_mode: Some(2),
        expiration: None,
        redelivered: false,
        exchange: String::new(),
        routing_key: "q1".into(),
        transport_error: None,
    };
    (decode_task(&raw).expect("valid task"), raw)
}

fn state(concurrency: usize) -> Arc<WorkerState> {
    Arc::new(WorkerState::new(
        "w1@h",
        &["q1".to_owned()],
        concurrency,
        8,
        (10.0, 40.0),
        "amqp://guest:secret@127.0.0.1:5672//",
    ))
}

fn ctx(state: &WorkerState, slot: usize) -> TaskContext {
    TaskContext {
        nodename: state.nodename.clone(),
        cancel: CancellationToken::new(),
        cancel_reason: Arc::default(),
        delivery: Default::default(),
        soft_time_limit: None,
        slot,
        gpus: gpus(&["0", "1"]),
        teardown: Default::default(),
    }
}

#[test]
fn concurrent_slots_are_distinct_and_reused() {
    let st = state(2);
    let (m1, r1) = task("t1", None);
    let (m2, r2) = task("t2", None);
    let mut g1 = st.received(&m1, &r1);
    let mut g2 = st.received(&m2, &r2);
    let s1 = g1.start();
    let s2 = g2.start();
    assert_ne!(s1, s2);
    assert!(s1 < 2 && s2 < 2);
    assert_ne!(
        gpu_env_for_slot(&gpus(&["0", "1"]), s1),
        gpu_env_for_slot(&gpus(&["0", "1"]), s2)
    );
    drop(g1);
    let (m3, r3) = task("t3", None);
    let mut g3 = st.received(&m3, &r3);
    assert_eq!(g3.start(), s1, "a freed slot is reused");
    assert_eq!(st.infos(|p| matches!(p, Phase::Active(_)), false).len(), 2);
    drop(g2);
    drop(g3);
    assert!(
        st.infos(|_| true, false).is_empty(),
        "guards remove requests"
    );
}

#[tokio::test]
async fn revoke_wakes_held_and_terminates_running() {
    let st = state(1);
    let (held, raw_held) = task("held", Some("2999-01-01T00:00:00+00:00"));
    let g = st.received(&held, &raw_held);
    g.scheduled(held.eta.expect("eta"));
    assert_eq!(st.scheduled().len(), 1);
    let (run, raw_run) = task("run", None);
    let mut r = st.received(&run, &raw_run);
    let slot = r.start();
    let c = ctx(&st, slot);
    r.running(&c);

    let terminated = st.revoke(&["held".into(), "run".into()], true);
    assert_eq!(terminated, vec!["run".to_owned()]);
    tokio::time::timeout(std::time::Duration::from_secs(1), g.interrupted())
        .await
        .expect("held request woken");
    assert!(st.is_revoked("held"));
    assert!(c.cancel.is_cancelled());
    assert_eq!(c.cancelled_because(), Some(CancelReason::Revoked));
    assert!(r.terminated());
    assert!(!g.terminated());
    let mut ids = st.revoked_ids();
    ids.sort();
    assert_eq!(ids, vec!["held".to_owned(), "run".to_owned()]);
}

#[tokio::test]
async fn command_payloads() {
    // A broker is never touched by these commands.
    struct NoBroker;
    #[async_trait::async_trait]
    impl om_worker::broker::Broker for NoBroker {
        async fn consume(
            &self,
            _: &[String],
            _: u16,
        ) -> Result<
            tokio::sync::mpsc::Receiver<om_worker::broker::Delivery>,
            om_worker::broker::BrokerError,
        > {
            Err(om_worker::broker::BrokerError::Operation("none".into()))
        }
        async fn stop_consuming(&self) -> Result<(), om_worker::broker::BrokerError> {
            Ok(())
        }
        async fn publish(
            &self,
            _: &str,
            _: &str,
            _: om_worker::protocol::Outgoing,
        ) -> Result<(), om_worker::broker::BrokerError> {
            Ok(())
        }
        async fn declare_queue(&self, _: &str) -> Result<(), om_worker::broker::BrokerError> {
            Ok(())
        }
        async fn close(&self) -> Result<(), om_worker::broker::BrokerError> {
            Ok(())
        }
    }
    let st = state(3);
    let ctx = Context {
        broker: Arc::new(NoBroker),
        state: Arc::clone(&st),
        registered: Arc::new(|| vec!["omegaml.tasks.omega_ping".into()]),
    };
    let none = Value::dict::<&str>([]);
    let d = |m: &'static str, a: Value| {
        let ctx = &ctx;
        async move { commands::dispatch(ctx, m, &a).await }
    };
    assert_eq!(
        d("ping", none.clone()).await,
        Some(serde_json::json!({"ok": "pong"}))
    );
    let stats = d("stats", none.clone()).await.expect("reply");
    assert_eq!(stats["pool"]["max-concurrency"], 3);
    assert_eq!(stats["pool"]["processes"].as_array().map(Vec::len), Some(3));
    assert!(stats["clock"].is_string());
    assert!(!stats.to_string().contains("secret"));
    let q = d("active_queues", none.clone()).await.expect("reply");
    assert_eq!(q[0]["name"], "q1");
    assert_eq!(q[0]["exchange"]["type"], "direct");
    let rv = d(
        "revoke",
        Value::dict([("task_id", Value::Str("abc".into()))]),
    )
    .await
    .expect("reply");
    assert_eq!(
        rv,
        serde_json::json!({"ok": "tasks {'abc'} flagged as revoked"})
    );
    assert!(st.is_revoked("abc"));
    assert_eq!(
        d("nope", none.clone()).await,
        Some(serde_json::json!({"error": "KeyError('nope')"}))
    );
    // Wrong argument types are answered, not a crash.
    let bad = d("revoke", Value::dict([("task_id", Value::Int(3))]))
        .await
        .expect("reply");
    assert!(bad.get("error").is_some());
    let bad = d("add_consumer", Value::Int(1)).await.expect("reply");
    assert!(bad.get("error").is_some());
    // add_consumer on a broker without runtime queues: an error reply, queue list unchanged.
    let r = d(
        "add_consumer",
        Value::dict([("queue", Value::Str("q2".into()))]),
    )
    .await
    .expect("reply");
    assert!(r.get("error").is_some());
    assert_eq!(st.queues(), vec!["q1".to_owned()]);
    assert_eq!(d("shutdown", none.clone()).await, None);
}

/// A broker that records the prefetch remote control asks for.
#[derive(Default)]
struct PrefetchBroker(std::sync::Mutex<Vec<u16>>);

#[async_trait::async_trait]
impl om_worker::broker::Broker for PrefetchBroker {
    async fn consume(
        &self,
        _: &[String],
        _: u16,
    ) -> Result<
        tokio::sync::mpsc::Receiver<om_worker::broker::Delivery>,
        om_worker::broker::BrokerError,
    > {
        Err(om_worker::broker::BrokerError::Operation("none".into()))
    }
    async fn stop_consuming(&self) -> Result<(), om_worker::broker::BrokerError> {
        Ok(())
    }
    async fn set_prefetch(&self, prefetch: u16) -> Result<(), om_worker::broker::BrokerError> {
        self.0.lock().expect("lock").push(prefetch);
        Ok(())
    }
    async fn publish(
        &self,
        _: &str,
        _: &str,
        _: om_worker::protocol::Outgoing,
    ) -> Result<(), om_worker::broker::BrokerError> {
        Ok(())
    }
    async fn declare_queue(&self, _: &str) -> Result<(), om_worker::broker::BrokerError> {
        Ok(())
    }
    async fn close(&self) -> Result<(), om_worker::broker::BrokerError> {
        Ok(())
    }
}

fn args<const N: usize>(items: [(&str, Value); N]) -> Value {
    Value::dict(items)
}

fn s(x: &str) -> Value {
    Value::Str(x.into())
}

#[tokio::test]
async fn pool_limit_and_info_commands_answer_as_celery() {
    let broker = Arc::new(PrefetchBroker::default());
    let st = state(2); // prefetch multiplier 8
    let ctx = Context {
        broker: Arc::clone(&broker) as Arc<dyn om_worker::broker::Broker>,
        state: Arc::clone(&st),
        registered: Arc::new(|| {
            vec![
                "omegaml.tasks.omega_ping".into(),
                "om_test_tasks.tasks.add".into(),
            ]
        }),
    };
    let d = |m: &'static str, a: Value| {
        let ctx = &ctx;
        async move { commands::dispatch(ctx, m, &a).await.expect("a reply") }
    };

    // pool_grow / pool_shrink: the slots and the prefetch follow.
    assert_eq!(
        d("pool_grow", args([("n", Value::Int(2))])).await,
        serde_json::json!({"ok": "pool will grow"})
    );
    assert_eq!(st.concurrency(), 4);
    assert_eq!(st.slots().limit(), 4);
    let stats = d("stats", Value::None).await;
    assert_eq!(stats["pool"]["max-concurrency"], 4);
    assert_eq!(stats["pool"]["processes"].as_array().map(Vec::len), Some(4));
    assert_eq!(stats["prefetch_count"], 32);
    assert_eq!(
        d("pool_shrink", Value::None).await,
        serde_json::json!({"ok": "pool will shrink"}),
        "n defaults to 1"
    );
    assert_eq!(st.concurrency(), 3);
    assert_eq!(*broker.0.lock().expect("lock"), vec![32, 24]);
    let refused = d("pool_shrink", args([("n", Value::Int(3))])).await;
    assert_eq!(
        refused,
        serde_json::json!({"error": "ValueError(\"Can't shrink pool below 1 task slot (concurrency 3, asked to shrink by 3)\")"})
    );
    assert_eq!(st.concurrency(), 3, "a refused shrink changes nothing");
    // Wrong types are answered as Python's range(n) fails on them.
    assert_eq!(
        d("pool_grow", args([("n", s("2"))])).await,
        serde_json::json!({"error": "TypeError(\"'str' object cannot be interpreted as an integer\")"})
    );
    assert!(d("pool_grow", args([("n", Value::Int(-1))]))
        .await
        .get("error")
        .is_some());
    assert_eq!(st.concurrency(), 3);

    // autoscale / pool_restart: as Celery's worker without them.
    assert_eq!(
        d(
            "autoscale",
            args([("max", Value::Int(4)), ("min", Value::Int(1))])
        )
        .await,
        serde_json::json!({"error": "ValueError('Autoscale not enabled')"})
    );
    assert_eq!(
        d("pool_restart", Value::None).await,
        serde_json::json!({"error": "ValueError('Pool restarts not enabled')"})
    );

    // time_limit
    let tl = |name: &str, soft: Value, hard: Value| {
        args([("task_name", s(name)), ("soft", soft), ("hard", hard)])
    };
    assert_eq!(
        d(
            "time_limit",
            tl("omegaml.tasks.omega_ping", Value::Float(1.5), Value::Int(3))
        )
        .await,
        serde_json::json!({"ok": "time limits set successfully"})
    );
    assert_eq!(
        st.limits.time_limits("omegaml.tasks.omega_ping"),
        (Some(1.5), Some(3.0))
    );
    assert_eq!(
        d(
            "time_limit",
            tl("no.such.task", Value::Int(1), Value::Int(2))
        )
        .await,
        serde_json::json!({"error": "unknown task"})
    );
    assert!(d(
        "time_limit",
        tl("omegaml.tasks.omega_ping", Value::List(vec![]), Value::None)
    )
    .await
    .get("error")
    .is_some());
    assert!(d(
        "time_limit",
        tl("omegaml.tasks.omega_ping", Value::Float(-1.0), Value::None)
    )
    .await
    .get("error")
    .is_some());
    assert_eq!(
        st.limits.time_limits("omegaml.tasks.omega_ping"),
        (Some(1.5), Some(3.0))
    );

    // rate_limit
    let rl = |name: &str, rate: Value| args([("task_name", s(name)), ("rate_limit", rate)]);
    assert_eq!(
        d("rate_limit", rl("om_test_tasks.tasks.add", s("10/m"))).await,
        serde_json::json!({"ok": "new rate limit set successfully"})
    );
    assert_eq!(
        st.limits.rate_text("om_test_tasks.tasks.add").as_deref(),
        Some("10/m")
    );
    let reg = d("registered", Value::None).await;
    assert_eq!(
        reg,
        serde_json::json!([
            "omegaml.tasks.omega_ping",
            "om_test_tasks.tasks.add [rate_limit=10/m]"
        ])
    );
    assert_eq!(
        d("dump_tasks", Value::None).await,
        reg,
        "dump_tasks is registered"
    );
    let reg = d(
        "registered",
        args([(
            "taskinfoitems",
            Value::List(vec![s("time_limit"), s("soft_time_limit")]),
        )]),
    )
    .await;
    assert_eq!(
        reg[0],
        "omegaml.tasks.omega_ping [time_limit=3.0 soft_time_limit=1.5]"
    );
    assert_eq!(
        d("rate_limit", rl("om_test_tasks.tasks.add", s("abc"))).await,
        serde_json::json!({"error": "Invalid rate limit string: ValueError(\"could not convert string to float: 'abc'\")"})
    );
    assert_eq!(
        d("rate_limit", rl("nope", s("1/s"))).await,
        serde_json::json!({"error": "unknown task"})
    );
    assert_eq!(
        d("rate_limit", rl("om_test_tasks.tasks.add", Value::None)).await,
        serde_json::json!({"ok": "rate limit disabled successfully"})
    );
    assert_eq!(st.limits.rate_text("om_test_tasks.tasks.add"), None);

    // events
    assert_eq!(
        d("enable_events", Value::None).await,
        serde_json::json!({"ok": "task events enabled"})
    );
    assert_eq!(
        d("enable_events", Value::None).await,
        serde_json::json!({"ok": "task events already enabled"})
    );
    assert!(st.task_events());
    assert_eq!(
        d("disable_events", Value::None).await,
        serde_json::json!({"ok": "task events disabled"})
    );
    assert_eq!(
        d("disable_events", Value::None).await,
        serde_json::json!({"ok": "task events already disabled"})
    );
    assert!(!st.task_events());
    assert_eq!(d("heartbeat", Value::None).await, serde_json::Value::Null);
    assert_eq!(d("election", Value::None).await, serde_json::Value::Null);

    // conf / report: no password anywhere.
    let conf = d("dump_conf", Value::None).await;
    assert_eq!(conf["CELERYD_CONCURRENCY"], 3);
    assert_eq!(d("conf", Value::None).await, conf);
    let report = d("report", Value::None).await;
    let text = report["ok"].as_str().expect("ok text");
    assert!(
        text.contains("software -> om-worker:") && text.contains("transport:amqp"),
        "{text}"
    );
    assert!(!text.contains("secret") && !conf.to_string().contains("secret"));

    // aliases and query_task
    let (m, r) = task("q1", Some("2999-01-01T00:00:00+00:00"));
    let g = st.received(&m, &r);
    g.scheduled(m.eta.expect("eta"));
    assert_eq!(
        d("dump_schedule", Value::None)
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let q = d("query_task", args([("ids", Value::List(vec![s("q1")]))])).await;
    assert_eq!(q["q1"][0], "scheduled", "{q}");
    g.reserved();
    assert_eq!(
        d("dump_reserved", Value::None)
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(d("dump_active", Value::None).await, serde_json::json!([]));
    let t = d(
        "terminate",
        args([("signal", s("SIGTERM")), ("task_id", s("q1"))]),
    )
    .await;
    assert_eq!(
        t,
        serde_json::json!({"ok": "terminate: tasks unknown"}),
        "q1 is not running"
    );
    assert_eq!(
        d("dump_revoked", Value::None).await,
        serde_json::json!(["q1"])
    );
}

#[test]
fn conf_of_a_config_has_celery_keys_and_no_password() {
    let mut flags = WorkerFlags {
        broker: Some("amqp://user:s3cret@127.0.0.1:5672//".into()),
        result_backend: Some("redis://:pw2@127.0.0.1:6379/1".into()),
        ..Default::default()
    };
    flags.concurrency = Some(3);
    let c = Config::resolve(&flags, &|_| None, &FileConfig::default(), "h").expect("resolves");
    let st = WorkerState::from_config(&c);
    let conf = st.settings();
    assert_eq!(conf["BROKER_URL"], "amqp://user:********@127.0.0.1:5672//");
    assert_eq!(
        conf["CELERY_RESULT_BACKEND"],
        "redis://:********@127.0.0.1:6379/1"
    );
    assert_eq!(conf["CELERYD_CONCURRENCY"], 3);
    assert_eq!(conf["CELERYD_PREFETCH_MULTIPLIER"], 4);
    assert_eq!(conf["CELERY_ACKS_LATE"], false);
    assert_eq!(conf["CELERYD_TASK_TIME_LIMIT"], 1230.0);
    let text = conf.to_string();
    assert!(!text.contains("s3cret") && !text.contains("pw2"), "{text}");
    st.grow_pool(2);
    assert_eq!(
        st.settings()["CELERYD_CONCURRENCY"],
        5,
        "conf shows the live concurrency"
    );
}
