//! The proxy fixtures: TCP proxies in front of a registry that cut, delay,
//! trickle or never end its answers, and remember what they saw.

/// A TCP proxy in front of a registry that cuts the first blob response
/// after `cut_after` bytes, or holds every HEAD for a while, and remembers
/// every request line and its Range.
pub struct FlakyProxy {
    pub port: u16,
    pub requests: RequestLog,
}

/// Request lines, each with the Range it asked for.
pub type RequestLog = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

impl FlakyProxy {
    pub fn start(upstream: u16, cut_after: usize) -> FlakyProxy {
        FlakyProxy::with(upstream, cut_after, std::time::Duration::ZERO)
    }

    /// Cuts nothing; answers every HEAD (a tag resolution) `delay` late.
    pub fn slow_heads(upstream: u16, delay: std::time::Duration) -> FlakyProxy {
        FlakyProxy::with(upstream, usize::MAX, delay)
    }

    fn with(upstream: u16, cut_after: usize, head_delay: std::time::Duration) -> FlakyProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let armed = std::sync::Arc::new(AtomicBool::new(true));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let seen = seen.clone();
                let armed = armed.clone();
                std::thread::spawn(move || {
                    let mut client = client;
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut byte).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let mut lines = text.split("\r\n");
                    let request_line = lines.next().unwrap_or_default().to_owned();
                    let mut range = None;
                    let mut rewritten = format!("{request_line}\r\n");
                    for line in lines.filter(|line| !line.is_empty()) {
                        let lower = line.to_ascii_lowercase();
                        if lower.starts_with("range:") {
                            range = Some(line[6..].trim().to_owned());
                        }
                        if !lower.starts_with("connection:") {
                            rewritten.push_str(line);
                            rewritten.push_str("\r\n");
                        }
                    }
                    // One request per connection keeps the proxy simple.
                    rewritten.push_str("Connection: close\r\n\r\n");
                    let is_blob = request_line.starts_with("GET ") && request_line.contains("/blobs/");
                    if request_line.starts_with("HEAD ") {
                        std::thread::sleep(head_delay);
                    }
                    seen.lock().unwrap().push((request_line, range));
                    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                    upstream.write_all(rewritten.as_bytes()).unwrap();
                    let cut = is_blob && armed.swap(false, Ordering::SeqCst);
                    let mut sent = 0usize;
                    let mut buffer = vec![0u8; 64 << 10];
                    loop {
                        let read = upstream.read(&mut buffer).unwrap_or(0);
                        if read == 0 {
                            break;
                        }
                        let allowed = if cut { read.min(cut_after.saturating_sub(sent)) } else { read };
                        if client.write_all(&buffer[..allowed]).is_err() {
                            break;
                        }
                        sent += allowed;
                        if cut && sent >= cut_after {
                            break;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Both);
                });
            }
        });
        FlakyProxy { port, requests }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// How [`HostileBlobProxy`] serves its one blob.
#[derive(Clone, Copy, Debug)]
pub enum BlobAnswer {
    /// The headers at once, then `bytes` of the body every `every` (a long
    /// `every` is a stall after the first `bytes`).
    Trickle { bytes: usize, every: std::time::Duration },
    /// The body, then zeros until the client hangs up, without a
    /// Content-Length (the body ends when the connection does).
    Endless,
}

/// A TCP proxy in front of a registry that forwards every request but GETs
/// of one blob, which it answers as `answer` says; remembers how many of
/// those it saw.
pub struct HostileBlobProxy {
    pub port: u16,
    pub blob_gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HostileBlobProxy {
    pub fn start(upstream: u16, digest: &str, answer: BlobAnswer) -> HostileBlobProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let port = listener.local_addr().unwrap().port();
        let blob_gets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (counter, digest) = (blob_gets.clone(), digest.to_owned());
        let read_head = |stream: &mut TcpStream| -> Option<Vec<u8>> {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).unwrap_or(0) == 0 {
                    return None;
                }
                head.push(byte[0]);
            }
            Some(head)
        };
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (counter, digest) = (counter.clone(), digest.clone());
                std::thread::spawn(move || {
                    let mut client = client;
                    let Some(head) = read_head(&mut client) else { return };
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let request_line = text.lines().next().unwrap_or_default().to_owned();
                    // One request per connection keeps the proxy simple.
                    let mut rewritten: String = text
                        .split("\r\n")
                        .filter(|line| !line.is_empty() && !line.to_ascii_lowercase().starts_with("connection:"))
                        .map(|line| format!("{line}\r\n"))
                        .collect();
                    rewritten.push_str("Connection: close\r\n\r\n");
                    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                    upstream.write_all(rewritten.as_bytes()).unwrap();
                    let hostile = request_line.starts_with("GET ") && request_line.contains(&format!("/blobs/{digest}"));
                    if !hostile {
                        let _ = std::io::copy(&mut upstream, &mut client);
                        let _ = client.shutdown(Shutdown::Both);
                        return;
                    }
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(response_head) = read_head(&mut upstream) else { return };
                    let mut body = Vec::new();
                    let _ = upstream.read_to_end(&mut body);
                    match answer {
                        BlobAnswer::Trickle { bytes, every } => {
                            if client.write_all(&response_head).is_err() {
                                return;
                            }
                            for chunk in body.chunks(bytes.max(1)) {
                                if client.write_all(chunk).and_then(|()| client.flush()).is_err() {
                                    return;
                                }
                                std::thread::sleep(every);
                            }
                        }
                        BlobAnswer::Endless => {
                            let head: String = String::from_utf8_lossy(&response_head)
                                .split("\r\n")
                                .filter(|line| !line.is_empty() && !line.to_ascii_lowercase().starts_with("content-length:"))
                                .map(|line| format!("{line}\r\n"))
                                .collect();
                            if client.write_all(format!("{head}\r\n").as_bytes()).and_then(|()| client.write_all(&body)).is_err()
                            {
                                return;
                            }
                            let zeros = vec![0u8; 64 << 10];
                            while client.write_all(&zeros).is_ok() {}
                        }
                    }
                    let _ = client.shutdown(Shutdown::Both);
                });
            }
        });
        HostileBlobProxy { port, blob_gets }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
