//! A worker thread inside a pod's network namespace.
//!
//! A netlink socket belongs to the netns of the thread that opened it, and
//! setns(2) changes only the calling thread. So the worker is a dedicated OS
//! thread that enters the pod netns first, then opens its own netlink socket
//! and runs its own current-thread runtime. No shared thread ever changes
//! namespace. Jobs are closures sent over a channel; their futures run on the
//! worker, so they need not be `Send`.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sched::{CloneFlags, setns};
use rtnetlink::Handle;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::nl;
use crate::dataplane::DataplaneError;

type Job = Box<dyn FnOnce(Handle) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

pub(super) struct PodNetns {
    path: PathBuf,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    /// Resolved once the worker has entered the netns and opened its socket.
    ready: Option<oneshot::Receiver<Result<(), DataplaneError>>>,
    thread: Option<JoinHandle<()>>,
}

impl PodNetns {
    /// Starts the worker; entering the netns happens on the worker, and its
    /// failure shows up on the first `run`.
    pub(super) fn start(netns: Arc<File>, path: &Path) -> Result<Self, DataplaneError> {
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let worker_path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("ferry-podns".into())
            .spawn(move || worker(&netns, worker_path, ready_tx, jobs_rx))
            .map_err(|source| DataplaneError::Netns {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(PodNetns {
            path: path.to_path_buf(),
            jobs: Some(jobs_tx),
            ready: Some(ready_rx),
            thread: Some(thread),
        })
    }

    /// Runs `job` with a netlink handle inside the pod netns and returns its
    /// result.
    pub(super) async fn run<T, F, Fut>(&mut self, job: F) -> Result<T, DataplaneError>
    where
        T: Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, DataplaneError>> + 'static,
    {
        if let Some(ready) = self.ready.take() {
            ready.await.map_err(|_| self.stopped())??;
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let boxed: Job = Box::new(move |handle| {
            Box::pin(async move {
                // The caller may have given up; nothing to do then.
                let _ = reply_tx.send(job(handle).await);
            })
        });
        let jobs = self.jobs.as_ref().ok_or_else(|| self.stopped())?;
        jobs.send(boxed).map_err(|_| self.stopped())?;
        reply_rx.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> DataplaneError {
        DataplaneError::Netlink {
            op: format!("netns {}", self.path.display()),
            detail: "the worker thread stopped unexpectedly".into(),
        }
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop.
        self.jobs.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!(netns = %self.path.display(), "pod netns worker panicked");
        }
    }
}

fn worker(
    netns: &File,
    path: PathBuf,
    ready: oneshot::Sender<Result<(), DataplaneError>>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    if let Err(errno) = setns(netns, CloneFlags::CLONE_NEWNET) {
        let _ = ready.send(Err(DataplaneError::Netns {
            path,
            source: errno.into(),
        }));
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(source) => {
            let _ = ready.send(Err(DataplaneError::Netns { path, source }));
            return;
        }
    };
    runtime.block_on(async move {
        // Opened only now, after setns, so the socket lives in the pod netns.
        let handle = match nl::connect() {
            Ok(h) => h,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        while let Some(job) = jobs.recv().await {
            job(handle.clone()).await;
        }
    });
}
