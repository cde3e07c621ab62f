//! The RFC 5849 (OAuth 1.0a) signature arithmetic, server side: parsing the
//! `Authorization: OAuth` header, the base string with its parameter normalisation,
//! HMAC-SHA1 compared in constant time, and the clock the timestamp check reads.
//!
//! Owns only pure functions over a request. Which consumers and tokens exist, and the
//! nonces already used, are [`super::auth`]'s; the token endpoints are
//! [`super::oauth1`]'s. This is a deliberately separate implementation from any
//! client-side signer in the crate, so a shared mistake cannot make both sides agree on
//! a wrong signature.

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::wire::Call;

/// How far `oauth_timestamp` may be from the server clock, in seconds.
pub(super) const TIMESTAMP_TOLERANCE_SECS: i64 = 600;

/// RFC 5849 section 3.6: everything except ALPHA, DIGIT, `-`, `.`, `_` and `~` is
/// percent-encoded, with upper-case hex.
const RFC5849_RESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes per RFC 5849 section 3.6.
pub(super) fn encode(value: &str) -> String {
    utf8_percent_encode(value, RFC5849_RESERVED).to_string()
}

/// Parses `Authorization: OAuth name="value", ...` into decoded pairs (including
/// `realm`). `None` when the scheme is not OAuth or a parameter is malformed.
pub(super) fn parse_authorization(value: &str) -> Option<Vec<(String, String)>> {
    let value = value.trim_start();
    let (scheme, rest) = value.split_at(value.find(char::is_whitespace)?);
    if !scheme.eq_ignore_ascii_case("OAuth") {
        return None;
    }
    let mut pairs = Vec::new();
    for item in rest.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (name, quoted) = item.split_once('=')?;
        let inner = quoted
            .trim()
            .strip_prefix('"')
            .and_then(|quoted| quoted.strip_suffix('"'))?;
        let name = percent_decode_str(name.trim()).decode_utf8().ok()?;
        let inner = percent_decode_str(inner).decode_utf8().ok()?;
        pairs.push((name.into_owned(), inner.into_owned()));
    }
    Some(pairs)
}

/// The base string URI of RFC 5849 section 3.4.1.2 for a plain-HTTP request: scheme and
/// host in lower case, the port only when it is not 80, then the path as sent.
pub(super) fn base_string_uri(host: &str, path: &str) -> String {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix(":80").unwrap_or(&host);
    let path = if path.is_empty() { "/" } else { path };
    format!("http://{host}{path}")
}

