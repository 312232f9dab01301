//! The one-shot commands: `add` (buffer only, works offline) and `upload`
//! (buffer, then send everything queued, retrying an unreachable receiver on
//! the agent's backoff schedule), which the cp-style `indexedcp FILE... URL`
//! also runs. They drive the library's [`Client`] for a receiver, or the same
//! buffer and uploader with the `s3` delivery for an `s3://` bucket
//! (`bucket`), and show progress bars on a terminal, or one
//! `FILE -> SERVER NAME` line per file otherwise.

mod bucket;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::args::{AddArgs, BufferArg, UploadArgs};
use super::{Failure, exit, runtime};
use crate::agent::ingest::IngestError;
use crate::agent::store::{FileRecord, FileState};
use crate::agent::upload::{Backoff, Retry};
use crate::client::{Client, ClientError, ClientOptions, FailedFile, PathIngest, ProgressEvent};
use crate::config::TargetConfig;
use crate::config::{LogFormat, TargetTls};
use crate::logging;

/// Refuses, before anything is buffered, names that are not readable regular
/// files, naming each.
fn check_files(files: &[PathBuf]) -> Result<(), Failure> {
    let problems: Vec<String> = files
        .iter()
        .filter_map(|path| match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => None,
            Ok(meta) if meta.is_dir() => Some(format!(
                "{} is a directory; name the files in it (for example {}/*)",
                path.display(),
                path.display()
            )),
            Ok(_) => Some(format!("{} is not a regular file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("{}: no such file", path.display()))
            }
            Err(e) => Some(format!("cannot read {}: {e}", path.display())),
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::data(format!(
            "{}\nindexedcp: nothing was buffered",
            problems.join("\nindexedcp: ")
        )))
    }
}

fn client_failure(error: ClientError) -> Failure {
    let message = error.to_string();
    match error {
        ClientError::InvalidOptions(_) | ClientError::NoServerUrl | ClientError::NoApiKey => {
            Failure::usage(message)
        }
        ClientError::Ingest(IngestError::Store(_)) => Failure::io(message),
        ClientError::Ingest(_) => Failure::data(message),
        ClientError::StorageDir { .. } | ClientError::Store(_) => Failure::io(message),
        _ => Failure::software(message),
    }
}

/// The flags that name the buffer, to repeat in hints.
fn buffer_flags(buffer: &BufferArg) -> String {
    match (&buffer.storage, &buffer.config) {
        (Some(path), _) => format!(" --storage {}", path.display()),
        (None, Some(path)) => format!(" --config {}", path.display()),
        (None, None) => String::new(),
    }
}

