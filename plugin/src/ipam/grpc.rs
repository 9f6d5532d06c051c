//! gRPC IpamClient over the Unix socket. The client owns a current-thread
//! tokio runtime so `cmd.rs` stays synchronous, and connects on first use so
//! that a DEL with ipamd down can still tear the dataplane down first.

use std::cell::RefCell;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_client::IpamClient as RpcClient;
use ipnet::Ipv4Net;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{IpamClient, IpamClientError, Key, Lease, PodInfo, Readiness};

pub struct GrpcIpam {
    socket: PathBuf,
    timeout: Duration,
    runtime: tokio::runtime::Runtime,
    client: RefCell<Option<RpcClient<Channel>>>,
}

impl GrpcIpam {
    /// Builds the runtime only; nothing touches the socket until the first call.
    pub fn new(socket: &Path, timeout: Duration) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(GrpcIpam {
            socket: socket.to_path_buf(),
            timeout,
            runtime,
            client: RefCell::new(None),
        })
    }

    fn unreachable(&self, cause: impl std::fmt::Display) -> IpamClientError {
        IpamClientError::Unreachable(format!(
            "ipamd is not reachable at {}: {cause}",
            self.socket.display()
        ))
    }

    async fn client(&self) -> Result<RpcClient<Channel>, IpamClientError> {
        if let Some(c) = self.client.borrow().as_ref() {
            return Ok(c.clone());
        }
        let channel = ferry_proto::connect_uds(&self.socket, self.timeout)
            .await
            .map_err(|e| match e {
                // The error already names the socket; keep the cause only.
                ferry_proto::ConnectError::NoSocket { .. } => {
                    self.unreachable("the socket does not exist (is ipamd running?)")
                }
                ferry_proto::ConnectError::Connect { source, .. } => {
                    self.unreachable(ferry_proto::error_chain(&source))
                }
            })?;
        let client = RpcClient::new(channel);
        *self.client.borrow_mut() = Some(client.clone());
        Ok(client)
    }

    /// One RPC under the overall deadline (connect included).
    fn call<T, F, Fut>(&self, rpc: F) -> Result<T, IpamClientError>
    where
        F: FnOnce(RpcClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let work = async {
            let client = self.client().await?;
            rpc(client)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| self.map_status(s))
        };
        self.runtime
            .block_on(async { tokio::time::timeout(self.timeout, work).await })
            .unwrap_or_else(|_| {
                Err(self.unreachable(format!("no answer within {} ms", self.timeout.as_millis())))
            })
    }

    /// The one place a tonic Status becomes an IpamClientError, reading the
    /// codes ipamd gives its errors (`From<IpamError> for Status`, ipamd/src/grpc/mod.rs).
    fn map_status(&self, s: Status) -> IpamClientError {
        // ipamd's own statuses never carry a source; one that does was made
        // on this side from a broken connection (reset mid-call, refused),
        // whatever its code: ipamd may be restarting, so try again.
        if std::error::Error::source(&s).is_some() {
            return self.unreachable(ferry_proto::error_chain(&s));
        }
        let msg = s.message().to_string();
        match s.code() {
            Code::ResourceExhausted => IpamClientError::Exhausted(msg),
            Code::AlreadyExists => IpamClientError::AddressUnavailable(msg),
            Code::FailedPrecondition => IpamClientError::VersionMismatch(msg),
            Code::InvalidArgument => IpamClientError::InvalidRequest(msg),
            Code::DeadlineExceeded | Code::Cancelled => self.unreachable(msg),
            Code::Unavailable => IpamClientError::Unavailable(msg),
            _ => IpamClientError::Internal(format!("ipamd: {msg}")),
        }
    }
}

fn pb_key(key: &Key) -> pb::AllocationKey {
    pb::AllocationKey {
        network: key.network.clone(),
        container_id: key.container_id.clone(),
        ifname: key.ifname.clone(),
    }
}

fn from_pb_key(key: Option<pb::AllocationKey>) -> Option<Key> {
    key.map(|k| Key {
        network: k.network,
        container_id: k.container_id,
        ifname: k.ifname,
    })
}

