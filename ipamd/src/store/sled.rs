//! The sled Store: one transaction per batch, group-committed flushes.
