//! Turning a configured `host:port` into addresses, behind a trait so tests can move a name.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

/// A future returned by [`Resolve::resolve`].
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Resolves a server's configured `host:port`.
pub trait Resolve: Send + Sync + 'static {
    /// All addresses for `host_port`, in preference order.
    fn resolve<'a>(&'a self, host_port: &'a str) -> ResolveFuture<'a>;
}

/// The system resolver (getaddrinfo via tokio); literal addresses skip it.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host_port: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            if let Ok(addr) = host_port.parse::<SocketAddr>() {
                return Ok(vec![addr]);
            }
            Ok(tokio::net::lookup_host(host_port).await?.collect())
        })
    }
}
