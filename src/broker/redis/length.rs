//! Queue lengths for `celery_queue_length`: the sum of `LLEN` over the queue's priority
//! sub-queues (kombu's `L`, `L\x06\x163`, ...), in one pipeline. celery-exporter reads only `L`;
//! with priorities unused the sub-queues are empty and both agree, with priorities in use this
//! counts every message a consumer of `L` would take.

use redis::Pipeline;

use super::query::Request;
use super::Shared;
use crate::broker::BrokerError;

impl Shared {
    /// Messages waiting in `queue` (all priority steps); a missing queue is 0, as in Redis.
    pub(super) async fn queue_length(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut pipe = Pipeline::new();
        for key in self.length_keys(queue) {
            pipe.llen(key);
        }
        let lens: Vec<u64> = self.cmd.query("LLEN", 1, Request::Pipeline(&pipe)).await?;
        Ok(lens.iter().sum())
    }

    /// The list keys of `queue`, one per distinct priority step.
    fn length_keys(&self, queue: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .opts
            .priority_steps
            .iter()
            .map(|p| self.queue_key(queue, *p))
            .collect();
        keys.dedup();
        if keys.is_empty() {
            keys.push(self.key(queue));
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use redis::Client;

    use super::super::RedisOptions;
    use super::*;

    #[test]
    fn every_priority_step_is_counted() {
        let client = Client::open("redis://127.0.0.1:6379/3").expect("valid url");
        let s = Shared::new(RedisOptions::default(), String::new(), 3, client);
        assert_eq!(
            s.length_keys("q"),
            vec!["q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
        );
    }
}
