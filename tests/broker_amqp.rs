//! AMQP broker against the local RabbitMQ and the real Python kombu client.
//!
//! Every test uses its own `omw-test-…` queue/exchange and deletes them.

#[path = "common/broker.rs"]
mod broker_common;

use std::time::Duration;

use broker_common::{bounded, init_logs, python, recv, sh, unique, AMQP_URL};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use om_worker::broker::amqp::{AmqpBroker, AmqpOptions};
use om_worker::broker::Broker;
use om_worker::protocol::{Headers, Outgoing, Value};

async fn broker() -> AmqpBroker {
    AmqpBroker::connect(AMQP_URL, AmqpOptions::default())
        .await
        .expect("connects to RabbitMQ")
}

/// Deletes the test's queue and exchange.
async fn cleanup(name: &str) {
    let Ok(conn) = lapin::Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

fn message(body: &str, id: &str) -> Outgoing {
    Outgoing {
        body: body.as_bytes().to_vec(),
        content_type: "application/json".into(),
        content_encoding: "utf-8".into(),
        correlation_id: Some(id.into()),
        delivery_mode: 2,
        ..Outgoing::default()
    }
}

fn list_queue(name: &str) -> Option<String> {
    sh(
        "rabbitmqctl",
        &[
            "-q",
            "list_queues",
            "name",
            "durable",
            "auto_delete",
            "arguments",
        ],
    )
    .lines()
    .find(|l| l.split('\t').next() == Some(name))
    .map(str::to_owned)
}

#[tokio::test]
async fn round_trip_with_headers_of_many_types() {
    let q = unique("rt");
    bounded(30, async {
        let b = broker().await;
        let mut rx = b
            .consume(std::slice::from_ref(&q), 4)
            .await
            .expect("consume");
        let mut headers = Headers::new();
        headers.insert("none".into(), Value::None);
        headers.insert("t".into(), Value::Bool(true));
        headers.insert("small".into(), Value::Int(-7));
        headers.insert("big".into(), Value::Int(1 << 40));
        headers.insert("float".into(), Value::Float(2.5));
        headers.insert("str".into(), Value::Str("häj".into()));
        headers.insert("bytes".into(), Value::Bytes(vec![0, 1, 255]));
        headers.insert(
            "timelimit".into(),
            Value::List(vec![Value::Int(1230), Value::None]),
        );
        headers.insert(
            "nested".into(),
            Value::dict([("a", Value::List(vec![Value::dict([("b", Value::Int(1))])]))]),
        );
        headers.insert("dec".into(), Value::Decimal("12.34".into()));
        let when = chrono::NaiveDate::from_ymd_opt(2026, 1, 2)
            .and_then(|d| d.and_hms_opt(3, 4, 5))
            .expect("date");
        headers.insert(
            "when".into(),
            Value::DateTime {
                naive: when,
                offset_seconds: Some(0),
            },
        );
        let mut m = message("[[2, 2], {}, {}]", "id-1");
        m.headers = headers;
        m.reply_to = Some("reply-q".into());
        m.priority = Some(3);
        m.expiration = Some("60000".into());
        b.publish("", &q, m).await.expect("publish");

        let d = recv(&mut rx, Duration::from_secs(10))
            .await
            .expect("delivery");
        let msg = &d.message;
        assert_eq!(msg.body, b"[[2, 2], {}, {}]");
        assert_eq!(msg.content_type.as_deref(), Some("application/json"));
        assert_eq!(msg.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(msg.correlation_id.as_deref(), Some("id-1"));
        assert_eq!(msg.reply_to.as_deref(), Some("reply-q"));
        assert_eq!(msg.priority, Some(3));
        assert_eq!(msg.delivery_mode, Some(2));
        assert_eq!(msg.expiration.as_deref(), Some("60000"));
        assert_eq!(msg.exchange, "");
        assert_eq!(msg.routing_key, q);
        assert!(!msg.redelivered);
        let h = &msg.headers;
        assert_eq!(h.get("none"), Some(&Value::None));
        assert_eq!(h.get("t"), Some(&Value::Bool(true)));
        assert_eq!(h.get("small"), Some(&Value::Int(-7)));
        assert_eq!(h.get("big"), Some(&Value::Int(1 << 40)));
        assert_eq!(h.get("float"), Some(&Value::Float(2.5)));
        assert_eq!(h.get("str"), Some(&Value::Str("häj".into())));
        assert_eq!(h.get("bytes"), Some(&Value::Bytes(vec![0, 1, 255])));
        assert_eq!(
            h.get("timelimit"),
            Some(&Value::List(vec![Value::Int(1230), Value::None]))
        );
        assert_eq!(
            h.get("nested").and_then(|n| n.get("a")),
            Some(&Value::List(vec![Value::dict([("b", Value::Int(1))])]))
        );
        assert_eq!(h.get("dec"), Some(&Value::Decimal("12.34".into())));
        assert_eq!(
            h.get("when"),
            Some(&Value::DateTime {
                naive: when,
                offset_seconds: None
            })
        );
        d.acker.ack().await.expect("ack");
        // A second settle is an error, not a panic.
        assert!(d.acker.ack().await.is_err());
        b.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn kombu_declares_first_then_we_consume_its_message() {
    let q = unique("kfirst");
    bounded(60, async {
        python(&format!(
            r#"
import datetime, decimal
from kombu import Connection, Exchange, Queue
with Connection('{AMQP_URL}') as c:
    q = Queue('{q}', Exchange('{q}', 'direct'), routing_key='{q}')
    q(c.default_channel).declare()
    c.Producer().publish(b'[[1], {{}}, {{}}]', routing_key='{q}', exchange='',
        content_type='application/json', content_encoding='utf-8',
        correlation_id='cid-k', reply_to='r-k', priority=5, delivery_mode=2,
        headers={{'task': 't.x', 'none': None, 'big': 2**40, 'neg': -2**40, 'dec': decimal.Decimal('1.25'),
                  'when': datetime.datetime(2026, 1, 2, 3, 4, 5), 'lst': [1, None, 'a'], 'd': {{'k': True}},
                  'f': 0.5, 'stamps': {{}}}})
"#
        ));
        let line = list_queue(&q).expect("queue listed");
        assert_eq!(line, format!("{q}\ttrue\tfalse\t[]"));

        let b = broker().await;
        let mut rx = b
            .consume(std::slice::from_ref(&q), 1)
            .await
            .expect("our declaration is equivalent");
        let d = recv(&mut rx, Duration::from_secs(10)).await.expect("delivery");
        let h = &d.message.headers;
        assert_eq!(h.get("task"), Some(&Value::Str("t.x".into())));
        assert_eq!(h.get("none"), Some(&Value::None));
        assert_eq!(h.get("big"), Some(&Value::Int(1 << 40)));
        assert_eq!(h.get("neg"), Some(&Value::Int(-(1 << 40))));
        assert_eq!(h.get("dec"), Some(&Value::Decimal("1.25".into())));
        assert!(matches!(h.get("when"), Some(Value::DateTime { .. })));
        assert_eq!(
            h.get("lst"),
            Some(&Value::List(vec![
                Value::Int(1),
                Value::None,
                Value::Str("a".into())
            ]))
        );
        assert_eq!(
            h.get("d").and_then(|v| v.get("k")),
            Some(&Value::Bool(true))
        );
        assert_eq!(h.get("f"), Some(&Value::Float(0.5)));
        assert_eq!(h.get("stamps"), Some(&Value::Dict(vec![])));
        assert_eq!(d.message.correlation_id.as_deref(), Some("cid-k"));
        assert_eq!(d.message.priority, Some(5));
        d.acker.ack().await.expect("ack");
        b.close().await.expect("close");
        // Still exactly kombu's flags after our declaration.
        assert_eq!(
            list_queue(&q).expect("listed"),
            format!("{q}\ttrue\tfalse\t[]")
        );
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn we_declare_first_then_kombu_declares_without_406() {
    let q = unique("ofirst");
    bounded(60, async {
        let b = broker().await;
        let _rx = b
            .consume(std::slice::from_ref(&q), 1)
            .await
            .expect("consume");
        assert_eq!(
            list_queue(&q).expect("listed"),
            format!("{q}\ttrue\tfalse\t[]")
        );
        let exchanges = sh(
            "rabbitmqctl",
            &[
                "-q",
                "list_exchanges",
                "name",
                "type",
                "durable",
                "auto_delete",
            ],
        );
        assert!(
            exchanges
                .lines()
                .any(|l| l == format!("{q}\tdirect\ttrue\tfalse")),
            "{exchanges}"
        );
        let bindings = sh(
            "rabbitmqctl",
            &[
                "-q",
                "list_bindings",
                "source_name",
                "destination_name",
                "routing_key",
            ],
        );
        assert!(bindings.lines().any(|l| l == format!("{q}\t{q}\t{q}")));
        let out = python(&format!(
            r#"
from kombu import Connection, Exchange, Queue
with Connection('{AMQP_URL}') as c:
    Queue('{q}', Exchange('{q}', 'direct'), routing_key='{q}')(c.default_channel).declare()
    print('ok')
"#
        ));
        assert_eq!(out.trim(), "ok");
        b.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries() {
    let q = unique("prefetch");
    bounded(60, async {
        let b = broker().await;
        b.declare_queue(&q).await.expect("declare");
        for i in 0..4 {
            b.publish("", &q, message("[]", &format!("m{i}")))
                .await
                .expect("publish");
        }
        let mut rx = b
            .consume(std::slice::from_ref(&q), 2)
            .await
            .expect("consume");
        let d1 = recv(&mut rx, Duration::from_secs(5)).await.expect("first");
        let d2 = recv(&mut rx, Duration::from_secs(5)).await.expect("second");
        assert!(
            recv(&mut rx, Duration::from_millis(1500)).await.is_none(),
            "a third delivery arrived while two were unacked"
        );
        d1.acker.ack().await.expect("ack");
        let d3 = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("third after an ack");
        assert!(recv(&mut rx, Duration::from_millis(800)).await.is_none());
        d2.acker.ack().await.expect("ack");
        d3.acker.ack().await.expect("ack");
        let d4 = recv(&mut rx, Duration::from_secs(5)).await.expect("fourth");
        d4.acker.ack().await.expect("ack");
        b.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn reject_requeue_redelivers_with_flag() {
    let q = unique("reject");
    bounded(30, async {
        let b = broker().await;
        let mut rx = b
            .consume(std::slice::from_ref(&q), 1)
            .await
            .expect("consume");
        b.publish("", &q, message("[1]", "r1"))
            .await
            .expect("publish");
        let d = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivery");
        assert!(!d.message.redelivered);
        d.acker.reject(true).await.expect("reject");
        let again = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("redelivery");
        assert!(again.message.redelivered);
        assert_eq!(again.message.correlation_id.as_deref(), Some("r1"));
        again.acker.reject(false).await.expect("reject for good");
        assert!(recv(&mut rx, Duration::from_millis(800)).await.is_none());
        b.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn closing_without_ack_requeues_for_the_next_consumer() {
    let q = unique("drop");
    bounded(60, async {
        let a = broker().await;
        let mut rx = a
            .consume(std::slice::from_ref(&q), 4)
            .await
            .expect("consume");
        a.publish("", &q, message("[2]", "d1"))
            .await
            .expect("publish");
        let held = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivery");
        a.close().await.expect("close");
        // The connection is gone: acking fails cleanly.
        assert!(held.acker.ack().await.is_err());

        let b = broker().await;
        let mut rx = b
            .consume(std::slice::from_ref(&q), 4)
            .await
            .expect("consume");
        let d = recv(&mut rx, Duration::from_secs(10))
            .await
            .expect("requeued");
        assert_eq!(d.message.correlation_id.as_deref(), Some("d1"));
        assert!(d.message.redelivered);
        d.acker.ack().await.expect("ack");

        // Dropping (no close) also gives messages back.
        b.publish("", &q, message("[3]", "d2"))
            .await
            .expect("publish");
        let held = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivery");
        drop(rx);
        drop(b);
        drop(held);
        let c = broker().await;
        let mut rx = c
            .consume(std::slice::from_ref(&q), 4)
            .await
            .expect("consume");
        let d = recv(&mut rx, Duration::from_secs(10))
            .await
            .expect("requeued after drop");
        assert_eq!(d.message.correlation_id.as_deref(), Some("d2"));
        d.acker.ack().await.expect("ack");
        c.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn default_exchange_publish_with_correlation_id_reaches_kombu() {
    let q = unique("rpc");
    bounded(30, async {
        let b = broker().await;
        b.declare_queue(&q).await.expect("declare");
        let mut m = message("{\"status\": \"SUCCESS\"}", "task-123");
        m.delivery_mode = 1;
        b.publish("", &q, m).await.expect("publish");
        let out = python(&format!(
            r#"
import time
from kombu import Connection
with Connection('{AMQP_URL}') as c:
    ch = c.channel()
    m = None
    for _ in range(50):
        m = ch.basic_get('{q}', no_ack=True)
        if m: break
        time.sleep(0.1)
    body = m.body if isinstance(m.body, str) else m.body.decode()
    print(m.properties['correlation_id'], m.properties['delivery_mode'], body)
"#
        ));
        assert_eq!(out.trim(), "task-123 1 {\"status\": \"SUCCESS\"}");
        b.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn reconnects_after_the_broker_closes_the_connection() {
    let q = unique("reconnect");
    let name = unique("conn");
    init_logs();
    bounded(90, async {
        let opts = AmqpOptions {
            connection_name: Some(name.clone()),
            ..AmqpOptions::default()
        };
        let b = AmqpBroker::connect(AMQP_URL, opts).await.expect("connect");
        let mut rx = b
            .consume(std::slice::from_ref(&q), 2)
            .await
            .expect("consume");
        b.publish("", &q, message("[]", "before"))
            .await
            .expect("publish");
        let held = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivery");

        let conns = sh(
            "rabbitmqctl",
            &["-q", "list_connections", "pid", "client_properties"],
        );
        // RabbitMQ 3.10's close_connection wants the connection pid.
        let conn_pid = conns
            .lines()
            .find(|l| l.contains(&name))
            .and_then(|l| l.split('\t').next())
            .expect("our connection is listed")
            .to_owned();
        sh(
            "rabbitmqctl",
            &["-q", "close_connection", &conn_pid, "omw test"],
        );

        // The message held on the dead connection comes back, redelivered,
        // on the same receiver; the old ack fails cleanly.
        let again = recv(&mut rx, Duration::from_secs(20))
            .await
            .expect("redelivered after reconnect");
        assert_eq!(again.message.correlation_id.as_deref(), Some("before"));
        assert!(again.message.redelivered);
        assert!(held.acker.ack().await.is_err());
        again.acker.ack().await.expect("ack on the new connection");

        b.publish("", &q, message("[]", "after"))
            .await
            .expect("publish");
        let d = recv(&mut rx, Duration::from_secs(10)).await.expect("after");
        assert_eq!(d.message.correlation_id.as_deref(), Some("after"));
        d.acker.ack().await.expect("ack");
        b.stop_consuming().await.expect("stop");
        assert!(recv(&mut rx, Duration::from_secs(5)).await.is_none());
        b.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn queue_length_is_the_ready_count_and_a_missing_queue_harms_nothing() {
    let q = unique("qlen");
    bounded(30, async {
        let b = broker().await;
        b.declare_queue(&q).await.expect("declare");
        for i in 0..3 {
            b.publish("", &q, message("{}", &format!("m{i}")))
                .await
                .expect("publish");
        }
        let want = Some(3);
        let mut got = None;
        for _ in 0..50 {
            got = b.queue_length(&q).await.expect("passive declare");
            if got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(got, want);
        // 404 on a channel of its own: None, and the connection keeps working.
        let missing = unique("missing");
        assert_eq!(b.queue_length(&missing).await.expect("404 is None"), None);
        let mut rx = b
            .consume(std::slice::from_ref(&q), 0)
            .await
            .expect("consume");
        let d = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("delivery");
        d.acker.ack().await.expect("ack");
        b.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}

#[tokio::test]
async fn set_prefetch_widens_and_narrows_the_running_consumer() {
    let q = unique("setprefetch");
    bounded(60, async {
        let b = broker().await;
        b.declare_queue(&q).await.expect("declare");
        for i in 0..3 {
            b.publish("", &q, message("[]", &format!("s{i}")))
                .await
                .expect("publish");
        }
        let mut rx = b
            .consume(std::slice::from_ref(&q), 1)
            .await
            .expect("consume");
        let d1 = recv(&mut rx, Duration::from_secs(5)).await.expect("first");
        assert!(recv(&mut rx, Duration::from_millis(1500)).await.is_none());
        // pool_grow: basic.qos 2, one more delivery without any ack.
        b.set_prefetch(2).await.expect("set_prefetch");
        let d2 = recv(&mut rx, Duration::from_secs(5))
            .await
            .expect("second after the grow");
        // pool_shrink: basic.qos 1; an ack leaves 1 unacked, so nothing new.
        b.set_prefetch(1).await.expect("set_prefetch");
        d1.acker.ack().await.expect("ack");
        assert!(recv(&mut rx, Duration::from_millis(1500)).await.is_none());
        d2.acker.ack().await.expect("ack");
        let d3 = recv(&mut rx, Duration::from_secs(5)).await.expect("third");
        d3.acker.ack().await.expect("ack");
        b.close().await.expect("close");
    })
    .await;
    cleanup(&q).await;
}
