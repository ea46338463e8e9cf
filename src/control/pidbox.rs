//! kombu's pidbox node (`kombu/pidbox.py:Node`, `celery/worker/pidbox.py`):
//! receives broadcast control requests, decides whether they are for this
//! node, runs the command and publishes the reply.
//!
//! Requests are outside input: every one is decoded with the safe decoders
//! of [`crate::protocol`] (pickle is interpreted, never executed), and a
//! request that cannot be decoded or has the wrong shape is logged and
//! ignored. Nothing here can stop the worker except the `shutdown` command.

use std::sync::Arc;

use serde_json::Value as Json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::commands::{self, Context};
use super::state::unix_now;
use crate::broker::{Broker, ExchangeType, FanoutSubscription};
use crate::protocol::{decode_body, Headers, Outgoing, RawMessage, Value};

/// The reply exchange clients bind their reply queues to.
pub const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// Exchange, normally `reply.celery.pidbox`.
    pub exchange: String,
    /// The client's oid.
    pub routing_key: String,
}

/// A decoded control request.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlRequest {
    /// Command name.
    pub method: String,
    /// Keyword arguments (a dict, or `None`).
    pub arguments: Value,
    /// Only these nodenames act, when given and non-empty.
    pub destination: Option<Vec<String>>,
    /// Nodename pattern (with `matcher`).
    pub pattern: Option<String>,
    /// `glob` or `pcre`.
    pub matcher: Option<String>,
    /// Echoed in the reply's `ticket` header.
    pub ticket: Option<String>,
    /// Absent for casts (no reply).
    pub reply_to: Option<ReplyTo>,
}

/// Why a request was ignored.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body did not decode.
    #[error("undecodable control request: {0}")]
    Decode(String),
    /// The body decoded but is not a control request.
    #[error("not a control request: {0}")]
    Shape(String),
}

fn opt_str(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    }
}

/// Turns a decoded body into a [`ControlRequest`].
pub fn parse_request(body: &Value) -> Result<ControlRequest, RequestError> {
    if body.as_dict().is_none() {
        return Err(RequestError::Shape(format!(
            "body is a {}, not a dict",
            body.type_name()
        )));
    }
    let method =
        opt_str(body.get("method")).ok_or_else(|| RequestError::Shape("no str `method`".into()))?;
    let destination = match body.get("destination") {
        None | Some(Value::None) => None,
        Some(v) => match v.as_seq() {
            Some(items) => Some(
                items
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect(),
            ),
            None => match v.as_str() {
                Some(s) => Some(vec![s.to_owned()]),
                None => return Err(RequestError::Shape("`destination` is not a list".into())),
            },
        },
    };
    let reply_to = match body.get("reply_to") {
        None | Some(Value::None) => None,
        Some(r) => {
            let exchange = opt_str(r.get("exchange"));
            let routing_key = opt_str(r.get("routing_key"));
            match (exchange, routing_key) {
                (Some(exchange), Some(routing_key)) => Some(ReplyTo {
                    exchange,
                    routing_key,
                }),
                _ => {
                    return Err(RequestError::Shape(
                        "`reply_to` lacks exchange/routing_key".into(),
                    ))
                }
            }
        }
    };
    Ok(ControlRequest {
        method,
        arguments: body.get("arguments").cloned().unwrap_or(Value::None),
        destination,
        pattern: opt_str(body.get("pattern")),
        matcher: opt_str(body.get("matcher")),
        ticket: opt_str(body.get("ticket")),
        reply_to,
    })
}

