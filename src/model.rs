//! Domain types parsed at the boundary: what a CMS row means once it is known to be valid.
//!
//! A row from `cms_asset_references` (or a custom source) becomes a [`Reference`] only through
//! [`Reference::parse`]; anything else becomes a typed [`SkipReason`] that is reported and never sent.
//! This module owns validation; it knows nothing of SQL or HTTP.

use std::fmt;

/// Longest asset id accepted. Bynder media ids are 35 characters; anything far longer is a bad row.
pub const MAX_ASSET_ID_LEN: usize = 64;
/// Longest uri accepted (the common practical limit of URLs in browsers and proxies).
pub const MAX_URI_LEN: usize = 2048;
/// Longest `additional` note accepted.
pub const MAX_ADDITIONAL_LEN: usize = 1024;

/// A Bynder media id, exactly as the CMS gave it (never re-cased or re-formatted).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct AssetId(String);

/// Where the CMS uses an asset. Always present: a delete without a uri would remove the usages of
/// every installation sharing the integration id, so the type makes that impossible.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct UsageUri(String);

/// One valid desired usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub asset_id: AssetId,
    pub uri: UsageUri,
    /// The note shown in Bynder; empty when the CMS gave none.
    pub additional: String,
}

/// Why a row was skipped. Shown to the user; never sent to Bynder.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum SkipReason {
    EmptyAssetId,
    EmptyUri,
    NotUtf8(&'static str),
    TooLong {
        field: &'static str,
        max: usize,
    },
    ControlCharacter(&'static str),
    SurroundingWhitespace(&'static str),
    InvalidAssetId,
    OutsideUriPrefixes,
    /// The uri's scheme (lower-cased; empty when it has none) is not in `sync.uri_schemes`.
    SchemeNotAllowed(String),
    Duplicate,
    /// Same uri and the same asset id but for letter case as an earlier row (named here): Bynder
    /// compares ids ignoring case, so both rows are one usage.
    CaseVariant(String),
    NotText,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::EmptyAssetId => write!(f, "asset_id is empty"),
            SkipReason::EmptyUri => write!(f, "uri is empty"),
            SkipReason::NotUtf8(field) => write!(f, "{field} is not valid UTF-8"),
            SkipReason::TooLong { field, max } => {
                write!(f, "{field} is longer than {max} characters")
            }
            SkipReason::ControlCharacter(field) => {
                write!(f, "{field} contains a control character")
            }
            SkipReason::SurroundingWhitespace(field) => {
                write!(f, "{field} has leading or trailing whitespace")
            }
            SkipReason::InvalidAssetId => write!(
                f,
                "asset_id has characters no Bynder id has (expected hex digits and dashes, \
                 e.g. C078E8EE-C13A-4DA5-86EC8D6F335364EB)"
            ),
            SkipReason::OutsideUriPrefixes => {
                write!(
                    f,
                    "uri is outside sync.uri_prefixes, so it is not ours to manage"
                )
            }
            SkipReason::SchemeNotAllowed(scheme) if scheme.is_empty() => write!(
                f,
                "uri has no scheme, and sync.uri_schemes lists the schemes that may be sent"
            ),
            SkipReason::SchemeNotAllowed(scheme) => write!(
                f,
                "uri scheme `{scheme}:` is not in sync.uri_schemes, so it is never sent"
            ),
            SkipReason::Duplicate => write!(f, "another row has the same asset_id and uri"),
            SkipReason::CaseVariant(first) => write!(
                f,
                "another row has the same uri and asset_id {first}, which differs only in letter \
                 case: Bynder treats asset ids without regard to case, so both are one usage and \
                 the first is kept"
            ),
            SkipReason::NotText => {
                write!(f, "asset_id or uri is stored as a BLOB or number, not TEXT")
            }
        }
    }
}

