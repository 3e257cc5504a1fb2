//! The callgrind entry point of the instruction-count benchmarks, shared by
//! `instructions.rs` and `instructions_sets.rs`.

use gungraun::{Callgrind, EntryPoint, LibraryBenchmarkConfig};

/// Counts the benchmark function `name` and everything it calls; every benchmark of
/// `instructions.rs` and `instructions_sets.rs` uses it.
///
/// gungraun's default, `--toggle-collect=*::__gungraun_wrapper_mod::*`, also matches the
/// closures and async blocks written inside a benchmark function, and their drop glue
/// (`drop_in_place<…::__gungraun_wrapper_mod::…::{{closure}}>`). Callgrind flips
/// counting on entering and on leaving each function that matches, so nothing inside
/// those was counted: the semaphore row's acquire, hand-off, permit drop and `free` run
/// in its async block and that block's drop glue, and the row read 248 instructions per
/// request instead of 932. The exact name matches the benchmark function alone, so no
/// row depends on whether the compiler inlines the closures in it. A name that is not
/// the function's counts nothing, which `.ci/instruction-gate` rejects.
pub fn counted(name: &str) -> LibraryBenchmarkConfig {
    // The benchmark binary's crate, the first part of every function's path in it.
    let krate = env!("CARGO_CRATE_NAME");
    let mut config = LibraryBenchmarkConfig::default();
    config.tool(Callgrind::default().entry_point(EntryPoint::Custom(format!(
        "{krate}::{name}::__gungraun_wrapper_mod::{name}"
    ))));
    config
}
