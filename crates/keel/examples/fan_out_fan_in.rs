//! Fan-out/fan-in: list the files, copy them all in parallel, add up the bytes.
//!
//! `cargo run --release -p keel --example fan_out_fan_in`

use std::time::Duration;

use keel::{Activity, ActivityContext, ActivityError, Orchestration, OrchestrationContext, OrchestrationError};

const BACKUP: Orchestration<String, u64> = Orchestration::new("BackupSiteContent");
const LIST_FILES: Activity<String, Vec<String>> = Activity::new("GetFileList");
const COPY_FILE: Activity<String, u64> = Activity::new("CopyFileToBlob");

async fn backup(ctx: OrchestrationContext, root: String) -> Result<u64, OrchestrationError> {
    let files = ctx.call(LIST_FILES, &root).await?;
    let copied = ctx.try_when_all(files.iter().map(|file| ctx.call(COPY_FILE, file))).await?;
    Ok(copied.into_iter().sum())
}

async fn list_files(_: ActivityContext, root: String) -> Result<Vec<String>, ActivityError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push(entry.path().display().to_string());
        }
    }
    Ok(files)
}

async fn copy_file(_: ActivityContext, path: String) -> Result<u64, ActivityError> {
    Ok(tokio::fs::metadata(path).await?.len()) // a stand-in for the upload
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = keel::store::open(keel::store::DEFAULT_STORE_URL).await?;
    let worker = keel::Worker::builder(store)
        .orchestration(BACKUP, backup)
        .activity(LIST_FILES, list_files)
        .activity(COPY_FILE, copy_file)
        .build()
        .start();
    let instance = worker.client().start(BACKUP, &".".to_string()).await?;
    println!("{:?}", instance.wait(Duration::from_secs(30)).await?);
    worker.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
