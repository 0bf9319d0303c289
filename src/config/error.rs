//! `ConfigError`: every problem names the file, the key path and line:column, on one line.
//!
//! Type and syntax errors come from the toml crate with a byte span; semantic problems come
//! from `validate` with a key path. Either way the other half is recovered from the document
//! itself: a span is turned into the innermost key that contains it, and a key path into
//! the span of that key, so every rendered line reads
//! `FILE:LINE:COL: KEY.PATH: message`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: usize,
    /// 1-based column, when known.
    pub column: usize,
    /// Dotted key path (`check.disk.root.warn`); empty for the document itself.
    pub key: String,
    /// What is wrong, on one line.
    pub message: String,
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config; every problem found.
    #[error("{}", render(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Each problem, in document order.
        problems: Vec<Problem>,
    },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| {
            let key = if p.key.is_empty() {
                String::new()
            } else {
                format!("{}: ", p.key)
            };
            format!(
                "{}:{}:{}: {key}{}",
                path.display(),
                p.line,
                p.column,
                p.message
            )
        })
        .collect();
    lines.join("\n")
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.line, self.column, self.key, self.message
        )
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(doc: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(doc.len());
    let before = &doc[..floor_char_boundary(doc, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Builds a problem from a toml error, recovering the key path from its span.
pub fn from_toml(doc: &str, err: &toml::de::Error) -> Problem {
    let span = err.span().unwrap_or(0..0);
    let (line, column) = line_col(doc, span.start);
    let key = key_at(doc, span.start).unwrap_or_default();
    // toml's messages are occasionally several lines; one problem is one line.
    let message = err
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Problem {
        line,
        column,
        key,
        message,
    }
}

/// Builds a problem for a key path, locating the key in the document.
pub fn at_key(doc: &str, key: &[&str], message: impl Into<String>) -> Problem {
    let span = span_of(doc, key).unwrap_or(0..0);
    let (line, column) = line_col(doc, span.start);
    Problem {
        line,
        column,
        key: join_key(key),
        message: message.into(),
    }
}

/// Renders a key path with TOML quoting where a segment needs it.
pub fn join_key<S: AsRef<str>>(key: &[S]) -> String {
    key.iter()
        .map(|k| {
            let k = k.as_ref();
            if !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                k.to_string()
            } else {
                format!("{k:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The innermost key whose key or value contains `offset`.
fn key_at(doc: &str, offset: usize) -> Option<String> {
    let Ok(root) = toml::de::DeTable::parse(doc) else {
        return key_from_text(doc, offset);
    };
    let mut path = Vec::new();
    find_offset(root.get_ref(), offset, &mut path).then(|| join_key(&path))
}

/// For a document that does not parse (a syntax error): the last `[table]` header before
/// the error's line plus the `key =` on that line, read from the text.
fn key_from_text(doc: &str, offset: usize) -> Option<String> {
    let offset = floor_char_boundary(doc, offset.min(doc.len()));
    let line_start = doc[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = doc[line_start..].lines().next().unwrap_or("");
    let table = doc[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('#'));
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (t, k) => t.or(k),
    }
}

/// The names of `[check.KIND.NAME]` tables in document order, across kinds.
pub fn check_order(doc: &str) -> Vec<String> {
    let Ok(root) = toml::de::DeTable::parse(doc) else {
        return Vec::new();
    };
    let Some(checks) = root
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == "check")
        .and_then(|(_, v)| v.get_ref().as_table())
    else {
        return Vec::new();
    };
    let mut found: Vec<(usize, String)> = Vec::new();
    for kind in crate::checks::KINDS {
        let mut table = Some(checks);
        for segment in kind.name.split('.') {
            table = table
                .and_then(|t| t.iter().find(|(k, _)| k.get_ref() == segment))
                .and_then(|(_, v)| v.get_ref().as_table());
        }
        if let Some(t) = table {
            found.extend(
                t.iter()
                    .map(|(k, _)| (k.span().start, k.get_ref().to_string())),
            );
        }
    }
    found.sort();
    found.into_iter().map(|(_, n)| n).collect()
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

fn find_offset(table: &toml::de::DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    for (k, v) in table.iter() {
        path.push(k.get_ref().to_string());
        if contains(&k.span(), offset) {
            return true;
        }
        // A table opened by a `[header]` spans only its header, so descend before
        // testing the value's own span.
        let found_inside = match v.get_ref() {
            toml::de::DeValue::Table(t) => find_offset(t, offset, path),
            toml::de::DeValue::Array(a) => a.iter().enumerate().any(|(i, item)| {
                path.push(i.to_string());
                let hit = match item.get_ref() {
                    toml::de::DeValue::Table(t) => find_offset(t, offset, path),
                    _ => false,
                } || contains(&item.span(), offset);
                if !hit {
                    path.pop();
                }
                hit
            }),
            _ => false,
        };
        if found_inside || contains(&v.span(), offset) {
            return true;
        }
        path.pop();
    }
    false
}

/// The span of the last segment of `key` (the key itself), or of the nearest parent found.
fn span_of(doc: &str, key: &[&str]) -> Option<Range<usize>> {
    let root = toml::de::DeTable::parse(doc).ok()?;
    let mut table = root.get_ref();
    let mut best = None;
    for segment in key {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref() == segment)?;
        best = Some(k.span());
        match v.get_ref() {
            toml::de::DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str =
        "[agent]\ninterval = \"10s\"\n\n[check.disk.root]\npath = \"/\"\nwarn = \"80%\"\n";

    #[test]
    fn offsets_map_to_the_innermost_key() {
        let warn = DOC.find("\"80%\"").unwrap();
        assert_eq!(key_at(DOC, warn).as_deref(), Some("check.disk.root.warn"));
        assert_eq!(
            key_at(DOC, DOC.find("interval").unwrap()).as_deref(),
            Some("agent.interval")
        );
    }

    #[test]
    fn key_paths_map_to_their_line() {
        let p = at_key(DOC, &["check", "disk", "root", "warn"], "x");
        assert_eq!((p.line, p.column), (6, 1));
        let p = at_key(DOC, &["check", "disk", "root"], "x");
        assert_eq!((p.line, p.column), (4, 13));
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("a\nbé c", 5), (2, 3));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
