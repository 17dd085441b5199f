//! Config errors that name the file, the line and column, and the field.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use toml::de::DeValue;

/// A configuration that could not be loaded: which file, where, and what was expected.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file, when the error comes from one.
    pub file: Option<PathBuf>,
    /// 1-based line and column of the offending value, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong, naming the field and what was expected.
    pub message: String,
    /// The dotted path of the field at fault (`routes[2].refresh_ahead`), for errors
    /// found after parsing: [`ConfigError::located`] points them at the file's line.
    field: Option<String>,
}

/// The file and text a config was parsed from, kept to point errors found after parsing
/// (range checks, checks across fields) at the line of the field at fault.
#[derive(Debug, Clone)]
pub(super) struct Source {
    pub(super) file: Option<PathBuf>,
    pub(super) text: Arc<str>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.position) {
            (Some(file), Some((line, col))) => write!(f, "{}:{line}:{col}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, _) => {}
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub(super) fn plain(message: impl Into<String>) -> Self {
        ConfigError::in_file(None, None, message.into())
    }

    /// An error at `position` (1-based line and column) of `file`.
    pub(super) fn in_file(
        file: Option<PathBuf>,
        position: Option<(usize, usize)>,
        message: String,
    ) -> Self {
        ConfigError {
            file,
            position,
            message,
            field: None,
        }
    }

    /// An error in `field` (a dotted path with array indices, `routes[2].ttl_secs`), shown
    /// as `field: detail`.
    pub(super) fn at_field(field: impl Into<String>, detail: impl fmt::Display) -> Self {
        let field = field.into();
        ConfigError {
            file: None,
            position: None,
            message: format!("{field}: {detail}"),
            field: Some(field),
        }
    }

    /// With the file, line and column of its field when `source` has it (the value's
    /// start; for a field the file lacks, its table's, and just the file when the table
    /// is missing too). An error about a value that did not come from the file (an
    /// environment variable, a command-line flag) names no file.
    pub(super) fn located(mut self, source: &Source) -> Self {
        if self.position.is_some() || self.file.is_some() {
            return self;
        }
        let Some(field) = &self.field else {
            return self;
        };
        match offset_of(&source.text, field) {
            Some((offset, exact)) => {
                self.position = Some(line_col(&source.text, offset));
                self.file = source.file.clone();
                if !exact && let Some(detail) = self.message.strip_prefix(&format!("{field}: ")) {
                    self.message = format!("{field} (not set in this table): {detail}");
                }
            }
            None => self.file = source.file.clone(),
        }
        self
    }
}

/// Where `field` (`routes[2].ttl_secs`) is in `text`: the byte offset of its value and
/// `true`, or of the nearest enclosing table or array the text has and `false`; `None`
/// when the text has no part of the path.
fn offset_of(text: &str, field: &str) -> Option<(usize, bool)> {
    // `routes[2].ttl_secs` -> "routes", 2, "ttl_secs".
    let mut path: Vec<Result<&str, usize>> = Vec::new();
    for part in field.split('.') {
        let mut pieces = part.split('[');
        path.push(Ok(pieces.next()?));
        for index in pieces {
            path.push(Err(index.strip_suffix(']')?.parse().ok()?));
        }
    }
    let root = DeValue::Table(toml::de::DeTable::parse(text).ok()?.into_inner());
    let (mut value, mut found) = (&root, None);
    for step in path {
        let child = match step {
            Ok(key) => value.get(key),
            Err(index) => value.get(index),
        };
        let Some(child) = child else {
            return found.map(|at| (at, false));
        };
        (value, found) = (child.get_ref(), Some(child.span().start));
    }
    found.map(|at| (at, true))
}

/// The dotted name of the field whose value starts at `offset`: the enclosing table
/// header plus the key on that line (e.g. `cache.rollout_percent`, `routes.ttl_secs`).
pub(super) fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    // The offset's own line first: a missing field is reported at its table's header.
    let table = std::iter::once(line.trim())
        .chain(text[..line_start].lines().rev().map(str::trim))
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}
