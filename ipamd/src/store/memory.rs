//! In-memory Store for tests of the core.
