//! The remote-control commands (`celery/worker/control.py`), with the reply
//! payloads the Celery CLI, Flower and omega|ml's `om.runtime` read.
//!
//! [`dispatch`] returns `None` when Python sends no reply (`shutdown`) and
//! the payload otherwise; unknown methods get `{"error": "KeyError('name')"}`
//! exactly as kombu's `Node.dispatch` answers them. Arguments are outside
//! input: a wrong type is answered with an `error` reply, never a panic.

use std::sync::Arc;

use serde_json::{json, Value as Json};
use tracing::{info, warn};

use super::limits::parse_rate;
use super::state::{Phase, WorkerState};
use crate::broker::Broker;
use crate::protocol::Value;

/// What the commands act on.
pub struct Context {
    /// For `add_consumer` / `cancel_consumer` and replies.
    pub broker: Arc<dyn Broker>,
    /// The worker's state.
    pub state: Arc<WorkerState>,
    /// Registered task names (`registered`), asked each time: the Python
    /// tasks are listed in the background after start-up.
    pub registered: Registered,
}

/// The registered task names, as `celery inspect registered` shows them.
pub type Registered = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

fn ok(msg: impl Into<String>) -> Json {
    json!({"ok": msg.into()})
}

fn err(msg: impl Into<String>) -> Json {
    json!({"error": msg.into()})
}

/// An argument by name (`arguments` is a dict; anything else has none).
fn arg<'a>(args: &'a Value, name: &str) -> Option<&'a Value> {
    args.get(name).filter(|v| !v.is_none())
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::None) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Int(i)) => *i != 0,
        Some(Value::Float(f)) => *f != 0.0,
        Some(Value::Str(s)) => !s.is_empty(),
        Some(Value::List(v)) | Some(Value::Tuple(v)) | Some(Value::Set(v)) => !v.is_empty(),
        Some(Value::Dict(d)) => !d.is_empty(),
        Some(_) => true,
    }
}

/// The reply kombu sends when a command raises: `{'error': repr(exc)}`.
fn raised(exc_type: &str, msg: &str) -> Json {
    err(format!("{exc_type}({})", Value::Str(msg.to_owned()).repr()))
}

/// An `int` argument (Celery's `n` of `pool_grow`), `default` when absent.
/// Anything else is answered as Python's `range(n)` would fail on it.
fn int_arg(args: &Value, name: &str, default: i64) -> Result<i64, Json> {
    match arg(args, name) {
        None => Ok(default),
        Some(Value::Int(i)) => Ok(*i),
        Some(Value::Bool(b)) => Ok(i64::from(*b)),
        Some(other) => Err(raised(
            "TypeError",
            &format!(
                "'{}' object cannot be interpreted as an integer",
                other.type_name()
            ),
        )),
    }
}

/// A number of seconds for `time_limit` (`None` and 0 = the worker's default).
fn seconds_arg(args: &Value, name: &str) -> Result<Option<f64>, Json> {
    let v = match arg(args, name) {
        None => return Ok(None),
        Some(Value::Int(i)) => *i as f64,
        Some(Value::Float(f)) => *f,
        Some(Value::Str(s)) => s.trim().parse::<f64>().map_err(|_| {
            raised(
                "ValueError",
                &format!(
                    "could not convert string to float: {}",
                    Value::Str(s.clone()).repr()
                ),
            )
        })?,
        Some(other) => {
            return Err(raised(
                "TypeError",
                &format!(
                    "time_limit: {name} must be a number of seconds, not {}",
                    other.type_name()
                ),
            ))
        }
    };
    if !v.is_finite() || v < 0.0 {
        return Err(raised(
            "ValueError",
            &format!("time_limit: {name} must be a non-negative number of seconds, got {v}"),
        ));
    }
    Ok((v > 0.0).then_some(v))
}

/// Python's `str()` of an argument, as `registered` shows task attributes.
fn py_str(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        other => other.repr(),
    }
}

/// Celery's `DEFAULT_TASK_INFO_ITEMS` for `registered`.
const TASK_INFO_ITEMS: [&str; 3] = ["exchange", "routing_key", "rate_limit"];

/// A str or a list of str (Celery's `maybe_list`).
fn str_list(v: Option<&Value>) -> Option<Vec<String>> {
    match v? {
        Value::Str(s) => Some(vec![s.clone()]),
        other => other.as_seq().map(|items| {
            items
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        }),
    }
}

