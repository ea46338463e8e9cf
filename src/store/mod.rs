//! omega|ml's MongoDB layout: job metadata and GridFS notebooks.
//!
//! Exactly the documents omega|ml's `om.jobs` reads and writes (collection
//! `metadata`, prefix `jobs/`, GridFS bucket `omegaml` or `omegaml_<bucket>`,
//! as captured in `tests/fixtures/groundtruth/mongo_*.json`), and only path-level updates (`$set`,
//! `$push`, `$unset`): the kernel writes `attributes.job.status` into the same
//! document while the task runs, so a whole-document replace would lose it.

mod schedule;

use chrono::NaiveDateTime;
use futures_util::TryStreamExt as _;
use mongodb::bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, DateTime, Document};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

/// The bucket name omega|ml stores for its default bucket.
pub const DEFAULT_BUCKET: &str = "omegaml";
/// Metadata prefix of notebooks.
pub const JOBS_PREFIX: &str = "jobs/";
/// `kind` of notebooks.
pub const NOTEBOOK_KIND: &str = "script.ipynb";
/// GridFS chunk size pymongo uses.
pub const CHUNK_SIZE: usize = 261_120;

/// GridFS chunks written per `insert_many` (16 × 255 KiB ≈ 4 MiB).
const CHUNKS_PER_INSERT: usize = 16;

/// Errors talking to omega|ml's MongoDB.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is unusable.
    #[error("invalid MongoDB URL: {0}")]
    InvalidUrl(String),
    /// A MongoDB operation failed.
    #[error("MongoDB {op}: {source}")]
    Mongo {
        /// What we were doing.
        op: &'static str,
        /// The driver error.
        #[source]
        source: mongodb::error::Error,
    },
    /// A GridFS file is missing or broken.
    #[error("GridFS file {id} in {collection}: {reason}")]
    GridFs {
        /// File id.
        id: ObjectId,
        /// `<fs>.files` collection.
        collection: String,
        /// What is wrong.
        reason: String,
    },
}

impl StoreError {
    /// True when MongoDB could not be reached (a restart, a failover, a
    /// network cut) rather than refusing the operation: worth retrying.
    pub fn is_transient(&self) -> bool {
        use mongodb::error::ErrorKind;
        match self {
            StoreError::Mongo { source, .. } => {
                matches!(
                    source.kind.as_ref(),
                    ErrorKind::Io(_)
                        | ErrorKind::ServerSelection { .. }
                        | ErrorKind::ConnectionPoolCleared { .. }
                ) || source.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
            }
            _ => false,
        }
    }
}

/// How long a task keeps retrying MongoDB operations that fail because the
/// server is unreachable before it gives up (a restart or failover mid-run
/// must not lose the run; `tests/interop/test_faults.py` stops MongoDB mid-run).
pub const OUTAGE_BUDGET: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `op` (attempt number from 1) until it succeeds, fails for a reason
/// other than an unreachable server, or [`OUTAGE_BUDGET`] is spent. Each
/// operation passed here must be safe to repeat.
pub async fn retrying<T, F, Fut>(what: &str, task_id: &str, mut op: F) -> Result<T, StoreError>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let started = std::time::Instant::now();
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(5),
    );
    let mut attempt = 1;
    loop {
        match op(attempt).await {
            Err(e) if e.is_transient() && started.elapsed() + backoff.peek() < OUTAGE_BUDGET => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    task_id,
                    "{what}: MongoDB unreachable, retrying in {delay:?}: {e}"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
            Ok(v) => {
                if attempt > 1 {
                    tracing::info!(
                        task_id,
                        "{what}: MongoDB reachable again after {attempt} attempts"
                    );
                }
                return Ok(v);
            }
        }
    }
}

fn mongo(op: &'static str) -> impl FnOnce(mongodb::error::Error) -> StoreError {
    move |source| StoreError::Mongo { op, source }
}

/// The metadata of one notebook, as far as the worker needs it.
#[derive(Debug, Clone)]
pub struct JobMeta {
    /// `_id`.
    pub id: ObjectId,
    /// `name` as stored (with `.ipynb`).
    pub name: String,
    /// `bucket` field.
    pub bucket: String,
    /// The GridFS file holding the notebook.
    pub gridfile: Option<ObjectId>,
    /// `kind_meta` (may carry `ep_kwargs`, `keep_output`).
    pub kind_meta: Document,
    /// `attributes`.
    pub attributes: Document,
}

