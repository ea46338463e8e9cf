//! MongoDB access for scheduled notebooks (`crate::schedule`): listing the
//! jobs `execute_scripts` looks at and the path-level updates `om.jobs.schedule()`
//! and `NotebookTask.on_success/on_failure` make.
//!
//! Like the rest of the store, only `$set`/`$unset` of the paths omega|ml's
//! mongoengine `save()` would send: `attributes.triggers` and
//! `attributes.config` (schedule), `attributes.state/task_id/last_run_time/
//! next_run_time` and `kind` (task hooks). The kernel and the client write
//! other keys of the same documents concurrently.

use futures_util::TryStreamExt as _;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document, Regex};

use super::{mongo, naive_as_bson, now_local, Store, StoreError, JOBS_PREFIX, NOTEBOOK_KIND};
use crate::schedule::ScheduleJob;

impl Store {
    /// `om.jobs.list(raw=True, hidden=True)` minus names starting with
    /// `results` (what `execute_scripts` skips) and `_` (omega|ml's
    /// `include_temp=False`), with just the fields scheduling needs.
    pub async fn list_schedule_jobs(&self, bucket: &str) -> Result<Vec<ScheduleJob>, StoreError> {
        let filter = doc! {
            "bucket": bucket,
            "prefix": JOBS_PREFIX,
            "name": {"$not": Regex { pattern: "^(results|_)".into(), options: String::new() }},
        };
        let projection = doc! {
            "name": 1, "bucket": 1, "kind": 1, "created": 1,
            "attributes.triggers": 1, "attributes.config": 1, "attributes.require": 1,
        };
        let docs: Vec<Document> = self
            .db
            .collection::<Document>("metadata")
            .find(filter)
            .projection(projection)
            .await
            .map_err(mongo("list jobs"))?
            .try_collect()
            .await
            .map_err(mongo("list jobs"))?;
        Ok(docs
            .iter()
            .filter_map(ScheduleJob::from_document)
            // belt and braces, should a server ignore $not/regex
            .filter(|j| !j.name.starts_with("results") && !j.name.starts_with('_'))
            .collect())
    }

    /// `om.jobs.metadata(name)` (exact name, then with `.ipynb`) with the
    /// whole `attributes` (schedule needs `job_runs` and `config`).
    pub async fn schedule_job(
        &self,
        bucket: &str,
        name: &str,
    ) -> Result<Option<ScheduleJob>, StoreError> {
        let mut names = vec![name.to_owned()];
        if !name.ends_with(".ipynb") {
            names.push(format!("{name}.ipynb"));
        }
        let docs: Vec<Document> = self
            .db
            .collection::<Document>("metadata")
            .find(doc! {"bucket": bucket, "prefix": JOBS_PREFIX, "name": {"$in": &names}})
            .limit(2)
            .await
            .map_err(mongo("find metadata"))?
            .try_collect()
            .await
            .map_err(mongo("find metadata"))?;
        Ok(names
            .iter()
            .find_map(|n| docs.iter().find(|d| d.get_str("name").ok() == Some(n)))
            .and_then(ScheduleJob::from_document))
    }

    /// What `schedule()`'s `meta.save()` sends: `$set` of
    /// `attributes.triggers`, `attributes.config` and `modified`.
    pub async fn set_schedule(
        &self,
        job: ObjectId,
        triggers: Vec<Bson>,
        config: Document,
    ) -> Result<(), StoreError> {
        let update = doc! {"$set": {
            "attributes.triggers": triggers,
            "attributes.config": config,
            "modified": naive_as_bson(now_local()),
        }};
        self.db
            .collection::<Document>("metadata")
            .update_one(doc! {"_id": job}, update)
            .await
            .map_err(mongo("update schedule"))?;
        Ok(())
    }

    /// `NotebookTask.on_success/on_failure` for `schedule_omegaml_job`:
    /// state, task id, `kind`, and `last_run_time = kwargs['run_at']`
    /// (`None` → `$unset`, as mongoengine does); `next_run_time` is never
    /// passed by the client, so it is always unset.
    pub async fn mark_schedule_task(
        &self,
        job: ObjectId,
        state: &str,
        task_id: &str,
        last_run_time: Option<Bson>,
    ) -> Result<(), StoreError> {
        let mut set = doc! {
            "attributes.state": state,
            "attributes.task_id": task_id,
            "kind": NOTEBOOK_KIND,
            "modified": naive_as_bson(now_local()),
        };
        let mut unset = doc! {"attributes.next_run_time": 1};
        match last_run_time {
            Some(v) => {
                set.insert("attributes.last_run_time", v);
            }
            None => {
                unset.insert("attributes.last_run_time", 1);
            }
        }
        self.db
            .collection::<Document>("metadata")
            .update_one(doc! {"_id": job}, doc! {"$set": set, "$unset": unset})
            .await
            .map_err(mongo("update task state"))?;
        Ok(())
    }
}
