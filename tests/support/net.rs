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

/// One HTTP/1.1 request: the status code and the body, or `None` when nothing
/// answers at `addr`. Blocking: from an async test, call it through `spawn_blocking`
/// (an in-process daemon serves on the test's runtime).
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
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
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