/// Python's `repr` of a set of str ids, as `revoke`'s reply shows them.
fn set_repr(ids: &[String]) -> String {
    if ids.is_empty() {
        return "set()".into();
    }
    let items: Vec<String> = ids.iter().map(|i| Value::Str(i.clone()).repr()).collect();
    format!("{{{}}}", items.join(", "))
}

/// kombu `Queue(q, Exchange(q, 'direct'), q).as_dict(recurse=True)`: the
/// queue shape omega|ml creates for a label (`task_create_missing_queues`).
pub fn queue_as_dict(name: &str) -> Json {
    json!({
        "name": name,
        "exchange": {
            "name": name, "type": "direct", "arguments": null, "durable": true,
            "passive": false, "auto_delete": false, "delivery_mode": null, "no_declare": false,
        },
        "routing_key": name,
        "queue_arguments": null,
        "binding_arguments": null,
        "consumer_arguments": null,
        "durable": true,
        "exclusive": false,
        "auto_delete": false,
        "no_ack": false,
        "alias": null,
        "bindings": [],
        "no_declare": null,
        "expires": null,
        "message_ttl": null,
        "max_length": null,
        "max_length_bytes": null,
        "max_priority": null,
    })
}

/// `stats.broker`: kombu `Connection.info()` without the password.
pub fn broker_info(url: &str) -> Json {
    let parsed = url::Url::parse(url).ok();
    let scheme = parsed
        .as_ref()
        .map(|u| u.scheme().to_owned())
        .unwrap_or_default();
    let transport = if scheme.starts_with("redis") {
        "redis"
    } else {
        "amqp"
    };
    let default_port = if transport == "redis" { 6379 } else { 5672 };
    let host = parsed
        .as_ref()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "localhost".into());
    let port = parsed
        .as_ref()
        .and_then(|u| u.port())
        .unwrap_or(default_port);
    let userid = parsed
        .as_ref()
        .map(|u| u.username().to_owned())
        .filter(|u| !u.is_empty())
        .map(Json::from)
        .unwrap_or(if transport == "amqp" {
            json!("guest")
        } else {
            Json::Null
        });
    let vhost = parsed
        .as_ref()
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .map(|p| {
            if p.is_empty() && transport == "amqp" {
                "/".to_owned()
            } else {
                p
            }
        })
        .unwrap_or_default();
    json!({
        "hostname": host,
        "userid": userid,
        "virtual_host": vhost,
        "port": port,
        "insist": false,
        "ssl": scheme.ends_with('s'),
        "transport": transport,
        "connect_timeout": 4,
        "transport_options": {},
        "login_method": if transport == "amqp" { json!("PLAIN") } else { Json::Null },
        "uri_prefix": null,
        "heartbeat": 0.0,
        "failover_strategy": "round-robin",
        "alternates": [],
    })
}

/// `registered`: each name, with the requested attributes that are set
/// (`name [rate_limit=10/m]`), as Celery's `_extract_info`. om-worker knows
/// the attributes remote control sets: `rate_limit`, `time_limit`,
/// `soft_time_limit`.
fn registered(ctx: &Context, args: &Value) -> Json {
    let items: Vec<String> = match str_list(arg(args, "taskinfoitems")) {
        Some(v) if !v.is_empty() => v,
        _ => TASK_INFO_ITEMS.iter().map(|s| (*s).to_owned()).collect(),
    };
    let items: Vec<String> = items.into_iter().filter(|i| !i.starts_with('_')).collect();
    let limits = &ctx.state.limits;
    let names = (ctx.registered)();
    let infos: Vec<String> = names
        .into_iter()
        .map(|name| {
            let (soft, hard) = limits.time_limits(&name);
            let fields: Vec<String> = items
                .iter()
                .filter_map(|item| {
                    let v = match item.as_str() {
                        "rate_limit" => limits.rate_text(&name),
                        "time_limit" => hard.map(|h| Value::Float(h).repr()),
                        "soft_time_limit" => soft.map(|s| Value::Float(s).repr()),
                        _ => None,
                    }?;
                    Some(format!("{item}={v}"))
                })
                .collect();
            if fields.is_empty() {
                name
            } else {
                format!("{name} [{}]", fields.join(" "))
            }
        })
        .collect();
    json!(infos)
}

