//! The packet splice (being built; not yet a data plane users can choose): after the CONNECT,
//! a TC program (proxy-ebpf/src/tc.rs) rewrites every segment of the client's connection into
//! a segment of the broker's and back, so the two run one TCP conversation and the proxy holds
//! no bytes. This module holds the daemon's side of it.

// The one module here that makes syscalls.
#[allow(unsafe_code)]
pub mod repair;

pub mod handover;
pub mod loader;
pub mod splice;
