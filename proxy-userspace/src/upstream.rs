//! Upstreams: the servers behind a listener, their health, and connecting to one of them.
//!
//! The server list is fixed by the configuration; what changes at run time is each server's
//! resolved addresses (re-resolved every `resolve_interval`) and its passive health
//! (`max_fails` within `fail_timeout`).

mod health;
mod resolve;

pub use health::Health;
pub use resolve::{Resolve, ResolveFuture, SystemResolver};

use crate::balance::{Balancer, SelectKey, ServerSpec};
use crate::config::{ServerConfig, UpstreamConfig};
use crate::stats::ByteMeter;
use crate::stats::{ServerStats, UpstreamStats};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One configured server and what is known about it now.
#[derive(Debug)]
pub struct Server {
    pub config: ServerConfig,
    /// The addresses `config.addr` resolved to last; empty until the first resolution succeeds.
    addrs: ArcSwap<Vec<SocketAddr>>,
    health: Health,
    /// Connections currently carried (counted from the moment the server is chosen).
    pub active: AtomicU64,
    /// Connections handed to this server over its lifetime.
    pub total: AtomicU64,
    /// Failed connect attempts over its lifetime.
    pub failures: AtomicU64,
    /// Bytes moved to and from this server.
    pub bytes: Arc<ByteMeter>,
}

impl Server {
    fn new(config: ServerConfig) -> Server {
        let health = Health::new(config.max_fails, config.fail_timeout);
        Server {
            config,
            addrs: ArcSwap::from_pointee(Vec::new()),
            health,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            bytes: Arc::default(),
        }
    }

    /// The addresses connections go to now.
    pub fn addrs(&self) -> Arc<Vec<SocketAddr>> {
        self.addrs.load_full()
    }

    /// The state shown in stats: `down`, `unavailable`, `backup` or `up`.
    pub fn state(&self, now: Instant) -> &'static str {
        if self.config.down {
            "down"
        } else if !self.health.is_available(now) {
            "unavailable"
        } else if self.config.backup {
            "backup"
        } else {
            "up"
        }
    }

    fn record_failure(&self, now: Instant) {
        self.failures.fetch_add(1, Relaxed);
        if self.health.record_failure(now) {
            tracing::warn!(
                server = %self.config.addr,
                "server unavailable for {:?} after {} failed connect(s)",
                self.config.fail_timeout,
                self.config.max_fails
            );
        }
    }

    fn snapshot(&self, now: Instant) -> ServerStats {
        ServerStats {
            addr: self.config.addr.clone(),
            resolved: self.addrs().iter().map(|a| a.to_string()).collect(),
            state: self.state(now).to_string(),
            weight: self.config.weight,
            backup: self.config.backup,
            active: self.active.load(Relaxed),
            total: self.total.load(Relaxed),
            failures: self.failures.load(Relaxed),
            bytes_to_server: self.bytes.to_broker.load(Relaxed),
            bytes_from_server: self.bytes.to_client.load(Relaxed),
        }
    }
}

/// Keeps a chosen server's `active` count honest: released when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard {
    server: Arc<Server>,
}

impl ActiveGuard {
    /// The server this connection is counted against.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Relaxed);
    }
}

/// A broker connection that succeeded, with the server it belongs to.
#[derive(Debug)]
pub struct Connected {
    pub stream: TcpStream,
    pub server: ActiveGuard,
}

/// Why no broker connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("no server available")]
    NoServer,
    #[error("connect_timeout expired after {attempts} attempt(s)")]
    Timeout { attempts: usize },
}