/// `conf`: the settings, with `include` (the task modules Celery's worker
/// imported) from the task names registered now.
fn conf(ctx: &Context) -> Json {
    let mut settings = ctx.state.settings();
    let mut modules: Vec<String> = (ctx.registered)()
        .iter()
        .filter_map(|n| n.rsplit_once('.').map(|(m, _)| m.to_owned()))
        .collect();
    modules.sort();
    modules.dedup();
    if let Json::Object(m) = &mut settings {
        m.insert("include".into(), json!(modules));
    }
    settings
}

/// `revoke` / `terminate`.
fn revoke(st: &WorkerState, ids: &[String], terminate: bool) -> Json {
    let terminated = st.revoke(ids, terminate);
    info!("Tasks flagged as revoked: {}", ids.join(", "));
    if terminate {
        if terminated.is_empty() {
            ok("terminate: tasks unknown")
        } else {
            for id in &terminated {
                info!(task_id = %id, "terminating task (revoke terminate=True)");
            }
            ok(format!("terminate: {}", terminated.join(", ")))
        }
    } else {
        ok(format!("tasks {} flagged as revoked", set_repr(ids)))
    }
}

/// After `pool_grow`/`pool_shrink`: the broker prefetch follows the
/// concurrency (Celery's `_update_prefetch_count`; unlimited stays so).
async fn update_prefetch(ctx: &Context) {
    let st = &ctx.state;
    if st.prefetch_multiplier == 0 {
        return;
    }
    let prefetch = st.prefetch();
    if let Err(e) = ctx.broker.set_prefetch(prefetch).await {
        warn!("remote control: could not set the prefetch to {prefetch}: {e}");
    }
}

/// `pool_grow` / `pool_shrink` (Celery: `{'ok': 'pool will grow'}`).
async fn resize_pool(ctx: &Context, args: &Value, grow: bool) -> Json {
    let st = &ctx.state;
    let n = match int_arg(args, "n", 1) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let Ok(n) = usize::try_from(n) else {
        return raised("ValueError", &format!("n must be 0 or more, got {n}"));
    };
    if grow {
        let now = st.grow_pool(n);
        update_prefetch(ctx).await;
        info!(
            "remote control: pool grown by {n}: concurrency {now}, prefetch {}",
            st.prefetch()
        );
        ok("pool will grow")
    } else {
        match st.shrink_pool(n) {
            Ok(now) => {
                update_prefetch(ctx).await;
                info!(
                    "remote control: pool shrunk by {n}: concurrency {now}, prefetch {} (running tasks finish)",
                    st.prefetch()
                );
                ok("pool will shrink")
            }
            Err(now) => raised(
                "ValueError",
                &format!("Can't shrink pool below 1 task slot (concurrency {now}, asked to shrink by {n})"),
            ),
        }
    }
}

/// `time_limit task_name soft hard` (Celery sets `task.soft_time_limit` and
/// `task.time_limit`): later tasks of that name run under them.
fn time_limit(ctx: &Context, args: &Value) -> Json {
    let name = arg(args, "task_name").and_then(Value::as_str);
    let Some(name) = name.filter(|n| (ctx.registered)().iter().any(|r| r == n)) else {
        warn!(
            "Change time limit attempt for unknown task {}",
            arg(args, "task_name").map(|v| v.repr()).unwrap_or_default()
        );
        return err("unknown task");
    };
    let soft = match seconds_arg(args, "soft") {
        Ok(v) => v,
        Err(e) => return e,
    };
    let hard = match seconds_arg(args, "hard") {
        Ok(v) => v,
        Err(e) => return e,
    };
    ctx.state.limits.set_time_limits(name, soft, hard);
    let show = |v: Option<f64>| v.map_or("None".to_owned(), |v| Value::Float(v).repr());
    info!(
        "New time limits for tasks of type {name}: soft={} hard={}",
        show(soft),
        show(hard)
    );
    ok("time limits set successfully")
}