/// One entry of `attributes.job_runs`.
#[derive(Debug, Clone)]
pub struct JobRun {
    /// `OK` or `ERROR`.
    pub status: &'static str,
    /// When the run started: naive local time (omega|ml's `datetime.now()`).
    pub ts: NaiveDateTime,
    /// `first 80...last 80` of the error message (`...` for OK runs).
    pub message: String,
    /// Name of the results notebook.
    pub results: String,
}

/// omega|ml's MongoDB, one pooled client per worker.
#[derive(Clone)]
pub struct Store {
    db: Database,
}

/// omega|ml stores `datetime.now()` (naive local time) as if it were UTC.
pub fn naive_as_bson(ts: NaiveDateTime) -> DateTime {
    DateTime::from_millis(ts.and_utc().timestamp_millis())
}

/// `datetime.now()` as omega|ml stores it.
pub fn now_local() -> NaiveDateTime {
    chrono::Local::now().naive_local()
}

/// Python's `str(datetime)`: `YYYY-MM-DD HH:MM:SS[.ffffff]`.
pub fn python_str(ts: NaiveDateTime) -> String {
    use chrono::Timelike;
    if ts.nanosecond() / 1000 == 0 {
        ts.format("%Y-%m-%d %H:%M:%S").to_string()
    } else {
        ts.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
    }
}

/// The results notebook name omega|ml gives a run: `results/{nb_file}_{str(ts)}.ipynb`.
pub fn results_name(nb_file: &str, ts: NaiveDateTime) -> String {
    format!("results/{nb_file}_{}.ipynb", python_str(ts))
}

/// The bucket field value for a task's `__bucket` (None / `default` → omega|ml's default).
pub fn bucket_name(bucket: Option<&str>) -> String {
    match bucket {
        None | Some("") | Some("default") => DEFAULT_BUCKET.to_owned(),
        Some(b) => b.to_owned(),
    }
}

/// The GridFS collection prefix of a bucket (`omegaml`, else `omegaml_<bucket>`).
pub fn gridfs_prefix(bucket: &str) -> String {
    if bucket == DEFAULT_BUCKET {
        DEFAULT_BUCKET.to_owned()
    } else {
        format!("{DEFAULT_BUCKET}_{bucket}")
    }
}

impl Store {
    /// Connects as omega|ml does: direct connection, `authSource=admin` when
    /// credentials are given, `uuidRepresentation=standard` (the Rust driver's
    /// only one). The database is the URL path.
    pub async fn connect(
        url: &str,
        connect_timeout: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let mut opts = ClientOptions::parse(url)
            .await
            .map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
        let db = opts
            .default_database
            .clone()
            .ok_or_else(|| StoreError::InvalidUrl("no database in the URL path".into()))?;
        if opts.hosts.len() == 1 && opts.direct_connection.is_none() {
            opts.direct_connection = Some(true);
        }
        if let Some(cred) = opts.credential.as_mut() {
            if cred.source.is_none() {
                cred.source = Some("admin".into());
            }
        }
        opts.connect_timeout = Some(connect_timeout);
        opts.server_selection_timeout = Some(connect_timeout);
        opts.app_name = Some("om-worker".into());
        let client = Client::with_options(opts).map_err(mongo("connect"))?;
        Ok(Store {
            db: client.database(&db),
        })
    }

