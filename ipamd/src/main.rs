//! ipamd: parse the configuration, open the core, program the node, serve
//! gRPC on the Unix socket until SIGTERM/SIGINT. Everything else lives in
//! the library.

use std::io::{ErrorKind, IsTerminal};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use ferry_proto::v1::ipam_admin_server::IpamAdminServer;
use ferry_proto::v1::ipam_server::IpamServer;
use ipamd::cluster::local::LocalCluster;
use ipamd::config::{Cli, Config};
use ipamd::grpc::{AdminService, IpamService};
use ipamd::ipam::Ipam;
use ipamd::metrics::{self, Metrics};
use ipamd::node::{self, Blackholes, NodeNet};
use ipamd::reconcile::{Reconciler, SystemClock, unix_ms};
use ipamd::store::recover;
use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tracing::{info, warn};

/// How long in-flight requests may take to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests handled at once across all connections; more wait their turn,
/// so a burst of runtimes or a looping client cannot exhaust ipamd.
const MAX_CONCURRENT_REQUESTS: usize = 64;

/// A handler still running after this is cancelled (the plugin sees "try
/// again"): far beyond any plugin deadline, it only bounds a stuck one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ipamd: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(tracing_subscriber::EnvFilter::new(config.log_filter()))
        .init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipamd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let started_unix_ms = unix_ms(SystemTime::now());
    // Installed first: a stop signal during start-up is then handled as a
    // graceful stop right after the server comes up, not a kill.
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    info!(
        version = ferry_proto::CLIENT_VERSION,
        node = %config.node_name,
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        pod_cidr = %config.pod_cidr,
        "ipamd starting"
    );
    // Before touching state: a second ipamd must not steal a live socket.
    clear_stale_socket(&config.socket)?;
    // Bound before any state is touched: a taken address stops the start
    // here, naming it, instead of ipamd running without metrics.
    let metrics = Metrics::new();
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };

    // A damaged database is moved aside and rebuilt from the host veths.
    let (store, _rebuild) =
        recover::open_store(&config.state_dir, &config.ipam_options(), &LocalCluster)
            .await
            .with_context(|| format!("opening state in {}", config.state_dir.display()))?;
    let ipam = Arc::new(
        Ipam::open(
            config.ipam_options(),
            Arc::new(store),
            Arc::new(LocalCluster),
        )
        .await
        .context("opening the IPAM core")?,
    );
    // Also after a restart soon after a rebuild: the hold is derived from
    // the moved-aside database's name, not from the store.
    if let Some((until, why)) =
        recover::fresh_hold(&config.state_dir, config.cooldown, SystemTime::now())
    {
        warn!(reason = %why, "holding new addresses until the lost cooldowns have passed");
        ipam.hold_fresh_until(until, why);
    }

    // The node's dataplane: forwarding, blackholes, MTU.
    if node::ensure_ip_forward(Path::new(node::IP_FORWARD)).context("enabling IP forwarding")? {
        info!("enabled net.ipv4.ip_forward");
    }
    let net = NodeNet::new().context("netlink")?;
    let mtu = match config.mtu {
        Some(m) => m,
        None => {
            let underlay = net
                .detect_underlay_mtu()
                .await
                .context("detecting the underlay MTU")?;
            node::pod_mtu(underlay)
        }
    };
    info!(mtu, "pod MTU");
    let blackholes = Arc::new(Blackholes::new(Arc::new(net.clone())));
    blackholes
        .sync(|| ipam.owned_blocks())
        .await
        .context("installing blackhole routes for owned blocks")?;

    let host_links: Arc<dyn node::HostLinks> = Arc::new(net);
    let reconciler = Arc::new(Reconciler::new(
        ipam.clone(),
        host_links.clone(),
        Arc::new(SystemClock),
        config.stale_grace,
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(
            ferry_proto::HEALTH_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;

    let listener = bind_socket(&config.socket)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(reconcile_loop(
        reconciler.clone(),
        blackholes.clone(),
        ipam.clone(),
        metrics.clone(),
        config.reconcile_interval,
        stop_rx.clone(),
    ));
    if let (Some(listener), Some(addr)) = (metrics_listener, config.metrics_addr) {
        info!(%addr, "serving metrics on GET /metrics");
        tasks.spawn(metrics::serve(
            listener,
            metrics.clone(),
            ipam.clone(),
            stop_rx.clone(),
        ));
    }
    tasks.spawn(idle_block_loop(
        ipam.clone(),
        blackholes.clone(),
        idle_check_interval(config.block_idle_grace),
        stop_rx.clone(),
    ));

    let ipam_service = IpamService::new(
        ipam.clone(),
        mtu,
        Some(blackholes.clone()),
        config.state_dir.display().to_string(),
        started_unix_ms,
    )
    .with_unplugger(node::Unplugger::start(host_links));
    let admin_service =
        AdminService::new(ipam.clone(), reconciler.clone()).with_blackholes(blackholes.clone());

    let (signaled_tx, mut signaled_rx) = watch::channel(false);
    let signaled = signaled_rx.clone();
    let socket = config.socket.clone();
    let stopping_health = health.clone();
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: stopping"),
            _ = sigint.recv() => info!("SIGINT: stopping"),
        }
        // Stop advertising at once: a plugin that finds no socket fails fast
        // with "try again" instead of waiting out its timeout on a listener
        // that no longer accepts.
        remove_socket(&socket);
        stopping_health
            .set_service_status(
                ferry_proto::HEALTH_SERVICE,
                tonic_health::ServingStatus::NotServing,
            )
            .await;
        let _ = signaled_tx.send(true);
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
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    let drain_deadline = async move {
        let _ = signaled_rx.wait_for(|s| *s).await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    let served = tokio::select! {
        r = server => r.context("gRPC server"),
        () = drain_deadline => {
            warn!("requests still running {DRAIN_TIMEOUT:?} after the stop signal; stopping anyway");
            Ok(())
        }
    };

    // Let the loops finish what they are doing (a release must not stop
    // half-way), then close the store by dropping the last handles.
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    // After a signal the socket is already gone, and the path may belong to a
    // successor by now.
    if !*signaled.borrow() {
        remove_socket(&config.socket);
    }
    served?;
    info!("ipamd stopped");
    Ok(())
}

/// Removes a socket file nobody answers on; refuses when someone does, or
/// when the path is not a socket at all.
fn clear_stale_socket(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another ipamd is already serving on {}; refusing to start",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused || e.kind() == ErrorKind::NotFound => {
            warn!(socket = %path.display(), "removing stale socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing stale socket {}", path.display()))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(e).with_context(|| format!("probing existing socket {}", path.display())),
    }
}

