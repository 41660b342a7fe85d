//! Local addresses and one HTTP request.

use std::time::Duration;

/// A local address nothing listens on (bound, then released).
#[allow(dead_code)]
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A port nothing listens on (yet).
#[allow(dead_code)]
pub fn free_port() -> u16 {
    free_addr().port()
}

/// One HTTP/1.1 request: the status code and the body (a chunked one decoded), or
/// `None` when nothing answers at `addr`. Blocking: from an async test, call it
/// through `spawn_blocking` (an in-process daemon serves on the test's runtime).
#[allow(dead_code)]
pub fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Some((status, if chunked { dechunk(body) } else { body.into() }))
}

/// A body in chunked transfer encoding, decoded.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// `http` from an async test, off the runtime.
#[allow(dead_code)]
pub async fn http_async(
    addr: std::net::SocketAddr,
    method: &'static str,
    path: &'static str,
) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || http(addr, method, path))
        .await
        .unwrap()
}
