//! kombu's exchange emulation: the `_kombu.binding.<exchange>` sets.
//!
//! Redis has no exchanges; kombu records each binding as a set member
//! `routing_key\x06\x16pattern\x06\x16queue` and routes a publish by reading
//! the set. Python clients route by these same sets, so declaring a queue
//! here is what makes their tasks reach it — and our publishes reach theirs.

use super::query::Request;
use super::Shared;
use crate::broker::{BrokerError, FanoutSubscription};

impl Shared {
    /// Declares `queue` the way kombu does for a queue without `x-expires`:
    /// `SADD _kombu.binding.L "L\x06\x16\x06\x16L"` and the same member in
    /// `_kombu.binding_permanent.L` (kombu ≥ 5.7), in one MULTI/EXEC.
    pub(super) async fn declare_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let member = self.binding_member(queue);
        let k1 = self.key(&format!("_kombu.binding.{queue}"));
        let k2 = self.key(&format!("_kombu.binding_permanent.{queue}"));
        self.cmd
            .query(
                "declare queue",
                3,
                Request::Pipeline(
                    redis::pipe()
                        .atomic()
                        .cmd("SADD")
                        .arg(&k1)
                        .arg(&member)
                        .ignore()
                        .cmd("SADD")
                        .arg(&k2)
                        .arg(&member)
                        .ignore(),
                ),
            )
            .await
    }

    /// Queues bound to `exchange` with exactly `routing_key` (kombu's direct
    /// lookup over `_kombu.binding.<exchange>`); the anon exchange routes to
    /// the queue named by the routing key.
    pub(super) async fn lookup(
        &self,
        exchange: &str,
        routing_key: &str,
    ) -> Result<Vec<String>, BrokerError> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_owned()]);
        }
        let key = self.key(&format!("_kombu.binding.{exchange}"));
        let members: Vec<Vec<u8>> = self
            .cmd
            .query(
                "SMEMBERS",
                3,
                Request::Cmd(redis::cmd("SMEMBERS").arg(&key)),
            )
            .await?;
        let mut queues = Vec::new();
        for m in members {
            let text = String::from_utf8_lossy(&m);
            let parts: Vec<&str> = text.split(self.opts.sep.as_str()).collect();
            if let [rk, _pattern, queue] = parts.as_slice() {
                if *rk == routing_key && !queues.iter().any(|q| q == queue) {
                    queues.push((*queue).to_owned());
                }
            }
        }
        Ok(queues)
    }

    /// kombu's binding for a node's pidbox queue (routing key and pattern
    /// empty); fanout delivery itself does not need it, but tools that list
    /// bindings expect it.
    pub(super) async fn bind_fanout_queue(
        &self,
        subscription: &FanoutSubscription,
    ) -> Result<(), BrokerError> {
        let key = self.key(&format!("_kombu.binding.{}", subscription.exchange));
        let member = format!("{sep}{sep}{}", subscription.queue, sep = self.opts.sep);
        self.cmd
            .query::<i64>(
                "SADD binding",
                3,
                Request::Cmd(redis::cmd("SADD").arg(&key).arg(&member)),
            )
            .await?;
        Ok(())
    }
}
