//! The access log: one line per finished connection, like NGINX's stream `access_log`.

use crate::config::AccessLog as AccessLogConfig;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Where finished connections are written; cheap to call when off.
pub struct AccessLog {
    sink: Option<Mutex<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("on", &self.sink.is_some())
            .finish()
    }
}

/// Everything one access-log line says about a connection.
#[derive(Debug)]
pub struct Entry<'a> {
    pub client: SocketAddr,
    /// `None` when no CONNECT was read.
    pub client_id: Option<&'a str>,
    pub listener: &'a str,
    /// The broker address, `None` when the connection never reached one.
    pub broker: Option<SocketAddr>,
    pub path: &'a str,
    /// Why that path ([`crate::dataplane::PathReason`]).
    pub path_reason: &'a str,
    pub bytes_to_broker: u64,
    pub bytes_to_client: u64,
    pub duration: Duration,
    pub close: &'a str,
}

impl AccessLog {
    /// Opens the configured sink; a file is opened for appending.
    pub fn open(config: &AccessLogConfig) -> std::io::Result<AccessLog> {
        let sink: Option<Box<dyn Write + Send>> = match config {
            AccessLogConfig::Off => None,
            AccessLogConfig::Stderr => Some(Box::new(std::io::stderr())),
            AccessLogConfig::File(path) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
        };
        Ok(AccessLog {
            sink: sink.map(Mutex::new),
        })
    }

    /// Writes one line; a failing sink is ignored rather than taking connections down.
    pub fn write(&self, entry: &Entry<'_>) {
        let Some(sink) = &self.sink else { return };
        let line = format_line(SystemTime::now(), entry);
        let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
        let _ = sink.write_all(line.as_bytes());
    }
}

/// `time client=… client_id="…" listener=… broker=… path=… path_reason=… bytes_to_broker=… bytes_to_client=… duration=… close=…`
fn format_line(now: SystemTime, e: &Entry<'_>) -> String {
    let broker = e.broker.map_or_else(|| "-".to_string(), |b| b.to_string());
    // Debug formatting quotes and escapes the client id, so a hostile id cannot forge log lines.
    let client_id = e
        .client_id
        .map_or_else(|| "-".to_string(), |id| format!("{id:?}"));
    format!(
        "{} client={} client_id={} listener={} broker={} path={} path_reason={} bytes_to_broker={} bytes_to_client={} duration={:.3}s close={}\n",
        humantime::format_rfc3339_millis(now),
        e.client,
        client_id,
        e.listener,
        broker,
        e.path,
        e.path_reason,
        e.bytes_to_broker,
        e.bytes_to_client,
        e.duration.as_secs_f64(),
        e.close
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_every_field_and_escapes_the_client_id() {
        let entry = Entry {
            client: "192.0.2.1:5000".parse().unwrap(),
            client_id: Some("dev\n1 close=forged"),
            listener: "mqtt",
            broker: Some("127.0.0.1:1883".parse().unwrap()),
            path: "userspace",
            path_reason: "client_tls",
            bytes_to_broker: 12,
            bytes_to_client: 34,
            duration: Duration::from_millis(1500),
            close: "client_closed",
        };
        let line = format_line(SystemTime::UNIX_EPOCH, &entry);
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z client=192.0.2.1:5000 client_id=\"dev\\n1 close=forged\" listener=mqtt \
             broker=127.0.0.1:1883 path=userspace path_reason=client_tls bytes_to_broker=12 bytes_to_client=34 duration=1.500s close=client_closed\n"
        );
    }
}
