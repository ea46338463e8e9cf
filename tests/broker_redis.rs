//! kombu Redis transport against the local Redis and the real Python kombu.
//!
//! Each test uses db 0 with its own `global_keyprefix` (`omw-test-…:`), so
//! the `unacked`/`unacked_index`/`unacked_mutex` keys, lists and bindings are
//! test-unique and the restore sweep never touches anyone else's messages.
//! All keys under the prefix are deleted at the end.

#[path = "common/broker.rs"]
mod broker_common;

use std::time::Duration;

use broker_common::{bounded, init_logs, python, recv, unique, REDIS_URL};
use om_worker::broker::redis::{RedisBroker, RedisOptions};
use om_worker::broker::Broker;
use om_worker::protocol::{Headers, Outgoing, Value};
use redis::AsyncCommands;

struct Ctx {
    prefix: String,
    queue: String,
    redis: redis::aio::MultiplexedConnection,
}

impl Ctx {
    async fn new(tag: &str) -> Self {
        let client = redis::Client::open(REDIS_URL).expect("url");
        let redis = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis up");
        Self {
            prefix: format!("{}:", unique(tag)),
            queue: unique("q"),
            redis,
        }
    }

    fn options(&self) -> RedisOptions {
        RedisOptions {
            global_keyprefix: self.prefix.clone(),
            ..RedisOptions::default()
        }
    }

    async fn broker(&self, opts: RedisOptions) -> RedisBroker {
        RedisBroker::connect(REDIS_URL, opts)
            .await
            .expect("connects to Redis")
    }

    fn k(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// kombu with the same key prefix.
    fn kombu(&self, body: &str) -> String {
        python(&format!(
            r#"
import json, kombu
from kombu import Connection, Queue
conn = Connection('{REDIS_URL}', transport_options={{'global_keyprefix': '{p}'}})
q = '{q}'
{body}
conn.release()
"#,
            p = self.prefix,
            q = self.queue
        ))
    }

    async fn cleanup(mut self) {
        let keys: Vec<String> = self
            .redis
            .keys(format!("{}*", self.prefix))
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = self.redis.del(keys).await;
        }
    }
}

fn message(body: &str, id: &str, priority: u8) -> Outgoing {
    let mut headers = Headers::new();
    headers.insert("task".into(), Value::Str("t.echo".into()));
    headers.insert("id".into(), Value::Str(id.into()));
    headers.insert("eta".into(), Value::None);
    Outgoing {
        body: body.as_bytes().to_vec(),
        content_type: "application/json".into(),
        content_encoding: "utf-8".into(),
        headers,
        correlation_id: Some(id.into()),
        reply_to: Some("reply-oid".into()),
        priority: Some(priority),
        delivery_mode: 2,
        expiration: None,
    }
}

