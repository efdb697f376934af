//! Consistent-hash ring (ketama style) shared by `ip_hash` and `client_id`.
//!
//! Every server contributes `POINTS_PER_WEIGHT × weight` points (capped at [`MAX_POINTS`]). A
//! point depends only on the server's configured key and the point number, never on the server's
//! position or on the other servers, so adding or removing a server only moves the clients whose
//! nearest usable point belonged to (or now belongs to) that server.
//!
//! The hash is pinned forever: XXH3-64 (`xxhash_rust::xxh3::xxh3_64`, seed 0). Point `j` of a
//! server is `xxh3_64(key_bytes ‖ j as u32 little-endian)`; a client is hashed by
//! [`hash_client_id`] or [`hash_ip`]. Changing any of these remaps every client, which is what the
//! golden-data tests guard against.

use std::net::IpAddr;
use xxhash_rust::xxh3::xxh3_64;

/// Virtual nodes per unit of weight. A server's share of the ring spreads by about 1/√points
/// around its fair share; the classic ketama 160 (≈ 8 %) lets one of five equal brokers carry 11 %
/// more than its share, while 1000 (≈ 3 %) keeps equal servers within a few percent, at 12 bytes
/// per point and an O(log points) lookup.
pub const POINTS_PER_WEIGHT: u32 = 1000;

/// Upper bound on one server's points (a weight of 100, 1.2 MB), so a typo like `weight = 100000`
/// cannot make the ring huge; hashing treats larger weights as 100. The cap is per server, so it
/// never depends on the other servers and does not break the minimal-remap property.
pub const MAX_POINTS: u32 = POINTS_PER_WEIGHT * 100;

/// Sorted ring points and, in parallel, the server index owning each point.
///
/// Two parallel vectors instead of a vector of pairs: the binary search touches only the dense
/// `points` array.
#[derive(Debug, Default)]
pub struct Ring {
    points: Vec<u64>,
    owners: Vec<u32>,
}

/// Hash of a client identifier onto the ring.
pub fn hash_client_id(client_id: &str) -> u64 {
    xxh3_64(client_id.as_bytes())
}

/// Hash of a source address onto the ring: the 4 octets of an IPv4 address, the 16 octets of an
/// IPv6 one. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as a dual-stack socket reports IPv4
/// peers) are hashed as the IPv4 address, so the same client lands on the same server whichever
/// listener it came through.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => xxh3_64(&v4.octets()),
        IpAddr::V6(v6) => xxh3_64(&v6.octets()),
    }
}

/// Number of ring points for a weight (weight 0 is treated as 1, like everywhere in selection).
pub fn points_for_weight(weight: u32) -> u32 {
    weight
        .max(1)
        .saturating_mul(POINTS_PER_WEIGHT)
        .min(MAX_POINTS)
}

impl Ring {
    /// Builds a ring from `(server index, key, weight)` triples.
    pub fn build<'a>(members: impl IntoIterator<Item = (usize, &'a str, u32)>) -> Ring {
        let mut pairs: Vec<(u64, u32)> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        for (index, key, weight) in members {
            let owner = u32::try_from(index).expect("server index fits in u32");
            buf.clear();
            buf.extend_from_slice(key.as_bytes());
            let key_len = buf.len();
            for j in 0..points_for_weight(weight) {
                buf.truncate(key_len);
                buf.extend_from_slice(&j.to_le_bytes());
                pairs.push((xxh3_64(&buf), owner));
            }
        }
        // Sorting by (point, owner) makes colliding points resolve the same way on every build.
        pairs.sort_unstable();
        Ring {
            points: pairs.iter().map(|p| p.0).collect(),
            owners: pairs.iter().map(|p| p.1).collect(),
        }
    }

    /// Number of points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// The owner of the first point at or clockwise after `hash` whose server is `usable`.
    ///
    /// Walks at most once around the ring, so an unusable server's clients spread over the next
    /// points' owners while every other client keeps its server.
    pub fn lookup(&self, hash: u64, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let start = self.points.partition_point(|&p| p < hash);
        let (tail, head) = self.owners.split_at(start);
        // `head` is [start, n), `tail` wraps around to [0, start). Runs of points owned by a server
        // already found unusable are skipped without asking again.
        let mut rejected = usize::MAX;
        for &owner in head.iter().chain(tail) {
            let i = owner as usize;
            if i == rejected {
                continue;
            }
            if usable(i) {
                return Some(i);
            }
            rejected = i;
        }
        None
    }
}
