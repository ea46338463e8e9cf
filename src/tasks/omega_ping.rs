//! `omegaml.tasks.omega_ping`: the liveness task behind `om.runtime.ping()`.
//!
//! omega|ml returns `{'message': 'ping return message', 'time': now().isoformat(),
//! 'args': args, 'kwargs': delegate kwargs minus pure_python, 'worker': hostname}`
//! and raises when called with `exception=True`.

use async_trait::async_trait;

use super::{split_system_kwargs, Output, Task, TaskContext, TaskError};
use crate::protocol::{TaskMessage, Value};

/// The ping task.
pub struct OmegaPing;

#[async_trait]
impl Task for OmegaPing {
    fn name(&self) -> &'static str {
        "omegaml.tasks.omega_ping"
    }

    async fn run(&self, ctx: TaskContext, msg: &TaskMessage) -> Result<Output, TaskError> {
        self.run_value(ctx, msg).await.map(Output::from)
    }
}

impl OmegaPing {
    async fn run_value(&self, ctx: TaskContext, msg: &TaskMessage) -> Result<Value, TaskError> {
        let (_system, delegate) = split_system_kwargs(&msg.kwargs);
        if msg.kwarg("exception").is_some_and(truthy) {
            return Err(TaskError::new(
                "builtins",
                "Exception",
                "omega ping exception",
            ));
        }
        let kwargs = delegate
            .into_iter()
            .filter(|(k, _)| k != "pure_python" && k != "exception")
            .map(|(k, v)| (Value::Str(k.clone()), v.clone()))
            .collect();
        // omega|ml's `datetime.now().isoformat()`: naive local time.
        let now = chrono::Local::now().naive_local();
        Ok(Value::dict([
            ("message", Value::from("ping return message")),
            (
                "time",
                Value::Str(now.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()),
            ),
            ("args", Value::List(msg.args.clone())),
            ("kwargs", Value::Dict(kwargs)),
            ("worker", Value::Str(ctx.nodename.clone())),
        ]))
    }
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::None | Value::Bool(false) | Value::Int(0))
}
