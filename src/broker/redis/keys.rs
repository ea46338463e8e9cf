//! Key and channel names, exactly as kombu builds them: the global key
//! prefix, priority sub-queues (`L\x06\x163`), binding members and the
//! fanout pub/sub channel.
//!
//! Python clients push to and pop from these same keys, so a single wrong
//! byte here means messages nobody sees. Pure functions, unit-tested.

use super::Shared;

impl Shared {
    /// `name` with kombu's `global_keyprefix`.
    pub(super) fn key(&self, name: &str) -> String {
        format!("{}{}", self.opts.global_keyprefix, name)
    }

    /// kombu `_q_for_pri(queue, priority(p))`, prefixed.
    pub(super) fn queue_key(&self, queue: &str, priority: u8) -> String {
        let step = self.step_for(priority);
        if step == 0 {
            self.key(queue)
        } else {
            self.key(&format!("{queue}{}{step}", self.opts.sep))
        }
    }

    /// `steps[bisect(steps, p) - 1]`, `p` clamped to 0..=9.
    fn step_for(&self, priority: u8) -> u8 {
        let p = priority.min(9);
        self.opts
            .priority_steps
            .iter()
            .copied()
            .filter(|s| *s <= p)
            .max()
            .unwrap_or(0)
    }

    /// The member of `_kombu.binding.<queue>` for kombu's default binding.
    pub(super) fn binding_member(&self, queue: &str) -> String {
        // routing_key + sep + pattern("") + sep + queue
        format!("{queue}{sep}{sep}{queue}", sep = self.opts.sep)
    }

    /// kombu's fanout channel for `exchange` (`/<db>.<exchange>`, prefixed).
    pub(super) fn fanout_channel(&self, exchange: &str) -> String {
        let prefix = self
            .opts
            .fanout_prefix
            .clone()
            .unwrap_or_else(|| format!("/{}.", self.db));
        format!("{}{prefix}{exchange}", self.opts.global_keyprefix)
    }
}

#[cfg(test)]
mod tests {
    use redis::Client;

    use super::super::RedisOptions;
    use super::*;

    fn shared() -> Shared {
        let client = Client::open("redis://127.0.0.1:6379/3").expect("valid url");
        Shared::new(RedisOptions::default(), String::new(), 3, client)
    }

    #[test]
    fn priority_keys_follow_kombu_steps() {
        let s = shared();
        let want = [
            (0, "q"),
            (1, "q"),
            (2, "q"),
            (3, "q\x06\x163"),
            (5, "q\x06\x163"),
            (6, "q\x06\x166"),
            (8, "q\x06\x166"),
            (9, "q\x06\x169"),
            (200, "q\x06\x169"),
        ];
        for (p, k) in want {
            assert_eq!(s.queue_key("q", p), k, "priority {p}");
        }
        assert_eq!(
            s.binding_member("default"),
            "default\x06\x16\x06\x16default"
        );
    }
}
