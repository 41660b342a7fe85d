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

#[allow(dead_code)]
impl Cluster {
    /// initdb, then start with `settings` (`-c name=value` each) on a free port.
    pub fn start(bin: &Path, name: &str, settings: &[&str]) -> Cluster {
        let dir = std::env::temp_dir().join(format!("w2c_{name}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let chown = Command::new("chown")
            .arg("postgres")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success(), "chown postgres {}", dir.display());
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
        let log = dir.join("log");
        let span = (PORTS.end - PORTS.start) as u32;
        let mut tried = Vec::new();
        for attempt in 0..ATTEMPTS {
            let port = PORTS.start + ((std::process::id() + attempt * 977) % span) as u16;
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
                Err(_) if logged.contains("could not bind") => {
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

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            self.dir.join("data").to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
