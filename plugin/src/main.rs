//! The `ferry` CNI plugin: read the request, run it, print the reply, exit.
//! stdout carries only the CNI reply; logs go to the log file and stderr.

mod cmd;
mod cni;
mod ipam;

use std::any::Any;
use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;

use cni::CniError;
use cni::config::NetConf;
use cni::error::code;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        if tracing::dispatcher::has_been_set() {
            tracing::error!("panic: {info}");
        } else {
            eprintln!("ferry: panic: {info}");
        }
    }));
    let mut error_version = cni::CniVersion::LATEST.as_str().to_string();
    let outcome = guarded(|| serve(&mut error_version));
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(reply) => {
            if let Some(reply) = reply {
                let _ = writeln!(stdout, "{reply}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&error_version));
            ExitCode::FAILURE
        }
    }
}

fn serve(error_version: &mut String) -> Result<Option<String>, CniError> {
    let stdin = read_stdin()?;
    *error_version = cni::request::error_version(&stdin);
    let request = cni::request::parse(|k| std::env::var(k).ok(), &stdin);
    init_logging(request.as_ref().ok().and_then(|r| r.conf()));
    let request = request.inspect_err(|e| tracing::error!(code = e.code, "{e}"))?;

    let container = std::env::var("CNI_CONTAINERID").unwrap_or_default();
    let _span = tracing::info_span!("cni", cmd = request.verb_name(), %container).entered();
    let tolerated = match &request {
        cni::Request::Del(a) => a.tolerated.as_slice(),
        cni::Request::Gc(g) => g.tolerated.as_slice(),
        _ => &[],
    };
    for problem in tolerated {
        tracing::warn!("{problem}");
    }
    cmd::execute(&request).inspect_err(|e| tracing::error!(code = e.code, "{e}"))
}

/// The most stdin may hold: a network config with a prevResult is a few KiB.
const STDIN_LIMIT: u64 = 1024 * 1024;

/// A terminal on stdin means a human ran `CNI_COMMAND=VERSION ferry`: do not wait.
fn read_stdin() -> Result<Vec<u8>, CniError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    read_limited(stdin, STDIN_LIMIT)
}

/// At most `limit` bytes; more is an error rather than memory spent on it.
fn read_limited(input: impl Read, limit: u64) -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    input
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CniError::new(code::IO, format!("cannot read stdin: {e}")))?;
    if buf.len() as u64 > limit {
        return Err(CniError::new(
            code::DECODE,
            format!(
                "stdin is larger than {} MiB; a network config is never that big",
                limit / (1024 * 1024)
            ),
        ));
    }
    Ok(buf)
}

/// Logs to `logFile` (appended) and stderr; stderr only without a config.
fn init_logging(conf: Option<&NetConf>) {
    let level = conf.map_or("info", |c| c.log_level.as_str());
    // Only DEL gets here with a bad logLevel (it goes on despite one).
    let filter = cni::config::log_directive(level)
        .ok()
        .and_then(|d| EnvFilter::try_new(d).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let mut file_problem = None;
    let file = conf
        .map(|c| c.log_file.as_str())
        .filter(|f| !f.is_empty())
        .and_then(|path| match open_log(Path::new(path)) {
            Ok(f) => Some(f),
            Err(e) => {
                file_problem = Some(format!("cannot open log file {path}: {e}"));
                None
            }
        });
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    let file_layer = file.map(|f| {
        tracing_subscriber::fmt::layer()
            .with_writer(Mutex::new(f))
            .with_ansi(false)
            .with_target(false)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr_layer)
        .with(file_layer)
        .try_init();
    if let Some(problem) = file_problem {
        tracing::warn!("{problem}; logging to stderr only");
    }
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// No panic may reach the runtime: it becomes CNI error 106 on stdout.
fn guarded(
    f: impl FnOnce() -> Result<Option<String>, CniError>,
) -> Result<Option<String>, CniError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(CniError::new(
            code::INTERNAL,
            format!("internal error: {}", panic_message(payload.as_ref())),
        ))
    })
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_over_the_limit_is_code_6_saying_so() {
        let limit = STDIN_LIMIT as usize;
        let ok = read_limited(&vec![b' '; limit][..], STDIN_LIMIT).unwrap();
        assert_eq!(ok.len(), limit);
        let e = read_limited(&vec![b' '; limit + 1][..], STDIN_LIMIT).unwrap_err();
        assert_eq!(e.code, 6);
        assert!(e.msg.contains("larger than 1 MiB"), "{}", e.msg);
    }

    #[test]
    fn a_panic_becomes_error_106() {
        let e = guarded(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(e.code, 106);
        assert_eq!(e.msg, "internal error: boom 7");
        assert_eq!(guarded(|| Ok(None)), Ok(None));
    }
}
