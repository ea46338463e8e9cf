//! Encoding a Celery protocol-v2 task message for publishing (the worker as
//! a *sender*: `execute_scripts` submitting `run_omegaml_job`, the `--beat`
//! ticker submitting `execute_scripts`).
//!
//! The body is JSON: omega|ml's workers accept `pickle` and `json`
//! (`CELERY_ACCEPT_CONTENT`), and JSON needs no pickle encoder for
//! arbitrary values. Headers and properties are the ones Celery 5's
//! `amqp.as_task_v2` + `send_task_message` write, so Flower, `celery
//! inspect` and the Python worker see an ordinary task.

use super::json;
use super::message::{Headers, Outgoing};
use super::value::Value;

/// What to send.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSend {
    /// Registered task name, e.g. `omegaml.notebook.tasks.run_omegaml_job`.
    pub name: String,
    /// Task id (uuid4 text).
    pub id: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments, in order.
    pub kwargs: Vec<(String, Value)>,
    /// The sending task's id (Celery sets it when a task sends a task).
    pub parent_id: Option<String>,
    /// The workflow root: the parent's root, else this task's own id.
    pub root_id: Option<String>,
    /// Sender, `gen<pid>@<host>` as Celery's `anon_nodename()`.
    pub origin: String,
    /// Where an rpc:// result should go; `None` when nobody waits for it.
    pub reply_to: Option<String>,
}

impl TaskSend {
    /// A task with a fresh uuid4 id, no parent, sent from this process.
    pub fn new(name: &str, args: Vec<Value>, kwargs: Vec<(String, Value)>) -> Self {
        TaskSend {
            name: name.to_owned(),
            id: uuid::Uuid::new_v4().to_string(),
            args,
            kwargs,
            parent_id: None,
            root_id: None,
            origin: anon_nodename(),
            reply_to: None,
        }
    }
}

/// Celery's `anon_nodename()`: `gen<pid>@<hostname>`.
pub fn anon_nodename() -> String {
    format!(
        "gen{}@{}",
        std::process::id(),
        gethostname::gethostname().to_string_lossy()
    )
}

