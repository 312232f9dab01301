//! The folders of a run, the daemon's configuration, the processes (started
//! through the shared harness, ready on sd_notify, logging into files) and
//! waiting for files to arrive.

use std::fs::File;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use super::support::{BIN, Rng, indexedcp};
use super::{KEY, Settings};

/// The folders of one run, removed when it ends.
pub(super) struct RunDir {
    _temp: tempfile::TempDir,
    pub(super) root: PathBuf,
    pub(super) spool: PathBuf,
    pub(super) staging: PathBuf,
    pub(super) out: PathBuf,
    pub(super) state: PathBuf,
    /// The daemon's config file, once written.
    pub(super) config: PathBuf,
}

impl RunDir {
    pub(super) fn create(settings: &Settings) -> Result<RunDir> {
        let temp = tempfile::Builder::new()
            .prefix("indexedcp-bench-run-")
            .tempdir_in(&settings.base_dir)
            .with_context(|| {
                format!(
                    "cannot create a temp dir in {}",
                    settings.base_dir.display()
                )
            })?;
        let root = temp.path().to_owned();
        let run = RunDir {
            spool: root.join("spool"),
            staging: root.join("staging"),
            out: root.join("out"),
            state: root.join("state"),
            config: root.join("indexedcp.toml"),
            root,
            _temp: temp,
        };
        for dir in [&run.spool, &run.staging, &run.out] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(run)
    }
}

/// Starts `indexedcp daemon` with an agent sending the run's spool to
/// 127.0.0.1:`target_port`, and with `server = Some((port, max_chunk_bytes))`
/// also a receiver writing into the run's output directory. Everything else
/// keeps its default (`settle`, `check_interval`, `chunk_size`, ...).
pub(super) fn start_daemon(
    run: &RunDir,
    name: &str,
    target_port: u16,
    server: Option<(u16, Option<u64>)>,
) -> Result<Running> {
    let mut config = format!(
        "[daemon]\nstate_dir = {state:?}\nlog_format = \"text\"\n\n\
         [[target]]\nname = \"receiver\"\nurl = \"http://127.0.0.1:{target_port}/upload\"\napi_key = \"{KEY}\"\n\n\
         [[spool]]\npath = {spool:?}\ntarget = \"receiver\"\n",
        state = utf8(&run.state)?,
        spool = utf8(&run.spool)?,
    );
    if let Some((port, max_chunk_bytes)) = server {
        config.push_str(&format!(
            "\n[server]\nlisten = \"127.0.0.1:{port}\"\noutput_dir = {out:?}\napi_keys = [\"{KEY}\"]\n",
            out = utf8(&run.out)?,
        ));
        if let Some(bytes) = max_chunk_bytes {
            config.push_str(&format!("max_chunk_bytes = {bytes}\n"));
        }
    }
    std::fs::write(&run.config, config)
        .with_context(|| format!("cannot write {}", run.config.display()))?;
    Running::start(name, &run.root, &["daemon", "--config", utf8(&run.config)?])
}

/// Starts `indexedcp server` on a free port writing into the run's output
/// directory; returns it and its port.
pub(super) fn start_receiver(run: &RunDir) -> Result<(Running, u16)> {
    start_receiver_with(run, 64 << 20)
}

/// [`start_receiver`] taking chunks of up to `max_chunk_bytes` (curl's
/// baseline sends a whole file as one chunk).
pub(super) fn start_receiver_with(run: &RunDir, max_chunk_bytes: u64) -> Result<(Running, u16)> {
    let max_chunk = max_chunk_bytes.to_string();
    let args = [
        "server",
        "--port",
        "0",
        "--output-dir",
        utf8(&run.out)?,
        "-k",
        KEY,
        "--max-chunk-bytes",
        &max_chunk,
    ];
    let receiver = Running::start("receiver", &run.root, &args)?;
    let url = receiver.server_url()?;
    let port = url
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| anyhow!("no port in the receiver's address {url}"))?;
    Ok((receiver, port))
}

/// A running indexedcp process; killed and reaped when dropped.
pub(super) struct Running {
    pub(super) name: String,
    pub(super) child: Child,
    pub(super) stdout: PathBuf,
    pub(super) log: PathBuf,
}

impl Running {
    /// Starts `indexedcp args` with its stdout and stderr in files in `dir`,
    /// and waits for the READY=1 it sends (sd_notify) once it watches its
    /// spools and serves.
    pub(super) fn start(name: &str, dir: &Path, args: &[&str]) -> Result<Running> {
        let socket_path = dir.join(format!("{name}.notify"));
        let socket = UnixDatagram::bind(&socket_path)
            .with_context(|| format!("cannot bind {}", socket_path.display()))?;
        let stdout = dir.join(format!("{name}.stdout"));
        let log = dir.join(format!("{name}.log"));
        let child = indexedcp()
            .args(args)
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {BIN}"))?;
        let mut running = Running {
            name: name.to_owned(),
            child,
            stdout,
            log,
        };
        running.wait_ready(&socket, Duration::from_secs(60))?;
        // Later STATUS= lines would queue up unread; with the socket gone the
        // process's notifications fail at once, which it ignores.
        drop(socket);
        let _ = std::fs::remove_file(&socket_path);
        Ok(running)
    }

