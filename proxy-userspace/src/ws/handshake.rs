//! The server side of the RFC 6455 opening handshake as pure functions: parse the request head,
//! decide, and write the 101 or the HTTP error the client gets instead.

use super::stats::UpgradeFailure;
use crate::config::WsListenerConfig;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Longest request head accepted; browsers send well under 2 KiB.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header lines accepted.
const MAX_HEADERS: usize = 64;

/// The MQTT subprotocols (`mqttv3.1` is what MQTT 3.1 clients ask for).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// An accepted upgrade: what the 101 needs and what a WebSocket broker is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Path and query exactly as requested.
    pub target: String,
    /// The `Host` header, if any.
    pub host: Option<String>,
    /// The chosen subprotocol, if the client offered one.
    pub subprotocol: Option<&'static str>,
    /// `Sec-WebSocket-Accept` for the 101.
    pub accept: String,
    /// `X-Forwarded-For` (all lines joined), if any.
    pub forwarded_for: Option<String>,
    /// `X-Real-IP`, if any.
    pub real_ip: Option<String>,
    /// Bytes of the request head, so anything after it belongs to the WebSocket.
    pub head_len: usize,
}

/// Parses and checks a request head. `Ok(None)`: incomplete, read more (below [`MAX_HEAD`]).
pub fn check_request(
    buf: &[u8],
    config: &WsListenerConfig,
) -> Result<Option<Upgrade>, UpgradeFailure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(UpgradeFailure::HeadersTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(UpgradeFailure::HeadersTooLarge),
        Err(_) => return Err(UpgradeFailure::BadRequest),
    };
    if head_len > MAX_HEAD {
        return Err(UpgradeFailure::HeadersTooLarge);
    }
    if req.version != Some(1) {
        return Err(UpgradeFailure::BadRequest);
    }
    if req.method != Some("GET") {
        return Err(UpgradeFailure::Method);
    }
    let target = req.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    if !config.paths.iter().any(|p| p == path) {
        return Err(UpgradeFailure::NotFound);
    }
    let headers: &[httparse::Header<'_>] = req.headers;
    let header = |name: &'static str| values(headers, name);
    let one = |name: &'static str| -> Result<Option<&str>, UpgradeFailure> {
        let mut values = header(name);
        let first = values.next().transpose()?;
        if values.next().is_some() {
            return Err(UpgradeFailure::BadRequest);
        }
        Ok(first.map(str::trim))
    };
    let has_token = |name: &'static str, token: &str| -> Result<bool, UpgradeFailure> {
        for value in header(name) {
            if value?
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
            {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if !has_token("upgrade", "websocket")? || !has_token("connection", "upgrade")? {
        return Err(UpgradeFailure::NotUpgrade);
    }
    if one("sec-websocket-version")? != Some("13") {
        return Err(UpgradeFailure::Version);
    }
    let key = one("sec-websocket-key")?.ok_or(UpgradeFailure::BadRequest)?;
    if !is_websocket_key(key) {
        return Err(UpgradeFailure::BadRequest);
    }
    if !config.allowed_origins.is_empty() {
        let origin = one("origin")?.ok_or(UpgradeFailure::Origin)?;
        if !config
            .allowed_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
        {
            return Err(UpgradeFailure::Origin);
        }
    }
    let mut offered = false;
    let mut subprotocol = None;
    for value in header("sec-websocket-protocol") {
        for token in value?.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            offered = true;
            if subprotocol.is_none() {
                subprotocol = SUBPROTOCOLS.iter().find(|p| **p == token).copied();
            }
        }
    }
    if (offered && subprotocol.is_none()) || (!offered && config.require_subprotocol) {
        return Err(UpgradeFailure::Subprotocol);
    }
    let joined = |name: &'static str| -> Result<Option<String>, UpgradeFailure> {
        let values = header(name).collect::<Result<Vec<_>, _>>()?;
        Ok((!values.is_empty()).then(|| values.join(",")))
    };
    Ok(Some(Upgrade {
        target: target.to_string(),
        host: one("host")?.map(str::to_string),
        subprotocol,
        accept: derive_accept_key(key.as_bytes()),
        forwarded_for: joined("x-forwarded-for")?,
        real_ip: one("x-real-ip")?.map(str::to_string),
        head_len,
    }))
}

/// The values of every header line called `name` (case-insensitive), as UTF-8.
fn values<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'static str,
) -> impl Iterator<Item = Result<&'a str, UpgradeFailure>> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| std::str::from_utf8(h.value).map_err(|_| UpgradeFailure::BadRequest))
}

/// A `Sec-WebSocket-Key`: base64 of 16 bytes, i.e. 22 base64 characters and `==`.
fn is_websocket_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// The 101 Switching Protocols response for an accepted upgrade.
pub fn switching_protocols(upgrade: &Upgrade) -> String {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        upgrade.accept
    );
    if let Some(p) = upgrade.subprotocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out
}

