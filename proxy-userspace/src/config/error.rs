//! What an operator is told about a configuration that cannot be used: the key path, the line
//! (and column, for syntax errors) and the reason, both as one message and as parts.

use super::locate;
use super::value::Invalid;

/// A configuration that could not be read or is not valid; the message names the key path and line.
///
/// The parts are kept apart too, so callers (and tests) need not parse the message to point at
/// the mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The whole, operator-facing text: `key.path (line N): reason`.
    pub message: String,
    key_path: Option<String>,
    line: Option<usize>,
    column: Option<usize>,
    reason: String,
}

impl ConfigError {
    pub(super) fn new(
        key_path: Option<String>,
        line: Option<usize>,
        column: Option<usize>,
        reason: String,
    ) -> Self {
        let place = match (line, column) {
            (Some(l), Some(c)) => Some(format!("line {l}, column {c}")),
            (Some(l), None) => Some(format!("line {l}")),
            _ => None,
        };
        let message = match (&key_path, place) {
            (Some(path), Some(place)) => format!("{path} ({place}): {reason}"),
            (Some(path), None) => format!("{path}: {reason}"),
            (None, Some(place)) => format!("{place}: {reason}"),
            (None, None) => reason.clone(),
        };
        ConfigError {
            message,
            key_path,
            line,
            column,
            reason,
        }
    }

    /// A syntax or type error from the toml crate: its span gives line and column, and the
    /// spanned document tree (when the syntax is fine) gives the key path.
    pub(super) fn from_toml(text: &str, error: &toml::de::Error) -> Self {
        let reason = error
            .message()
            .trim_end()
            .replace("expected i64", "expected an integer");
        let Some(span) = error.span() else {
            return ConfigError::new(None, None, None, reason);
        };
        let (line, column) = locate::line_column(text, span.start);
        let mut key_path = locate::key_path_at(text, span.start);
        // serde reports a missing key at the table that lacks it; name the key itself.
        if let Some(missing) = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            key_path = Some(match key_path {
                Some(table) => format!("{table}.{missing}"),
                None => missing.to_owned(),
            });
        }
        ConfigError::new(key_path, Some(line), Some(column), reason)
    }

    pub(super) fn from_invalid(text: &str, invalid: Invalid) -> Self {
        let line = invalid
            .span
            .map(|span| locate::line_column(text, span.start).0);
        ConfigError::new(Some(invalid.path), line, None, invalid.reason)
    }

    /// 1-based line of the offending key or value, so an editor can jump there; `None` when the
    /// mistake is something missing from the whole file (or the file could not be read).
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// 1-based column, known for syntax and type errors reported by the TOML parser.
    pub fn column(&self) -> Option<usize> {
        self.column
    }

    /// Dotted key path such as `upstream[0].servers[1].weight`, stable across edits that move lines.
    pub fn key_path(&self) -> Option<&str> {
        self.key_path.as_deref()
    }

    /// The reason alone, without the location prefix.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}