fn absolute_name(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

fn ingest_failure(path: &Path, error: ClientError) -> Failure {
    let failure = client_failure(error);
    if failure.message.contains(&path.display().to_string()) {
        failure
    } else {
        Failure {
            code: failure.code,
            message: format!("{}: {}", path.display(), failure.message),
        }
    }
}

/// `indexedcp add FILE...`: buffers only.
pub(super) fn add(args: AddArgs) -> Result<(), Failure> {
    check_files(&args.files)?;
    let storage = args.buffer.path()?;
    logging::init(Some("off"), LogFormat::Text);
    let rt = runtime()?;
    let result = rt.block_on(async {
        let client = Client::new(ClientOptions {
            storage_path: storage,
            log_level: None,
            ..ClientOptions::default()
        })
        .await
        .map_err(client_failure)?;
        for path in &args.files {
            let added = client
                .buffer_file(path)
                .await
                .map_err(|e| ingest_failure(path, e))?;
            if added.already_buffered {
                println!(
                    "{} is already buffered (id {})",
                    path.display(),
                    added.file_id
                );
            } else {
                println!(
                    "buffered {} ({} bytes, {} chunk(s), id {})",
                    path.display(),
                    added.bytes,
                    added.chunk_count,
                    added.file_id
                );
            }
        }
        client.close().await;
        eprintln!(
            "indexedcp: send with `indexedcp upload --server URL{}`",
            buffer_flags(&args.buffer)
        );
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// `indexedcp upload --server URL [FILE...]`: buffers the files, then sends
/// everything queued, retrying an unreachable receiver a few times.
pub(super) fn upload(args: UploadArgs) -> Result<(), Failure> {
    check_files(&args.files)?;
    let destination = destination(&args)?;
    let storage = args.buffer.path()?;
    logging::init(Some("off"), LogFormat::Text);
    let mut resume = format!("indexedcp upload --server {}", args.server);
    for (flag, value) in [("--endpoint", &args.endpoint), ("--region", &args.region)] {
        if let Some(value) = value {
            resume.push_str(&format!(" {flag} {value}"));
        }
    }
    resume.push_str(&buffer_flags(&args.buffer));
    let rt = runtime()?;
    let reporter = Arc::new(Reporter::new());
    let result = rt.block_on(async {
        tokio::select! {
            result = upload_files(&args, destination, storage, &resume, reporter.clone()) => result,
            _ = tokio::signal::ctrl_c() => Err(Failure {
                code: exit::INTERRUPTED,
                message: format!("interrupted; what was not delivered stays buffered, and `{resume}` resumes it"),
            }),
        }
    });
    reporter.finish();
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Where `upload` sends: a receiver (with its API key) or a bucket.
enum Destination {
    Receiver { api_key: String },
    Bucket(Box<TargetConfig>),
}

/// The destination `--server` names, with what it needs; options of the
/// other kind are refused rather than ignored.
fn destination(args: &UploadArgs) -> Result<Destination, Failure> {
    if args.server.starts_with("s3://") {
        return bucket::target(
            &args.server,
            args.endpoint.as_deref(),
            args.region.as_deref(),
            args.tls()?,
        )
        .map(|target| Destination::Bucket(Box::new(target)));
    }
    for (flag, value) in [("--endpoint", &args.endpoint), ("--region", &args.region)] {
        if value.is_some() {
            return Err(Failure::usage(format!(
                "{flag} is for s3:// URLs; --server {} is a receiver",
                args.server
            )));
        }
    }
    let api_key = args
        .api_key
        .clone()
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| Failure::usage("no API key: pass --api-key KEY or set INDEXEDCP_API_KEY"))?;
    Ok(Destination::Receiver { api_key })
}

/// The buffer and the way out of it that `upload` drives.
enum Sender {
    Receiver(Client),
    Bucket(Box<bucket::Bucket>),
}

impl Sender {
    async fn open(
        destination: Destination,
        server: &str,
        tls: TargetTls,
        storage: PathBuf,
    ) -> Result<Sender, ClientError> {
        Ok(match destination {
            Destination::Receiver { api_key } => Sender::Receiver(
                Client::new(ClientOptions {
                    server_url: Some(server.to_owned()),
                    api_key: Some(api_key),
                    tls,
                    storage_path: storage,
                    log_level: None,
                    ..ClientOptions::default()
                })
                .await?,
            ),
            Destination::Bucket(target) => {
                Sender::Bucket(Box::new(bucket::Bucket::open(storage, *target).await?))
            }
        })
    }

    async fn buffer_file(&self, path: &Path) -> Result<PathIngest, ClientError> {
        match self {
            Sender::Receiver(client) => client.buffer_file(path).await,
            Sender::Bucket(bucket) => bucket.buffer_file(path).await,
        }
    }

    async fn buffered_files(&self) -> Result<Vec<FileRecord>, ClientError> {
        match self {
            Sender::Receiver(client) => client.buffered_files().await,
            Sender::Bucket(bucket) => bucket.buffered_files().await,
        }
    }

    fn on_upload_progress(&self, callback: impl Fn(&ProgressEvent) + Send + Sync + 'static) {
        match self {
            Sender::Receiver(client) => client.on_upload_progress(callback),
            Sender::Bucket(bucket) => bucket.on_upload_progress(Arc::new(callback)),
        }
    }

    /// One attempt at every queued file: the files delivered (client name ->
    /// name at the destination) and those not.
    async fn upload_round(
        &self,
    ) -> Result<(HashMap<String, String>, Vec<FailedFile>), ClientError> {
        match self {
            Sender::Receiver(client) => match client.upload_buffered_files().await {
                Ok(delivered) => Ok((delivered, Vec::new())),
                Err(ClientError::Undelivered { delivered, failed }) => Ok((delivered, failed)),
                Err(e) => Err(e),
            },
            Sender::Bucket(bucket) => bucket.upload_round().await,
        }
    }

    /// The peer, as messages name it.
    fn peer(&self) -> &'static str {
        match self {
            Sender::Receiver(_) => "the receiver",
            Sender::Bucket(_) => "the store",
        }
    }

    /// What to check when the destination refuses every request.
    fn refusal(&self, error: &str) -> String {
        match self {
            Sender::Receiver(_) => {
                format!("the receiver refused the request: {error}; check --server and --api-key")
            }
            Sender::Bucket(_) => format!(
                "the store refused the request: {error}; check that the bucket exists, \
                 --endpoint, --region, and the credentials (AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY)"
            ),
        }
    }

    async fn close(self) {
        match self {
            Sender::Receiver(client) => client.close().await,
            Sender::Bucket(bucket) => (*bucket).close().await,
        }
    }
}

async fn upload_files(
    args: &UploadArgs,
    destination: Destination,
    storage: PathBuf,
    resume: &str,
    reporter: Arc<Reporter>,
) -> Result<(), Failure> {
    let client = Sender::open(destination, &args.server, args.tls()?, storage)
        .await
        .map_err(client_failure)?;
    for path in &args.files {
        client
            .buffer_file(path)
            .await
            .map_err(|e| ingest_failure(path, e))?;
        reporter.name(absolute_name(path), path.display().to_string());
    }
    let queued = |files: Vec<FileRecord>| -> Vec<FileRecord> {
        files
            .into_iter()
            .filter(|f| f.state == FileState::Queued)
            .collect()
    };
    let all = client.buffered_files().await.map_err(client_failure)?;
    let parked_before = all.iter().filter(|f| f.state == FileState::Failed).count();
    if parked_before > 0 {
        reporter.note(&format!(
            "{parked_before} file(s) parked earlier are not sent; `indexedcp status` shows why, `indexedcp retry --all` re-queues them"
        ));
    }
    if queued(all).is_empty() {
        reporter.note("nothing to upload: no file is waiting in the buffer");
        return Ok(());
    }
    let progress = reporter.clone();
    client.on_upload_progress(move |event| progress.progress(event));

    let mut parked: Vec<FailedFile> = Vec::new();
    let mut retries = 0u32;
    let backoff = retry_schedule(args.retry_delay);
    loop {
        let waiting = queued(client.buffered_files().await.map_err(client_failure)?);
        reporter.prepare(&waiting);
        let (delivered, failed) = client.upload_round().await.map_err(client_failure)?;
        reporter.delivered(&delivered);
        let (now_parked, pending): (Vec<FailedFile>, Vec<FailedFile>) =
            failed.into_iter().partition(|f| f.parked);
        for f in &now_parked {
            reporter.note(&format!(
                "{}: refused, not retried: {}",
                reporter.display(&f.file_name),
                f.error
            ));
        }
        parked.extend(now_parked);
        if pending.is_empty() {
            break;
        }
        let refused = pending.iter().find(|f| f.retry == Retry::AtMaximum);
        if let Some(refused) = refused {
            return Err(Failure {
                code: exit::CONFIG,
                message: format!(
                    "{}. {} file(s) stay buffered; `{resume}` sends them",
                    client.refusal(&refused.error),
                    pending.len()
                ),
            });
        }
        if retries >= args.max_retries {
            return Err(Failure {
                code: exit::UNAVAILABLE,
                message: format!(
                    "gave up after {retries} retries: {}. {} file(s) stay buffered; `{resume}` resumes them",
                    pending[0].error,
                    pending.len()
                ),
            });
        }
        retries += 1;
        let delay = backoff.delay(u64::from(retries));
        reporter.note(&format!(
            "{} file(s) not delivered yet ({}); retry {retries} of {} in {:.1}s",
            pending.len(),
            pending[0].error,
            args.max_retries,
            delay.as_secs_f64()
        ));
        tokio::time::sleep(delay).await;
    }
    let peer = client.peer();
    client.close().await;
    if let Some(first) = parked.first() {
        return Err(Failure::data(format!(
            "{peer} refused {} file(s) ({}: {}); they are parked in the buffer: `indexedcp status` shows them, `indexedcp retry --all` re-queues them once the cause is fixed",
            parked.len(),
            reporter.display(&first.file_name),
            first.error
        )));
    }
    Ok(())
}

/// The longest wait between two tries of the one-shot upload: someone is
/// usually waiting at the terminal.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// The one-shot upload's retry schedule: `--retry-delay` first, doubling up to
/// 30 seconds. A first delay longer than that is kept for every retry rather
/// than shortened, since it is what was asked for.
fn retry_schedule(first: Duration) -> Backoff {
    Backoff::new(first, first.max(MAX_RETRY_DELAY), 2.0)
        .expect("the maximum is at least the first delay and the multiplier is 2")
}

/// What the one-shot upload shows: progress bars (one per file and a total) on
/// a terminal, otherwise one `FILE -> SERVER NAME` line per delivered file.
struct Reporter {
    bars: Option<Bars>,
    /// Client name (absolute path) -> the path as typed on the command line.
    typed: Mutex<HashMap<String, String>>,
}

struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    files: Mutex<HashMap<String, ProgressBar>>,
    style: ProgressStyle,
}

impl Reporter {
    fn new() -> Reporter {
        use std::io::IsTerminal;
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let total = multi.add(ProgressBar::new(0));
            total.set_style(
                ProgressStyle::with_template(
                    "{msg:>30!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            total.set_message("total");
            Bars {
                multi,
                total,
                files: Mutex::new(HashMap::new()),
                style: ProgressStyle::with_template("{msg:>30!} [{bar:30}] {bytes}/{total_bytes}")
                    .expect("valid template")
                    .progress_chars("=> "),
            }
        });
        Reporter {
            bars,
            typed: Mutex::new(HashMap::new()),
        }
    }

    fn name(&self, client_name: String, typed: String) {
        self.typed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_name, typed);
    }

    fn display(&self, client_name: &str) -> String {
        self.typed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(client_name)
            .cloned()
            .unwrap_or_else(|| client_name.to_owned())
    }

    /// Prints a line on stdout, above the bars when there are any.
    fn line(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.multi.suspend(|| println!("{text}")),
            None => println!("{text}"),
        }
    }

    /// Prints a note on stderr, above the bars when there are any.
    fn note(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.multi.suspend(|| eprintln!("indexedcp: {text}")),
            None => eprintln!("indexedcp: {text}"),
        }
    }

    /// Adds a bar for every file about to be sent that has none yet.
    fn prepare(&self, files: &[FileRecord]) {
        let Some(bars) = &self.bars else { return };
        let mut map = bars.files.lock().unwrap_or_else(|p| p.into_inner());
        for file in files {
            if map.contains_key(&file.rel_path) {
                continue;
            }
            let bar = bars
                .multi
                .insert_before(&bars.total, ProgressBar::new(file.size));
            bar.set_style(bars.style.clone());
            bar.set_message(file.remote_name.clone());
            bars.total.inc_length(file.size);
            map.insert(file.rel_path.clone(), bar);
        }
    }

    fn progress(&self, event: &ProgressEvent) {
        let Some(bars) = &self.bars else { return };
        if event.status != crate::client::ChunkStatus::Success || event.chunk_count == 0 {
            return;
        }
        let map = bars.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bar) = map.get(&event.file_name) {
            let done = (u128::from(event.file_size) * u128::from(event.chunk_index + 1)
                / u128::from(event.chunk_count)) as u64;
            let before = bar.position();
            if done > before {
                bar.set_position(done);
                bars.total.inc(done - before);
            }
        }
    }

    fn delivered(&self, delivered: &HashMap<String, String>) {
        let mut names: Vec<(&String, &String)> = delivered.iter().collect();
        names.sort();
        for (client_name, server_name) in names {
            if let Some(bars) = &self.bars
                && let Some(bar) = bars
                    .files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(client_name)
            {
                bars.total.inc(bar.length().unwrap_or(0) - bar.position());
                bar.finish_and_clear();
                bars.multi.remove(&bar);
            }
            self.line(&format!("{} -> {server_name}", self.display(client_name)));
        }
    }

    fn finish(&self) {
        if let Some(bars) = &self.bars {
            for (_, bar) in bars.files.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                bar.abandon();
            }
            bars.total.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_the_first_delay_up_to_thirty_seconds() {
        let secs: Vec<f64> = (1..=7)
            .map(|n| {
                retry_schedule(Duration::from_millis(1500))
                    .delay(n)
                    .as_secs_f64()
            })
            .collect();
        assert_eq!(secs, [1.5, 3.0, 6.0, 12.0, 24.0, 30.0, 30.0]);
        let long = retry_schedule(Duration::from_secs(45));
        assert_eq!(long.delay(1), Duration::from_secs(45));
        assert_eq!(long.delay(3), Duration::from_secs(45));
    }
}