/// One `[[upstream]]` at run time.
pub struct Upstream {
    pub config: UpstreamConfig,
    servers: Vec<Arc<Server>>,
    balancer: Balancer,
    resolver: Arc<dyn Resolve>,
    /// TLS to the brokers (`upstream_tls`), built by the caller from the files it names.
    pub tls: Option<crate::tls::UpstreamTls>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the servers and the balancer once; call [`Upstream::resolve_all`] before serving.
    pub fn new(config: UpstreamConfig, resolver: Arc<dyn Resolve>) -> Upstream {
        let specs: Vec<ServerSpec> = config
            .servers
            .iter()
            .map(|s| ServerSpec {
                key: s.addr.clone(),
                weight: s.weight,
                backup: s.backup,
                down: s.down,
            })
            .collect();
        let balancer = Balancer::new(config.balance, &specs);
        let servers = config
            .servers
            .iter()
            .cloned()
            .map(|s| Arc::new(Server::new(s)))
            .collect();
        Upstream {
            config,
            servers,
            balancer,
            resolver,
            tls: None,
        }
    }

    /// The servers, in configuration order.
    pub fn servers(&self) -> &[Arc<Server>] {
        &self.servers
    }

    /// Resolves every server's address once; failures are logged and leave the old addresses.
    pub async fn resolve_all(&self) {
        for server in &self.servers {
            match self.resolver.resolve(&server.config.addr).await {
                Ok(addrs) if !addrs.is_empty() => {
                    let old = server.addrs.load();
                    if **old != addrs {
                        if !old.is_empty() {
                            tracing::info!(server = %server.config.addr, ?addrs, "server resolves to new addresses");
                        }
                        server.addrs.store(Arc::new(addrs));
                    }
                }
                Ok(_) => {
                    tracing::warn!(server = %server.config.addr, "name resolved to no address")
                }
                Err(e) => tracing::warn!(server = %server.config.addr, "cannot resolve: {e}"),
            }
        }
    }

    /// Re-resolves host names every `resolve_interval`, forever; literal addresses never change.
    pub async fn keep_resolving(self: Arc<Self>) {
        let has_names = self
            .servers
            .iter()
            .any(|s| s.config.addr.parse::<SocketAddr>().is_err());
        if !has_names {
            return;
        }
        let mut tick = tokio::time::interval(self.config.resolve_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.resolve_all().await;
        }
    }

    /// Chooses a server and connects, trying the next choice after a failure until
    /// `connect_timeout` runs out (NGINX's `proxy_next_upstream`).
    pub async fn connect(
        &self,
        key: &SelectKey<'_>,
        nodelay: bool,
    ) -> Result<Connected, ConnectFailure> {
        let deadline = Instant::now() + self.config.connect_timeout;
        // Servers per upstream are few; one small allocation per connection, not per message.
        let mut tried = vec![false; self.servers.len()];
        let mut attempts = 0;
        loop {
            let now = Instant::now();
            let usable = |i: usize| !tried[i] && self.servers[i].health.is_available(now);
            let active = |i: usize| self.servers[i].active.load(Relaxed);
            let Some(index) = self.balancer.select(key, &usable, &active) else {
                return Err(ConnectFailure::NoServer);
            };
            tried[index] = true;
            attempts += 1;
            let server = &self.servers[index];
            server.active.fetch_add(1, Relaxed);
            let guard = ActiveGuard {
                server: server.clone(),
            };
            match tokio::time::timeout_at(deadline, connect_any(&server.addrs())).await {
                Ok(Ok(stream)) => {
                    server.health.record_success();
                    let _ = stream.set_nodelay(nodelay);
                    return Ok(Connected {
                        stream,
                        server: guard,
                    });
                }
                Ok(Err(e)) => {
                    tracing::warn!(server = %server.config.addr, "connect failed: {e}");
                    server.record_failure(Instant::now());
                }
                Err(_) => {
                    tracing::warn!(server = %server.config.addr, "connect timed out");
                    server.record_failure(Instant::now());
                    return Err(ConnectFailure::Timeout { attempts });
                }
            }
        }
    }

    /// `{balance, servers: [...]}` for the stats endpoint.
    pub fn snapshot(&self) -> UpstreamStats {
        let now = Instant::now();
        UpstreamStats {
            balance: self.config.balance.as_str().to_string(),
            servers: self.servers.iter().map(|s| s.snapshot(now)).collect(),
        }
    }
}

async fn connect_any(addrs: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address not resolved");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}
