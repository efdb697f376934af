//! Broker selection: pure algorithms over a fixed server list.
//!
//! A [`Balancer`] is built once per change of the server set (start-up, re-resolution) and then
//! only answers [`Balancer::select`] per connection. It knows weights, `backup` and `down`; the
//! caller supplies what changes per call: which servers are currently usable (health, already
//! tried on this connection) and how many connections each has.
//!
//! Rules shared by every method:
//! - a `down` server is never chosen;
//! - servers form two tiers, primaries (not `backup`) and backups; the backup tier is consulted
//!   only when no primary is usable, and then the same method applies among the backups;
//! - a weight of 0 is treated as 1 (the config rejects it anyway);
//! - retrying after a failed connect is just another call with the failed server unusable.
//!
//! Methods:
//! - `RoundRobin`: smooth weighted round robin as in NGINX (per pick every usable server gains its
//!   weight, the largest current value wins and pays back the total). Ties go to the lowest index.
//! - `LeastConn`: the usable server with the smallest `active / weight`, compared by
//!   cross-multiplication in `u128`; servers tied on that ratio are broken by the same smooth
//!   weighted round robin (as NGINX does), so an idle cluster still spreads new connections.
//! - `IpHash` / `ClientId`: consistent hashing on a ring per tier, see `balance/ring.rs` for the pinned
//!   hash and point layout. An empty client id falls back to the source address.
//!
//! `select` does not allocate; round robin and least-conn take a short `Mutex` per pick.

mod ring;

use crate::config::BalanceMethod;
use ring::Ring;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

/// The static facts about one server that selection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Stable identity hashed onto the ring: the `addr` as configured, so re-resolution does not move clients.
    pub key: String,
    /// Relative share of connections (round robin, least-conn) or of ring points (hashing).
    pub weight: u32,
    /// Held in reserve: chosen only while no primary server is usable.
    pub backup: bool,
    /// Administratively out of rotation without removing it from the config (and the ring layout).
    pub down: bool,
}

/// What a connection offers to be hashed on.
#[derive(Debug, Clone, Copy)]
pub struct SelectKey<'a> {
    /// Peer address, the hash input for `ip_hash` and the fallback for `client_id`.
    pub source_ip: IpAddr,
    /// The MQTT client identifier; empty means "assigned by the broker" and falls back to `source_ip`.
    pub client_id: &'a str,
}

/// One group of servers that selection considers together (primaries, or backups).
#[derive(Debug, Default)]
struct Tier {
    /// Server indices in ascending order; `down` servers are left out.
    members: Vec<usize>,
    /// Only built for the hashing methods.
    ring: Ring,
}

/// Picks a server index for each new connection.
pub struct Balancer {
    method: BalanceMethod,
    servers: Vec<ServerSpec>,
    /// Effective weights (≥ 1), indexed like `servers`.
    weights: Vec<u32>,
    primary: Tier,
    backup: Tier,
    /// Smooth weighted round-robin current values, indexed like `servers`.
    current: Mutex<Vec<i64>>,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The rings hold thousands of points; show their sizes, not their contents.
        f.debug_struct("Balancer")
            .field("method", &self.method)
            .field("servers", &self.servers)
            .field("primary", &self.primary.members)
            .field("backup", &self.backup.members)
            .field("primary_ring_points", &self.primary.ring.len())
            .field("backup_ring_points", &self.backup.ring.len())
            .finish()
    }
}

impl Balancer {
    /// Builds the selection state (rings, weights) once for a server list.
    pub fn new(method: BalanceMethod, servers: &[ServerSpec]) -> Balancer {
        let weights: Vec<u32> = servers.iter().map(|s| s.weight.max(1)).collect();
        let hashing = matches!(method, BalanceMethod::IpHash | BalanceMethod::ClientId);
        let tier = |backup: bool| {
            let members: Vec<usize> = (0..servers.len())
                .filter(|&i| !servers[i].down && servers[i].backup == backup)
                .collect();
            let ring = if hashing {
                Ring::build(
                    members
                        .iter()
                        .map(|&i| (i, servers[i].key.as_str(), weights[i])),
                )
            } else {
                Ring::default()
            };
            Tier { members, ring }
        };
        Balancer {
            method,
            servers: servers.to_vec(),
            primary: tier(false),
            backup: tier(true),
            current: Mutex::new(vec![0; servers.len()]),
            weights,
        }
    }

