//! The `wal2cache` command: parses the command line, loads the configuration, runs
//! the command, maps failures to exit codes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wal2cache::config::{Config, LogFormat};
use wal2cache::error::Error;

/// mimalloc, not the system allocator: the pipeline allocates per change on several
/// threads, and glibc's arenas cost about a sixth of the daemon's CPU in the
/// tag-heavy catch-up (malloc, free and the lock between threads).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (include/mimalloc.h), which
/// libmimalloc-sys has no constant for; `the_allocator_options_are_the_documented_ones`
/// checks the number against the option's default (1000 ms in src/options.c).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long memory freed stays with the process before it goes back to the OS, in ms.
/// mimalloc's default (1 s) kept the pipeline's batches' pages between uses: one
/// transaction of 1M rows peaked at 112-139 MiB of RSS (67 MiB with glibc). At once (0),
/// the peak was 75-85 MiB, but each batch's pages went back to the OS when the batch was
/// done and the next batch faulted them in again: 52,000-55,000 page faults in the
/// tag-heavy catch-up of 200,000 changes, where the kernel clearing those pages was
/// about a tenth of the daemon's CPU samples. Measured side by side (2026-12-07), faults
/// in that catch-up / in the 1M-row transaction, with the transaction's system CPU and
/// peak RSS: 0 ms 52-55k / 648k, 2.8 s, 77 MiB; 5 ms 26k / 416k, 1.8 s, 80 MiB; 10 ms
/// 19k / 417k, 1.7 s, 77-87 MiB; 25 ms 13-14k / 246-303k, 1.4-1.6 s, 84-94 MiB; 100 ms
/// 8-12k; 1 s 3-5k / 113 MiB. 10 ms keeps most of the saving and the peak well under
/// the 100 MB target.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// `mi_option_allow_thp` in the same enum; `the_allocator_options_are_the_documented_ones`
/// checks it against the option's default (1 on Linux).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Sets [`PURGE_DELAY_MS`] and turns transparent huge pages off for the process;
/// `MIMALLOC_PURGE_DELAY` and `MIMALLOC_ALLOW_THP` in the environment still win.
///
/// Huge pages: mimalloc asks for them on its arenas (`madvise(MADV_HUGEPAGE)`, which
/// the kernel honours under its common `madvise` setting, and `always` gives them
/// anyway). The daemon's memory is a few MiB of short-lived batches, so every purge
/// of freed pages broke a huge page, and the next batch touching that range faulted in
/// a whole new 2 MiB page and cleared it: `clear_page_erms` under
/// `do_huge_pmd_anonymous_page` was 6% of the daemon's CPU samples in the tag-heavy
/// catch-up (`W2C_BENCH_PERF=1`), 0.6% without them. Measured side by side
/// (2026-12-07, the same binary, eight interleaved pairs, rusage user + system):
/// 1.00 s mean with huge pages, 0.88 s without (less in 7 of the 8 pairs); peak RSS
/// 38-56 MiB against 29-37 MiB, and 74 against 64 MiB for a 1M-row transaction.
#[allow(unsafe_code)]
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads it at every purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: sets one integer option, read by mimalloc when it maps more memory.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
        // mimalloc's arenas mapped before `main` were already advised: the process
        // flag stops huge pages on every later fault, whatever the advice (what
        // mimalloc itself does at start under MIMALLOC_ALLOW_THP=0).
        // Its result is not looked at: kernels before 3.15 have no such flag, and the
        // daemon works the same (this runs before logging starts, so nothing could be
        // said about it anyway).
        // SAFETY: prctl with integer arguments only; it sets a flag of this process.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

