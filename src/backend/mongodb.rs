//! `mongodb://`: one document per task in `celery_taskmeta`.
//!
//! As Celery's MongoDB backend: `{_id: task_id, status, result, traceback,
//! children, date_done}` with `result` the client's `result_serializer`
//! bytes (omega|ml: pickle) as BSON Binary and `date_done` a BSON datetime,
//! written with `replace_one({_id, status: {$ne: SUCCESS}}, doc, upsert)` so a
//! stored SUCCESS is never overwritten. omega|ml's client reads the
//! collection in the omega database, so a URL without a database falls back
//! to the omega MongoDB URL's database.

use async_trait::async_trait;
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use mongodb::{Client, Collection};

use super::{BackendError, ReplyTarget, ResultBackend};
use crate::protocol::result_codec::{self, Serializer};
use crate::protocol::ResultMeta;

/// Celery's MongoDB result backend.
pub struct MongoBackend {
    client: Client,
    collection: Collection<Document>,
    serializer: Serializer,
}

fn io(e: impl std::fmt::Display) -> BackendError {
    BackendError::Io {
        backend: "mongodb",
        reason: e.to_string(),
    }
}

/// The database a MongoDB URL names (its path), if any.
pub fn database_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let path = rest.split_once('/')?.1;
    let db = path.split('?').next().unwrap_or("");
    (!db.is_empty()).then(|| db.to_owned())
}

impl MongoBackend {
    /// Connects to `url`; the database is `url`'s, else `omega_url`'s, else `celery`.
    pub async fn connect(
        url: &str,
        omega_url: &str,
        serializer: Serializer,
    ) -> Result<Self, BackendError> {
        let invalid = |e: mongodb::error::Error| BackendError::InvalidUrl {
            url: crate::redact::mask_url(url),
            reason: e.to_string(),
        };
        let mut opts = mongodb::options::ClientOptions::parse(url)
            .await
            .map_err(invalid)?;
        // omega|ml's backend URL carries `directConnection=True` (OMEGA_MONGO_SSL_KWARGS).
        if opts.hosts.len() == 1 && opts.direct_connection.is_none() {
            opts.direct_connection = Some(true);
        }
        // Fail a store within seconds when MongoDB is away (the worker retries).
        opts.server_selection_timeout = Some(std::time::Duration::from_secs(5));
        opts.connect_timeout = Some(std::time::Duration::from_secs(5));
        let client = Client::with_options(opts).map_err(invalid)?;
        let db = database_of(url)
            .or_else(|| database_of(omega_url))
            .unwrap_or_else(|| "celery".to_owned());
        let collection = client.database(&db).collection("celery_taskmeta");
        Ok(MongoBackend {
            client,
            collection,
            serializer,
        })
    }
}

#[async_trait]
impl ResultBackend for MongoBackend {
    async fn store(&self, meta: &ResultMeta, _target: &ReplyTarget) -> Result<(), BackendError> {
        let result = Bson::Binary(Binary {
            subtype: BinarySubtype::Generic,
            bytes: result_codec::encode_result(self.serializer, meta),
        });
        let date_done = match meta.date_done {
            Some(d) => Bson::DateTime(mongodb::bson::DateTime::from_millis(d.timestamp_millis())),
            None => Bson::Null,
        };
        let traceback = meta.traceback.clone().map_or(Bson::Null, Bson::String);
        let document = doc! {
            "_id": &meta.task_id,
            "status": meta.status.as_str(),
            "result": result,
            "traceback": traceback,
            "children": [],
            "date_done": date_done,
        };
        let filter = doc! {"_id": &meta.task_id, "status": {"$ne": "SUCCESS"}};
        // A stored SUCCESS makes the filter miss and the upsert collide on _id:
        // that is the "keep the first SUCCESS" outcome, not an error.
        match self
            .collection
            .replace_one(filter, document)
            .upsert(true)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.client
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await
            .map(|_| ())
            .map_err(io)
    }

    fn name(&self) -> &'static str {
        "mongodb"
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::database_of;

    #[test]
    fn database_from_url() {
        assert_eq!(database_of("mongodb://h:1/omega").as_deref(), Some("omega"));
        assert_eq!(
            database_of("mongodb://u:p@h/omega?authSource=admin").as_deref(),
            Some("omega")
        );
        assert_eq!(database_of("mongodb://h:1/"), None);
        assert_eq!(database_of("mongodb://h:1"), None);
    }
}