#[tokio::test]
async fn consumes_a_kombu_published_message_and_mirrors_bindings() {
    let mut ctx = Ctx::new("kpub").await;
    bounded(60, async {
        ctx.kombu(
            "conn.Producer().publish(b'[[1, 2], {}, {}]', routing_key=q, exchange='',\n\
             \x20   declare=[Queue(q, kombu.Exchange(q, 'direct'), routing_key=q)],\n\
             \x20   priority=5, content_type='application/json', content_encoding='utf-8',\n\
             \x20   correlation_id='cid-1', reply_to='oid-1',\n\
             \x20   headers={'task': 't.add', 'id': 'cid-1', 'retries': 0, 'eta': None, 'timelimit': [None, None]})",
        );
        // kombu put priority 5 into the step-3 list.
        let len: i64 = ctx
            .redis
            .llen(ctx.k(&format!("{}\x06\x163", ctx.queue)))
            .await
            .expect("llen");
        assert_eq!(len, 1);
        let kombu_binding: Vec<String> = ctx
            .redis
            .smembers(ctx.k(&format!("_kombu.binding.{}", ctx.queue)))
            .await
            .expect("smembers");

        let b = ctx.broker(ctx.options()).await;
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 4)
            .await
            .expect("consume");
        let d = recv(&mut rx, Duration::from_secs(5)).await.expect("delivery");
        let m = &d.message;
        assert_eq!(m.body, b"[[1, 2], {}, {}]");
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.correlation_id.as_deref(), Some("cid-1"));
        assert_eq!(m.reply_to.as_deref(), Some("oid-1"));
        assert_eq!(m.priority, Some(5));
        assert_eq!(m.routing_key, ctx.queue);
        assert_eq!(m.headers.get("task"), Some(&Value::Str("t.add".into())));
        assert_eq!(m.headers.get("eta"), Some(&Value::None));
        assert_eq!(
            m.headers.get("timelimit"),
            Some(&Value::List(vec![Value::None, Value::None]))
        );
        assert!(!m.redelivered);
        d.acker.ack().await.expect("ack");

        // Our declaration wrote exactly kombu's members, in both sets.
        let member = format!("{q}\x06\x16\x06\x16{q}", q = ctx.queue);
        assert_eq!(kombu_binding, vec![member.clone()]);
        for set in ["_kombu.binding.", "_kombu.binding_permanent."] {
            let members: Vec<String> = ctx
                .redis
                .smembers(ctx.k(&format!("{set}{}", ctx.queue)))
                .await
                .expect("smembers");
            assert_eq!(members, vec![member.clone()], "{set}");
        }
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn priority_zero_is_served_before_nine() {
    let ctx = Ctx::new("prio").await;
    bounded(60, async {
        ctx.kombu(
            "p = conn.Producer()\n\
             for pri in (9, 0, 5):\n\
             \x20   p.publish({'pri': pri}, routing_key=q, declare=[Queue(q)], priority=pri, correlation_id=str(pri))",
        );
        let b = ctx.broker(ctx.options()).await;
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 0)
            .await
            .expect("consume");
        let mut order = Vec::new();
        for _ in 0..3 {
            let d = recv(&mut rx, Duration::from_secs(5)).await.expect("delivery");
            order.push(d.message.correlation_id.clone().unwrap_or_default());
            d.acker.ack().await.expect("ack");
        }
        assert_eq!(order, ["0", "5", "9"]);
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn unacked_entries_exist_while_unsettled_and_go_after_ack() {
    let mut ctx = Ctx::new("unacked").await;
    bounded(60, async {
        let b = ctx.broker(ctx.options()).await;
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 2)
            .await
            .expect("consume");
        b.publish("", &ctx.queue, message("[]", "u1", 0))
            .await
            .expect("publish");
        let d = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivery");
        let tags = b.unsettled_tags();
        assert_eq!(tags.len(), 1);
        let tag = &tags[0];
        let stored: Option<String> = ctx.redis.hget(ctx.k("unacked"), tag).await.expect("hget");
        let stored: serde_json::Value =
            serde_json::from_str(&stored.expect("unacked entry")).expect("json");
        let arr = stored
            .as_array()
            .expect("[envelope, exchange, routing_key]");
        assert_eq!(arr.len(), 3);
        assert_eq!(arr[0]["properties"]["delivery_tag"], tag.as_str());
        assert_eq!(arr[0]["properties"]["body_encoding"], "base64");
        assert_eq!(arr[1], "");
        assert_eq!(arr[2], ctx.queue.as_str());
        let score: Option<f64> = ctx
            .redis
            .zscore(ctx.k("unacked_index"), tag)
            .await
            .expect("zscore");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!((now - score.expect("indexed")).abs() < 30.0);

        d.acker.ack().await.expect("ack");
        let exists: bool = ctx
            .redis
            .hexists(ctx.k("unacked"), tag)
            .await
            .expect("hexists");
        let score: Option<f64> = ctx
            .redis
            .zscore(ctx.k("unacked_index"), tag)
            .await
            .expect("zscore");
        assert!(!exists);
        assert!(score.is_none());
        assert!(d.acker.ack().await.is_err(), "double ack is an error");
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn prefetch_limits_brpop_until_a_settle() {
    let ctx = Ctx::new("prefetch").await;
    bounded(60, async {
        let b = ctx.broker(ctx.options()).await;
        for i in 0..2 {
            b.publish("", &ctx.queue, message("[]", &format!("p{i}"), 0))
                .await
                .expect("publish");
        }
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 1)
            .await
            .expect("consume");
        let d = recv(&mut rx, Duration::from_secs(5)).await.expect("first");
        assert!(recv(&mut rx, Duration::from_millis(1500)).await.is_none());
        d.acker.reject(false).await.expect("reject");
        let d = recv(&mut rx, Duration::from_secs(5)).await.expect("second");
        d.acker.ack().await.expect("ack");
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn reject_requeue_pushes_back_marked_redelivered() {
    let ctx = Ctx::new("requeue").await;
    bounded(60, async {
        let b = ctx.broker(ctx.options()).await;
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 1)
            .await
            .expect("consume");
        b.publish("", &ctx.queue, message("[7]", "rq", 0))
            .await
            .expect("publish");
        let d = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivery");
        d.acker.reject(true).await.expect("requeue");
        let again = recv(&mut rx, Duration::from_secs(5)).await.expect("again");
        assert_eq!(again.message.correlation_id.as_deref(), Some("rq"));
        assert!(again.message.redelivered);
        assert_eq!(
            again.message.headers.get("redelivered"),
            Some(&Value::Bool(true))
        );
        again.acker.ack().await.expect("ack");
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn restore_sweep_recovers_a_crashed_consumers_message() {
    let mut ctx = Ctx::new("restore").await;
    init_logs();
    bounded(60, async {
        let crashed = ctx
            .broker(RedisOptions {
                visibility_timeout: Duration::from_secs(1),
                restore_interval: Duration::ZERO,
                ..ctx.options()
            })
            .await;
        let mut rx = crashed
            .consume(std::slice::from_ref(&ctx.queue), 1)
            .await
            .expect("consume");
        crashed
            .publish("", &ctx.queue, message("[1]", "lost", 0))
            .await
            .expect("publish");
        let held = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivery");
        // "Crash": no close, no ack.
        drop(held);
        drop(rx);
        drop(crashed);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let len: i64 = ctx.redis.hlen(ctx.k("unacked")).await.expect("hlen");
        assert_eq!(len, 1, "still recorded as unacked");

        let b = ctx
            .broker(RedisOptions {
                visibility_timeout: Duration::from_secs(1),
                restore_interval: Duration::from_millis(300),
                ..ctx.options()
            })
            .await;
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 1)
            .await
            .expect("consume");
        let d = recv(&mut rx, Duration::from_secs(10))
            .await
            .expect("restored");
        assert_eq!(d.message.correlation_id.as_deref(), Some("lost"));
        assert!(d.message.redelivered);
        d.acker.ack().await.expect("ack");
        let len: i64 = ctx.redis.hlen(ctx.k("unacked")).await.expect("hlen");
        assert_eq!(len, 0);
        let mutex: Option<String> = ctx.redis.get(ctx.k("unacked_mutex")).await.expect("get");
        assert!(mutex.is_none(), "mutex released");
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn close_restores_own_unsettled_deliveries() {
    let mut ctx = Ctx::new("close").await;
    bounded(60, async {
        let a = ctx.broker(ctx.options()).await;
        let mut rx = a
            .consume(std::slice::from_ref(&ctx.queue), 0)
            .await
            .expect("consume");
        for id in ["c1", "c2"] {
            a.publish("", &ctx.queue, message("[]", id, 0))
                .await
                .expect("publish");
        }
        let d1 = recv(&mut rx, Duration::from_secs(5)).await.expect("d1");
        let d2 = recv(&mut rx, Duration::from_secs(5)).await.expect("d2");
        a.close().await.expect("close");
        assert!(
            d1.acker.ack().await.is_err(),
            "restored deliveries cannot be acked"
        );
        drop(d2);
        let len: i64 = ctx.redis.llen(ctx.k(&ctx.queue)).await.expect("llen");
        assert_eq!(len, 2);
        let unacked: i64 = ctx.redis.hlen(ctx.k("unacked")).await.expect("hlen");
        assert_eq!(unacked, 0);

        let b = ctx.broker(ctx.options()).await;
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 0)
            .await
            .expect("consume");
        for _ in 0..2 {
            let d = recv(&mut rx, Duration::from_secs(5)).await.expect("again");
            assert!(d.message.redelivered);
            d.acker.ack().await.expect("ack");
        }
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn kombu_consumes_what_we_publish() {
    let ctx = Ctx::new("kcons").await;
    bounded(60, async {
        let b = ctx.broker(ctx.options()).await;
        b.declare_queue(&ctx.queue).await.expect("declare");
        // Named direct exchange: routed through the binding table.
        b.publish(&ctx.queue, &ctx.queue, message("[[3], {}, {}]", "ours-1", 6))
            .await
            .expect("publish");
        let out = ctx.kombu(
            "sq = conn.SimpleQueue(q)\n\
             m = sq.get(timeout=10)\n\
             print(json.dumps({'body': m.body.decode() if isinstance(m.body, bytes) else m.body,\n\
             \x20   'headers': m.headers, 'cid': m.properties.get('correlation_id'),\n\
             \x20   'reply_to': m.properties.get('reply_to'), 'priority': m.properties.get('priority'),\n\
             \x20   'ctype': m.content_type, 'rk': m.delivery_info.get('routing_key')}))\n\
             m.ack()\n\
             sq.close()",
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("python printed json");
        assert_eq!(v["body"], "[[3], {}, {}]");
        assert_eq!(v["cid"], "ours-1");
        assert_eq!(v["reply_to"], "reply-oid");
        assert_eq!(v["priority"], 6);
        assert_eq!(v["ctype"], "application/json");
        assert_eq!(v["rk"], ctx.queue.as_str());
        assert_eq!(v["headers"]["task"], "t.echo");
        assert_eq!(v["headers"]["eta"], serde_json::Value::Null);
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn survives_client_kill_of_its_connections() {
    let mut ctx = Ctx::new("kill").await;
    let name = unique("cn").replace('-', "_");
    bounded(60, async {
        let b = ctx
            .broker(RedisOptions {
                client_name: Some(name.clone()),
                ..ctx.options()
            })
            .await;
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 2)
            .await
            .expect("consume");
        b.publish("", &ctx.queue, message("[]", "k1", 0))
            .await
            .expect("publish");
        recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("before kill")
            .acker
            .ack()
            .await
            .expect("ack");

        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut ctx.redis)
            .await
            .expect("client list");
        let ids: Vec<String> = list
            .lines()
            .filter(|l| l.split(' ').any(|f| f == format!("name={name}")))
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
            .map(str::to_owned)
            .collect();
        assert!(ids.len() >= 2, "BRPOP and command connections: {ids:?}");
        for id in &ids {
            let _: Result<i64, _> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut ctx.redis)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.publish("", &ctx.queue, message("[]", "k2", 0))
            .await
            .expect("publish after kill (reconnects)");
        let d = recv(&mut rx, Duration::from_secs(15))
            .await
            .expect("consumption resumes");
        assert_eq!(d.message.correlation_id.as_deref(), Some("k2"));
        d.acker.ack().await.expect("ack");
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

/// Kills every Redis connection named `name` (the broker's BRPOP and command
/// connections): to the broker this is Redis going away and coming back.
async fn kill_clients(redis: &mut redis::aio::MultiplexedConnection, name: &str) {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(redis)
        .await
        .expect("client list");
    let ids: Vec<String> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == format!("name={name}")))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    assert!(!ids.is_empty(), "the broker's connections are named {name}");
    for id in &ids {
        let _: Result<i64, _> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(redis)
            .await;
    }
}

#[tokio::test]
async fn a_held_delivery_returns_to_its_queue_after_a_reconnect_even_if_redis_lost_unacked() {
    // Issue 13: after a connection loss, a message the worker held unstarted
    // goes back on its queue at once (not after the visibility timeout), also
    // when a restarted Redis lost the `unacked` hash, and exactly once: of
    // the first delivery and the copy, only one can be acked (and run).
    let mut ctx = Ctx::new("held").await;
    let name = unique("cn").replace('-', "_");
    bounded(60, async {
        let b = ctx
            .broker(RedisOptions {
                client_name: Some(name.clone()),
                ..ctx.options()
            })
            .await;
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 4)
            .await
            .expect("consume");
        b.publish("", &ctx.queue, message("[]", "held1", 0))
            .await
            .expect("publish");
        let first = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivered");
        assert_eq!(first.message.correlation_id.as_deref(), Some("held1"));
        // A Redis restart without persistence: the unacked bookkeeping is gone.
        let _: i64 = ctx
            .redis
            .del(&[ctx.k("unacked"), ctx.k("unacked_index")])
            .await
            .expect("del");
        kill_clients(&mut ctx.redis, &name).await;
        let again = recv(&mut rx, Duration::from_secs(20))
            .await
            .expect("restored from the kept copy and delivered again");
        assert_eq!(again.message.correlation_id.as_deref(), Some("held1"));
        assert!(again.message.redelivered, "marked redelivered");
        // Both carry the same delivery tag (kombu restores the envelope as
        // is): whichever the worker acks first runs, the other's ack fails.
        let acks = [
            first.acker.ack().await.is_ok(),
            again.acker.ack().await.is_ok(),
        ];
        assert_eq!(
            acks,
            [true, false],
            "exactly one delivery may be acked (and run)"
        );
        let left: i64 = ctx.redis.llen(ctx.k(&ctx.queue)).await.expect("llen");
        assert_eq!(left, 0, "exactly one copy went back");
        let unacked: i64 = ctx.redis.hlen(ctx.k("unacked")).await.expect("hlen");
        assert_eq!(unacked, 0);
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn queue_length_counts_every_priority_step() {
    let ctx = Ctx::new("qlen").await;
    bounded(60, async {
        ctx.kombu(
            "p = conn.Producer()\n\
             for pri in (9, 0, 5, 0):\n\
             \x20   p.publish({'pri': pri}, routing_key=q, declare=[Queue(q)], priority=pri)",
        );
        let b = ctx.broker(ctx.options()).await;
        assert_eq!(b.queue_length(&ctx.queue).await.expect("llen"), Some(4));
        // A queue nobody declared is empty, as LLEN says.
        assert_eq!(
            b.queue_length("omw-no-such-queue").await.expect("llen"),
            Some(0)
        );
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}

#[tokio::test]
async fn set_prefetch_widens_and_narrows_the_running_consumer() {
    let ctx = Ctx::new("setprefetch").await;
    bounded(60, async {
        let b = ctx.broker(ctx.options()).await;
        for i in 0..3 {
            b.publish("", &ctx.queue, message("[]", &format!("s{i}"), 0))
                .await
                .expect("publish");
        }
        let mut rx = b
            .consume(std::slice::from_ref(&ctx.queue), 1)
            .await
            .expect("consume");
        let d1 = recv(&mut rx, Duration::from_secs(5)).await.expect("first");
        assert!(recv(&mut rx, Duration::from_millis(1500)).await.is_none());
        // pool_grow: one more unsettled allowed, without any settle.
        b.set_prefetch(2).await.expect("set_prefetch");
        let d2 = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("second after the grow");
        // pool_shrink: back to 1; an ack leaves 1 unsettled, so nothing new.
        b.set_prefetch(1).await.expect("set_prefetch");
        d1.acker.ack().await.expect("ack");
        assert!(recv(&mut rx, Duration::from_millis(2500)).await.is_none());
        d2.acker.ack().await.expect("ack");
        let d3 = recv(&mut rx, Duration::from_secs(5)).await.expect("third");
        d3.acker.ack().await.expect("ack");
        b.close().await.expect("close");
    })
    .await;
    ctx.cleanup().await;
}
