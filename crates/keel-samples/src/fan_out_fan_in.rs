//! `BackupSiteContent`: fan-out/fan-in (Durable Functions' `E2_BackupSiteContent`).
//! Lists the files under a directory, "copies" each one in parallel (the blob upload is
//! a stand-in that reads the file's size) and returns the total number of bytes.
//!
//! Input: the root directory, e.g. `"/var/www"`. Zero files give 0.
//!
//! `BackupSites` fans out one level up: a `BackupSiteContent` sub-orchestration per
//! directory of its input (`["/var/www", "/srv/blog"]`), the bytes of all of them added
//! up; its instances are the children's parent (the dashboard's structure view shows
//! them).

use std::path::{Path, PathBuf};

use keel::{
    Activity, ActivityContext, ActivityError, Orchestration, OrchestrationContext, OrchestrationError, WorkerBuilder,
};

/// The input is the root directory (`null` is refused with a clear error).
pub const BACKUP_SITE_CONTENT: Orchestration<Option<String>, u64> = Orchestration::new("BackupSiteContent");
pub const GET_FILE_LIST: Activity<String, Vec<String>> = Activity::new("GetFileList");
pub const COPY_FILE_TO_BLOB: Activity<String, u64> = Activity::new("CopyFileToBlob");
/// The input is the list of root directories, one sub-orchestration each.
pub const BACKUP_SITES: Orchestration<Vec<String>, u64> = Orchestration::new("BackupSites");

/// The most files one backup takes; a larger tree fails the listing.
pub const MAX_FILES: usize = 10_000;

/// Registers `BackupSites`, `BackupSiteContent`, `GetFileList` and `CopyFileToBlob`.
pub fn register(worker: WorkerBuilder) -> WorkerBuilder {
    worker
        .orchestration(BACKUP_SITES, backup_sites)
        .orchestration(BACKUP_SITE_CONTENT, backup_site_content)
        .activity(GET_FILE_LIST, get_file_list)
        .activity(COPY_FILE_TO_BLOB, copy_file_to_blob)
}

/// The orchestrator: list, copy every file in parallel, add up the bytes.
pub async fn backup_site_content(ctx: OrchestrationContext, root: Option<String>) -> Result<u64, OrchestrationError> {
    let root = root.filter(|root| !root.trim().is_empty()).ok_or_else(|| {
        OrchestrationError::new("InvalidInput", "the input must be the directory to back up, as a JSON string")
    })?;
    let files = ctx.call(GET_FILE_LIST, &root).await?;
    ctx.set_custom_status(&serde_json::json!({ "files": files.len() }));
    let copies = ctx.try_when_all(files.iter().map(|file| ctx.call(COPY_FILE_TO_BLOB, file))).await?;
    Ok(copies.into_iter().sum())
}

/// The parent: backs up every directory in its own sub-orchestration, in parallel.
pub async fn backup_sites(ctx: OrchestrationContext, roots: Vec<String>) -> Result<u64, OrchestrationError> {
    let backups = ctx.try_when_all(roots.into_iter().map(|root| ctx.call(BACKUP_SITE_CONTENT, &Some(root)))).await?;
    Ok(backups.into_iter().sum())
}

async fn get_file_list(ctx: ActivityContext, root: String) -> Result<Vec<String>, ActivityError> {
    let files = tokio::task::spawn_blocking(move || list_files(Path::new(&root)))
        .await
        .map_err(|error| ActivityError::msg(error.to_string()))??;
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, files = files.len(), "files listed");
    Ok(files)
}

/// Every file under `root`, recursively, sorted.
fn list_files(root: &Path) -> Result<Vec<String>, ActivityError> {
    let mut files = Vec::new();
    let mut directories: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(directory) = directories.pop() {
        for entry in std::fs::read_dir(&directory)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                directories.push(entry.path());
            } else if kind.is_file() {
                if files.len() == MAX_FILES {
                    return Err(ActivityError::new(
                        "TooManyFiles",
                        format!("{} holds more than {MAX_FILES} files", root.display()),
                    ));
                }
                files.push(entry.path().to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    Ok(files)
}

async fn copy_file_to_blob(ctx: ActivityContext, path: String) -> Result<u64, ActivityError> {
    let bytes = tokio::fs::metadata(&path).await?.len();
    tracing::info!(instance_id = %ctx.instance_id, function = %ctx.name, %path, bytes, "file copied");
    Ok(bytes)
}
