//! gRPC IpamClient over the Unix socket.
