//! The plugin's dataplane as a library: the `ferry` binary (main.rs) wires
//! pods with it, and the bench (`tests/bench`) times it.

pub mod dataplane;
