//! How configuration problems are reported: [`ConfigError`] and its
//! [`Problem`]s, each rendered as file, line and column, then the key and the
//! message, so that an operator (or an editor) can jump straight to it. This module also turns
//! the errors of the TOML parser and of serde (syntax errors, unknown keys,
//! values of the wrong type) into problems, finding the key each one is about
//! from the spans of the parsed document rather than from the error's text.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The I/O error is part of the message rather than a `#[source]` so that
    // printing the error chain does not repeat it.
    /// The file could not be read: missing, unreadable, or not UTF-8.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The configuration file, as given to [`Config::load`](crate::config::Config::load).
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// Every problem found, in file order.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// One human-readable line per problem.
    pub fn messages(&self) -> Vec<String> {
        match self {
            Self::Read { .. } => vec![self.to_string()],
            Self::Invalid(problems) => problems.iter().map(Problem::to_string).collect(),
        }
    }
}

fn join_lines(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The configuration file; a problem in a key file it names is reported
    /// at the key that names it.
    pub file: PathBuf,
    /// 1-based line and column; `None` for problems about the file as a whole.
    pub position: Option<(usize, usize)>,
    /// Dotted key such as `target.url`; `None` when no key is to blame.
    pub key: Option<String>,
    /// What is wrong, and where it helps what to write instead.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, "{line}:{column}:")?;
        }
        if let Some(key) = &self.key {
            write!(f, " `{key}`:")?;
        }
        write!(f, " {}", self.message)
    }
}