/// The HTTP response a refused request gets (`None`: the client is gone or too slow to answer).
pub fn refusal(reason: UpgradeFailure) -> Option<String> {
    let (status, extra, body) = match reason {
        UpgradeFailure::Timeout | UpgradeFailure::Closed => return None,
        UpgradeFailure::HeadersTooLarge => (
            "431 Request Header Fields Too Large",
            "",
            "request head too large",
        ),
        UpgradeFailure::BadRequest => {
            ("400 Bad Request", "", "malformed WebSocket upgrade request")
        }
        UpgradeFailure::Method => (
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "only GET upgrades to a WebSocket",
        ),
        UpgradeFailure::NotFound => (
            "404 Not Found",
            "",
            "no MQTT WebSocket endpoint at this path",
        ),
        UpgradeFailure::NotUpgrade => (
            "426 Upgrade Required",
            "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            "this endpoint speaks MQTT over WebSocket only",
        ),
        UpgradeFailure::Version => (
            "426 Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
            "unsupported Sec-WebSocket-Version; 13 is supported",
        ),
        UpgradeFailure::Origin => ("403 Forbidden", "", "origin not allowed"),
        UpgradeFailure::Subprotocol => (
            "400 Bad Request",
            "",
            "unsupported or missing Sec-WebSocket-Protocol; supported: mqtt, mqttv3.1",
        ),
    };
    Some(format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_HANDSHAKE_TIMEOUT;

    fn config() -> WsListenerConfig {
        WsListenerConfig {
            paths: vec!["/mqtt".into(), "/ws".into()],
            require_subprotocol: false,
            max_frame_size: 1 << 20,
            allowed_origins: vec![],
            trust_forwarded_for: vec![],
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    const GOOD: &str = "GET /mqtt?x=1 HTTP/1.1\r\nHost: lb.example\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: foo, mqtt\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";

    fn check(req: &str) -> Result<Option<Upgrade>, UpgradeFailure> {
        check_request(req.as_bytes(), &config())
    }

    #[test]
    fn accepts_rfc_example() {
        let up = check(GOOD).unwrap().unwrap();
        // RFC 6455 section 1.3's example key and accept value.
        assert_eq!(up.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(up.subprotocol, Some("mqtt"));
        assert_eq!(up.target, "/mqtt?x=1");
        assert_eq!(up.host.as_deref(), Some("lb.example"));
        assert_eq!(up.forwarded_for.as_deref(), Some("1.2.3.4,10.0.0.1"));
        assert_eq!(up.head_len, GOOD.len());
        let resp = switching_protocols(&up);
        assert!(resp.starts_with("HTTP/1.1 101 "));
        assert!(resp.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
    }

    #[test]
    fn incomplete_then_too_large() {
        assert_eq!(check(&GOOD[..40]), Ok(None));
        let huge = format!("GET /mqtt HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(check(&huge), Err(UpgradeFailure::HeadersTooLarge));
    }

    #[test]
    fn refusals_by_reason() {
        let cases = [
            (GOOD.replace("GET", "POST"), UpgradeFailure::Method),
            (
                GOOD.replace("/mqtt?x=1", "/other"),
                UpgradeFailure::NotFound,
            ),
            (
                GOOD.replace("Upgrade: websocket\r\n", ""),
                UpgradeFailure::NotUpgrade,
            ),
            (
                GOOD.replace("keep-alive, Upgrade", "keep-alive"),
                UpgradeFailure::NotUpgrade,
            ),
            (
                GOOD.replace("Version: 13", "Version: 8"),
                UpgradeFailure::Version,
            ),
            (
                GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
                UpgradeFailure::BadRequest,
            ),
            (
                GOOD.replace("foo, mqtt", "foo"),
                UpgradeFailure::Subprotocol,
            ),
            (
                GOOD.replace("HTTP/1.1", "HTTP/1.0"),
                UpgradeFailure::BadRequest,
            ),
            (
                "\x16\x03\x01garbage\r\n\r\n".to_string(),
                UpgradeFailure::BadRequest,
            ),
        ];
        for (req, want) in cases {
            assert_eq!(check(&req), Err(want), "{req:?}");
            assert!(refusal(want).unwrap().starts_with("HTTP/1.1 4"));
        }
        assert!(
            refusal(UpgradeFailure::NotFound)
                .unwrap()
                .starts_with("HTTP/1.1 404 ")
        );
        assert!(
            refusal(UpgradeFailure::NotUpgrade)
                .unwrap()
                .starts_with("HTTP/1.1 426 ")
        );
    }

    #[test]
    fn subprotocol_optional_unless_required_and_origins() {
        let none = GOOD.replace("Sec-WebSocket-Protocol: foo, mqtt\r\n", "");
        assert_eq!(check(&none).unwrap().unwrap().subprotocol, None);
        let mut cfg = config();
        cfg.require_subprotocol = true;
        assert_eq!(
            check_request(none.as_bytes(), &cfg),
            Err(UpgradeFailure::Subprotocol)
        );
        let old = GOOD.replace("foo, mqtt", "mqttv3.1");
        assert_eq!(check(&old).unwrap().unwrap().subprotocol, Some("mqttv3.1"));
        cfg.allowed_origins = vec!["https://app.example".into()];
        assert_eq!(
            check_request(GOOD.as_bytes(), &cfg),
            Err(UpgradeFailure::Origin)
        );
        let with_origin = GOOD.replace("Host:", "Origin: https://app.example\r\nHost:");
        assert!(
            check_request(with_origin.as_bytes(), &cfg)
                .unwrap()
                .is_some()
        );
    }
}
