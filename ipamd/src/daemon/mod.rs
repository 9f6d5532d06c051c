//! ipamd as one call: [`run`] opens the state, programs the node's routes,
//! serves gRPC on the configured Unix socket and runs the background loops
//! until `shutdown` resolves, then drains. `main.rs` adds only flags and
//! signals; tests call [`run`] with an in-memory [`Host`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_proto::v1::ipam_admin_server::IpamAdminServer;
use ferry_proto::v1::ipam_server::IpamServer;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::clock::unix_ms;
use crate::cluster::local::LocalCluster;
use crate::config::Config;
use crate::error::IpamError;
use crate::grpc::{AdminService, IpamService};
use crate::ipam::Ipam;
use crate::metrics::{self, BindError, Metrics};
use crate::node::{
    self, BlockRoutes, HostLinks, NodeError, NodeNet, NodeSetup, RouteReconciler, Unplugger,
};
use crate::reconcile::Reconciler;
use crate::store::recover::{self, RecoverError};

pub mod socket;

pub use socket::SocketError;

/// How long in-flight requests may take to finish after the stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests handled at once across all connections; more wait their turn,
/// so a burst of runtimes or a looping client cannot exhaust ipamd.
const MAX_CONCURRENT_REQUESTS: usize = 64;

/// A handler still running after this is cancelled (the plugin sees "try
/// again"): far beyond any plugin deadline, it only bounds a stuck one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Each variant's text is the step that failed; the cause is its source.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Metrics(#[from] BindError),
    #[error("opening state in {}", dir.display())]
    State {
        dir: PathBuf,
        #[source]
        source: Box<RecoverError>,
    },
    #[error("opening the IPAM core")]
    Core(#[source] IpamError),
    #[error("{what}")]
    Node {
        what: &'static str,
        #[source]
        source: NodeError,
    },
    #[error("gRPC server")]
    Serve(#[source] tonic::transport::Error),
}

fn node_err(what: &'static str) -> impl FnOnce(NodeError) -> DaemonError {
    move |source| DaemonError::Node { what, source }
}

/// The node as ipamd acts on it: netlink in the daemon, in memory in tests.
pub struct Host {
    pub links: Arc<dyn HostLinks>,
    pub routes: Arc<dyn BlockRoutes>,
    pub setup: Arc<dyn NodeSetup>,
}

impl Host {
    /// The node ipamd runs in, through one netlink socket; nothing on the
    /// node changes until [`run`] has opened the state.
    pub fn open() -> Result<Host, DaemonError> {
        let net = Arc::new(NodeNet::new().map_err(node_err("netlink"))?);
        Ok(Host {
            links: net.clone(),
            routes: net.clone(),
            setup: net,
        })
    }

    /// Forwarding on, and the pod MTU: configured, or the underlay's less
    /// the IPIP header.
    async fn prepare(&self, configured_mtu: Option<u32>) -> Result<u32, DaemonError> {
        if self
            .setup
            .enable_forwarding()
            .map_err(node_err("enabling IP forwarding"))?
        {
            info!("enabled net.ipv4.ip_forward");
        }
        let mtu = match configured_mtu {
            Some(m) => m,
            None => node::pod_mtu(
                self.setup
                    .underlay_mtu()
                    .await
                    .map_err(node_err("detecting the underlay MTU"))?,
            ),
        };
        info!(mtu, "pod MTU");
        Ok(mtu)
    }
}

/// Serves until `shutdown` resolves, then stops advertising, lets running
/// requests finish (up to [`DRAIN_TIMEOUT`]) and the loops end, and closes
/// the store.
pub async fn run(
    config: Config,
    host: Host,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let started_unix_ms = unix_ms(SystemTime::now());
    info!(
        version = ferry_proto::PROTOCOL_VERSION,
        node = %config.node_name,
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        pod_cidr = %config.pod_cidr,
        "ipamd starting"
    );
    // Before touching state: a second ipamd must not steal a live socket.
    socket::clear_stale(&config.socket)?;
    // Bound before any state is touched: a taken address stops the start
    // here, naming it, instead of ipamd running without metrics.
    let metrics = Metrics::new();
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some((metrics::bind(addr).await?, addr)),
        None => None,
    };

    // A damaged database is moved aside and rebuilt from the host veths.
    let (store, _rebuild) = recover::open_store(
        &config.state_dir,
        &config.ipam_options(),
        &LocalCluster,
        host.links.as_ref(),
    )
    .await
    .map_err(|source| DaemonError::State {
        dir: config.state_dir.clone(),
        source: Box::new(source),
    })?;
    let ipam = Arc::new(
        Ipam::open(
            config.ipam_options(),
            Arc::new(store),
            Arc::new(LocalCluster),
        )
        .await
        .map_err(DaemonError::Core)?,
    );
    // Also after a restart soon after a rebuild: the hold is derived from
    // the moved-aside database's name, not from the store.
    if let Some((until, why)) =
        recover::fresh_hold(&config.state_dir, config.cooldown, SystemTime::now())
    {
        warn!(reason = %why, "holding new addresses until the lost cooldowns have passed");
        ipam.hold_fresh_until(until, why);
    }

    // The node's dataplane: forwarding, MTU, then the routes of owned blocks.
    let mtu = host.prepare(config.mtu).await?;
    let owned = ipam.watch_owned_blocks();
    let mut routes = RouteReconciler::new(host.routes.clone());
    // Cloned: a held borrow would stall the core's next publication.
    let blocks = owned.borrow().clone();
    routes
        .sync(&blocks)
        .await
        .map_err(node_err("installing blackhole routes for owned blocks"))?;
    let reconciler = Arc::new(Reconciler::new(
        ipam.clone(),
        host.links.clone(),
        config.stale_grace,
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(
            ferry_proto::HEALTH_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;

    let listener = socket::bind(&config.socket)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(routes.run(owned, config.reconcile_interval, stop_rx.clone()));
    tasks.spawn(every(config.reconcile_interval, stop_rx.clone(), {
        let (reconciler, metrics) = (reconciler.clone(), metrics.clone());
        move || reconcile_once(reconciler.clone(), metrics.clone())
    }));
    tasks.spawn(every(
        idle_check_interval(config.block_idle_grace),
        stop_rx.clone(),
        {
            let ipam = ipam.clone();
            move || release_idle_blocks(ipam.clone())
        },
    ));
    if let Some((listener, addr)) = metrics_listener {
        info!(%addr, "serving metrics on GET /metrics");
        tasks.spawn(metrics::serve(
            listener,
            metrics.clone(),
            ipam.clone(),
            stop_rx.clone(),
        ));
    }

    let ipam_service = IpamService::new(
        ipam.clone(),
        mtu,
        config.state_dir.display().to_string(),
        started_unix_ms,
    )
    .with_unplugger(Unplugger::start(host.links.clone()));
    let admin_service = AdminService::new(ipam.clone(), reconciler.clone());

    let (stopping_tx, mut stopping_rx) = watch::channel(false);
    let stopping = stopping_rx.clone();
    let socket_path = config.socket.clone();
    let stop_serving = async move {
        shutdown.await;
        // Stop advertising at once: a plugin that finds no socket fails fast
        // with "try again" instead of waiting out its timeout on a listener
        // that no longer accepts.
        socket::remove(&socket_path);
        health
            .set_service_status(
                ferry_proto::HEALTH_SERVICE,
                tonic_health::ServingStatus::NotServing,
            )
            .await;
        let _ = stopping_tx.send(true);
    };

    info!(socket = %config.socket.display(), "serving");
    let server = Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            MAX_CONCURRENT_REQUESTS,
        ))
        .add_service(metrics.grpc(health_service))
        .add_service(metrics.grpc(IpamServer::new(ipam_service)))
        .add_service(metrics.grpc(IpamAdminServer::new(admin_service)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop_serving);
    let drain_deadline = async move {
        let _ = stopping_rx.wait_for(|s| *s).await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    let served = tokio::select! {
        r = server => r.map_err(DaemonError::Serve),
        () = drain_deadline => {
            warn!("requests still running {DRAIN_TIMEOUT:?} after the stop signal; stopping anyway");
            Ok(())
        }
    };

    // Let the loops finish what they are doing (a release must not stop
    // half-way), then close the store by dropping the last handles.
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    // After the stop the socket is already gone, and the path may belong to
    // a successor by now.
    if !*stopping.borrow() {
        socket::remove(&config.socket);
    }
    served?;
    info!("ipamd stopped");
    Ok(())
}

/// Runs `tick` at once and then every `period` until `stop`; a tick is
/// never cut short by the stop.
async fn every<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tick().await;
    }
}

async fn reconcile_once(reconciler: Arc<Reconciler>, metrics: Metrics) {
    match reconciler.run_once().await {
        Ok(outcome) => {
            metrics.record_findings(&outcome.findings);
            metrics.record_reconcile_released(outcome.released.len());
            if !outcome.released.is_empty() || !outcome.unplugged.is_empty() {
                info!(
                    released = outcome.released.len(),
                    deleted_veths = outcome.unplugged.len(),
                    "reconcile cleaned up after pods gone without DEL"
                );
            }
        }
        Err(e) => warn!(error = %e, "reconcile failed"),
    }
}

async fn release_idle_blocks(ipam: Arc<Ipam>) {
    match ipam.release_idle_blocks().await {
        Ok(released) if released.is_empty() => {}
        Ok(released) => info!(blocks = ?released, "gave back idle blocks"),
        Err(e) => warn!(error = %e, "releasing idle blocks failed"),
    }
}

/// Checking a few times per grace period keeps the give-back close to the
/// grace without polling hard.
fn idle_check_interval(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

#[cfg(test)]
mod tests;
