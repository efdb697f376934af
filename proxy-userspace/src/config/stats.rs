//! `[stats]`: where the JSON stats endpoint listens.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::value::{Invalid, optional_key, parse_listen_addr};

/// Default of `stats.listen`: loopback only, as a status page should be.
pub const DEFAULT_STATS_LISTEN: &str = "127.0.0.1:8888";

/// `[stats]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStats {
    listen: Option<Spanned<String>>,
}

/// Where the JSON stats endpoint listens; `None` turns it off.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsConfig {
    /// Default [`DEFAULT_STATS_LISTEN`].
    pub listen: Option<SocketAddr>,
}

impl StatsConfig {
    pub(super) fn from_raw(raw: &RawStats) -> Result<StatsConfig, Invalid> {
        let default = Some(DEFAULT_STATS_LISTEN.parse().expect("valid default"));
        Ok(StatsConfig {
            listen: optional_key!(raw, "stats", listen, default, |s| parse_stats_listen(s))?,
        })
    }
}

/// `stats.listen`: an address, or `off`.
pub fn parse_stats_listen(value: &str) -> Result<Option<SocketAddr>, String> {
    if value == "off" {
        Ok(None)
    } else {
        parse_listen_addr(value).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_or_off() {
        assert_eq!(parse_stats_listen("off"), Ok(None));
        assert_eq!(
            parse_stats_listen("127.0.0.1:9"),
            Ok(Some("127.0.0.1:9".parse().unwrap()))
        );
        assert!(parse_stats_listen("on").is_err());
    }
}