/// `rate_limit task_name rate` (Celery sets `task.rate_limit` and rebuilds
/// the token buckets): later tasks of that name start no faster.
fn rate_limit(ctx: &Context, args: &Value) -> Json {
    let raw = arg(args, "rate_limit").cloned().unwrap_or(Value::None);
    let per_sec = match parse_rate(&raw) {
        Ok(r) => r,
        Err(e) => return err(e.to_string()),
    };
    let name = arg(args, "task_name").and_then(Value::as_str);
    let Some(name) = name.filter(|n| (ctx.registered)().iter().any(|r| r == n)) else {
        warn!(
            "Rate limit attempt for unknown task {}",
            arg(args, "task_name").map(|v| v.repr()).unwrap_or_default()
        );
        return err("unknown task");
    };
    let text = py_str(&raw);
    ctx.state.limits.set_rate(name, per_sec, &text);
    if truthy(Some(&raw)) {
        info!("New rate limit for tasks of type {name}: {text}.");
        ok("new rate limit set successfully")
    } else {
        info!("Rate limits disabled for tasks of type {name}");
        ok("rate limit disabled successfully")
    }
}

/// `report`: Celery's `app.bugreport()` text, for om-worker: software,
/// platform and the settings as `conf` shows them (no secrets).
fn report(st: &WorkerState) -> Json {
    let settings = st.settings();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let transport = broker_info(&st.broker_url)["transport"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();
    let results = settings["CELERY_RESULT_BACKEND"]
        .as_str()
        .unwrap_or("disabled")
        .to_owned();
    let mut lines = Vec::new();
    if let Json::Object(m) = &settings {
        for (k, v) in m {
            lines.push(format!("{k}: {v}"));
        }
    }
    ok(format!(
        "\nsoftware -> om-worker:{ver} (Celery 5 worker protocol, omega|ml 0.18 tasks)\n\
         platform -> system:{sys} arch:{arch}\n            kernel version:{kernel}\n\
         settings -> transport:{transport} results:{results}\n\n{settings}\n",
        ver = env!("CARGO_PKG_VERSION"),
        sys = sw_sys(),
        arch = std::env::consts::ARCH,
        settings = lines.join("\n"),
    ))
}

fn sw_sys() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        other => other,
    }
}

/// `stats` payload.
pub fn stats(state: &WorkerState) -> Json {
    let total: serde_json::Map<String, Json> = state
        .totals()
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    json!({
        "total": total,
        "pid": state.pid,
        "clock": state.clock.value().to_string(),
        "uptime": state.uptime(),
        "pool": {
            "implementation": "om_worker:KernelSlots",
            // The live slot count (`pool_grow`/`pool_shrink` change it).
            "max-concurrency": state.concurrency(),
            // One entry per task slot. Kernels are started per task, so
            // the slots are this process's; omega|ml shows the list as is.
            "processes": vec![state.pid; state.concurrency()],
            "max-tasks-per-child": 1,
            "put-guarded-by-semaphore": false,
            "timeouts": [state.timeouts.0, state.timeouts.1],
        },
        "broker": broker_info(&state.broker_url),
        "prefetch_count": state.prefetch(),
        "rusage": {},
        "sw_ident": "om-worker",
        "sw_ver": env!("CARGO_PKG_VERSION"),
    })
}

/// Celery's aliases (`Panel.register(alias=...)` in celery/worker/control.py).
pub fn canonical(method: &str) -> &str {
    match method {
        "dump_conf" => "conf",
        "dump_schedule" => "scheduled",
        "dump_reserved" => "reserved",
        "dump_active" => "active",
        "dump_revoked" => "revoked",
        "dump_tasks" => "registered",
        other => other,
    }
}