/// ipamd writes "a.b.c.d/32" in leases and "a.b.c.d" in allocations; accept both.
fn parse_address(s: &str) -> Result<Ipv4Net, IpamClientError> {
    s.parse::<Ipv4Net>()
        .or_else(|_| s.parse::<Ipv4Addr>().map(Ipv4Net::from))
        .map_err(|_| IpamClientError::Internal(format!("ipamd returned a bad address {s:?}")))
}

impl IpamClient for GrpcIpam {
    fn allocate(
        &self,
        key: &Key,
        pod: &PodInfo,
        requested: &[Ipv4Addr],
        pool_hint: Option<&str>,
    ) -> Result<Lease, IpamClientError> {
        let req = pb::AllocateRequest {
            client_version: ferry_proto::PROTOCOL_VERSION.to_string(),
            key: Some(pb_key(key)),
            pod: Some(pb::PodMeta {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                netns: pod.netns.clone(),
            }),
            requested_ips: requested.iter().map(Ipv4Addr::to_string).collect(),
            pool_hint: pool_hint.unwrap_or_default().to_string(),
        };
        let resp = self.call(|mut c| async move { c.allocate(req).await })?;
        let addresses = resp
            .addresses
            .iter()
            .map(|a| parse_address(a))
            .collect::<Result<Vec<_>, _>>()?;
        if addresses.is_empty() {
            return Err(IpamClientError::Internal(
                "ipamd returned a lease without addresses".into(),
            ));
        }
        let gateway = if resp.gateway.is_empty() {
            ferry_proto::POD_GATEWAY
        } else {
            resp.gateway.parse().map_err(|_| {
                IpamClientError::Internal(format!(
                    "ipamd returned a bad gateway {:?}",
                    resp.gateway
                ))
            })?
        };
        Ok(Lease {
            addresses,
            gateway,
            mtu: resp.mtu,
            pool: resp.pool,
            created: resp.created,
        })
    }

    fn release(&self, key: &Key) -> Result<(), IpamClientError> {
        let req = pb::ReleaseRequest {
            client_version: ferry_proto::PROTOCOL_VERSION.to_string(),
            key: Some(pb_key(key)),
            host_link: None,
        };
        self.call(|mut c| async move { c.release(req).await })?;
        Ok(())
    }

    fn release_and_unplug(
        &self,
        key: &Key,
        host_veth: &str,
        ifindex: u32,
    ) -> Result<bool, IpamClientError> {
        let req = pb::ReleaseRequest {
            client_version: ferry_proto::PROTOCOL_VERSION.to_string(),
            key: Some(pb_key(key)),
            host_link: Some(pb::HostLink {
                name: host_veth.to_string(),
                ifindex,
            }),
        };
        let resp = self.call(|mut c| async move { c.release(req).await })?;
        Ok(resp.unplug_queued)
    }

    fn check(&self, key: &Key) -> Result<Option<Vec<Ipv4Net>>, IpamClientError> {
        let req = pb::CheckRequest {
            client_version: ferry_proto::PROTOCOL_VERSION.to_string(),
            key: Some(pb_key(key)),
        };
        let resp = self.call(|mut c| async move { c.check(req).await })?;
        resp.allocation
            .map(|a| parse_address(&a.ip).map(|ip| vec![ip]))
            .transpose()
    }

    fn gc(&self, network: &str, valid: &[Key]) -> Result<Vec<Key>, IpamClientError> {
        let req = pb::GcRequest {
            client_version: ferry_proto::PROTOCOL_VERSION.to_string(),
            network: network.to_string(),
            valid: valid.iter().map(pb_key).collect(),
        };
        let resp = self.call(|mut c| async move { c.gc(req).await })?;
        Ok(resp
            .released
            .into_iter()
            .filter_map(|a| from_pb_key(a.key))
            .collect())
    }

    fn status(&self) -> Result<(Readiness, String), IpamClientError> {
        let req = pb::StatusRequest {
            client_version: ferry_proto::PROTOCOL_VERSION.to_string(),
        };
        let resp = self.call(|mut c| async move { c.status(req).await })?;
        let readiness = match resp.readiness() {
            pb::Readiness::Ready => Readiness::Ready,
            pb::Readiness::NoAddresses => Readiness::NoAddresses,
            pb::Readiness::NotAvailable | pb::Readiness::Unspecified => Readiness::NotAvailable,
        };
        Ok((readiness, resp.reason))
    }
}

#[cfg(test)]
mod tests;
