//! [`MongoLedger`]: the in-flight records in MongoDB, and the sweep that
//! re-queues the tasks of dead workers (see [`super`] for why).

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures_util::TryStreamExt as _;
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use tracing::{info, warn};

use super::{Begin, Ledger, LedgerError};
use crate::protocol::{json, Headers, Outgoing, RawMessage};

/// Where records live (in the omega database).
pub const COLLECTION: &str = "om_worker_inflight";

fn err(op: &'static str) -> impl FnOnce(mongodb::error::Error) -> LedgerError {
    move |source| LedgerError::Mongo { op, source }
}

/// The ledger of one worker, in MongoDB.
#[derive(Clone)]
pub struct MongoLedger {
    coll: Collection<Document>,
    owner: String,
    lease: Duration,
}

fn lease_until(lease: Duration) -> DateTime {
    DateTime::from_millis(
        Utc::now().timestamp_millis() + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2),
    )
}

impl MongoLedger {
    /// A ledger in `db` for the worker `owner`, leases of `lease`.
    pub fn new(db: &Database, owner: &str, lease: Duration) -> Self {
        MongoLedger {
            coll: db.collection(COLLECTION),
            owner: owner.to_owned(),
            lease,
        }
    }

    /// Whether MongoDB answers (one cheap read of the ledger collection).
    pub async fn probe(&self) -> Result<(), LedgerError> {
        self.coll
            .find_one(doc! {"_id": ""})
            .projection(doc! {"_id": 1})
            .await
            .map(|_| ())
            .map_err(err("probe"))
    }

    /// Claims every record whose lease expired (its worker died) and returns
    /// them as `(task_id, queue, message)` to republish. Claimed records get a
    /// fresh lease in this worker's name; call [`Ledger::finish`] after the
    /// republish succeeded (a crash in between republishes once more later;
    /// tasks are idempotent).
    pub async fn claim_expired(&self) -> Result<Vec<(String, String, Outgoing)>, LedgerError> {
        let now = DateTime::now();
        let expired: Vec<Document> = self
            .coll
            .find(doc! {"lease_until": {"$lt": now}})
            .projection(doc! {"_id": 1})
            .limit(100)
            .await
            .map_err(err("find expired"))?
            .try_collect()
            .await
            .map_err(err("find expired"))?;
        let mut claimed = Vec::new();
        for d in expired {
            let Some(Bson::String(id)) = d.get("_id").cloned() else {
                continue;
            };
            let got = self
                .coll
                .find_one_and_update(
                    doc! {"_id": &id, "lease_until": {"$lt": now}},
                    doc! {"$set": {"owner": &self.owner, "lease_until": lease_until(self.lease)}},
                )
                .return_document(ReturnDocument::After)
                .await
                .map_err(err("claim"))?;
            let Some(rec) = got else { continue };
            match outgoing_from(&rec) {
                Some((queue, msg)) => claimed.push((id, queue, msg)),
                None => {
                    warn!(task_id = %id, "in-flight record is unreadable; dropping it");
                    let _ = self.coll.delete_one(doc! {"_id": &id}).await;
                }
            }
        }
        Ok(claimed)
    }
}

#[async_trait]
impl Ledger for MongoLedger {
    /// The lease length.
    fn lease(&self) -> Duration {
        self.lease
    }

    /// Records that this worker starts `task_id` (from `raw`), unless another
    /// worker holds a live lease on it. Call before acking the message.
    async fn begin(&self, task_id: &str, raw: &RawMessage) -> Result<Begin, LedgerError> {
        let now = DateTime::now();
        // Take the record if it is new, expired or already ours.
        let filter = doc! {
            "_id": task_id,
            "$or": [{"lease_until": {"$lt": now}}, {"owner": &self.owner}],
        };
        let update = doc! {
            "$set": {
                "owner": &self.owner,
                "lease_until": lease_until(self.lease),
                "queue": &raw.routing_key,
                "message": message_doc(raw),
            },
            "$setOnInsert": {"created": now},
            "$inc": {"attempts": 1},
        };
        match self
            .coll
            .find_one_and_update(filter, update)
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
        {
            Ok(_) => Ok(Begin::Run),
            // The filter missed an existing record: someone else holds a live lease.
            Err(e) if is_duplicate_key(&e) => {
                let holder = self
                    .coll
                    .find_one(doc! {"_id": task_id})
                    .await
                    .map_err(err("read holder"))?
                    .and_then(|d| d.get_str("owner").ok().map(str::to_owned))
                    .unwrap_or_else(|| "?".into());
                Ok(Begin::HeldBy(holder))
            }
            Err(e) => Err(err("begin")(e)),
        }
    }