    /// The omega database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Pings the server.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(doc! {"ping": 1})
            .await
            .map(|_| ())
            .map_err(mongo("ping"))
    }

    /// `om.jobs.metadata(name)`: exact name, then with `.ipynb` appended.
    pub async fn job_metadata(
        &self,
        bucket: &str,
        name: &str,
    ) -> Result<Option<JobMeta>, StoreError> {
        let coll = self.db.collection::<Document>("metadata");
        let mut names = vec![name.to_owned()];
        if !name.ends_with(".ipynb") {
            names.push(format!("{name}.ipynb"));
        }
        // One round trip for both spellings; prefer the exact one.
        let filter = doc! {"bucket": bucket, "prefix": JOBS_PREFIX, "name": {"$in": &names}};
        let docs: Vec<Document> = coll
            .find(filter)
            .limit(2)
            .await
            .map_err(mongo("find metadata"))?
            .try_collect()
            .await
            .map_err(mongo("find metadata"))?;
        let pick = names
            .iter()
            .find_map(|n| docs.iter().find(|d| d.get_str("name").ok() == Some(n)));
        Ok(pick.and_then(job_meta_from))
    }

    /// Reads a whole GridFS file of a bucket.
    pub async fn read_file(&self, bucket: &str, id: ObjectId) -> Result<Vec<u8>, StoreError> {
        let fs = gridfs_prefix(bucket);
        let files = format!("{fs}.files");
        let gridfs = |reason: String| StoreError::GridFs {
            id,
            collection: files.clone(),
            reason,
        };
        let file = self
            .db
            .collection::<Document>(&files)
            .find_one(doc! {"_id": id})
            .await
            .map_err(mongo("find GridFS file"))?
            .ok_or_else(|| gridfs("no such file".into()))?;
        let length = match file.get("length") {
            Some(Bson::Int32(n)) => *n as i64,
            Some(Bson::Int64(n)) => *n,
            Some(Bson::Double(n)) => *n as i64,
            _ => return Err(gridfs("files document has no length".into())),
        };
        let length =
            usize::try_from(length).map_err(|_| gridfs(format!("negative length {length}")))?;
        let mut data = Vec::with_capacity(length.min(64 << 20));
        let mut chunks = self
            .db
            .collection::<Document>(&format!("{fs}.chunks"))
            .find(doc! {"files_id": id})
            .sort(doc! {"n": 1})
            .await
            .map_err(mongo("find GridFS chunks"))?;
        while let Some(chunk) = chunks
            .try_next()
            .await
            .map_err(mongo("read GridFS chunks"))?
        {
            match chunk.get("data") {
                Some(Bson::Binary(b)) => data.extend_from_slice(&b.bytes),
                _ => return Err(gridfs("chunk without binary data".into())),
            }
        }
        if data.len() != length {
            return Err(gridfs(format!(
                "chunks hold {} bytes, files document says {length}",
                data.len()
            )));
        }
        Ok(data)
    }

    /// Writes a GridFS file as pymongo's `fs.put(data, filename=uuid4().hex,
    /// encoding=None)` does, returning its id.
    pub async fn write_file(&self, bucket: &str, data: &[u8]) -> Result<ObjectId, StoreError> {
        let fs = gridfs_prefix(bucket);
        let id = ObjectId::new();
        // Chunks go in batches of CHUNKS_PER_INSERT (about 4 MiB), so a 50 MiB
        // results notebook is not copied whole into chunk documents and again
        // into the driver's message buffer while its text is still held.
        let chunks = self.db.collection::<Document>(&format!("{fs}.chunks"));
        for (b, batch) in data.chunks(CHUNK_SIZE * CHUNKS_PER_INSERT).enumerate() {
            let docs: Vec<Document> = batch
                .chunks(CHUNK_SIZE)
                .enumerate()
                .map(|(n, part)| {
                    doc! {
                        "files_id": id,
                        "n": (b * CHUNKS_PER_INSERT + n) as i32,
                        "data": Binary { subtype: BinarySubtype::Generic, bytes: part.to_vec() },
                    }
                })
                .collect();
            chunks
                .insert_many(docs)
                .await
                .map_err(mongo("insert GridFS chunks"))?;
        }
        let file = doc! {
            "_id": id,
            "filename": uuid::Uuid::new_v4().simple().to_string(),
            "encoding": Bson::Null,
            "chunkSize": CHUNK_SIZE as i32,
            "length": data.len() as i64,
            "uploadDate": DateTime::now(),
        };
        self.db
            .collection::<Document>(&format!("{fs}.files"))
            .insert_one(file)
            .await
            .map_err(mongo("insert GridFS file"))?;
        Ok(id)
    }

    /// The id of the results notebook `name`, if it is stored (a retry asks
    /// this first: an earlier attempt whose reply was lost may have stored it).
    pub async fn results_notebook_id(
        &self,
        bucket: &str,
        name: &str,
    ) -> Result<Option<ObjectId>, StoreError> {
        Ok(self
            .db
            .collection::<Document>("metadata")
            .find_one(doc! {"name": name, "bucket": bucket, "prefix": JOBS_PREFIX})
            .projection(doc! {"_id": 1})
            .await
            .map_err(mongo("find results metadata"))?
            .and_then(|d| d.get_object_id("_id").ok()))
    }

    /// Stores an executed notebook as `om.jobs.put(nb, name)` followed by
    /// `attributes.source_job = source` would leave it.
    pub async fn put_results_notebook(
        &self,
        bucket: &str,
        name: &str,
        source_job: &str,
        notebook: &[u8],
    ) -> Result<ObjectId, StoreError> {
        let gridfile = self.write_file(bucket, notebook).await?;
        let now = naive_as_bson(now_local());
        let meta = doc! {
            "name": name,
            "bucket": bucket,
            "prefix": JOBS_PREFIX,
            "kind": NOTEBOOK_KIND,
            "kind_meta": {},
            "attributes": {"source_job": source_job},
            "s3file": {},
            "created": now,
            "modified": now,
            "gridfile": gridfile,
        };
        let res = self
            .db
            .collection::<Document>("metadata")
            .insert_one(meta)
            .await
            .map_err(mongo("insert results metadata"))?;
        Ok(res.inserted_id.as_object_id().unwrap_or(gridfile))
    }

    /// Appends a run to the task's `job_results`/`job_runs` and sets its final
    /// state, as `run_notebook` + `NotebookTask.on_success` do — in one update.
    pub async fn record_run(
        &self,
        job: ObjectId,
        run: &JobRun,
        state: &str,
        task_id: &str,
    ) -> Result<(), StoreError> {
        let entry = doc! {
            "status": run.status,
            "ts": naive_as_bson(run.ts),
            "message": &run.message,
            "results": &run.results,
        };
        // `$push` first: SecantusDB applies operators in document order and real
        // MongoDB (5.0+) in field-name order; both then create `job_results`,
        // `job_runs` before `state`, `task_id` — the key order the Python
        // worker's two separate saves leave (checked by test_fidelity).
        let mut update = doc! {
            "$push": {"attributes.job_results": &run.results, "attributes.job_runs": entry},
        };
        update.extend(state_update(state, task_id));
        // Idempotent for retries: once the run is recorded, `task_id` names
        // this task and the update matches nothing.
        self.db
            .collection::<Document>("metadata")
            .update_one(
                doc! {"_id": job, "attributes.task_id": {"$ne": task_id}},
                update,
            )
            .await
            .map_err(mongo("update task metadata"))?;
        Ok(())
    }

    /// Sets only the final state (runs that failed before a results notebook existed).
    pub async fn mark_state(
        &self,
        job: ObjectId,
        state: &str,
        task_id: &str,
    ) -> Result<(), StoreError> {
        self.db
            .collection::<Document>("metadata")
            .update_one(doc! {"_id": job}, state_update(state, task_id))
            .await
            .map_err(mongo("update task state"))?;
        Ok(())
    }
}

