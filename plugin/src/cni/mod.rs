//! CNI protocol: env + stdin -> typed request; results and errors per spec version.