    pub(super) fn wait_ready(&mut self, socket: &UnixDatagram, timeout: Duration) -> Result<()> {
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let deadline = Instant::now() + timeout;
        let mut message = [0; 4096];
        loop {
            match socket.recv(&mut message) {
                Ok(len) => {
                    if String::from_utf8_lossy(&message[..len])
                        .lines()
                        .any(|line| line == "READY=1")
                    {
                        return Ok(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("cannot read sd_notify messages"),
            }
            self.ensure_alive()?;
            ensure!(
                Instant::now() < deadline,
                "{} not ready after {timeout:?}; its log ends: {}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// An error naming the exit status and the log's end once the process exited.
    pub(super) fn ensure_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); its log ends: {}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// The receiver's URL from its "Server listening on URL" line.
    pub(super) fn server_url(&self) -> Result<String> {
        let stdout = std::fs::read_to_string(&self.stdout)?;
        stdout
            .lines()
            .find_map(|line| line.strip_prefix("Server listening on "))
            .map(|url| url.trim().to_owned())
            .ok_or_else(|| anyhow!("{} did not print `Server listening on`", self.name))
    }

    /// The peak resident memory so far (VmHWM), in MiB.
    pub(super) fn peak_rss_mib(&self) -> Result<f64> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))
    }

    /// Bytes the process caused to be written to storage so far
    /// (`/proc/PID/io` write_bytes, counted when pages are dirtied).
    pub(super) fn write_bytes(&self) -> Result<u64> {
        super::large::proc_io(self.child.id(), "write_bytes")
    }

    /// CPU time (user + system) the process has used so far.
    pub(super) fn cpu_seconds(&self) -> Result<f64> {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) in parentheses;
        // utime and stime are the 14th and 15th fields, in clock ticks.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
            bail!("cannot parse /proc/{pid}/stat");
        };
        let per_second = rustix::param::clock_ticks_per_second() as f64;
        Ok((utime + stime) / per_second)
    }

    /// Kills and reaps the process, then says on stderr how many warnings and
    /// errors it logged.
    pub(super) fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let kinds = warnings_by_kind(&log);
        if !kinds.is_empty() {
            let total: usize = kinds.iter().map(|(_, n)| n).sum();
            eprintln!("  {} logged {total} warning/error line(s):", self.name);
            for (kind, n) in kinds.iter().take(4) {
                eprintln!("    {n} x {}", shorten(kind, 200));
            }
        }
    }

    pub(super) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" / ")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The WARN and ERROR lines of a text-format log, grouped by level, module and
/// message (without the timestamp and the `key=value` fields), most frequent
/// first.
pub(super) fn warnings_by_kind(log: &str) -> Vec<(String, usize)> {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for line in log.lines() {
        let Some(start) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let kind = line[start..]
            .split_whitespace()
            .take_while(|word| !word.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    kinds
}

pub(super) fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_owned()
    } else {
        text.chars().take(max_chars).chain("...".chars()).collect()
    }
}

pub(super) fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8; set INDEXEDCP_BENCH_DIR", path.display()))
}

pub(super) fn program_available(program: &'static str) -> Result<(), String> {
    match Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        _ => Err(format!("{program} not found")),
    }
}

/// Writes `count` files of `size` random bytes named `<prefix><number>` into
/// `dir`; returns their names.
pub(super) fn write_files(
    dir: &Path,
    prefix: &str,
    count: usize,
    size: usize,
) -> Result<Vec<String>> {
    let mut prng = Rng::new(3);
    let mut content = vec![0; size];
    (0..count)
        .map(|i| {
            let name = format!("{prefix}{i:06}");
            prng.fill(&mut content);
            std::fs::write(dir.join(&name), &content)
                .with_context(|| format!("cannot write {name} in {}", dir.display()))?;
            Ok(name)
        })
        .collect()
}

pub(super) fn rename_all(from: &Path, to: &Path, names: &[String]) -> Result<()> {
    for name in names {
        std::fs::rename(from.join(name), to.join(name))
            .with_context(|| format!("cannot rename {name} into {}", to.display()))?;
    }
    Ok(())
}

/// Files waited for one by one, in order: each check resumes at the first
/// that had not arrived, so waiting for N files costs about N checks in all
/// (listing a folder of 100,000 files every few milliseconds would take the
/// CPU the daemon is being measured on).
pub(super) struct Pending<'a> {
    pub(super) names: &'a [String],
    pub(super) next: usize,
}

impl<'a> Pending<'a> {
    pub(super) fn new(names: &'a [String]) -> Pending<'a> {
        Pending { names, next: 0 }
    }

    /// Moves past the files for which `arrived` holds; true once all did.
    pub(super) fn advance(&mut self, mut arrived: impl FnMut(&str) -> bool) -> bool {
        while self.names.get(self.next).is_some_and(|name| arrived(name)) {
            self.next += 1;
        }
        self.next == self.names.len()
    }
}

pub(super) fn file_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}
