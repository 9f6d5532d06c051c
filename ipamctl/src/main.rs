//! ipamctl: the operator's view of one node's ipamd, over its Unix socket.
//! Human tables by default, `--json` (camelCase keys) for scripts. Errors
//! are one line on stderr, "ipamctl: <msg>", exit 1.

mod client;
mod commands;
mod render;
#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ipamctl", version, about = "inspect and repair ferry's ipamd")]
struct Cli {
    /// ipamd's Unix socket.
    #[arg(long, global = true, env = "FERRY_IPAMD_SOCKET", default_value = ferry_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// JSON output (camelCase keys).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Readiness and counts; exits 0 only when ipamd is READY.
    Status,
    /// Pools, their options and their use (same as `pool ls`).
    Pools,
    /// Add, remove or list pools at run time.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Blocks this ipamd knows of.
    Blocks {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        pool: Option<String>,
    },
    /// Allocations, optionally filtered.
    Allocations {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        pod: Option<String>,
        /// A container ID or a unique prefix of one.
        #[arg(long)]
        container: Option<String>,
    },
    /// The state of an IP, or the allocations of a container (ID or prefix).
    Show { target: String },
    /// Force-release an IP, or every allocation of a container.
    Release { target: String },
    /// Compare allocations with the host veths (and the store).
    Check,
    /// Act on what `check` finds (release stale allocations, delete orphan
    /// veths); prints each action.
    Gc {
        /// Only print what would be done.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCmd {
    /// Add a pool; it lasts across ipamd restarts until `pool rm`.
    Add(PoolAdd),
    /// Remove a pool added at run time; refused while it holds allocations.
    #[command(visible_alias = "remove")]
    Rm { name: String },
    /// List pools (same as `ipamctl pools`).
    #[command(visible_alias = "list")]
    Ls,
}

#[derive(Debug, clap::Args)]
struct PoolAdd {
    name: String,
    /// The pool's network, e.g. 10.50.0.0/24.
    cidr: String,
    /// Prefix length of the per-node blocks (default /26, or the pool's own
    /// prefix when it is smaller than that).
    #[arg(long, value_name = "N")]
    block_size: Option<u8>,
    /// A Kubernetes namespace this pool serves (repeatable). A pool with
    /// none would be a second default pool, which is refused.
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// Masquerade traffic leaving every cluster pool.
    #[arg(long)]
    nat_outgoing: bool,
    /// The source address for that SNAT (default: the node's).
    #[arg(long, value_name = "IP")]
    snat_address: Option<Ipv4Addr>,
    /// Drop traffic into this pool from other pools, except --allow-from.
    #[arg(long)]
    isolated: bool,
    /// A pool allowed into an isolated pool (repeatable).
    #[arg(long = "allow-from", value_name = "POOL")]
    allow_from: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(&cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ipamctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
