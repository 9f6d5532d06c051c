//! ADD, DEL, CHECK, STATUS and GC over an IpamClient and a Dataplane:
//! pure orchestration, so every path is unit-tested with fakes.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tracing::{info, warn};

use crate::cni::config::{prev_result_addresses, prev_result_gateway};
use crate::cni::error::code;
use crate::cni::result::{AddResult, Wired};
use crate::cni::{Attachment, CniError, GcRequest, Request, StatusRequest, version};
use crate::ipam::grpc::GrpcIpam;
use crate::ipam::{IpamClient, IpamClientError, Key, Readiness};
use ferry::dataplane::{Dataplane, PodLink};

/// Runs `req` against the real ipamd and kernel; returns what goes on stdout.
pub fn execute(req: &Request) -> Result<Option<String>, CniError> {
    let reply = match (req, req.conf()) {
        (Request::Version { requested }, _) => Some(version_json(requested.as_deref())?),
        (_, Some(conf)) => {
            let ipam = GrpcIpam::new(
                &conf.ipamd.socket,
                Duration::from_millis(conf.ipamd.timeout_ms),
            )
            .map_err(|e| CniError::new(code::IO, format!("cannot start the ipamd client: {e}")))?;
            let dataplane = ferry::dataplane::linux::LinuxDataplane::new();
            run(req, &ipam, &dataplane)?
        }
        (_, None) => return Err(CniError::new(code::INTERNAL, "request without a config")),
    };
    Ok(reply.map(|v| v.to_string()))
}

/// Dispatches one verb; Some(json) is printed, None prints nothing.
pub fn run(
    req: &Request,
    ipam: &dyn IpamClient,
    dp: &dyn Dataplane,
) -> Result<Option<Value>, CniError> {
    match req {
        Request::Version { requested } => version_json(requested.as_deref()).map(Some),
        Request::Add(a) => add(a, ipam, dp).map(Some),
        Request::Del(a) => del(a, ipam, dp).map(|()| None),
        Request::Check(a) => check(a, ipam, dp).map(|()| None),
        Request::Status(s) => status(s, ipam).map(|()| None),
        Request::Gc(g) => gc(g, ipam, dp).map(|()| None),
    }
}

fn version_json(requested: Option<&str>) -> Result<Value, CniError> {
    serde_json::to_value(version::version_reply(requested)).map_err(|e| {
        CniError::new(
            code::INTERNAL,
            format!("cannot encode the VERSION reply: {e}"),
        )
    })
}

/// The netns ADD and CHECK work in: set and present, else 103; not the
/// node's own (the plugin's), else 4.
fn required_netns(a: &Attachment) -> Result<&Path, CniError> {
    let netns = a.netns.as_deref().ok_or_else(|| {
        CniError::new(
            code::NETNS,
            "CNI_NETNS is not set: the pod's network namespace path is required",
        )
    })?;
    crate::cni::netns::check_pod_netns(netns, Path::new(crate::cni::netns::NODE_NETNS))?;
    Ok(netns)
}

pub fn add(a: &Attachment, ipam: &dyn IpamClient, dp: &dyn Dataplane) -> Result<Value, CniError> {
    // Before Allocate: a bad netns must not cost an address.
    let netns = required_netns(a)?;
    let key = a.key();
    let lease = ipam.allocate(
        &key,
        &a.pod_info(),
        &a.requested_ips,
        a.pool_hint.as_deref(),
    )?;
    info!(container = %a.container_id, ifname = %a.ifname, pool = %lease.pool,
          addresses = ?lease.addresses, "allocated");

    let link = PodLink {
        netns: netns.to_path_buf(),
        ifname: a.ifname.clone(),
        host_veth: a.host_veth(),
        addresses: lease.addresses.clone(),
        gateway: lease.gateway,
        mtu: if a.conf.mtu != 0 {
            a.conf.mtu
        } else {
            lease.mtu
        },
        replace_stale: lease.created,
    };
    let attached = match dp.setup(&link) {
        Ok(attached) => attached,
        // A failed setup has already removed any pair it made, and a pair it
        // did not make (a live attachment whose retried ADD failed early) is
        // not ours to delete.
        Err(e) => {
            rollback(&key, &link, lease.created, false, ipam, dp);
            return Err(e.into());
        }
    };
    let rendered = AddResult::for_pod(&Wired {
        host_veth: &link.host_veth,
        host_mac: attached.host_mac,
        ifname: &link.ifname,
        pod_mac: attached.pod_mac,
        netns,
        addresses: &link.addresses,
        gateway: link.gateway,
    })
    .and_then(|r| r.render(a.version, a.conf.prev_result.as_ref()));
    match rendered {
        Ok(v) => {
            info!(container = %a.container_id, host_veth = %link.host_veth, "ADD done");
            Ok(v)
        }
        Err(e) => {
            rollback(&key, &link, lease.created, true, ipam, dp);
            Err(e)
        }
    }
}

/// Undoes what this ADD did, and only that: the pair if it made one, the
/// address if it allocated it (a retried ADD got back an address the pod
/// may still use; the runtime's DEL frees it). Errors are logged, never
/// returned: the caller reports the error that caused the rollback.
fn rollback(
    key: &Key,
    link: &PodLink,
    allocated: bool,
    made_pair: bool,
    ipam: &dyn IpamClient,
    dp: &dyn Dataplane,
) {
    warn!(container = %key.container_id, ifname = %key.ifname, allocated, made_pair,
        "ADD failed, rolling back");
    if made_pair && let Err(e) = dp.teardown(&link.host_veth) {
        warn!(error = %e, host_veth = %link.host_veth, "rollback: teardown failed");
    }
    if allocated && let Err(e) = ipam.release(key) {
        warn!(error = %e, container = %key.container_id, "rollback: release failed");
    }
}