/// kombu `Node.handle_message`'s targeting: a non-empty `destination` must
/// name us; else `pattern` + `matcher` must match; else everyone acts.
pub fn is_for(req: &ControlRequest, nodename: &str) -> bool {
    if let Some(dest) = &req.destination {
        if !dest.is_empty() {
            return dest.iter().any(|d| d == nodename);
        }
    }
    if let (Some(pattern), Some(matcher)) = (&req.pattern, &req.matcher) {
        return match matcher.as_str() {
            "glob" => glob_match(pattern, nodename),
            // Python's re.match: anchored at the start only.
            "pcre" => match regex::Regex::new(&format!("^(?:{pattern})")) {
                Ok(re) => re.is_match(nodename),
                Err(e) => {
                    warn!("control request with an invalid pcre pattern {pattern:?}: {e}");
                    false
                }
            },
            other => {
                warn!("control request with unknown matcher {other:?}; ignored");
                false
            }
        };
    }
    true
}

/// `fnmatch.fnmatch` (case-sensitive on POSIX): `*`, `?`, `[seq]`, `[!seq]`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    // Iterative with backtracking on the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_match(&p[pi..], n[ni]) {
                        if matched {
                            pi += next;
                            ni += 1;
                            continue;
                        }
                    } else if p[pi] == n[ni] {
                        // Unclosed '[' is a literal.
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches `c` against a `[...]` class at the start of `p`; returns
/// (matched, length of the class) or `None` when the class is unclosed.
fn class_match(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!'));
    if negate {
        i += 1;
    }
    let start = i;
    let mut matched = false;
    while i < p.len() {
        if p[i] == ']' && i > start {
            return Some((matched != negate, i + 1));
        }
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// The reply message: `{nodename: payload}` as JSON, headers `ticket` and `clock`.
pub fn reply_message(nodename: &str, payload: Json, ticket: Option<&str>, clock: u64) -> Outgoing {
    let mut headers = Headers::new();
    if let Some(t) = ticket {
        headers.insert("ticket".into(), Value::Str(t.to_owned()));
    }
    headers.insert(
        "clock".into(),
        Value::Int(i64::try_from(clock).unwrap_or(i64::MAX)),
    );
    let mut body = serde_json::Map::new();
    body.insert(nodename.to_owned(), payload);
    Outgoing {
        body: serde_json::to_vec(&Json::Object(body)).unwrap_or_default(),
        content_type: "application/json".into(),
        content_encoding: "utf-8".into(),
        headers,
        delivery_mode: 1,
        ..Outgoing::default()
    }
}

/// Subscribes to `celery.pidbox` and serves requests until the broker
/// closes the subscription.
pub async fn start(
    ctx: Arc<Context>,
) -> Result<tokio::task::JoinHandle<()>, crate::broker::BrokerError> {
    let broker: &Arc<dyn Broker> = &ctx.broker;
    if let Err(e) = broker
        .declare_exchange(REPLY_EXCHANGE, ExchangeType::Direct, false)
        .await
    {
        warn!("declaring exchange {REPLY_EXCHANGE}: {e}");
    }
    let rx = broker
        .subscribe_fanout(FanoutSubscription::pidbox(&ctx.state.nodename))
        .await?;
    info!(
        "remote control: listening as {} on celery.pidbox",
        ctx.state.nodename
    );
    Ok(tokio::spawn(serve(ctx, rx)))
}

async fn serve(ctx: Arc<Context>, mut rx: mpsc::Receiver<RawMessage>) {
    while let Some(raw) = rx.recv().await {
        // One at a time, like kombu's Node: replies keep their order.
        handle(&ctx, &raw).await;
    }
    debug!("remote control stopped");
}

/// Handles one raw request: decode, target, dispatch, reply.
pub async fn handle(ctx: &Context, raw: &RawMessage) {
    let req = match decode_body(raw)
        .map_err(|e| RequestError::Decode(e.to_string()))
        .and_then(|b| parse_request(&b))
    {
        Ok(r) => r,
        Err(e) => {
            warn!(
                content_type = raw.content_type.as_deref().unwrap_or("?"),
                "ignoring control message: {e}"
            );
            return;
        }
    };
    if let Some(c) = raw.headers.get("clock").and_then(Value::as_i64) {
        ctx.state.clock.adjust(u64::try_from(c).unwrap_or(0));
    }
    if let Some(exp) = raw.headers.get("expires").and_then(Value::as_f64) {
        if exp < unix_now() {
            debug!(method = %req.method, "control request expired; ignored");
            return;
        }
    }
    if !is_for(&req, &ctx.state.nodename) {
        return;
    }
    debug!(method = %req.method, ticket = req.ticket.as_deref().unwrap_or(""), "control request");
    let payload = commands::dispatch(ctx, &req.method, &req.arguments).await;
    let (Some(reply_to), Some(payload)) = (&req.reply_to, payload) else {
        return;
    };
    let clock = ctx.state.clock.forward();
    let msg = reply_message(&ctx.state.nodename, payload, req.ticket.as_deref(), clock);
    if let Err(e) = ctx
        .broker
        .publish(&reply_to.exchange, &reply_to.routing_key, msg)
        .await
    {
        warn!(method = %req.method, "could not publish control reply: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs() {
        assert!(glob_match("w*@host", "w1@host"));
        assert!(glob_match("*", ""));
        assert!(glob_match("w?@h", "w1@h"));
        assert!(!glob_match("w?@h", "w12@h"));
        assert!(glob_match("w[0-9]@h", "w5@h"));
        assert!(!glob_match("w[!0-9]@h", "w5@h"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("[ab", "[ab"));
    }

    fn req(body: Value) -> ControlRequest {
        parse_request(&body).expect("parses")
    }

    #[test]
    fn targeting() {
        let base = |d: Value, p: Value, m: Value| {
            req(Value::dict([
                ("method", Value::Str("ping".into())),
                ("arguments", Value::dict::<&str>([])),
                ("destination", d),
                ("pattern", p),
                ("matcher", m),
                ("ticket", Value::Str("t".into())),
                (
                    "reply_to",
                    Value::dict([
                        ("exchange", Value::Str("reply.celery.pidbox".into())),
                        ("routing_key", Value::Str("oid".into())),
                    ]),
                ),
            ]))
        };
        let me = "w1@h";
        assert!(is_for(&base(Value::None, Value::None, Value::None), me));
        assert!(is_for(
            &base(Value::List(vec![]), Value::None, Value::None),
            me
        ));
        assert!(is_for(
            &base(
                Value::List(vec![Value::Str(me.into())]),
                Value::None,
                Value::None
            ),
            me
        ));
        assert!(!is_for(
            &base(
                Value::List(vec![Value::Str("x@h".into())]),
                Value::None,
                Value::None
            ),
            me
        ));
        let g = |p: &str, m: &str| base(Value::None, Value::Str(p.into()), Value::Str(m.into()));
        assert!(is_for(&g("w*", "glob"), me));
        assert!(!is_for(&g("x*", "glob"), me));
        assert!(is_for(&g("w\\d", "pcre"), me));
        assert!(!is_for(&g("h$", "pcre"), me));
        assert!(!is_for(&g("(", "pcre"), me));
        let r = base(Value::None, Value::None, Value::None);
        assert_eq!(
            r.reply_to,
            Some(ReplyTo {
                exchange: "reply.celery.pidbox".into(),
                routing_key: "oid".into()
            })
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(parse_request(&Value::Int(1)).is_err());
        assert!(parse_request(&Value::dict([("method", Value::Int(1))])).is_err());
        assert!(parse_request(&Value::dict([
            ("method", Value::Str("ping".into())),
            ("reply_to", Value::Str("x".into())),
        ]))
        .is_err());
    }

    #[test]
    fn reply_shape() {
        let m = reply_message("w@h", json!({"ok": "pong"}), Some("t1"), 7);
        let body: Json = serde_json::from_slice(&m.body).expect("json");
        assert_eq!(body, json!({"w@h": {"ok": "pong"}}));
        assert_eq!(m.headers.get("ticket"), Some(&Value::Str("t1".into())));
        assert_eq!(m.headers.get("clock"), Some(&Value::Int(7)));
        assert_eq!(m.delivery_mode, 1);
    }
}
