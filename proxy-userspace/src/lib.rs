//! mqsplice: an MQTT load balancer for broker clusters.
//!
//! A connection's life reads top to bottom in [`connection::serve`]: accept → read the CONNECT →
//! choose a broker → connect → hand the pair to a data plane. [`start`] binds everything a
//! configuration describes and returns a handle; the `mqsplice` binary is a thin CLI around it.
// Only `dataplane::ebpf` talks to the kernel through raw socket options; it opts in, with a
// `// SAFETY:` line on every block.
#![deny(unsafe_code)]

pub mod access_log;
pub mod balance;
pub mod config;
pub mod connection;
pub mod dataplane;
pub mod listener;
pub mod mqtt;
pub mod proxy_protocol;
pub mod reject;
pub mod server;
pub mod stats;
pub mod tls;
pub mod upstream;
pub mod ws;

pub use server::{Options, Running, start, start_with};