/// The single problem a TOML syntax error or a serde error stands for.
pub(super) fn toml_problem(text: &str, source: &Path, error: &toml::de::Error) -> Problem {
    let offset = error.span().map(|span| span.start);
    let key = offset.and_then(|offset| key_path_at(text, offset));
    let message = match key.as_deref().and_then(section_shape) {
        // serde's wording for a section of the wrong shape names internal types.
        Some(shape) if error.message().starts_with("invalid type") => shape.to_owned(),
        _ => error.message().trim().to_owned(),
    };
    Problem {
        file: source.to_owned(),
        position: offset.map(|offset| position_of(text, offset)),
        key,
        message,
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn position_of(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The dotted key (`section.key`) that a toml error starting at `offset` is
/// about. toml's errors carry the span of the key or value they are about but
/// not its path, so the document is parsed again and its keys and values are
/// searched for the deepest one whose span starts exactly there. An element of
/// an array, including a `[[section]]`, is named by its array's key: the
/// messages name keys, and the line number already tells elements apart.
///
/// A syntax error points at a character rather than at a key or value, so for
/// it the document is recovered as far as it parses and the error is put under
/// the last key that starts before it: usually the key being written there,
/// and never a key that only appears inside a string or a comment.
fn key_path_at(text: &str, offset: usize) -> Option<String> {
    let (document, _) = DeTable::parse_recoverable(text);
    let mut nodes = Vec::new();
    table_nodes(document.get_ref(), &[], &mut nodes);
    let exact = nodes
        .iter()
        .filter(|node| node.start == offset)
        .max_by_key(|node| node.path.len());
    let preceding = || {
        nodes
            .iter()
            .filter(|node| node.is_key && node.start <= offset)
            .max_by_key(|node| (node.start, node.path.len()))
    };
    exact
        .or_else(preceding)
        .map(|node| node.path.join("."))
        .filter(|key| !key.is_empty())
}

/// A key, or a value, of the parsed document: where it starts and the dotted
/// path of the key it belongs to.
struct Node {
    start: usize,
    is_key: bool,
    path: Vec<String>,
}

fn table_nodes(table: &DeTable<'_>, path: &[String], nodes: &mut Vec<Node>) {
    for (key, value) in table {
        let mut key_path = path.to_vec();
        key_path.push(key.get_ref().to_string());
        nodes.push(Node {
            start: key.span().start,
            is_key: true,
            path: key_path.clone(),
        });
        value_nodes(value, &key_path, nodes);
    }
}

fn value_nodes(value: &Spanned<DeValue<'_>>, path: &[String], nodes: &mut Vec<Node>) {
    nodes.push(Node {
        start: value.span().start,
        is_key: false,
        path: path.to_vec(),
    });
    match value.get_ref() {
        DeValue::Table(table) => table_nodes(table, path, nodes),
        DeValue::Array(array) => {
            for item in array.iter() {
                value_nodes(item, path, nodes);
            }
        }
        _ => {}
    }
}

/// How each top-level section must be written, for type errors about the section itself.
fn section_shape(key: &str) -> Option<&'static str> {
    match key {
        "daemon" => Some("must be a table: write a single [daemon] section"),
        "server" => Some("must be a table: write a single [server] section, not [[server]]"),
        "target" => {
            Some("must be an array of tables: write [[target]] (double brackets) for each target")
        }
        "spool" => {
            Some("must be an array of tables: write [[spool]] (double brackets) for each spool")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::testing::{TARGET, assert_single_error, messages, parse};

    #[test]
    fn unknown_key_reports_line_and_column() {
        let text = format!("{TARGET}\n[daemon]\nstate_dir = \"/x\"\n  bogus = 1\n");
        assert_single_error(
            &text,
            "test.toml:7:3: `daemon.bogus`: unknown field `bogus`, expected one of `state_dir`",
        );
        assert_single_error(
            "colour = \"blue\"\n",
            "test.toml:1:1: `colour`: unknown field `colour`",
        );
        let text = format!("{TARGET}api_token = \"x\"\n");
        assert_single_error(
            &text,
            "test.toml:4:1: `target.api_token`: unknown field `api_token`",
        );
    }

    #[test]
    fn wrong_type_reports_line_and_column() {
        let text = format!("{TARGET}concurrency = \"four\"\n");
        assert_single_error(
            &text,
            "test.toml:4:15: `target.concurrency`: invalid type: string \"four\", expected i64",
        );
        assert_single_error(
            "[server]\noutput_dir = \"/out\"\napi_keys = \"k\"\n",
            "test.toml:3:12: `server.api_keys`: invalid type: string \"k\", expected a sequence",
        );
    }

    #[test]
    fn error_inside_multi_line_array_names_its_key() {
        let text =
            format!("{TARGET}[[spool]]\npath = \"/in\"\ninclude = [\n  \"*.dat\",\n  3,\n]\n");
        assert_single_error(
            &text,
            "test.toml:8:3: `spool.include`: invalid type: integer `3`, expected a string",
        );
    }

    #[test]
    fn sections_of_the_wrong_shape_say_how_to_write_them() {
        assert_single_error(
            "[target]\nname = \"x\"\n",
            "test.toml:1:1: `target`: must be an array of tables: write [[target]]",
        );
        assert_single_error(
            "[[server]]\noutput_dir = \"/x\"\n",
            "test.toml:1:1: `server`: must be a table: write a single [server] section",
        );
        assert_single_error("daemon = 3\n", "test.toml:1:10: `daemon`: must be a table");
    }

    #[test]
    fn key_comes_from_the_document_not_from_nearby_text() {
        // A header or a `key =` inside a string is not one.
        let text =
            "[[target]]\nname = \"\"\"\n[daemon]\n\"\"\"\nurl = \"http://x/upload\"\nbogus = 1\n";
        assert_single_error(text, "test.toml:6:1: `target.bogus`: unknown field `bogus`");
        let text = format!("{TARGET}[[spool]]\npath = \"/in\"\ninclude = [\n  \"a=b\",\n  3,\n]\n");
        assert_single_error(
            &text,
            "test.toml:8:3: `spool.include`: invalid type: integer `3`, expected a string",
        );
    }

    #[test]
    fn syntax_errors_name_the_key_being_written() {
        assert_single_error(
            "[[target]]\nname = \"a\"\nname = \"b\"\n",
            "test.toml:3:1: `target.name`: duplicate key",
        );
        assert_single_error(
            "[daemon]\nstate_dir = \"/x\nlog_level = \"info\"\n",
            "test.toml:2:16: `daemon.state_dir`: invalid basic string",
        );
        assert_single_error("= 3\n", "test.toml:1:1: unquoted keys cannot be empty");
    }

    #[test]
    fn toml_syntax_error_reports_line() {
        let messages = messages("[daemon]\nstate_dir = \"/x\nlog_level = \"info\"\n");
        assert_eq!(messages.len(), 1);
        assert!(messages[0].starts_with("test.toml:2:"), "{messages:?}");
    }

    #[test]
    fn all_problems_are_reported_in_file_order() {
        let text = "[daemon]\ncheck_interval = 0\n\n[[target]]\nname = \"t\"\nurl = \"ftp://x\"\n\
                    chunk_size = 0\n\n[[spool]]\npath = \"/in\"\ntarget = \"nope\"\n";
        let error = parse(text).unwrap_err();
        let messages = error.messages();
        let lines: Vec<&str> = messages
            .iter()
            .map(|message| message.split(':').nth(1).unwrap())
            .collect();
        assert_eq!(lines, ["2", "6", "7", "11"], "{error}");
        assert_eq!(error.to_string().lines().count(), 4);
    }

    #[test]
    fn load_reports_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let error = Config::load(&path).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }));
        assert_eq!(error.messages(), [error.to_string()]);
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot read {}: ", path.display())),
            "{error}"
        );
    }
}
