//! Legacy OAuth 1.0a, client side: the RFC 5849 HMAC-SHA1 signer every request goes through,
//! and the temporary-token handshake of `auth oauth1-login`.
//!
//! The signature covers the method, the base string URI (scheme, host, port unless default,
//! path), the query string, a form-urlencoded body and the `oauth_*` protocol parameters
//! (RFC 5849 section 3.4.1); it goes into an `Authorization: OAuth …` header, as Bynder's
//! OAuth 1 SDKs sent it. A JSON body is not covered, as the RFC says.
//!
//! This is deliberately separate code from the simulated portal's verifier
//! (`simulator::oauth1`), so a shared mistake cannot make both sides agree on a wrong signature.

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::transport::Transport;
use super::AuthError;

pub(crate) const REQUEST_TOKEN_PATH: &str = "/api/v4/oauth/request_token/";
pub(crate) const AUTHORISE_PATH: &str = "/api/v4/oauth/authorise/";
pub(crate) const ACCESS_TOKEN_PATH: &str = "/api/v4/oauth/access_token/";

/// RFC 5849 section 3.6 (RFC 3986 unreserved characters stay, everything else is `%XX`).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Signs requests for one consumer and (after the handshake's first step) one token.
pub(crate) struct Signer {
    consumer_key: String,
    consumer_secret: SecretString,
    token: Option<(SecretString, SecretString)>,
}

impl Signer {
    pub fn new(
        consumer_key: String,
        consumer_secret: SecretString,
        token: Option<(SecretString, SecretString)>,
    ) -> Signer {
        Signer {
            consumer_key,
            consumer_secret,
            token,
        }
    }

    /// Adds `Authorization: OAuth …` to a request, with a fresh nonce and timestamp.
    pub fn sign(&self, request: &mut reqwest::Request) -> Result<(), AuthError> {
        let is_form = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        let body = if is_form {
            request.body().and_then(|b| b.as_bytes())
        } else {
            None
        };
        let nonce = hex(&rand::random::<[u8; 16]>());
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let header = self.authorization(request.method(), request.url(), body, &nonce, &timestamp);
        let mut value = HeaderValue::from_str(&header).map_err(|_| {
            AuthError::Header(
                "the OAuth 1 header contains characters not allowed in a header".into(),
            )
        })?;
        value.set_sensitive(true);
        request.headers_mut().insert(AUTHORIZATION, value);
        Ok(())
    }

    /// The `Authorization` header value for one request.
    fn authorization(
        &self,
        method: &Method,
        url: &Url,
        form_body: Option<&[u8]>,
        nonce: &str,
        timestamp: &str,
    ) -> String {
        let mut protocol = vec![
            ("oauth_consumer_key".to_owned(), self.consumer_key.clone()),
            ("oauth_nonce".to_owned(), nonce.to_owned()),
            ("oauth_signature_method".to_owned(), "HMAC-SHA1".to_owned()),
            ("oauth_timestamp".to_owned(), timestamp.to_owned()),
        ];
        if let Some((token, _)) = &self.token {
            protocol.push(("oauth_token".to_owned(), token.expose_secret().to_owned()));
        }
        protocol.push(("oauth_version".to_owned(), "1.0".to_owned()));
        let base = signature_base_string(method.as_str(), url, form_body, &protocol);
        let token_secret = self
            .token
            .as_ref()
            .map(|(_, secret)| secret.expose_secret())
            .unwrap_or("");
        let signature = hmac_sha1(&base, self.consumer_secret.expose_secret(), token_secret);
        protocol.push(("oauth_signature".to_owned(), signature));
        protocol.sort();
        let fields: Vec<String> = protocol
            .iter()
            .map(|(name, value)| format!("{}=\"{}\"", encode(name), encode(value)))
            .collect();
        format!("OAuth {}", fields.join(", "))
    }
}

/// RFC 5849 section 3.6 percent-encoding.
fn encode(value: &str) -> String {
    utf8_percent_encode(value, UNRESERVED).to_string()
}

/// RFC 5849 section 3.4.1.2: scheme and host in lower case, the port only when it is not the
/// scheme's default, then the path; no query, no fragment.
fn base_string_uri(url: &Url) -> String {
    let scheme = url.scheme().to_ascii_lowercase();
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let path = if url.path().is_empty() {
        "/"
    } else {
        url.path()
    };
    format!("{scheme}://{host}{port}{path}")
}