/// Runs one command. `None` = send no reply.
pub async fn dispatch(ctx: &Context, method: &str, args: &Value) -> Option<Json> {
    let st = &ctx.state;
    let reply = match canonical(method) {
        "ping" => ok("pong"),
        "active_queues" => Json::Array(st.queues().iter().map(|q| queue_as_dict(q)).collect()),
        "active" => {
            let safe = truthy(arg(args, "safe"));
            Json::Array(st.infos(|p| matches!(p, Phase::Active(_)), safe))
        }
        "reserved" => Json::Array(st.infos(|p| matches!(p, Phase::Reserved), false)),
        "scheduled" => Json::Array(st.scheduled()),
        "stats" => stats(st),
        "registered" => registered(ctx, args),
        "conf" => conf(ctx),
        "report" => report(st),
        "revoke" => {
            let Some(ids) = str_list(arg(args, "task_id")) else {
                return Some(err("revoke: task_id must be a str or a list of str"));
            };
            revoke(st, &ids, truthy(arg(args, "terminate")))
        }
        "terminate" => {
            let Some(ids) = str_list(arg(args, "task_id")) else {
                return Some(err("terminate: task_id must be a str or a list of str"));
            };
            revoke(st, &ids, true)
        }
        "revoked" => json!(st.revoked_ids()),
        "query_task" => {
            let ids = str_list(arg(args, "ids")).unwrap_or_default();
            st.query(&ids)
        }
        "clock" => json!({"clock": st.clock.forward()}),
        "hello" => {
            let from = arg(args, "from_node").and_then(Value::as_str).unwrap_or("");
            if from == st.nodename {
                // Python answers its own hello with None.
                Json::Null
            } else {
                if let Some(items) = arg(args, "revoked").and_then(Value::as_dict) {
                    st.merge_revoked(
                        items
                            .iter()
                            .filter_map(|(k, _)| k.as_str().map(str::to_owned)),
                    );
                }
                json!({"revoked": st.revoked_hello(), "clock": st.clock.forward()})
            }
        }
        // Without gossip (om-worker takes part in no elections), Celery's
        // handler does nothing and answers None.
        "election" => Json::Null,
        "heartbeat" => {
            st.heartbeat();
            Json::Null
        }
        "enable_events" => {
            if st.set_task_events(true) {
                ok("task events already enabled")
            } else {
                info!("Events of group {{task}} enabled by remote.");
                ok("task events enabled")
            }
        }
        "disable_events" => {
            if st.set_task_events(false) {
                info!("Events of group {{task}} disabled by remote.");
                ok("task events disabled")
            } else {
                ok("task events already disabled")
            }
        }
        "shutdown" => {
            let msg = arg(args, "msg").and_then(Value::as_str).unwrap_or("");
            warn!("remote control: shutdown requested {msg}; warm shutdown");
            st.request_shutdown();
            return None;
        }
        "add_consumer" => {
            let Some(queue) = arg(args, "queue").and_then(Value::as_str) else {
                return Some(err("add_consumer: queue must be a str"));
            };
            match ctx.broker.add_queue(queue).await {
                Ok(()) => {
                    st.add_queue(queue);
                    ok(format!("add consumer {queue}"))
                }
                Err(e) => err(format!("add consumer {queue}: {e}")),
            }
        }
        "cancel_consumer" => {
            let Some(queue) = arg(args, "queue").and_then(Value::as_str) else {
                return Some(err("cancel_consumer: queue must be a str"));
            };
            match ctx.broker.cancel_queue(queue).await {
                Ok(()) => {
                    st.remove_queue(queue);
                    ok(format!("no longer consuming from {queue}"))
                }
                Err(e) => err(format!("cancel consumer {queue}: {e}")),
            }
        }
        "pool_grow" => resize_pool(ctx, args, true).await,
        "pool_shrink" => resize_pool(ctx, args, false).await,
        "time_limit" => time_limit(ctx, args),
        "rate_limit" => rate_limit(ctx, args),
        // om-worker has no autoscaler: Celery's worker without `--autoscale`
        // raises this, and kombu answers its repr.
        "autoscale" => raised("ValueError", "Autoscale not enabled"),
        // Celery's default (`worker_pool_restarts` off); om-worker has no
        // pool to restart (each task runs in a fresh child).
        "pool_restart" => raised("ValueError", "Pool restarts not enabled"),
        "revoke_by_stamped_headers" => {
            err("revoke_by_stamped_headers is not supported by om-worker")
        }
        other => err(format!("KeyError({})", Value::Str(other.to_owned()).repr())),
    };
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reprs() {
        assert_eq!(set_repr(&["a".into()]), "{'a'}");
        assert_eq!(set_repr(&[]), "set()");
    }

    #[test]
    fn broker_info_has_no_password() {
        let i = broker_info("amqp://guest:****@127.0.0.1:5672//");
        assert_eq!(i["hostname"], "127.0.0.1");
        assert_eq!(i["port"], 5672);
        assert_eq!(i["transport"], "amqp");
        assert!(!i.to_string().contains("****"));
        let r = broker_info("redis://127.0.0.1:6379/0");
        assert_eq!(r["transport"], "redis");
        assert_eq!(r["virtual_host"], "0");
    }
}
