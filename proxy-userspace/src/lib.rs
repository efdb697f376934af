//! mqsplice: an MQTT load balancer for broker clusters.
//!
//! A connection's life: accept → read the CONNECT → choose a broker → connect → hand the pair
//! to a data plane (see [`connection::serve`]).

pub mod balance;
pub mod config;
pub mod mqtt;
pub mod reject;
// Worktree-only wiring until the real `dataplane.rs` (owned by the main author) declares it.
pub mod dataplane {
    pub mod ebpf;
}