/// `NotebookTask.on_success/on_failure` as path-level updates: final state,
/// task id, `modified`, and the schedule times unset (mongoengine turns their
/// `None` into `$unset`).
fn state_update(state: &str, task_id: &str) -> Document {
    doc! {
        "$set": {
            "attributes.state": state,
            "attributes.task_id": task_id,
            "modified": naive_as_bson(now_local()),
        },
        "$unset": {"attributes.last_run_time": 1, "attributes.next_run_time": 1},
    }
}

fn job_meta_from(d: &Document) -> Option<JobMeta> {
    Some(JobMeta {
        id: d.get_object_id("_id").ok()?,
        name: d.get_str("name").ok()?.to_owned(),
        bucket: d.get_str("bucket").unwrap_or(DEFAULT_BUCKET).to_owned(),
        gridfile: d.get_object_id("gridfile").ok(),
        kind_meta: d.get_document("kind_meta").cloned().unwrap_or_default(),
        attributes: d.get_document("attributes").cloned().unwrap_or_default(),
    })
}

/// `f'{message[0:80]}...{message[-80:]}'` over characters, as omega|ml 0.18 stores it.
pub fn truncate_message(message: &str) -> String {
    let chars: Vec<char> = message.chars().collect();
    let head: String = chars.iter().take(80).collect();
    let tail: String = chars[chars.len().saturating_sub(80)..].iter().collect();
    format!("{head}...{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn ts(us: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2026, 11, 22)
            .and_then(|d| d.and_hms_micro_opt(3, 8, 38, us))
            .expect("valid")
    }

    #[test]
    fn results_names_match_python_str() {
        assert_eq!(
            results_name("tasks/gtmain/8db5d3ec-0.ipynb", ts(111_108)),
            "results/tasks/gtmain/8db5d3ec-0.ipynb_2026-11-22 03:08:38.111108.ipynb"
        );
        assert_eq!(
            results_name("mynb", ts(0)),
            "results/mynb_2026-11-22 03:08:38.ipynb"
        );
    }

    #[test]
    fn messages_truncate_like_omegaml() {
        assert_eq!(truncate_message(""), "...");
        assert_eq!(truncate_message("boom"), "boom...boom");
        let long: String = "a".repeat(100) + &"b".repeat(100);
        let t = truncate_message(&long);
        assert_eq!(t, "a".repeat(80) + "..." + &"b".repeat(80));
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_name(None), "omegaml");
        assert_eq!(bucket_name(Some("default")), "omegaml");
        assert_eq!(gridfs_prefix("omegaml"), "omegaml");
        assert_eq!(gridfs_prefix("team"), "omegaml_team");
    }

    #[test]
    fn bson_dates_are_naive_local_as_utc_in_ms() {
        assert_eq!(
            naive_as_bson(ts(111_108)).timestamp_millis(),
            1_795_316_918_111
        );
    }
}
