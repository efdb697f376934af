//! TLS from mqsplice to the brokers (`upstream_tls`): the client side of a handshake per broker
//! connection, checked against the configured CA and server name.

use super::load;
use crate::config::UpstreamTlsConfig;
use anyhow::Context;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The TLS client an upstream's broker connections use.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Reads the CA file and builds the client (TLS 1.2 and 1.3, session resumption on).
    pub fn new(config: &UpstreamTlsConfig) -> anyhow::Result<UpstreamTls> {
        let roots = load::roots(&config.ca)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("upstream TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = config
            .server_name
            .as_deref()
            .map(|n| ServerName::try_from(n.to_owned()))
            .transpose()
            .context("upstream_tls.server_name")?;
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }

    /// Runs the handshake on a connected broker socket; `addr` is the server's configured
    /// `host:port`, whose host is the name checked unless `server_name` is set.
    pub async fn connect(
        &self,
        stream: TcpStream,
        addr: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => host_name(addr)?,
        };
        self.connector.connect(name, stream).await
    }
}

/// The host of `host:port` or `[v6]:port` as a server name.
fn host_name(addr: &str) -> std::io::Result<ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host:?} cannot be checked as a TLS server name: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_the_server_address() {
        assert_eq!(
            host_name("emqx1.example:8883").unwrap(),
            ServerName::try_from("emqx1.example").unwrap()
        );
        assert_eq!(
            host_name("[::1]:8883").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            host_name("127.0.0.1:8883").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
    }
}