#[derive(Parser)]
#[command(version, about = "Cache invalidation from the PostgreSQL WAL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: keep Redis and the invalidation topic in step with the database.
    /// SIGHUP reloads the rules; SIGTERM and SIGINT drain and stop.
    Run {
        #[arg(long, short, default_value = "wal2cache.toml")]
        config: PathBuf,
    },
    /// Create the publication (for the rules' tables) and the replication slot.
    Setup {
        #[arg(long, short, default_value = "wal2cache.toml")]
        config: PathBuf,
    },
    /// Check the config and the rules, and the rules against the live database.
    Check {
        #[arg(long, short, default_value = "wal2cache.toml")]
        config: PathBuf,
    },
    /// Print every decoded change and its plan as a JSON line, on a temporary slot of
    /// its own. SIGHUP reloads the rules.
    Tail {
        #[arg(long, short, default_value = "wal2cache.toml")]
        config: PathBuf,
    },
    /// Invalidate keys or tags, or flush everything the rules cache, through the WAL:
    /// a transactional logical message that the running daemon applies like a change
    /// (ordered with the data, to Redis and every L1 subscriber, at least once).
    /// Refused (exit 5) when no process streams from the slot, unless --force.
    Invalidate {
        #[arg(long, short, default_value = "wal2cache.toml")]
        config: PathBuf,
        /// A cache key to delete (repeatable).
        #[arg(long = "key", value_name = "KEY")]
        keys: Vec<String>,
        /// A tag to purge: its set's members and the set (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Every key under the rules' key prefixes and every tag set, and a flush_all
        /// (reason "manual") to every subscriber.
        #[arg(long, conflicts_with_all = ["keys", "tags"])]
        all: bool,
        /// Why, for the flush_all event's detail (with --all).
        #[arg(long, requires = "all")]
        reason: Option<String>,
        /// Write it even when no process streams from the slot now.
        #[arg(long)]
        force: bool,
    },
    /// Write every current row of the republish rules' tables to Redis, as the
    /// republish of an INSERT of that row would, read under one exported snapshot and
    /// versioned so that the stream always wins. Safe while the daemon runs, and to run
    /// again. Ctrl-C stops it; what was written stays.
    Backfill {
        #[arg(long, short, default_value = "wal2cache.toml")]
        config: PathBuf,
        /// Only this republish rule (repeatable).
        #[arg(long = "rule", value_name = "NAME")]
        rules: Vec<String>,
        /// Only the rules of this table, schema.table (repeatable).
        #[arg(long = "table", value_name = "SCHEMA.TABLE")]
        tables: Vec<String>,
        /// At most this many rows a second.
        #[arg(long, value_name = "ROWS_PER_S")]
        rate: Option<u32>,
        /// Read and plan every row, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rows per query.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        chunk: u32,
    },
    /// Ask the database (and Redis) whether wal2cache streams anywhere: the slot, who
    /// holds it, how far behind it is, the WAL it keeps. Needs no running daemon.
    /// Exit code 0 when a process streams from the slot, 5 when none does.
    Status {
        #[arg(long, short, default_value = "wal2cache.toml")]
        config: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The default log filter. `pgwire_replication` logs an ERROR of its own each time its
/// worker stops (a standby retrying, every reconnect); wal2cache reports those errors
/// itself, once and with the fix, so the crate's own events are off unless
/// `WAL2CACHE_LOG` names it.
const DEFAULT_LOG: &str = "info";
const QUIET_CRATES: &str = "pgwire_replication=off";

fn log_filter(env: Option<&str>) -> tracing_subscriber::EnvFilter {
    let directives = match env {
        Some(env) if env.contains("pgwire_replication") => env.to_string(),
        Some(env) if !env.trim().is_empty() => format!("{env},{QUIET_CRATES}"),
        _ => format!("{DEFAULT_LOG},{QUIET_CRATES}"),
    };
    tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{DEFAULT_LOG},{QUIET_CRATES}"))
    })
}

