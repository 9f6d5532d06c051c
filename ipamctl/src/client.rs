//! The one connection to ipamd. Every request goes out stamped with our
//! version, and every failure comes back as one line, naming the socket
//! when the transport is at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use ferry_proto::v1 as pb;
use ferry_proto::v1::ipam_admin_client::IpamAdminClient;
use ferry_proto::v1::ipam_client::IpamClient;
use tonic::transport::Channel;
use tonic::{Response, Status};

/// For the connect and for each call.
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct Ipamd {
    socket: PathBuf,
    services: Services,
}

/// ipamd's two gRPC services, over one channel.
pub struct Services {
    ipam: IpamClient<Channel>,
    admin: IpamAdminClient<Channel>,
}

impl Ipamd {
    pub async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let channel = ferry_proto::connect_uds(socket, TIMEOUT)
            .await
            .map_err(|e| match e {
                ferry_proto::ConnectError::NoSocket { path } => anyhow!(
                    "ipamd is not running at {} (socket missing)",
                    path.display()
                ),
                ferry_proto::ConnectError::Connect { path, source } => anyhow!(
                    "cannot connect to ipamd at {}: {}",
                    path.display(),
                    ferry_proto::error_chain(&source)
                ),
            })?;
        Ok(Ipamd {
            socket: socket.to_path_buf(),
            services: Services {
                ipam: IpamClient::new(channel.clone()),
                admin: IpamAdminClient::new(channel),
            },
        })
    }

    /// ipamd's answer to `request`; its `client_version` is filled in here.
    pub async fn call<R: Rpc>(&mut self, request: R) -> anyhow::Result<R::Reply> {
        match request.send(&mut self.services).await {
            Ok(reply) => Ok(reply.into_inner()),
            Err(status) => Err(rpc_error(&self.socket, status)),
        }
    }
}

/// A request ipamctl sends, tied to the service method that answers it.
pub trait Rpc {
    type Reply;

    /// Stamps [`ferry_proto::PROTOCOL_VERSION`] on the request (ipamd refuses
    /// an incompatible one) and sends it.
    async fn send(self, services: &mut Services) -> Result<Response<Self::Reply>, Status>;
}

macro_rules! rpcs {
    ($($request:ident => $service:ident.$method:ident -> $reply:ident;)*) => {$(
        impl Rpc for pb::$request {
            type Reply = pb::$reply;

            async fn send(mut self, services: &mut Services) -> Result<Response<pb::$reply>, Status> {
                self.client_version = ferry_proto::PROTOCOL_VERSION.to_string();
                services.$service.$method(self).await
            }
        }
    )*};
}

rpcs! {
    StatusRequest => ipam.status -> StatusResponse;
    ListPoolsRequest => admin.list_pools -> ListPoolsResponse;
    AddPoolRequest => admin.add_pool -> AddPoolResponse;
    RemovePoolRequest => admin.remove_pool -> RemovePoolResponse;
    ListBlocksRequest => admin.list_blocks -> ListBlocksResponse;
    ListAllocationsRequest => admin.list_allocations -> ListAllocationsResponse;
    ShowRequest => admin.show -> ShowResponse;
    ForceReleaseRequest => admin.force_release -> ForceReleaseResponse;
    CheckConsistencyRequest => admin.check_consistency -> CheckConsistencyResponse;
    CollectGarbageRequest => admin.collect_garbage -> CollectGarbageResponse;
}

/// A failed call, named with the socket when the transport is at fault.
pub fn rpc_error(socket: &Path, s: Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unimplemented => anyhow!(
            "ipamd at {} does not support this command yet: {} (upgrade ipamd)",
            socket.display(),
            s.message()
        ),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => anyhow!(
            "ipamd at {} did not answer: {} ({:?})",
            socket.display(),
            s.message(),
            s.code()
        ),
        code => anyhow!("{} ({code:?})", s.message()),
    }
}
