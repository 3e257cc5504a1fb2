//! Running one scenario of a test binary in a child process: for the scenarios whose
//! failure would be an abort (a panic while a panic unwinds), which would take the
//! whole test binary down with it.
#![allow(dead_code, unreachable_pub)]

use std::process::{Command, ExitStatus, Output};

/// The name of the test, in every binary that uses this, that runs the scenario named
/// by its environment variable, and does nothing without it.
pub const CHILD: &str = "child";

/// What a child process printed, and how it ended.
pub struct ChildRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Everything above, for assertion messages.
    pub report: String,
}

/// Runs this test binary again with `scenario` in the environment variable `variable`,
/// running only its [`CHILD`] test, and checks that the child was not killed by a
/// signal (an abort) and did run that test.
#[track_caller]
pub fn run_child(variable: &str, scenario: &str) -> ChildRun {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args([CHILD, "--exact", "--nocapture"])
        .env(variable, scenario)
        // Short reports: a panic while panicking prints its backtrace anyway.
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("the child process runs");
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    let report = format!("{status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            None,
            "scenario {scenario} was killed by a signal (an abort is SIGABRT, 6): {report}"
        );
    }
    assert!(
        stdout.contains("running 1 test"),
        "scenario {scenario}: the child did not run its test: {report}"
    );
    ChildRun {
        status,
        stdout,
        stderr,
        report,
    }
}
