//! `[log]`: where the access log (one record per connection) goes.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::value::{Invalid, optional_key};

/// `[log]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    access: Option<Spanned<String>>,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq)]
pub enum AccessLog {
    Off,
    Stderr,
    File(PathBuf),
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Default `stderr`, where a service manager's journal picks it up.
    pub access: AccessLog,
}

impl LogConfig {
    pub(super) fn from_raw(raw: &RawLog) -> Result<LogConfig, Invalid> {
        Ok(LogConfig {
            access: optional_key!(raw, "log", access, AccessLog::Stderr, |s| {
                parse_access_log(s)
            })?,
        })
    }
}

/// `log.access`: `off`, `stderr`, or any other string as a file path.
pub fn parse_access_log(value: &str) -> Result<AccessLog, String> {
    match value {
        "off" => Ok(AccessLog::Off),
        "stderr" => Ok(AccessLog::Stderr),
        "" => Err("empty access log; use \"off\", \"stderr\" or a file path".into()),
        path => Ok(AccessLog::File(PathBuf::from(path))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log() {
        assert_eq!(parse_access_log("off"), Ok(AccessLog::Off));
        assert_eq!(parse_access_log("stderr"), Ok(AccessLog::Stderr));
        assert_eq!(
            parse_access_log("/var/log/mqsplice.log"),
            Ok(AccessLog::File("/var/log/mqsplice.log".into()))
        );
        assert_eq!(
            parse_access_log("stdout"),
            Ok(AccessLog::File("stdout".into()))
        );
        assert!(parse_access_log("").is_err());
    }
}
