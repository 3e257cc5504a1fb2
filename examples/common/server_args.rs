//! The command line of the example servers: `--addr HOST:PORT` and
//! `--mode sync|concurrent`. Each example includes this file as a module of its own.

use std::net::SocketAddr;

/// How the server orders each connection's messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerMode {
    Sync,
    Concurrent,
}

/// The address and mode from the command line; on a bad argument, prints it with a usage
/// line naming `program` and exits with status 2.
pub fn parse_or_exit(program: &str) -> (SocketAddr, ServerMode) {
    parse(std::env::args().skip(1)).unwrap_or_else(|message| {
        eprintln!("{message}\nusage: {program} [--addr HOST:PORT] [--mode sync|concurrent]");
        std::process::exit(2);
    })
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<(SocketAddr, ServerMode), String> {
    let mut addr: SocketAddr = "127.0.0.1:3000".parse().expect("valid default address");
    let mut mode = ServerMode::Sync;
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--addr" => {
                addr = value
                    .parse()
                    .map_err(|error| format!("--addr {value}: {error}"))?
            }
            "--mode" => {
                mode = match value.as_str() {
                    "sync" => ServerMode::Sync,
                    "concurrent" => ServerMode::Concurrent,
                    other => return Err(format!("--mode must be sync or concurrent, got {other}")),
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((addr, mode))
}