impl AssetId {
    /// Validates a Bynder media id: 8-4-4-16 hex in practice; accepted are hex digits and dashes.
    pub fn parse(raw: &str) -> Result<Self, SkipReason> {
        if raw.is_empty() {
            return Err(SkipReason::EmptyAssetId);
        }
        if raw.trim() != raw {
            return Err(SkipReason::SurroundingWhitespace("asset_id"));
        }
        if raw.chars().count() > MAX_ASSET_ID_LEN {
            return Err(SkipReason::TooLong {
                field: "asset_id",
                max: MAX_ASSET_ID_LEN,
            });
        }
        let valid = raw.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
            && raw.bytes().any(|b| b.is_ascii_hexdigit());
        if !valid {
            return Err(SkipReason::InvalidAssetId);
        }
        Ok(AssetId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl UsageUri {
    /// Validates a uri: non-empty, bounded, no control characters, no surrounding whitespace.
    /// Any text is accepted otherwise (Bynder stores it verbatim); absolute URLs are recommended.
    pub fn parse(raw: &str) -> Result<Self, SkipReason> {
        if raw.is_empty() {
            return Err(SkipReason::EmptyUri);
        }
        if raw.trim() != raw {
            return Err(SkipReason::SurroundingWhitespace("uri"));
        }
        if raw.chars().count() > MAX_URI_LEN {
            return Err(SkipReason::TooLong {
                field: "uri",
                max: MAX_URI_LEN,
            });
        }
        if raw.chars().any(char::is_control) {
            return Err(SkipReason::ControlCharacter("uri"));
        }
        Ok(UsageUri(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Both read as the text they hold, so they pass wherever text is read (SQL binds, messages,
// comparisons with what Bynder answered); they are built only by `parse`.
impl std::ops::Deref for AssetId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for UsageUri {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<UsageUri> for String {
    fn eq(&self, other: &UsageUri) -> bool {
        *self == other.0
    }
}

impl PartialEq<AssetId> for String {
    fn eq(&self, other: &AssetId) -> bool {
        *self == other.0
    }
}

impl fmt::Display for AssetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for UsageUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates an `additional` note: optional, bounded, no control characters except tab.
pub fn parse_additional(raw: Option<&str>) -> Result<String, SkipReason> {
    let raw = raw.unwrap_or("");
    if raw.chars().count() > MAX_ADDITIONAL_LEN {
        return Err(SkipReason::TooLong {
            field: "additional",
            max: MAX_ADDITIONAL_LEN,
        });
    }
    if raw.chars().any(|c| c.is_control() && c != '\t') {
        return Err(SkipReason::ControlCharacter("additional"));
    }
    Ok(raw.to_owned())
}

/// A row as read from a source, before validation. Fields are raw bytes because a CMS can store
/// anything in a SQLite TEXT column, including invalid UTF-8.
#[derive(Clone, Debug, Default)]
pub struct RawRow {
    pub asset_id: Option<Vec<u8>>,
    pub uri: Option<Vec<u8>>,
    pub additional: Option<Vec<u8>>,
}

impl RawRow {
    /// The row's asset id and uri as shown in reports (lossy for invalid UTF-8).
    pub fn display_key(&self) -> (String, String) {
        let show = |v: &Option<Vec<u8>>| {
            v.as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        (show(&self.asset_id), show(&self.uri))
    }
}

impl Reference {
    /// Validates a raw row. `uri_prefixes`, when not empty, limits which uris are ours to manage;
    /// `uri_schemes`, when not empty (lower-case), which schemes may be sent.
    pub fn parse(
        row: &RawRow,
        uri_prefixes: &[String],
        uri_schemes: &[String],
    ) -> Result<Reference, SkipReason> {
        let text =
            |v: &Option<Vec<u8>>, field: &'static str| -> Result<Option<String>, SkipReason> {
                match v {
                    None => Ok(None),
                    Some(b) => String::from_utf8(b.clone())
                        .map(Some)
                        .map_err(|_| SkipReason::NotUtf8(field)),
                }
            };
        let asset_id = AssetId::parse(&text(&row.asset_id, "asset_id")?.unwrap_or_default())?;
        let uri = UsageUri::parse(&text(&row.uri, "uri")?.unwrap_or_default())?;
        let additional = parse_additional(text(&row.additional, "additional")?.as_deref())?;
        if !is_managed_uri(uri.as_str(), uri_prefixes) {
            return Err(SkipReason::OutsideUriPrefixes);
        }
        if !uri_schemes.is_empty() {
            let scheme = uri_scheme(uri.as_str());
            if !uri_schemes.contains(&scheme) {
                return Err(SkipReason::SchemeNotAllowed(scheme));
            }
        }
        Ok(Reference {
            asset_id,
            uri,
            additional,
        })
    }
}

/// Whether a uri is ours to manage: every uri when no prefix is configured.
/// The order of usage keys everywhere the plan merges them: asset id ignoring ASCII case (as
/// SQLite's NOCASE collation compares), then uri byte for byte. Bynder may answer asset ids in
/// another case than the CMS wrote them, so ids that differ only in case are one key.
pub fn key_order(a: (&str, &str), b: (&str, &str)) -> std::cmp::Ordering {
    cmp_asset_ids(a.0, b.0).then_with(|| a.1.cmp(b.1))
}

/// Compares asset ids ignoring ASCII case, byte for byte otherwise (SQLite's NOCASE).
pub fn cmp_asset_ids(a: &str, b: &str) -> std::cmp::Ordering {
    a.bytes()
        .map(|c| c.to_ascii_lowercase())
        .cmp(b.bytes().map(|c| c.to_ascii_lowercase()))
}

/// Whether two asset ids name the same asset (equal ignoring ASCII case).
pub fn same_asset(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// A usage key for maps that must treat ids differing only in case as one: the asset id
/// lower-cased (ASCII), the uri as is.
pub fn folded_key(asset_id: &str, uri: &str) -> (String, String) {
    (asset_id.to_ascii_lowercase(), uri.to_owned())
}

/// The scheme of a uri, lower-cased (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`,
/// before the first `:`); empty when it has none (a relative reference).
pub fn uri_scheme(uri: &str) -> String {
    match uri.split_once(':') {
        Some((scheme, _))
            if scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            scheme.to_ascii_lowercase()
        }
        _ => String::new(),
    }
}

pub fn is_managed_uri(uri: &str, uri_prefixes: &[String]) -> bool {
    uri_prefixes.is_empty() || uri_prefixes.iter().any(|p| uri.starts_with(p.as_str()))
}

/// One usage listed in a sync request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncUsage {
    pub asset_id: String,
    pub uri: String,
    pub additional: String,
}

/// Now, in the one timestamp format stored everywhere (sorts as text).
pub fn now_text() -> String {
    format_time(chrono::Utc::now())
}

/// `t` in that format.
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_ignores_the_case_of_asset_ids_like_sqlite_nocase() {
        use std::cmp::Ordering::*;
        assert_eq!(key_order(("abc-1", "u"), ("ABC-1", "u")), Equal);
        // Binary order would put "B0" before "a0".
        assert_eq!(key_order(("a0", "u"), ("B0", "u")), Less);
        assert_eq!(key_order(("ABC", "u/1"), ("abc", "u/2")), Less);
        assert!(same_asset("C078e8ee-1", "c078E8EE-1"));
        assert_eq!(folded_key("AbC", "U"), ("abc".to_owned(), "U".to_owned()));
    }

    fn row(asset: &[u8], uri: &[u8], additional: Option<&[u8]>) -> RawRow {
        RawRow {
            asset_id: Some(asset.to_vec()),
            uri: Some(uri.to_vec()),
            additional: additional.map(<[u8]>::to_vec),
        }
    }

    const ID: &[u8] = b"C078E8EE-C13A-4DA5-86EC8D6F335364EB";

    #[test]
    fn a_valid_row_becomes_a_reference_with_its_values_untouched() {
        let r = Reference::parse(
            &row(ID, "https://cms.example/päge?a=b&c".as_bytes(), None),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(r.asset_id.as_str(), "C078E8EE-C13A-4DA5-86EC8D6F335364EB");
        assert_eq!(r.uri.as_str(), "https://cms.example/päge?a=b&c");
        assert_eq!(r.additional, "");
    }

    #[test]
    fn lower_case_asset_ids_are_kept_as_given() {
        let r = Reference::parse(
            &row(b"c078e8ee-c13a-4da5-86ec8d6f335364eb", b"/p", None),
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(r.asset_id.as_str(), "c078e8ee-c13a-4da5-86ec8d6f335364eb");
    }

    #[test]
    fn bad_rows_are_skipped_with_a_reason_naming_the_field() {
        let long_uri = vec![b'a'; MAX_URI_LEN + 1];
        let long_note = vec![b'n'; MAX_ADDITIONAL_LEN + 1];
        let cases: Vec<(RawRow, SkipReason)> = vec![
            (row(b"", b"/p", None), SkipReason::EmptyAssetId),
            (row(ID, b"", None), SkipReason::EmptyUri),
            (
                RawRow {
                    asset_id: None,
                    uri: Some(b"/p".to_vec()),
                    additional: None,
                },
                SkipReason::EmptyAssetId,
            ),
            (
                row(b"C078E8EE;DROP", b"/p", None),
                SkipReason::InvalidAssetId,
            ),
            (row(b"----", b"/p", None), SkipReason::InvalidAssetId),
            (
                row(b" C078E8EE", b"/p", None),
                SkipReason::SurroundingWhitespace("asset_id"),
            ),
            (
                row(ID, b"/p\n", None),
                SkipReason::SurroundingWhitespace("uri"),
            ),
            (
                row(ID, b"/p\x07x", None),
                SkipReason::ControlCharacter("uri"),
            ),
            (
                row(ID, b"/p", Some(b"a\x00b")),
                SkipReason::ControlCharacter("additional"),
            ),
            (
                row(ID, &long_uri, None),
                SkipReason::TooLong {
                    field: "uri",
                    max: MAX_URI_LEN,
                },
            ),
            (
                row(ID, b"/p", Some(&long_note)),
                SkipReason::TooLong {
                    field: "additional",
                    max: MAX_ADDITIONAL_LEN,
                },
            ),
            (row(ID, b"/p\xff", None), SkipReason::NotUtf8("uri")),
            (
                row(&[b'A'; 65], b"/p", None),
                SkipReason::TooLong {
                    field: "asset_id",
                    max: MAX_ASSET_ID_LEN,
                },
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                Reference::parse(&raw, &[], &[]),
                Err(expected.clone()),
                "{raw:?}"
            );
            assert!(!expected.to_string().is_empty());
        }
    }

    #[test]
    fn uris_outside_the_configured_prefixes_are_not_ours() {
        let prefixes = vec!["https://shop.example/".to_owned()];
        assert!(
            Reference::parse(&row(ID, b"https://shop.example/p/1", None), &prefixes, &[]).is_ok()
        );
        assert_eq!(
            Reference::parse(&row(ID, b"https://blog.example/p/1", None), &prefixes, &[]),
            Err(SkipReason::OutsideUriPrefixes)
        );
        assert!(is_managed_uri("anything", &[]));
    }

    /// REGRESSION: `javascript:` uris were sent to Bynder verbatim; `sync.uri_schemes` is an
    /// allow-list of schemes, compared without regard to case.
    #[test]
    fn uri_schemes_allow_only_the_listed_schemes() {
        let schemes = ["https".to_owned(), "http".to_owned()];
        let parse = |uri: &[u8]| Reference::parse(&row(ID, uri, None), &[], &schemes);
        assert!(parse(b"https://shop.example/p/1").is_ok());
        assert!(parse(b"HTTP://shop.example/p/1").is_ok());
        assert_eq!(
            parse(b"javascript:alert(1)").unwrap_err(),
            SkipReason::SchemeNotAllowed("javascript".to_owned())
        );
        assert_eq!(
            parse(b"JavaScript:alert(1)").unwrap_err(),
            SkipReason::SchemeNotAllowed("javascript".to_owned())
        );
        // A relative reference has no scheme, even with a colon later on.
        assert_eq!(
            parse(b"/pages/a:b").unwrap_err(),
            SkipReason::SchemeNotAllowed(String::new())
        );
        assert!(Reference::parse(&row(ID, b"javascript:alert(1)", None), &[], &[]).is_ok());
        assert!(parse(b"data:text/html,x")
            .unwrap_err()
            .to_string()
            .contains("`data:` is not in sync.uri_schemes"));
    }
}
