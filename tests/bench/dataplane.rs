//! What wiring one pod and unwiring it cost in the plugin's own dataplane
//! code (`ferry::dataplane::linux`), with no plugin process and no ipamd
//! around it.
//!
//! Teardown deletes the host veth synchronously, so its time is mostly the
//! kernel's veth unregister (an RCU grace period): the wait ferry's DEL
//! leaves to ipamd, and the reference plugins' DEL pays inline.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use ferry::dataplane::linux::LinuxDataplane;
use ferry::dataplane::{Dataplane, PodLink};
use ferry_tests::{Fabric, Netns};
use nix::sched::{CloneFlags, setns};
use serde::Serialize;

use crate::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct DataplaneTimes {
    pub runs: usize,
    pub setup: Summary,
    pub teardown: Summary,
}

/// `runs` setups, each followed by its teardown, of one pod on a fresh node
/// of `fabric` (an uplink and a default route, as on a real node).
pub fn run(fabric: &Fabric, runs: usize, stop: &AtomicBool) -> Result<DataplaneTimes> {
    let node = fabric.add_node().context("creating the node netns")?;
    let pod = Netns::new("p").context("creating the pod netns")?;
    let link = PodLink {
        netns: pod.path(),
        ifname: "eth0".into(),
        host_veth: ferry_proto::host_veth_name("bench-dataplane", "eth0"),
        addresses: vec!["10.244.0.2/32".parse()?],
        gateway: ferry_proto::POD_GATEWAY,
        mtu: 1480,
        replace_stale: false,
    };
    let node_netns = node.ns.path();
    // The plugin runs in the node netns; so does this thread, and only it:
    // the bench itself stays where it is.
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&node_netns)
                .with_context(|| format!("opening {}", node_netns.display()))?;
            setns(&ns, CloneFlags::CLONE_NEWNET).context("entering the node netns")?;
            let dp = LinuxDataplane::new();
            let mut setups = Vec::with_capacity(runs);
            let mut teardowns = Vec::with_capacity(runs);
            for _ in 0..runs {
                if stop.load(Ordering::SeqCst) {
                    bail!("interrupted");
                }
                let started = Instant::now();
                dp.setup(&link).context("dataplane setup")?;
                setups.push(started.elapsed().as_secs_f64() * 1000.0);
                let started = Instant::now();
                dp.teardown(&link.host_veth).context("dataplane teardown")?;
                teardowns.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(DataplaneTimes {
                runs,
                setup: Summary::of(&setups),
                teardown: Summary::of(&teardowns),
            })
        })
        .join()
        .map_err(|_| anyhow!("the dataplane thread panicked"))?
    })
}
