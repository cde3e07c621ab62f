//! A server that answers every request with `200 OK` and a chunked body that never ends, the way
//! a broken gateway or TLS-inspecting proxy can: for tests of the response size cap.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Starts the server. The body is 64 KiB chunks of `fill` (`b'['` makes the start of a JSON array
/// that never closes). Returns its base URL and, for each connection in turn, how many body bytes
/// it wrote before the client hung up.
pub async fn endless_body_server(
    fill: u8,
) -> std::io::Result<(String, mpsc::UnboundedReceiver<u64>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = mpsc::unbounded_channel();
    let chunk = format!(
        "10000\r\n{}\r\n",
        String::from_utf8_lossy(&vec![fill; 0x10000])
    );
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (tx, chunk) = (tx.clone(), chunk.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let start = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             transfer-encoding: chunked\r\n\r\n";
                if stream.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                let mut written = 0u64;
                while stream.write_all(chunk.as_bytes()).await.is_ok() {
                    written += 0x10000;
                }
                let _ = tx.send(written);
            });
        }
    });
    Ok((url, rx))
}
