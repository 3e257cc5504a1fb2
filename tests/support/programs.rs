//! Programs the end-to-end tests start (nginx, Prometheus, the examples), and their
//! files: shared by `tests/cluster.rs` and `tests/metrics_prometheus.rs`, which include
//! this file alone (`#[path]`), not the whole `support` module.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;

/// A program on `PATH`, or at one of `extra` paths.
pub fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name));
    on_path
        .chain(extra.iter().map(PathBuf::from))
        .find(|candidate| candidate.is_file())
}

/// The program `name` (from the Debian package `package`), or `None` after printing
/// that `test` is skipped; when `CI` is set, a panic: there the test must run.
pub fn require(name: &str, extra: &[&str], package: &str, test: &str) -> Option<PathBuf> {
    if let Some(program) = find_program(name, extra) {
        return Some(program);
    }
    let in_ci = std::env::var_os("CI").is_some_and(|value| !value.is_empty());
    assert!(
        !in_ci,
        "{name} not installed, and CI is set: {test} must run in CI \
         (Debian/Ubuntu: apt-get install {package})"
    );
    // Straight to stderr, past the test harness's capture, so that a plain `cargo test`
    // shows it; once per program, not once per test.
    static REPORTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    if REPORTED.lock().unwrap().insert(name.to_owned()) {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: {name} not installed ({test}; set CI to make this a failure)"
        );
    }
    None
}

/// A port on 127.0.0.1 that was free a moment ago; whoever uses it retries if another
/// process takes it first.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// A directory for one test's files, under cargo's `target/tmp`. Removed when the test
/// passes, kept (and named) when it fails.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(name: &str) -> Self {
        let path =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the run directory");
        RunDir(path)
    }

    /// A file's text, or nothing if it is not there (yet).
    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.0.join(file)).unwrap_or_default()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process, killed when dropped.
pub struct Process(pub Child);

impl Process {
    /// SIGKILL: nothing to shut down gracefully, and nothing is left behind (each
    /// program here runs as a single process).
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn has_exited(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}
