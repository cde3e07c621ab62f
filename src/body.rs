//! Reading HTTP response bodies from the portal with a size cap (`bynder.max_response_size`).
//!
//! Owns the one loop that reads a body chunk by chunk and stops at a limit, so that an endless
//! or enormous answer (a broken gateway, a TLS-inspecting proxy) costs at most the cap in
//! memory, never the whole stream. It does not decide what an oversized answer means: the API
//! client, the token transport and `raw` each turn [`TooLarge`] into their own error.

use reqwest::Response;

/// The settings key that raises the cap; every message about the cap names it.
pub const CAP_KEY: &str = "bynder.max_response_size";

/// The first bytes of a body, and whether they are all of it.
#[derive(Debug)]
pub struct Prefix {
    pub bytes: Vec<u8>,
    /// False when the body goes on past the limit (the rest was not read).
    pub complete: bool,
}

/// An answer larger than the cap: reading stopped there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    /// The cap, in bytes.
    pub cap: u64,
    /// The `Content-Length` the answer announced, when that is how it was caught.
    pub declared: Option<u64>,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the answer is larger than {} ({CAP_KEY}); reading stopped there",
            bytesize::ByteSize(self.cap).display().iec()
        )?;
        if let Some(declared) = self.declared {
            write!(f, " (it announced {declared} bytes)")?;
        }
        write!(
            f,
            ". A broken gateway or proxy may be sending an endless body. Fix: if the portal \
             really sends answers this large, raise {CAP_KEY}"
        )
    }
}

impl std::error::Error for TooLarge {}

/// Why a capped body could not be read.
#[derive(Debug)]
pub enum CappedError {
    TooLarge(TooLarge),
    /// The connection failed while the body was read.
    Read(reqwest::Error),
}

/// Reads at most `limit` bytes of the body; what lies beyond is never read (dropping the
/// response closes the connection). For error pages, whose start is all a message shows.
pub async fn read_prefix(response: &mut Response, limit: u64) -> Result<Prefix, reqwest::Error> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok(Prefix {
                bytes,
                complete: false,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Prefix {
        bytes,
        complete: true,
    })
}

/// Reads the whole body if it is at most `cap` bytes. An announced `Content-Length` above the
/// cap fails before anything is read.
pub async fn read_capped(mut response: Response, cap: u64) -> Result<Vec<u8>, CappedError> {
    if let Some(declared) = response.content_length().filter(|n| *n > cap) {
        return Err(CappedError::TooLarge(TooLarge {
            cap,
            declared: Some(declared),
        }));
    }
    let prefix = read_prefix(&mut response, cap)
        .await
        .map_err(CappedError::Read)?;
    if !prefix.complete {
        return Err(CappedError::TooLarge(TooLarge {
            cap,
            declared: None,
        }));
    }
    Ok(prefix.bytes)
}

/// How much of an error page is read to show its start in a message.
pub const SNIPPET_READ_LIMIT: u64 = 16 * 1024;

/// The start of a body as text for a message: at most `chars` characters, with `…` when cut
/// here or when `complete` is false (the body went on past what was read).
pub fn snippet(bytes: &[u8], complete: bool, chars: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim();
    let mut out: String = trimmed.chars().take(chars).collect();
    if !complete || trimmed.chars().count() > chars {
        out.push('…');
    }
    out
}

/// Reads the start of an error page and returns it as a snippet for a message; a body that
/// cannot be read shows as nothing (the status says enough).
pub async fn read_snippet(response: &mut Response, chars: usize) -> String {
    match read_prefix(response, SNIPPET_READ_LIMIT).await {
        Ok(prefix) => snippet(&prefix.bytes, prefix.complete, chars),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The simulator's endless-body server, filled with spaces.
    pub(crate) async fn endless_server() -> (String, tokio::sync::mpsc::UnboundedReceiver<u64>) {
        crate::simulator::endless_body_server(b' ')
            .await
            .expect("start the endless server")
    }

    #[tokio::test]
    async fn a_prefix_stops_at_the_limit_and_says_the_body_went_on() {
        let (url, mut hung_up) = endless_server().await;
        let mut response = reqwest::get(&url).await.unwrap();
        let prefix = read_prefix(&mut response, 1000).await.unwrap();
        assert_eq!(prefix.bytes.len(), 1000);
        assert!(!prefix.complete);
        drop(response);
        assert!(hung_up.recv().await.is_some(), "the connection is closed");
        assert_eq!(snippet(b"  short  ", true, 10), "short");
        assert_eq!(snippet(b"short", false, 10), "short…");
        assert_eq!(snippet("ééé".as_bytes(), true, 2), "éé…");
    }

    #[test]
    fn the_message_names_the_cap_and_the_key_to_raise() {
        let message = TooLarge {
            cap: 16 * 1024 * 1024,
            declared: Some(20_000_000),
        }
        .to_string();
        assert!(message.contains("16.0 MiB"), "{message}");
        assert!(message.contains("20000000 bytes"), "{message}");
        assert!(
            message.contains("raise bynder.max_response_size"),
            "{message}"
        );
    }
}