/// RFC 5849 section 3.4.1: the signature base string of a request.
///
/// `protocol` holds the `oauth_*` parameters without `oauth_signature` (and without `realm`).
/// The query string and a form body are decoded as `application/x-www-form-urlencoded`
/// (section 3.4.1.3.1), then every name and value is re-encoded, sorted and joined
/// (section 3.4.1.3.2).
pub(crate) fn signature_base_string(
    method: &str,
    url: &Url,
    form_body: Option<&[u8]>,
    protocol: &[(String, String)],
) -> String {
    let mut parameters: Vec<(String, String)> = url
        .query_pairs()
        .map(|(n, v)| (encode(&n), encode(&v)))
        .collect();
    if let Some(body) = form_body {
        parameters.extend(url::form_urlencoded::parse(body).map(|(n, v)| (encode(&n), encode(&v))));
    }
    parameters.extend(protocol.iter().map(|(n, v)| (encode(n), encode(v))));
    parameters.sort();
    let normalized = parameters
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!(
        "{}&{}&{}",
        method.to_ascii_uppercase(),
        encode(&base_string_uri(url)),
        encode(&normalized)
    )
}

/// RFC 5849 section 3.4.2: `base64(HMAC-SHA1(enc(consumer secret) & enc(token secret), base))`.
pub(crate) fn hmac_sha1(base_string: &str, consumer_secret: &str, token_secret: &str) -> String {
    let key = format!("{}&{}", encode(consumer_secret), encode(token_secret));
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(key.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(base_string.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- the handshake ------------------------------------------------------------------------------

/// A token and its secret as the handshake endpoints answer them.
pub(crate) struct TokenPair {
    pub token: SecretString,
    pub secret: SecretString,
}

/// `POST /api/v4/oauth/request_token/`, signed with the consumer alone.
pub(crate) async fn request_token(
    transport: &Transport,
    base_url: &Url,
    consumer: &Signer,
) -> Result<TokenPair, AuthError> {
    token_call(transport, base_url, REQUEST_TOKEN_PATH, consumer).await
}

/// Where the person approves the request token in a browser. Bynder's parameter is
/// `callback`, not `oauth_callback`.
pub(crate) fn authorise_url(base_url: &Url, request_token: &str, callback: Option<&Url>) -> Url {
    let mut url = base_url.clone();
    url.set_path(AUTHORISE_PATH);
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("oauth_token", request_token);
        if let Some(callback) = callback {
            query.append_pair("callback", callback.as_str());
        }
    }
    url
}

/// `POST /api/v4/oauth/access_token/`, signed with the consumer and the authorised request
/// token; answers the lasting token pair.
pub(crate) async fn access_token(
    transport: &Transport,
    base_url: &Url,
    consumer_and_request_token: &Signer,
) -> Result<TokenPair, AuthError> {
    token_call(
        transport,
        base_url,
        ACCESS_TOKEN_PATH,
        consumer_and_request_token,
    )
    .await
}

async fn token_call(
    transport: &Transport,
    base_url: &Url,
    path: &str,
    signer: &Signer,
) -> Result<TokenPair, AuthError> {
    let mut url = base_url.clone();
    url.set_path(path);
    let mut request = reqwest::Request::new(Method::POST, url);
    signer.sign(&mut request)?;
    let answer = transport.execute_ok(request).await.map_err(|e| match e {
        super::transport::TransportError::Status { status, .. }
            if status.as_u16() == 401 || status.as_u16() == 403 =>
        {
            AuthError::Rejected {
                problem: format!("{path} answered {status}"),
                fix: "check auth.consumer_key and auth.consumer_secret (Settings > Portal settings > API tokens); \
                      after approving in the browser, run the login again if it took more than a few minutes"
                    .into(),
            }
        }
        other => AuthError::Unavailable(other.to_string()),
    })?;
    let mut token = None;
    let mut secret = None;
    for (name, value) in url::form_urlencoded::parse(&answer.body) {
        match name.as_ref() {
            "oauth_token" => token = Some(SecretString::from(value.into_owned())),
            "oauth_token_secret" => secret = Some(SecretString::from(value.into_owned())),
            _ => {}
        }
    }
    match (token, secret) {
        (Some(token), Some(secret)) => Ok(TokenPair { token, secret }),
        _ => Err(AuthError::Login(format!(
            "{path} answered without oauth_token and oauth_token_secret; is bynder.base_url the portal's URL?"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// RFC 5849 section 3.4.1: the worked example, reproduced exactly (its protocol
    /// parameters carry no `oauth_version`; `realm` and `oauth_signature` are left out).
    #[test]
    fn the_base_string_reproduces_rfc_5849_section_3_4_1() {
        let url = Url::parse("http://example.com/request?b5=%3D%253D&a3=a&c%40=&a2=r%20b").unwrap();
        let protocol = pairs(&[
            ("oauth_consumer_key", "9djdj82h48djs9d2"),
            ("oauth_token", "kkk9d7dh3k39sjv7"),
            ("oauth_signature_method", "HMAC-SHA1"),
            ("oauth_timestamp", "137131201"),
            ("oauth_nonce", "7d8f3e4a"),
        ]);
        let base = signature_base_string("POST", &url, Some(b"c2&a3=2+q"), &protocol);
        assert_eq!(
            base,
            "POST&http%3A%2F%2Fexample.com%2Frequest&a2%3Dr%2520b%26a3%3D2%2520q\
             %26a3%3Da%26b5%3D%253D%25253D%26c%2540%3D%26c2%3D%26oauth_consumer_\
             key%3D9djdj82h48djs9d2%26oauth_nonce%3D7d8f3e4a%26oauth_signature_m\
             ethod%3DHMAC-SHA1%26oauth_timestamp%3D137131201%26oauth_token%3Dkkk\
             9d7dh3k39sjv7"
        );
    }

    /// RFC 5849 section 3.4.1.2's base string URI examples.
    #[test]
    fn the_base_string_uri_drops_default_ports_queries_and_case() {
        let uri = |s: &str| base_string_uri(&Url::parse(s).unwrap());
        assert_eq!(
            uri("HTTP://EXAMPLE.COM:80/r%20v/X?id=123"),
            "http://example.com/r%20v/X"
        );
        assert_eq!(
            uri("https://www.example.net:8080/?q=1"),
            "https://www.example.net:8080/"
        );
        assert_eq!(
            uri("https://acme.bynder.com:443/api"),
            "https://acme.bynder.com/api"
        );
    }

    /// RFC 5849 section 1.2's photos request, signed with that section's client and token
    /// secrets: the full signature, not just the base string.
    #[test]
    fn the_signature_reproduces_rfc_5849_section_1_2() {
        let url =
            Url::parse("http://photos.example.net/photos?file=vacation.jpg&size=original").unwrap();
        let protocol = pairs(&[
            ("oauth_consumer_key", "dpf43f3p2l4k3l03"),
            ("oauth_token", "nnch734d00sl2jdk"),
            ("oauth_signature_method", "HMAC-SHA1"),
            ("oauth_timestamp", "137131202"),
            ("oauth_nonce", "chapoH"),
        ]);
        let base = signature_base_string("GET", &url, None, &protocol);
        assert_eq!(
            hmac_sha1(&base, "kd94hf93k423kf44", "pfkkdhi9sl3r4s00"),
            "MdpQcU8iPSUjWoN/UDMsK2sui9I="
        );
    }

    #[test]
    fn a_signed_request_carries_every_protocol_parameter_in_the_header() {
        let signer = Signer::new(
            "ck".into(),
            SecretString::from("consumer-s3cret"),
            Some((
                SecretString::from("tok en"),
                SecretString::from("token-s3cret"),
            )),
        );
        let url = Url::parse("https://acme.bynder.com/api/media/usage/?asset_id=A").unwrap();
        let header = signer.authorization(&Method::GET, &url, None, "n0nce", "1700000000");
        assert!(header.starts_with("OAuth "), "{header}");
        for part in [
            "oauth_consumer_key=\"ck\"",
            "oauth_nonce=\"n0nce\"",
            "oauth_signature_method=\"HMAC-SHA1\"",
            "oauth_timestamp=\"1700000000\"",
            "oauth_token=\"tok%20en\"",
            "oauth_version=\"1.0\"",
            "oauth_signature=\"",
        ] {
            assert!(header.contains(part), "{part} missing from {header}");
        }
        assert!(!header.contains("s3cret"), "no secret in the header");
    }

    #[test]
    fn a_form_body_is_signed_and_a_json_body_is_not() {
        let signer = Signer::new("ck".into(), SecretString::from("cs"), None);
        let url = Url::parse("https://acme.bynder.com/api/media/usage/").unwrap();
        let signature = |request: &mut reqwest::Request| {
            signer.sign(request).unwrap();
            request.headers()[AUTHORIZATION]
                .to_str()
                .unwrap()
                .to_owned()
        };
        let mut form = reqwest::Request::new(Method::POST, url.clone());
        form.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        *form.body_mut() = Some("asset_id=A".into());
        let header = signature(&mut form);
        // Rebuild the base string from the header's nonce and timestamp: with the body it
        // matches, without it it does not.
        let field = |name: &str| {
            let start = header.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            let end = header[start..].find('"').unwrap() + start;
            percent_encoding::percent_decode_str(&header[start..end])
                .decode_utf8()
                .unwrap()
                .into_owned()
        };
        let protocol = pairs(&[
            ("oauth_consumer_key", "ck"),
            ("oauth_nonce", &field("oauth_nonce")),
            ("oauth_signature_method", "HMAC-SHA1"),
            ("oauth_timestamp", &field("oauth_timestamp")),
            ("oauth_version", "1.0"),
        ]);
        let with_body = signature_base_string("POST", &url, Some(b"asset_id=A"), &protocol);
        let without = signature_base_string("POST", &url, None, &protocol);
        assert_eq!(field("oauth_signature"), hmac_sha1(&with_body, "cs", ""));
        assert_ne!(field("oauth_signature"), hmac_sha1(&without, "cs", ""));

        let mut json = reqwest::Request::new(Method::POST, url.clone());
        json.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        *json.body_mut() = Some("{\"a\":1}".into());
        assert!(signature(&mut json).starts_with("OAuth "));
    }
}