/// Binds with a umask that leaves the socket 0600 from its first moment,
/// then sets the mode explicitly, all before anything is served.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating socket directory {}", parent.display()))?;
    }
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => warn!(socket = %path.display(), error = %e, "cannot remove socket"),
    }
}

/// Checking a few times per grace period keeps the give-back close to the
/// grace without polling hard.
fn idle_check_interval(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

async fn reconcile_loop(
    reconciler: Arc<Reconciler>,
    blackholes: Arc<Blackholes>,
    ipam: Arc<Ipam>,
    metrics: Metrics,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // The first tick fires at once: reconcile at start.
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
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
        // Repairs routes someone else removed, and retries failed adds.
        if let Err(e) = blackholes.sync(|| ipam.owned_blocks()).await {
            warn!(error = %e, "blackhole route sync failed");
        }
    }
}

async fn idle_block_loop(
    ipam: Arc<Ipam>,
    blackholes: Arc<Blackholes>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match ipam.release_idle_blocks().await {
            Ok(released) if released.is_empty() => {}
            Ok(released) => {
                info!(blocks = ?released, "gave back idle blocks");
                if let Err(e) = blackholes.sync(|| ipam.owned_blocks()).await {
                    warn!(error = %e, "blackhole route sync failed");
                }
            }
            Err(e) => warn!(error = %e, "releasing idle blocks failed"),
        }
    }
}
