//! The kinds of value the sections share (durations, sizes, one-or-many lists, socket
//! addresses) and the two helpers every section validates its keys with, so that a rule broken
//! anywhere comes back with its key path and the span of the value.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::units::{parse_duration, parse_size};

/// Longest accepted duration: far beyond any sensible timeout, and short enough that adding it
/// to `Instant::now()` can never overflow (which would panic in the proxy, not here).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A rule broken at a key: where (path, byte span in the file) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted key path, e.g. `upstream[0].servers[1].weight`.
    pub path: String,
    /// Byte range of the offending value in the file; `None` when something is missing entirely.
    pub span: Option<Range<usize>>,
    /// Why, without the location.
    pub reason: String,
}

impl Invalid {
    /// A broken rule at `path`, pointing at `span` when there is a value to point at.
    pub fn at(
        path: impl Into<String>,
        span: Option<Range<usize>>,
        reason: impl Into<String>,
    ) -> Self {
        Invalid {
            path: path.into(),
            span,
            reason: reason.into(),
        }
    }
}

/// Applies `rule` to an optional spanned value, or returns `default` when the key is absent.
pub fn field<T, U>(
    value: &Option<Spanned<T>>,
    path: &str,
    default: U,
    rule: impl FnOnce(&T) -> Result<U, String>,
) -> Result<U, Invalid> {
    match value {
        None => Ok(default),
        Some(v) => rule(v.get_ref()).map_err(|r| Invalid::at(path, Some(v.span()), r)),
    }
}

/// Applies `rule` to a required spanned value.
pub fn required<T, U>(
    value: &Spanned<T>,
    path: &str,
    rule: impl FnOnce(&T) -> Result<U, String>,
) -> Result<U, Invalid> {
    rule(value.get_ref()).map_err(|r| Invalid::at(path, Some(value.span()), r))
}

/// Validates the optional key `$key` of the raw table `$raw` (found at `$path`) with `$rule`,
/// or gives `$default` when the key is absent. The key is named once: the same identifier is the
/// raw field and the last part of the key path in an error.
macro_rules! optional_key {
    ($raw:expr, $path:expr, $key:ident, $default:expr, $rule:expr $(,)?) => {
        $crate::config::value::field(
            &$raw.$key,
            &format!("{}.{}", $path, stringify!($key)),
            $default,
            $rule,
        )
    };
}

/// [`optional_key!`] for a key the table must have.
macro_rules! required_key {
    ($raw:expr, $path:expr, $key:ident, $rule:expr $(,)?) => {
        $crate::config::value::required(
            &$raw.$key,
            &format!("{}.{}", $path, stringify!($key)),
            $rule,
        )
    };
}

pub(crate) use {optional_key, required_key};

/// The value of an optional boolean key, `default` when absent.
pub fn flag(value: &Option<Spanned<bool>>, default: bool) -> bool {
    value.as_ref().map_or(default, |b| *b.get_ref())
}

/// Picks the value named `value` among `choices`; the error lists them all.
pub fn one_of<T: Copy>(what: &str, value: &str, choices: &[(&str, T)]) -> Result<T, String> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown {what} {value:?}, expected one of: {}",
                names.join(", ")
            )
        })
}

/// A value that may be written as a string (`"10s"`, `"64KiB"`) or a bare TOML integer
/// (seconds or bytes); validation decides which strings are acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumOrStr {
    /// A bare TOML integer: seconds or bytes.
    Int(i64),
    /// A string, unit included, parsed during validation.
    Str(String),
}