/// RFC 5849 section 3.4.1.3.2: encode every name and value, sort by name then value,
/// join as `name=value` with `&`. `oauth_signature` is left out wherever it appears.
pub(super) fn normalize_parameters(parameters: &[(String, String)]) -> String {
    let mut encoded: Vec<(String, String)> = parameters
        .iter()
        .filter(|(name, _)| name != "oauth_signature")
        .map(|(name, value)| (encode(name), encode(value)))
        .collect();
    encoded.sort();
    encoded
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// RFC 5849 section 3.4.1.1: `METHOD&enc(base string URI)&enc(normalised parameters)`.
pub(super) fn signature_base_string(
    method: &str,
    base_uri: &str,
    parameters: &[(String, String)],
) -> String {
    format!(
        "{}&{}&{}",
        method.to_ascii_uppercase(),
        encode(base_uri),
        encode(&normalize_parameters(parameters))
    )
}

fn signing_mac(consumer_secret: &str, token_secret: &str) -> hmac::Hmac<sha1::Sha1> {
    let key = format!("{}&{}", encode(consumer_secret), encode(token_secret));
    hmac::Hmac::<sha1::Sha1>::new_from_slice(key.as_bytes())
        .expect("HMAC takes a key of any length")
}

/// RFC 5849 section 3.4.2: base64 of HMAC-SHA1 over the base string. The server only
/// verifies; producing one is for tests.
#[cfg(test)]
pub(super) fn hmac_sha1_signature(
    base_string: &str,
    consumer_secret: &str,
    token_secret: &str,
) -> String {
    let mut mac = signing_mac(consumer_secret, token_secret);
    mac.update(base_string.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `signature` (base64, as sent) is the HMAC-SHA1 of the base string; compared
/// in constant time.
pub(super) fn signature_matches(
    base_string: &str,
    consumer_secret: &str,
    token_secret: &str,
    signature: &str,
) -> bool {
    let Ok(sent) = base64::engine::general_purpose::STANDARD.decode(signature) else {
        return false;
    };
    let mut mac = signing_mac(consumer_secret, token_secret);
    mac.update(base_string.as_bytes());
    mac.verify_slice(&sent).is_ok()
}

/// Every parameter the signature covers: the query, a form body, and the Authorization
/// header's parameters other than `realm` (RFC 5849 section 3.4.1.3.1).
pub(super) fn signed_parameters(
    call: &Call,
    header_parameters: &[(String, String)],
) -> Vec<(String, String)> {
    let mut parameters = call.query_pairs();
    parameters.extend(call.form_pairs());
    parameters.extend(
        header_parameters
            .iter()
            .filter(|(name, _)| name != "realm")
            .cloned(),
    );
    parameters
}

/// The server clock, in Unix seconds.
pub(super) fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::http::{HeaderMap, HeaderValue, Method, Uri};

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    /// The request of RFC 5849 section 3.4.1 (with the header unfolded).
    fn rfc_section_3_4_1_call() -> (Call, Vec<(String, String)>) {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.com"));
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let authorization = "OAuth realm=\"Example\", oauth_consumer_key=\"9djdj82h48djs9d2\", \
            oauth_token=\"kkk9d7dh3k39sjv7\", oauth_signature_method=\"HMAC-SHA1\", \
            oauth_timestamp=\"137131201\", oauth_nonce=\"7d8f3e4a\", \
            oauth_signature=\"bYT5CMsGcbgUdFHObYMEfcx6bsw%3D\"";
        let call = Call {
            method: Method::POST,
            uri: Uri::from_static("/request?b5=%3D%253D&a3=a&c%40=&a2=r%20b"),
            headers,
            body: Bytes::from_static(b"c2&a3=2+q"),
        };
        (
            call,
            parse_authorization(authorization).expect("the RFC header parses"),
        )
    }

    #[test]
    fn base_string_matches_rfc_5849_section_3_4_1() {
        let (call, header_parameters) = rfc_section_3_4_1_call();
        assert_eq!(
            header_parameters[0],
            ("realm".to_owned(), "Example".to_owned())
        );
        assert!(header_parameters.contains(&(
            "oauth_signature".to_owned(),
            "bYT5CMsGcbgUdFHObYMEfcx6bsw=".to_owned()
        )));

        let parameters = signed_parameters(&call, &header_parameters);
        let base_uri = base_string_uri(call.header("host").unwrap(), call.path());
        assert_eq!(base_uri, "http://example.com/request");
        assert_eq!(
            normalize_parameters(&parameters),
            "a2=r%20b&a3=2%20q&a3=a&b5=%3D%253D&c%40=&c2=&oauth_consumer_key=9djdj82h48djs9d2\
             &oauth_nonce=7d8f3e4a&oauth_signature_method=HMAC-SHA1&oauth_timestamp=137131201\
             &oauth_token=kkk9d7dh3k39sjv7"
        );
        assert_eq!(
            signature_base_string("post", &base_uri, &parameters),
            "POST&http%3A%2F%2Fexample.com%2Frequest&a2%3Dr%2520b%26a3%3D2%2520q\
             %26a3%3Da%26b5%3D%253D%25253D%26c%2540%3D%26c2%3D%26oauth_consumer_\
             key%3D9djdj82h48djs9d2%26oauth_nonce%3D7d8f3e4a%26oauth_signature_m\
             ethod%3DHMAC-SHA1%26oauth_timestamp%3D137131201%26oauth_token%3Dkkk\
             9d7dh3k39sjv7"
        );
    }

    #[test]
    fn hmac_sha1_matches_the_photos_example_with_the_section_1_2_secrets() {
        // The photos request of RFC 5849 section 1.2 with the consumer secret
        // `kd94hf93k423kf44` and token secret `pfkkdhi9sl3r4s00`, as signed in the
        // OAuth Core 1.0 appendix A.5 (which also sends `oauth_version=1.0`).
        let parameters = pairs(&[
            ("file", "vacation.jpg"),
            ("size", "original"),
            ("oauth_consumer_key", "dpf43f3p2l4k3l03"),
            ("oauth_token", "nnch734d00sl2jdk"),
            ("oauth_signature_method", "HMAC-SHA1"),
            ("oauth_timestamp", "1191242096"),
            ("oauth_nonce", "kllo9940pd9333jh"),
            ("oauth_version", "1.0"),
        ]);
        let base_uri = base_string_uri("Photos.Example.NET:80", "/photos");
        let base = signature_base_string("GET", &base_uri, &parameters);
        assert_eq!(
            base,
            "GET&http%3A%2F%2Fphotos.example.net%2Fphotos&file%3Dvacation.jpg\
             %26oauth_consumer_key%3Ddpf43f3p2l4k3l03%26oauth_nonce%3Dkllo9940pd9333jh\
             %26oauth_signature_method%3DHMAC-SHA1%26oauth_timestamp%3D1191242096\
             %26oauth_token%3Dnnch734d00sl2jdk%26oauth_version%3D1.0%26size%3Doriginal"
        );
        let signature = hmac_sha1_signature(&base, "kd94hf93k423kf44", "pfkkdhi9sl3r4s00");
        assert_eq!(signature, "tR3+Ty81lMeYAr/Fid0kMTYa/WM=");
        assert!(signature_matches(
            &base,
            "kd94hf93k423kf44",
            "pfkkdhi9sl3r4s00",
            &signature
        ));
        assert!(!signature_matches(
            &base,
            "kd94hf93k423kf44",
            "wrong-secret",
            &signature
        ));
    }

    #[test]
    fn encoding_follows_rfc_5849_section_3_6() {
        assert_eq!(encode("abcABC123-._~"), "abcABC123-._~");
        assert_eq!(encode("a b+c/d=e&f*"), "a%20b%2Bc%2Fd%3De%26f%2A");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn authorization_headers_with_another_scheme_or_unquoted_values_are_refused() {
        assert!(parse_authorization("Bearer abc").is_none());
        assert!(parse_authorization("OAuth oauth_token=abc").is_none());
        assert_eq!(
            parse_authorization("oauth oauth_token=\"a%20b\"").unwrap(),
            pairs(&[("oauth_token", "a b")])
        );
    }
}