pub fn del(a: &Attachment, ipam: &dyn IpamClient, dp: &dyn Dataplane) -> Result<(), CniError> {
    let host_veth = a.host_veth();
    let key = a.key();
    // The kernel's veth unregister (an RCU wait of ~20 ms) would dominate
    // DEL, so ipamd deletes the host veth once the release is durable, by
    // ifindex so that a veth re-created under the same name is never hit.
    // Only the host end matters, so an empty or vanished netns is fine.
    let index = dp.host_link_index(&host_veth).unwrap_or_else(|e| {
        warn!(error = %e, %host_veth, "cannot look up the host veth; DEL deletes it itself");
        None
    });
    let released = match index {
        Some(ifindex) => ipam.release_and_unplug(&key, &host_veth, ifindex),
        None => ipam.release(&key).map(|()| false),
    };
    if !matches!(released, Ok(true)) {
        dp.teardown(&host_veth)?;
    }
    match released {
        Ok(_) => {}
        // The pod is unplugged either way; ipamd's reconcile frees the
        // address once it can (a version skew is a rolling upgrade in flight).
        Err(IpamClientError::Unreachable(msg) | IpamClientError::VersionMismatch(msg)) => {
            warn!(container = %a.container_id, %msg,
                  "ipamd cannot release on DEL; its reconcile will free the address");
        }
        Err(e) => return Err(e.into()),
    }
    info!(container = %a.container_id, ifname = %a.ifname, "DEL done");
    Ok(())
}

pub fn check(a: &Attachment, ipam: &dyn IpamClient, dp: &dyn Dataplane) -> Result<(), CniError> {
    let netns = required_netns(a)?;
    let prev = a.conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult in the network config",
        )
    })?;
    let mut expected = prev_result_addresses(prev, &a.ifname)
        .map_err(|e| CniError::new(code::DECODE, format!("cannot read prevResult: {e}")))?;
    expected.sort();
    if expected.is_empty() {
        return Err(CniError::new(
            code::CHECK_MISMATCH,
            format!("prevResult holds no IPv4 address for {}", a.ifname),
        ));
    }
    let key = a.key();
    let mut held = ipam.check(&key)?.ok_or_else(|| {
        CniError::new(
            code::CHECK_MISMATCH,
            format!(
                "ipamd holds no address for {}/{}/{}; prevResult has {}",
                key.network,
                key.container_id,
                key.ifname,
                show(&expected)
            ),
        )
    })?;
    held.sort();
    if held != expected {
        return Err(CniError::new(
            code::CHECK_MISMATCH,
            format!(
                "prevResult has {} but ipamd holds {}",
                show(&expected),
                show(&held)
            ),
        ));
    }
    dp.check(&PodLink {
        netns: netns.to_path_buf(),
        ifname: a.ifname.clone(),
        host_veth: a.host_veth(),
        gateway: prev_result_gateway(prev, &expected).unwrap_or(ferry_proto::POD_GATEWAY),
        addresses: expected,
        // CHECK does not compare the MTU; 0 says "unknown".
        mtu: a.conf.mtu,
        replace_stale: false,
    })?;
    Ok(())
}

fn show(addrs: &[ipnet::Ipv4Net]) -> String {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    format!("[{}]", list.join(", "))
}

pub fn status(_req: &StatusRequest, ipam: &dyn IpamClient) -> Result<(), CniError> {
    match ipam.status() {
        Ok((Readiness::Ready, _)) => Ok(()),
        Ok((Readiness::NotAvailable, reason)) => Err(CniError::new(
            code::NOT_AVAILABLE,
            format!("ipamd is not ready: {reason}"),
        )),
        Ok((Readiness::NoAddresses, reason)) => Err(CniError::new(
            code::NO_ADDRESSES,
            format!("no addresses to hand out: {reason}"),
        )),
        Err(e @ (IpamClientError::Unreachable(_) | IpamClientError::Unavailable(_))) => {
            Err(CniError::new(code::NOT_AVAILABLE, e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn gc(req: &GcRequest, ipam: &dyn IpamClient, dp: &dyn Dataplane) -> Result<(), CniError> {
    let network = &req.conf.name;
    let valid: Vec<Key> = req
        .valid
        .iter()
        .map(|v| Key {
            network: network.clone(),
            container_id: v.container_id.clone(),
            ifname: v.ifname.clone(),
        })
        .collect();
    let released = ipam.gc(network, &valid)?;
    for key in &released {
        let host_veth = ferry_proto::host_veth_name(&key.container_id, &key.ifname);
        match dp.teardown(&host_veth) {
            // One line per attachment, so the plugin log says what GC freed.
            Ok(()) => info!(container = %key.container_id, ifname = %key.ifname,
                %host_veth, "GC released attachment and removed its host veth"),
            Err(e) => {
                warn!(error = %e, container = %key.container_id, ifname = %key.ifname,
                    %host_veth, "GC released attachment; teardown of its host veth failed")
            }
        }
    }
    info!(network = %network, released = released.len(), "GC done");
    Ok(())
}

#[cfg(test)]
mod tests;
