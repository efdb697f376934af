//! Turns byte offsets into what an operator needs to find a mistake: a 1-based line and column,
//! and the dotted key path (`upstream[0].servers[1].weight`) of the innermost key or value there.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// 1-based line and column (in characters) of a byte offset; offsets past the end map to the end.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The key path of the innermost key or value whose span contains `offset`.
///
/// serde's errors from the toml crate carry a span but not the path; re-parsing into the spanned
/// document tree recovers it without wrapping the deserializer. The parse is the recovering one,
/// so a syntax error still gets the path of whatever the parser made of its surroundings.
pub fn key_path_at(text: &str, offset: usize) -> Option<String> {
    let (doc, _errors) = DeTable::parse_recoverable(text);
    let mut best: Option<(usize, String)> = None;
    walk_table(doc.get_ref(), "", offset, &mut best);
    best.map(|(_, path)| path)
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

fn consider(span: Range<usize>, path: &str, offset: usize, best: &mut Option<(usize, String)>) {
    if !contains(&span, offset) {
        return;
    }
    let len = span.len();
    // On a tie the later (deeper) candidate wins: it is visited after its parent.
    if best.as_ref().is_none_or(|(best_len, _)| len <= *best_len) {
        *best = Some((len, path.to_owned()));
    }
}

fn walk_table(
    table: &DeTable<'_>,
    prefix: &str,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    for (key, value) in table.iter() {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        consider(key.span(), &path, offset, best);
        walk_value(value, &path, offset, best);
    }
}

fn walk_value(
    value: &Spanned<DeValue<'_>>,
    path: &str,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    consider(value.span(), path, offset, best);
    match value.get_ref() {
        DeValue::Table(table) => walk_table(table, path, offset, best),
        DeValue::Array(array) => {
            for (index, element) in array.iter().enumerate() {
                walk_value(element, &format!("{path}[{index}]"), offset, best);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns() {
        let text = "a = 1\nbb = 2\n\nc = \"é\"x";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 5), (1, 6));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 13), (3, 1));
        assert_eq!(line_column(text, text.len() - 1), (4, 8));
        assert_eq!(line_column(text, 1000), (4, 9));
    }

    #[test]
    fn paths_of_offsets() {
        let text = "[stats]\nlisten = \"x\"\n[[upstream]]\nname = \"a\"\nservers = [{ addr = \"h:1\" }, { addr = \"h:2\", weight = 0 }]\n";
        let at = |needle: &str| key_path_at(text, text.find(needle).unwrap());
        assert_eq!(at("listen").as_deref(), Some("stats.listen"));
        assert_eq!(at("\"x\"").as_deref(), Some("stats.listen"));
        assert_eq!(at("name").as_deref(), Some("upstream[0].name"));
        assert_eq!(
            at("\"h:1\"").as_deref(),
            Some("upstream[0].servers[0].addr")
        );
        assert_eq!(at("0 }").as_deref(), Some("upstream[0].servers[1].weight"));
        assert_eq!(key_path_at("a = 1", 4).as_deref(), Some("a"));
        assert_eq!(key_path_at("a = 1\n\n", 7), None);
    }
}