impl<'de> Deserialize<'de> for NumOrStr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NumOrStr;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string with a unit (e.g. \"10s\", \"16KiB\") or an integer")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NumOrStr, E> {
                Ok(NumOrStr::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumOrStr, E> {
                i64::try_from(v)
                    .map(NumOrStr::Int)
                    .map_err(|_| E::custom("integer is too large"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NumOrStr, E> {
                Ok(NumOrStr::Str(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A key that takes one string or a list of them (`path = "/mqtt"` or `path = ["/a", "/b"]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single string.
    One(String),
    /// A list of strings.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, one or many.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A duration key, written `"10s"`-style or as an integer number of seconds.
pub fn duration_value(value: &NumOrStr) -> Result<Duration, String> {
    match value {
        NumOrStr::Int(n) if *n < 0 => Err(format!("negative duration {n}")),
        NumOrStr::Int(n) => Ok(Duration::from_secs(n.unsigned_abs())),
        NumOrStr::Str(s) => parse_duration(s),
    }
}

/// A duration for which zero would mean "never wait" or "spin", which is never what was meant;
/// also capped at [`MAX_DURATION`].
pub fn positive_duration(value: &NumOrStr) -> Result<Duration, String> {
    let d = duration_value(value)?;
    if d.is_zero() {
        Err("must be greater than 0".into())
    } else if d > MAX_DURATION {
        Err("must be at most 365d".into())
    } else {
        Ok(d)
    }
}

/// A size key, written `"16KiB"`-style or as an integer number of bytes, within `[min, max]`.
pub fn size_in_range(value: &NumOrStr, min: u64, max: u64) -> Result<usize, String> {
    let bytes = match value {
        NumOrStr::Int(n) if *n < 0 => return Err(format!("negative size {n}")),
        NumOrStr::Int(n) => n.unsigned_abs(),
        NumOrStr::Str(s) => parse_size(s)?,
    };
    if bytes < min || bytes > max {
        return Err(format!(
            "must be between {} and {} (got {bytes} bytes)",
            human_size(min),
            human_size(max)
        ));
    }
    usize::try_from(bytes).map_err(|_| format!("{bytes} bytes does not fit in memory"))
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// A listening address: an IP literal and a port, since a listener binds before any resolver runs.
pub fn parse_listen_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!(
            "{value:?} is not a socket address; write IP:port such as \"0.0.0.0:1883\" or \"[::]:1883\""
        )
    })
}

/// A file the daemon reads (certificates, keys, CAs): any path but an empty one.
pub fn non_empty_path(value: &String) -> Result<PathBuf, String> {
    if value.is_empty() {
        Err("file path must not be empty".into())
    } else {
        Ok(PathBuf::from(value))
    }
}

/// A name or table that must not be empty (`upstream.name`, `listener.name`).
pub fn non_empty_name(what: &str) -> impl FnOnce(&String) -> Result<String, String> + '_ {
    move |name| {
        if name.is_empty() {
            Err(format!("{what} name must not be empty"))
        } else {
            Ok(name.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> NumOrStr {
        NumOrStr::Str(v.into())
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(
            duration_value(&NumOrStr::Int(30)),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(duration_value(&s("1m30s")), Ok(Duration::from_secs(90)));
        assert!(
            duration_value(&NumOrStr::Int(-1))
                .unwrap_err()
                .contains("negative")
        );
        assert_eq!(
            positive_duration(&s("500ms")),
            Ok(Duration::from_millis(500))
        );
        assert!(
            positive_duration(&NumOrStr::Int(0))
                .unwrap_err()
                .contains("greater than 0")
        );
        assert!(positive_duration(&s("0s")).is_err());
        assert!(positive_duration(&s("0")).is_err());
        assert_eq!(positive_duration(&s("365d")), Ok(MAX_DURATION));
        assert!(
            positive_duration(&s("365d1ms"))
                .unwrap_err()
                .contains("at most 365d")
        );
        assert!(
            positive_duration(&NumOrStr::Int(i64::MAX))
                .unwrap_err()
                .contains("at most")
        );

        assert_eq!(size_in_range(&s("16KiB"), 1024, 1 << 24), Ok(16 * 1024));
        assert_eq!(size_in_range(&NumOrStr::Int(1024), 1024, 1 << 24), Ok(1024));
        assert_eq!(size_in_range(&s("16m"), 1024, 1 << 24), Ok(1 << 24));
        let e = size_in_range(&s("1023"), 1024, 1 << 24).unwrap_err();
        assert!(e.contains("between 1KiB and 16MiB"), "{e}");
        assert!(size_in_range(&s("17M"), 1024, 1 << 24).is_err());
        assert!(
            size_in_range(&NumOrStr::Int(-5), 0, 10)
                .unwrap_err()
                .contains("negative")
        );
        let e = size_in_range(&NumOrStr::Int(63), 64, 256 << 20).unwrap_err();
        assert!(e.contains("between 64 bytes and 256MiB"), "{e}");
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen_addr("0.0.0.0:1883"),
            Ok("0.0.0.0:1883".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("[::1]:1883"),
            Ok("[::1]:1883".parse().unwrap())
        );
        assert!(parse_listen_addr("localhost:1883").is_err());
        assert!(parse_listen_addr("0.0.0.0").is_err());
        assert!(parse_listen_addr("0.0.0.0:70000").is_err());
    }

    #[test]
    fn choices_are_listed_when_none_matches() {
        let choices = [("a", 1), ("b", 2)];
        assert_eq!(one_of("letter", "b", &choices), Ok(2));
        assert_eq!(
            one_of("letter", "c", &choices).unwrap_err(),
            "unknown letter \"c\", expected one of: a, b"
        );
    }
}