    /// Index into the server list, or `None` when no server may be chosen.
    ///
    /// `usable(i)` is false for servers that are unhealthy or already failed on this connection;
    /// `active(i)` is the number of connections server `i` currently carries. Both are called
    /// while an internal lock may be held, so they must not call back into this balancer.
    pub fn select(
        &self,
        key: &SelectKey<'_>,
        usable: &dyn Fn(usize) -> bool,
        active: &dyn Fn(usize) -> u64,
    ) -> Option<usize> {
        let hash = match self.method {
            BalanceMethod::IpHash => ring::hash_ip(key.source_ip),
            BalanceMethod::ClientId if key.client_id.is_empty() => ring::hash_ip(key.source_ip),
            BalanceMethod::ClientId => ring::hash_client_id(key.client_id),
            BalanceMethod::RoundRobin | BalanceMethod::LeastConn => 0,
        };
        [&self.primary, &self.backup]
            .into_iter()
            .find_map(|tier| self.select_in(tier, hash, usable, active))
    }

    /// The servers this balancer was built from, so callers can map an index back to its spec.
    pub fn servers(&self) -> &[ServerSpec] {
        &self.servers
    }

    /// The method this balancer applies, for logging and for deciding whether a rebuild is needed.
    pub fn method(&self) -> BalanceMethod {
        self.method
    }

    fn select_in(
        &self,
        tier: &Tier,
        hash: u64,
        usable: &dyn Fn(usize) -> bool,
        active: &dyn Fn(usize) -> u64,
    ) -> Option<usize> {
        match self.method {
            BalanceMethod::RoundRobin => self.smooth_wrr(&mut self.lock_current(), tier, usable),
            BalanceMethod::LeastConn => self.least_conn(tier, usable, active),
            BalanceMethod::IpHash | BalanceMethod::ClientId => {
                // Cheap check first: walking a ring with nothing usable would ask about every point.
                if !tier.members.iter().any(|&i| usable(i)) {
                    return None;
                }
                tier.ring.lookup(hash, usable)
            }
        }
    }

    fn lock_current(&self) -> MutexGuard<'_, Vec<i64>> {
        // The state is plain counters: a panic elsewhere cannot leave it meaningfully broken.
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One NGINX smooth weighted round-robin step over the tier's servers that pass `eligible`.
    fn smooth_wrr(
        &self,
        current: &mut [i64],
        tier: &Tier,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for &i in &tier.members {
            if !eligible(i) {
                continue;
            }
            let weight = i64::from(self.weights[i]);
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }

    /// Least `active / weight`, ties broken by smooth weighted round robin among the tied servers.
    fn least_conn(
        &self,
        tier: &Tier,
        usable: &dyn Fn(usize) -> bool,
        active: &dyn Fn(usize) -> u64,
    ) -> Option<usize> {
        // Pass 1: the smallest ratio, as (active, weight) of one server that has it.
        let mut best: Option<(usize, u64, u32)> = None;
        for &i in &tier.members {
            if !usable(i) {
                continue;
            }
            let (a, w) = (active(i), self.weights[i]);
            // a / w < ba / bw  ⇔  a · bw < ba · w  (weights are ≥ 1).
            if best.is_none_or(|(_, ba, bw)| {
                u128::from(a) * u128::from(bw) < u128::from(ba) * u128::from(w)
            }) {
                best = Some((i, a, w));
            }
        }
        let (first, ba, bw) = best?;
        // Pass 2: rotate among every server with that same ratio.
        let tied = |i: usize| {
            usable(i)
                && u128::from(active(i)) * u128::from(bw)
                    == u128::from(ba) * u128::from(self.weights[i])
        };
        // Counts may change between the passes (other connections come and go); if the tie set has
        // emptied meanwhile, pass 1's answer is still a fine choice.
        Some(
            self.smooth_wrr(&mut self.lock_current(), tier, &tied)
                .unwrap_or(first),
        )
    }
}

#[cfg(test)]
mod tests;
