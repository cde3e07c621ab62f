//! Text that came from outside (the portal's answers and error bodies, usages read back) made
//! safe to show on a terminal: control characters and invisible direction overrides are written
//! as escapes, so an error body cannot move the cursor, recolour the screen or hide text. Also
//! [`error_chain`], a typed error with all its causes on one line.

use std::borrow::Cow;

/// `text` with every control character (C0, DEL, C1) and every bidirectional or zero-width
/// formatting character escaped as `\u{…}` (newline and tab as `\n` and `\t`); unchanged when it
/// holds none.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' // zero-width characters, direction marks
            | '\u{202a}'..='\u{202e}' // direction embeddings and overrides
            | '\u{2066}'..='\u{2069}' // direction isolates
            | '\u{feff}')
}

/// An error and its sources, outermost first: "writing the plan to the queue: database is
/// locked" (what anyhow's `{:#}` shows, for typed errors).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        // `#[error(transparent)]` and `{0}` messages already hold their source's text.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// REGRESSION: terminal escape sequences from portal error bodies reached `status`,
    /// `queue list` and resync output verbatim.
    #[test]
    fn escapes_and_direction_overrides_are_shown_as_text() {
        assert_eq!(printable("plain ünïcode"), "plain ünïcode");
        assert!(matches!(printable("plain"), Cow::Borrowed(_)));
        assert_eq!(
            printable("\u{1b}[2J\u{1b}]0;owned\u{7}bad\r\nline"),
            "\\u{1b}[2J\\u{1b}]0;owned\\u{7}bad\\u{d}\\nline"
        );
        assert_eq!(printable("a\u{202e}b\u{9b}c"), "a\\u{202e}b\\u{9b}c");
        assert_eq!(printable("tab\there"), "tab\\there");
    }

    #[test]
    fn an_error_chain_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("writing the plan to the queue")]
        struct Outer(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("run failed: {0}")]
        struct Quoting(#[source] std::io::Error);
        let io = || std::io::Error::other("database is locked");
        assert_eq!(
            error_chain(&Outer(io())),
            "writing the plan to the queue: database is locked"
        );
        // A message that already quotes its source does not repeat it.
        assert_eq!(
            error_chain(&Quoting(io())),
            "run failed: database is locked"
        );
    }
}
