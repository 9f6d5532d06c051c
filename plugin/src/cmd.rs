//! ADD, DEL, CHECK, STATUS and GC over an IpamClient and a Dataplane.
