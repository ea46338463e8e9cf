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
        Some(Value::Str(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

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
            "max-concurrency": state.concurrency,
            // One entry per task slot. Kernels are started per task, so
            // the slots are this process's; omega|ml shows the list as is.
            "processes": vec![state.pid; state.concurrency],
            "max-tasks-per-child": 1,
            "put-guarded-by-semaphore": false,
            "timeouts": [state.timeouts.0, state.timeouts.1],
        },
        "broker": broker_info(&state.broker_url),
        "prefetch_count": state.prefetch,
        "rusage": {},
        "sw_ident": "om-worker",
        "sw_ver": env!("CARGO_PKG_VERSION"),
    })
}

/// Runs one command. `None` = send no reply.
pub async fn dispatch(ctx: &Context, method: &str, args: &Value) -> Option<Json> {
    let st = &ctx.state;
    let reply = match method {
        "ping" => ok("pong"),
        "active_queues" => Json::Array(st.queues().iter().map(|q| queue_as_dict(q)).collect()),
        "active" => {
            let safe = truthy(arg(args, "safe"));
            Json::Array(st.infos(|p| matches!(p, Phase::Active(_)), safe))
        }
        "reserved" => Json::Array(st.infos(|p| matches!(p, Phase::Reserved), false)),
        "scheduled" => Json::Array(st.scheduled()),
        "stats" => stats(st),
        "registered" => json!((ctx.registered)()),
        "revoke" => {
            let Some(ids) = str_list(arg(args, "task_id")) else {
                return Some(err("revoke: task_id must be a str or a list of str"));
            };
            let terminate = truthy(arg(args, "terminate"));
            let terminated = st.revoke(&ids, terminate);
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
                ok(format!("tasks {} flagged as revoked", set_repr(&ids)))
            }
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
        "heartbeat" => {
            st.heartbeat();
            Json::Null
        }
        "enable_events" => {
            st.set_task_events(true);
            ok("task events enabled")
        }
        "disable_events" => {
            st.set_task_events(false);
            ok("task events disabled")
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
        "time_limit" | "rate_limit" | "pool_grow" | "pool_shrink" | "autoscale"
        | "pool_restart" => err(format!("{method} is not supported by om-worker")),
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
