//! The cluster's cache tier as shipped: nginx running
//! `deploy/cluster-tier/nginx.conf.template`, rendered for one origin.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::registry::{Registry, unassigned_port};

/// nginx serving the shipped tier config in front of `origin`; stopped when
/// dropped.
pub struct CacheTier {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// The nginx binary, if installed.
fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|path| path.exists())
}

impl CacheTier {
    /// `None` when nginx is missing (the caller skips).
    pub fn start(origin: &Registry) -> Option<CacheTier> {
        let binary = nginx_binary()?;
        let dir = tempfile::tempdir().expect("tier dir");
        let port = unassigned_port();
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster-tier/nginx.conf.template");
        let config = std::fs::read_to_string(&template)
            .expect("the shipped tier config")
            .replace("${ORIGIN}", &format!("http://{}", origin.host()))
            .replace("${LISTEN}", &format!("127.0.0.1:{port}"))
            .replace("${CACHE}", &dir.path().join("cache").display().to_string())
            .replace("${CACHE_SIZE}", "1g")
            // The test's own access log, so it can count what the tier served.
            .replacen("http {", &format!("http {{\n    access_log {};", dir.path().join("access.log").display()), 1);
        std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
        let global = format!("daemon off; master_process on; user root; pid {};", dir.path().join("nginx.pid").display());
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .args(["-g", &global])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx");
        let mut tier = CacheTier { child, port, dir };
        let started = std::time::Instant::now();
        // nginx writes its pid file once it holds its port.
        while !tier.dir.path().join("nginx.pid").exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = tier.child.try_wait().unwrap() {
                panic!("nginx exited with {status}: {}", tier.error_log());
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(20), "nginx never listened");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(tier)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// GET `path` from the tier, as `user:password` if given (HTTP basic):
    /// the status and the body.
    pub fn get(&self, path: &str, credentials: Option<&str>) -> (u16, Vec<u8>) {
        use base64::Engine;
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let authorization = credentials
            .map(|credentials| {
                format!("Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(credentials))
            })
            .unwrap_or_default();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {}\r\n{authorization}Connection: close\r\n\r\n", self.host()).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let split = answer.windows(4).position(|window| window == b"\r\n\r\n").expect("an HTTP answer");
        let head = String::from_utf8_lossy(&answer[..split]).into_owned();
        let status = head.split(' ').nth(1).and_then(|status| status.parse().ok()).expect("a status");
        (status, answer[split + 4..].to_vec())
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Blob GETs the tier answered with a success status.
    pub fn blob_gets_served(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("\"GET /v2/") && line.contains("/blobs/sha256:"))
            .filter(|line| line.split('"').nth(2).is_some_and(|status| status.trim_start().starts_with('2')))
            .count()
    }
}

impl Drop for CacheTier {
    fn drop(&mut self) {
        // TERM, not KILL: the master stops its workers, which hold the port.
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }
}
