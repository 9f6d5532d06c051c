//! A recording Dataplane for unit tests of cmd.rs.