/// The protocol-v2 message for `task`: JSON body `[args, kwargs, embed]`,
/// Celery's header set, `correlation_id` = id, persistent delivery.
pub fn encode_task_v2(task: &TaskSend) -> Outgoing {
    let kwargs = Value::Dict(
        task.kwargs
            .iter()
            .map(|(k, v)| (Value::Str(k.clone()), v.clone()))
            .collect(),
    );
    let args = Value::Tuple(task.args.clone());
    let embed = Value::dict([
        ("callbacks", Value::None),
        ("errbacks", Value::None),
        ("chain", Value::None),
        ("chord", Value::None),
    ]);
    let body = json::encode(&Value::List(vec![
        Value::List(task.args.clone()),
        kwargs.clone(),
        embed,
    ]));
    let opt = |s: &Option<String>| s.clone().map_or(Value::None, Value::Str);
    let mut headers = Headers::new();
    let mut h = |k: &str, v: Value| {
        headers.insert(k.to_owned(), v);
    };
    h("lang", Value::Str("py".into()));
    h("task", Value::Str(task.name.clone()));
    h("id", Value::Str(task.id.clone()));
    h("shadow", Value::None);
    h("eta", Value::None);
    h("expires", Value::None);
    h("group", Value::None);
    h("group_index", Value::None);
    h("retries", Value::Int(0));
    h("timelimit", Value::List(vec![Value::None, Value::None]));
    h(
        "root_id",
        Value::Str(task.root_id.clone().unwrap_or_else(|| task.id.clone())),
    );
    h("parent_id", opt(&task.parent_id));
    h("argsrepr", Value::Str(args.repr()));
    h("kwargsrepr", Value::Str(kwargs.repr()));
    h("origin", Value::Str(task.origin.clone()));
    h("ignore_result", Value::Bool(false));
    h("replaced_task_nesting", Value::Int(0));
    h("stamped_headers", Value::None);
    h("stamps", Value::Dict(Vec::new()));
    Outgoing {
        body,
        content_type: "application/json".into(),
        content_encoding: "utf-8".into(),
        headers,
        correlation_id: Some(task.id.clone()),
        reply_to: task.reply_to.clone(),
        priority: None,
        delivery_mode: 2,
        expiration: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_task, RawMessage};

    fn sample() -> TaskSend {
        TaskSend {
            name: "omegaml.notebook.tasks.run_omegaml_job".into(),
            id: "6f1c2a4e-0000-4000-8000-000000000001".into(),
            args: vec![Value::Str("sched.ipynb".into())],
            kwargs: vec![
                ("timeout".into(), Value::None),
                ("event".into(), Value::Str("2024-01-01T10:01:00".into())),
                ("pure_python".into(), Value::Bool(false)),
                ("__bucket".into(), Value::None),
            ],
            parent_id: Some("parent-id".into()),
            root_id: Some("root-id".into()),
            origin: "gen1@host".into(),
            reply_to: None,
        }
    }

    #[test]
    fn body_is_json_args_kwargs_embed() {
        let out = encode_task_v2(&sample());
        let body: serde_json::Value = serde_json::from_slice(&out.body).expect("body is JSON");
        assert_eq!(
            body,
            serde_json::json!([
                ["sched.ipynb"],
                {"timeout": null, "event": "2024-01-01T10:01:00", "pure_python": false, "__bucket": null},
                {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
            ])
        );
        assert_eq!(out.content_type, "application/json");
        assert_eq!(out.content_encoding, "utf-8");
        assert_eq!(out.delivery_mode, 2);
        assert_eq!(out.correlation_id.as_deref(), Some(sample().id.as_str()));
    }

    #[test]
    fn headers_are_celerys() {
        let out = encode_task_v2(&sample());
        let h = &out.headers;
        assert_eq!(h.get("lang"), Some(&Value::Str("py".into())));
        assert_eq!(
            h.get("task"),
            Some(&Value::Str("omegaml.notebook.tasks.run_omegaml_job".into()))
        );
        assert_eq!(h.get("parent_id"), Some(&Value::Str("parent-id".into())));
        assert_eq!(h.get("root_id"), Some(&Value::Str("root-id".into())));
        assert_eq!(h.get("retries"), Some(&Value::Int(0)));
        assert_eq!(
            h.get("argsrepr"),
            Some(&Value::Str("('sched.ipynb',)".into()))
        );
        assert_eq!(
            h.get("kwargsrepr"),
            Some(&Value::Str(
                "{'timeout': None, 'event': '2024-01-01T10:01:00', 'pure_python': False, '__bucket': None}"
                    .into()
            ))
        );
        assert_eq!(h.get("origin"), Some(&Value::Str("gen1@host".into())));
    }

    #[test]
    fn root_defaults_to_own_id_and_no_parent() {
        let t = TaskSend::new("omegaml.notebook.tasks.execute_scripts", vec![], vec![]);
        let out = encode_task_v2(&t);
        assert_eq!(out.headers.get("root_id"), Some(&Value::Str(t.id.clone())));
        assert_eq!(out.headers.get("parent_id"), Some(&Value::None));
        assert_eq!(out.headers.get("argsrepr"), Some(&Value::Str("()".into())));
        assert_eq!(
            out.headers.get("kwargsrepr"),
            Some(&Value::Str("{}".into()))
        );
        assert!(t.origin.starts_with("gen"));
    }

    #[test]
    fn our_own_decoder_reads_it_back() {
        let out = encode_task_v2(&sample());
        let raw = RawMessage {
            body: out.body.clone(),
            content_type: Some(out.content_type.clone()),
            content_encoding: Some(out.content_encoding.clone()),
            headers: out.headers.clone(),
            correlation_id: out.correlation_id.clone(),
            delivery_mode: Some(2),
            routing_key: "default".into(),
            ..RawMessage::default()
        };
        let msg = decode_task(&raw).expect("decodes");
        assert_eq!(msg.name, "omegaml.notebook.tasks.run_omegaml_job");
        assert_eq!(msg.args, vec![Value::Str("sched.ipynb".into())]);
        assert_eq!(
            msg.kwarg("event"),
            Some(&Value::Str("2024-01-01T10:01:00".into()))
        );
        assert_eq!(msg.parent_id.as_deref(), Some("parent-id"));
    }
}