    /// Extends the lease of a task this worker runs.
    async fn renew(&self, task_id: &str) -> Result<bool, LedgerError> {
        let r = self
            .coll
            .update_one(
                doc! {"_id": task_id, "owner": &self.owner},
                doc! {"$set": {"lease_until": lease_until(self.lease)}},
            )
            .await
            .map_err(err("renew"))?;
        Ok(r.matched_count == 1)
    }

    /// The task's result is stored: forget it.
    async fn finish(&self, task_id: &str) -> Result<(), LedgerError> {
        self.coll
            .delete_one(doc! {"_id": task_id, "owner": &self.owner})
            .await
            .map(|_| ())
            .map_err(err("finish"))
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => e.to_string().contains("E11000"),
    }
}

/// The message as the broker delivered it, enough to publish it again unchanged.
fn message_doc(raw: &RawMessage) -> Document {
    // json::encode keeps NaN/Infinity headers as Python's tokens (json::decode reads them back).
    let headers = String::from_utf8_lossy(&json::encode(&crate::protocol::Value::Dict(
        raw.headers
            .iter()
            .map(|(k, v)| (crate::protocol::Value::Str(k.clone()), v.clone()))
            .collect(),
    )))
    .into_owned();
    let opt = |s: &Option<String>| s.clone().map_or(Bson::Null, Bson::String);
    doc! {
        "body": Binary { subtype: BinarySubtype::Generic, bytes: raw.body.clone() },
        "content_type": opt(&raw.content_type),
        "content_encoding": opt(&raw.content_encoding),
        "headers": headers,
        "correlation_id": opt(&raw.correlation_id),
        "reply_to": opt(&raw.reply_to),
        "priority": raw.priority.map_or(Bson::Null, |p| Bson::Int32(i32::from(p))),
    }
}

fn outgoing_from(rec: &Document) -> Option<(String, Outgoing)> {
    let queue = rec.get_str("queue").ok()?.to_owned();
    let m = rec.get_document("message").ok()?;
    let body = match m.get("body")? {
        Bson::Binary(b) => b.bytes.clone(),
        _ => return None,
    };
    let headers: Headers = json::decode(m.get_str("headers").ok()?.as_bytes())
        .ok()?
        .as_dict()?
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.clone())))
        .collect();
    let s = |k: &str| m.get_str(k).ok().map(str::to_owned);
    Some((
        queue,
        Outgoing {
            body,
            content_type: s("content_type").unwrap_or_default(),
            content_encoding: s("content_encoding").unwrap_or_default(),
            headers,
            correlation_id: s("correlation_id"),
            reply_to: s("reply_to"),
            priority: m
                .get_i32("priority")
                .ok()
                .and_then(|p| u8::try_from(p).ok()),
            delivery_mode: 2,
            expiration: None,
        },
    ))
}

/// Every `interval`, returns expired records' messages to their queues.
///
/// A lease also runs out while MongoDB is unreachable, for live workers too:
/// they cannot renew. So the sweeper claims nothing until it has reached
/// MongoDB without error for a whole lease: by then every live worker has
/// renewed its records (they renew every lease/3), and only the records of
/// dead workers are still expired.
pub async fn sweep_forever(
    ledger: MongoLedger,
    broker: std::sync::Arc<dyn crate::broker::Broker>,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut reachable_since: Option<std::time::Instant> = None;
    loop {
        let settled = reachable_since.is_some_and(|t| t.elapsed() >= ledger.lease);
        let swept = if settled {
            // Not cancelled midway: a claim followed by a publish should finish together.
            sweep_once(&ledger, broker.as_ref()).await
        } else {
            // A read-only probe: dropped at shutdown rather than holding the worker's exit
            // for a whole server-selection timeout while MongoDB is away.
            tokio::select! {
                r = ledger.probe() => r,
                _ = stop.cancelled() => return,
            }
        };
        match swept {
            Ok(()) => {
                reachable_since.get_or_insert_with(std::time::Instant::now);
            }
            Err(e) => {
                if reachable_since.take().is_some() {
                    warn!("{e}; not re-queueing expired tasks until MongoDB has been reachable for a whole lease");
                } else {
                    warn!("{e}");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One sweep: claim the expired records and republish their messages.
async fn sweep_once(
    ledger: &MongoLedger,
    broker: &dyn crate::broker::Broker,
) -> Result<(), LedgerError> {
    for (id, queue, msg) in ledger.claim_expired().await? {
        let published = async {
            broker.declare_queue(&queue).await?;
            broker.publish("", &queue, msg).await
        }
        .await;
        match published {
            Ok(()) => {
                info!(task_id = %id, %queue, "re-queued a task whose worker died (lease expired)");
                if let Err(e) = ledger.finish(&id).await {
                    warn!(task_id = %id, "{e}");
                }
            }
            // The claim's lease runs out and the next sweep tries again.
            Err(e) => warn!(task_id = %id, "re-queueing failed, will retry: {e}"),
        }
    }
    Ok(())
}