/// Writes a line to standard error; a closed or broken stderr is not worth a panic.
fn say_err(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// What `wal2cache backfill` shows: the plan on standard output, then a progress bar
/// when standard error is a terminal, log lines otherwise.
struct CliObserver {
    bar: Option<indicatif::ProgressBar>,
    log: wal2cache::backfill::LogObserver,
    max_duration: std::time::Duration,
}

impl CliObserver {
    fn new(settings: &wal2cache::config::BackfillConfig) -> CliObserver {
        CliObserver {
            bar: None,
            log: wal2cache::backfill::LogObserver::new(std::time::Duration::from_secs(5)),
            max_duration: settings.max_duration,
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl wal2cache::backfill::Observer for CliObserver {
    fn planned(
        &mut self,
        tables: &[wal2cache::backfill::TableEstimate],
        expected: std::time::Duration,
    ) {
        use indicatif::{HumanBytes, HumanDuration};
        for t in tables {
            let rows = t.rows.map_or(
                "? rows (never analyzed: ANALYZE it for an estimate)".to_string(),
                |r| format!("~{r} rows"),
            );
            say(format_args!("{}: {rows}, {}", t.table, HumanBytes(t.bytes)));
        }
        say(format_args!(
            "expected duration: about {}{}",
            HumanDuration(expected),
            if expected > self.max_duration {
                format!(", over backfill.max_duration ({}): the snapshot holds back vacuum all that time; consider --table, one table at a time", HumanDuration(self.max_duration))
            } else {
                String::new()
            }
        ));
        let total: u64 = tables.iter().filter_map(|t| t.rows).sum();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new(total.max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {human_pos}/~{human_len} rows, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            self.bar = Some(bar);
        } else {
            self.log.planned(tables, expected);
        }
    }

    fn progress(&mut self, table: &str, rows: u64, expected_rows: u64) {
        match &self.bar {
            Some(bar) => {
                if rows > bar.length().unwrap_or(0) {
                    // The estimate was low (reltuples is a statistic).
                    bar.set_length(rows);
                }
                bar.set_message(table.to_string());
                bar.set_position(rows);
            }
            None => self.log.progress(table, rows, expected_rows),
        }
    }

    fn table_done(&mut self, table: &str, rows: u64) {
        match &self.bar {
            Some(bar) => bar.println(format!("{table}: done, {rows} rows")),
            None => self.log.table_done(table, rows),
        }
    }
}

/// Writes a line to standard output, ignoring a closed or broken pipe.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

impl Command {
    fn config(&self) -> &std::path::Path {
        match self {
            Command::Run { config }
            | Command::Setup { config }
            | Command::Check { config }
            | Command::Tail { config }
            | Command::Invalidate { config, .. }
            | Command::Backfill { config, .. }
            | Command::Status { config, .. } => config,
        }
    }
}

/// Logs to standard error as `log.format` says: JSON objects (one per line, the event's
/// fields at the top level, for log collectors) or text; by default JSON when standard
/// error is not a terminal.
fn init_logging(format: Option<LogFormat>) {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = format.unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("WAL2CACHE_LOG").ok().as_deref()))
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped: reporting it on the same
        // broken stderr would panic.
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.with_ansi(terminal).init(),
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    // Loaded before logging starts, for `log.format`; a config that does not load is
    // reported below, once, like any other error.
    let config = Config::load(cli.command.config());
    init_logging(config.as_ref().ok().and_then(|c| c.log.format));
    // One thread by default: measured side by side on a 2-core host (tag-heavy
    // catch-up, three interleaved runs each), the multi-threaded runtime spent 18-23 µs
    // of CPU per change against 12-16 µs on one thread; its profile had 40% of the
    // daemon's time in the kernel, mostly wake-ups and context switches.
    let runtime = match std::env::var("WAL2CACHE_RUNTIME").as_deref() {
        // The park hook paces reads while the stream catches up (source::pace).
        Err(_) | Ok("current_thread") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(wal2cache::source::pace::on_park)
            .build(),
        Ok("multi_thread") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_park(wal2cache::source::pace::on_park)
            .build(),
        Ok(other) => {
            say_err(format_args!(
                "error: WAL2CACHE_RUNTIME={other:?} is not a runtime: use current_thread (the default) or multi_thread, or unset it"
            ));
            return ExitCode::from(wal2cache::error::exit::CONFIG as u8);
        }
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            say_err(format_args!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            // Once, as the last line: not also as a log line.
            say_err(format_args!("error: {e}"));
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

/// Runs the command; `Some(code)` for a command that ends well with a code of its own.
async fn run(
    command: Command,
    config: Result<Config, wal2cache::config::ConfigError>,
) -> Result<Option<i32>, Error> {
    let config = config?;
    match command {
        Command::Setup { .. } => {
            let report = wal2cache::app::setup(&config).await?;
            say(format_args!(
                "publication {:?}: {}; slot {:?}: {}{}",
                config.postgres.publication,
                if report.created_publication {
                    "created".to_string()
                } else if !report.added_tables.is_empty() {
                    format!("added {}", report.added_tables.join(", "))
                } else {
                    "ok".to_string()
                },
                config.postgres.slot,
                if report.created_slot { "created" } else { "ok" },
                report
                    .confirmed_lsn
                    .map(|l| format!(", confirmed up to {l}"))
                    .unwrap_or_default(),
            ));
            Ok(None)
        }
        Command::Run { .. } => {
            wal2cache::app::run(&config, shutdown_signal(), hangups()?).await?;
            Ok(None)
        }
        Command::Check { .. } => {
            let (rules, report) = wal2cache::app::check(&config).await?;
            for w in &report.warnings {
                say(format_args!("warning: {w}"));
            }
            say(format_args!(
                "ok: {} rules on {} tables",
                rules.rules().len(),
                rules.tables().len()
            ));
            if !report.publish.is_empty() {
                say(format_args!(
                    "setup will add to publication {:?}: {}",
                    config.postgres.publication,
                    report.to_publish().join(", ")
                ));
            }
            Ok(None)
        }
        Command::Tail { .. } => {
            let stdout = std::io::stdout().lock();
            wal2cache::app::tail(&config, stdout, shutdown_signal(), hangups()?).await?;
            Ok(None)
        }
        Command::Invalidate {
            keys,
            tags,
            all,
            reason,
            force,
            ..
        } => {
            let what = wal2cache::app::Invalidation {
                keys,
                tags,
                all,
                reason,
                force,
            };
            let lsn = wal2cache::app::invalidate(&config, &what).await?;
            say(format_args!(
                "written to the WAL at {lsn}: {}",
                if what.all {
                    "flush everything the rules cache (flush_all, reason \"manual\")".to_string()
                } else {
                    format!("{} keys, {} tags", what.keys.len(), what.tags.len())
                }
            ));
            Ok(None)
        }
        Command::Backfill {
            rules,
            tables,
            rate,
            dry_run,
            chunk,
            ..
        } => {
            let options = wal2cache::backfill::Options {
                rules,
                tables,
                rate,
                dry_run,
                chunk: chunk as usize,
            };
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = stop.send(true);
            });
            let rule_set = wal2cache::app::load_rules(&config)?;
            let mut observer = CliObserver::new(&config.backfill);
            let report =
                wal2cache::backfill::run(&config, &rule_set, &options, &mut observer, stop_rx)
                    .await;
            observer.finish();
            let report = report?;
            for (table, rows) in &report.tables {
                say(format_args!("{table}: {rows} rows"));
            }
            say(format_args!(
                "backfill {}: {} rows, {} keys {} at version {} in {:.1}s",
                if report.interrupted {
                    "stopped (run it again to complete it)"
                } else {
                    "done"
                },
                report.rows,
                report.keys,
                if dry_run {
                    "planned (dry run: nothing written)".to_string()
                } else {
                    format!(
                        "written, {} refused by the version guard (the stream wrote or deleted them since the snapshot: its value stays)",
                        report.refused
                    )
                },
                report.version.map(|v| v.encode()).unwrap_or_default(),
                report.elapsed.as_secs_f64()
            ));
            if !dry_run {
                say(format_args!(
                    "{} of those keys offered without a version of their own (one write a key: every slot had confirmed past the snapshot)",
                    report.settled
                ));
            }
            Ok(report.interrupted.then_some(1))
        }
        Command::Status { json, .. } => {
            let report = wal2cache::app::status(&config).await?;
            if json {
                say(format_args!("{}", report.to_json()));
            } else {
                let _ = write!(std::io::stdout(), "{report}");
            }
            if !report.streaming() {
                return Ok(Some(wal2cache::error::exit::NOT_STREAMING));
            }
            Ok(None)
        }
    }
}

/// A message per SIGHUP.
fn hangups() -> Result<tokio::sync::mpsc::UnboundedReceiver<()>, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(|source| Error::Io {
        context: "installing the SIGHUP handler".into(),
        source,
    })?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the rules");
            wal2cache::health::systemd::notify(&[
                wal2cache::health::systemd::NotifyState::Reloading,
            ]);
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received: stopping");
    wal2cache::health::systemd::notify(&[wal2cache::health::systemd::NotifyState::Stopping]);
}

#[cfg(test)]
mod tests {
    use super::{
        log_filter, tune_allocator, MI_OPTION_ALLOW_THP, MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS,
    };

    /// The kernel's own account of the process (`THP_enabled` in /proc/self/status).
    fn thp_enabled() -> Option<String> {
        std::fs::read_to_string("/proc/self/status")
            .ok()?
            .lines()
            .find_map(|l| Some(l.strip_prefix("THP_enabled:")?.trim().to_string()))
    }

    /// One test for both options: `tune_allocator` sets them for the whole process,
    /// so a second test calling it could run first and hide the defaults.
    #[test]
    #[allow(unsafe_code)]
    fn the_allocator_options_are_the_documented_ones() {
        // SAFETY: reads one integer option.
        let get = |option| unsafe { libmimalloc_sys::mi_option_get(option) };
        let purge = std::env::var_os("MIMALLOC_PURGE_DELAY").is_none();
        let thp = std::env::var_os("MIMALLOC_ALLOW_THP").is_none();
        if purge {
            assert_eq!(
                get(MI_OPTION_PURGE_DELAY),
                1000,
                "mimalloc's default purge delay (1000 ms, src/options.c)"
            );
        }
        if thp {
            assert_eq!(
                get(MI_OPTION_ALLOW_THP),
                1,
                "mimalloc's default allow_thp on Linux (1, src/options.c)"
            );
        }
        tune_allocator();
        if purge {
            assert_eq!(get(MI_OPTION_PURGE_DELAY), PURGE_DELAY_MS);
        }
        if thp {
            assert_eq!(get(MI_OPTION_ALLOW_THP), 0);
            assert_eq!(thp_enabled().as_deref(), Some("0"));
        }
    }

    #[test]
    fn the_replication_crate_is_quiet_unless_named() {
        assert!(log_filter(None)
            .to_string()
            .contains("pgwire_replication=off"));
        let user = log_filter(Some("wal2cache=debug")).to_string();
        assert!(
            user.contains("wal2cache=debug") && user.contains("pgwire_replication=off"),
            "{user}"
        );
        let named = log_filter(Some("info,pgwire_replication=debug")).to_string();
        assert!(!named.contains("pgwire_replication=off"), "{named}");
    }
}
