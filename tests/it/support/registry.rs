//! The registry fixture: Debian's `docker-registry` on a loopback port, with
//! TLS or an htpasswd file when asked, its access log, and the docker configs
//! that carry credentials for it.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::skipping;
use super::tls::TestAuthority;

/// A loopback registry, or `None` (the test then skips, saying why).
pub fn start_registry() -> Option<Registry> {
    let registry = Registry::start();
    if registry.is_none() {
        skipping("docker-registry is not installed (apt-get install docker-registry)");
    }
    registry
}

/// Debian's `docker-registry` (CNCF distribution 2.8) on a loopback port,
/// storing in a temporary directory; killed when dropped.
pub struct Registry {
    child: std::process::Child,
    port: u16,
    storage: tempfile::TempDir,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Where the registry binary is, if installed.
pub fn registry_binary() -> Option<PathBuf> {
    ["/usr/bin/docker-registry", "/usr/local/bin/docker-registry"].into_iter().map(PathBuf::from).find(|path| path.is_file())
}

/// A loopback port that is free now and that no `bind(0)` will hand out:
/// it lies below the kernel's ephemeral range, where every fixture's
/// registry, daemon and client gets its port. A test that starts a registry
/// on it later (see [`Registry::start_on`]) meets no other fixture there; a
/// port taken from `bind(0)` and released can be handed to another fixture's
/// registry before the test binds it.
pub fn unassigned_port() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low = range.split_whitespace().next().and_then(|low| low.parse::<u16>().ok()).unwrap_or(32768);
    // Start somewhere different in each process so concurrent runs rarely
    // probe the same ports; never hand out one port twice in this process,
    // as two fixtures starting at once would both find the first free one.
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap();
    let span = low.saturating_sub(10_000).max(1);
    let start = 10_000 + (std::process::id() as u16 % span);
    let port = (0..span)
        .map(|step| 10_000 + (start - 10_000 + step) % span)
        .filter(|port| !handed_out.contains(port))
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free loopback port below the ephemeral range");
    handed_out.push(port);
    port
}

impl Registry {
    /// Starts a registry; `None` when the binary is missing (the caller skips).
    pub fn start() -> Option<Registry> {
        Registry::start_on(0)
    }

    /// Starts a registry on a given loopback port (0: any).
    pub fn start_on(port: u16) -> Option<Registry> {
        Registry::launch(port, "", None)
    }

    /// Starts a registry serving HTTPS with `tls`'s server certificate.
    pub fn start_with_tls(tls: &TestAuthority) -> Option<Registry> {
        let http = format!("  tls:\n    certificate: {}\n    key: {}\n", tls.certificate.display(), tls.key.display());
        Registry::launch(0, &http, None)
    }

    /// Starts a registry that admits only who `htpasswd` names (one
    /// `user:bcrypt-hash` line per user; HTTP basic authentication). It reads
    /// the file again when it changes: see [`Registry::set_htpasswd`].
    pub fn start_with_htpasswd(htpasswd: &str) -> Option<Registry> {
        Registry::launch(0, "", Some(htpasswd))
    }

    /// `http` is added to the config's `http:` section.
    fn launch(port: u16, http: &str, htpasswd: Option<&str>) -> Option<Registry> {
        use std::io::BufRead;
        let binary = registry_binary()?;
        let storage = tempfile::tempdir().expect("registry storage");
        let config = storage.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n{http}",
            storage.path().join("data").display()
        );
        if let Some(htpasswd) = htpasswd {
            write_htpasswd(storage.path(), htpasswd);
            yaml += &format!(
                "auth:\n  htpasswd:\n    realm: modelcache-tests\n    path: {}\n",
                storage.path().join("htpasswd").display()
            );
        }
        std::fs::write(&config, yaml).expect("registry config");
        let mut child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .env("REGISTRY_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("REGISTRY_LOG_LEVEL", "info")
            .env("REGISTRY_HTTP_SECRET", "modelcache-tests")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting docker-registry");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (port_sender, port_receiver) = std::sync::mpsc::channel();
        for stream in
            [Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stdout.take().unwrap())]
        {
            let log = log.clone();
            let port_sender = port_sender.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                        let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                        let _ = port_sender.send(port.parse::<u16>().expect("a port"));
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let port = port_receiver.recv_timeout(std::time::Duration::from_secs(20)).expect("the registry announced its port");
        Some(Registry { child, port, storage, log })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A reference in this registry.
    pub fn reference(&self, repository_and_tag: &str) -> String {
        format!("{}/{repository_and_tag}", self.host())
    }

    /// Deletes `/v2/{path}` (a blob, or a manifest and the tags naming it).
    pub fn delete(&self, path: &str) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.host()).unwrap();
        write!(stream, "DELETE /v2/{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.host()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }

    /// Uploads `content` as a blob of `repository` (an upload started, then
    /// finished with the whole content); its digest.
    pub fn put_blob(&self, repository: &str, content: &[u8]) -> String {
        let digest = super::digest_of(content);
        let started = self.send("POST", &format!("/v2/{repository}/blobs/uploads/"), "application/octet-stream", b"");
        assert!(started.starts_with("HTTP/1.1 202"), "{started}");
        let location = started
            .lines()
            .find_map(|line| line.strip_prefix("Location: "))
            .expect("an upload location")
            .trim()
            .trim_start_matches(&format!("http://{}", self.host()))
            .to_owned();
        let separator = if location.contains('?') { '&' } else { '?' };
        let finished = self.send("PUT", &format!("{location}{separator}digest={digest}"), "application/octet-stream", content);
        assert!(finished.starts_with("HTTP/1.1 201"), "{finished}");
        digest
    }

    /// Puts `body` as the manifest `repository:tag` with `media_type` (any
    /// shape: signature manifests, indexes); its digest.
    pub fn put_manifest(&self, repository: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
        let answer = self.send("PUT", &format!("/v2/{repository}/manifests/{tag}"), media_type, body);
        assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
        super::digest_of(body)
    }

    fn send(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.host()).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.host(),
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    /// GET requests for each blob digest (`sha256:…`), from the access log.
    pub fn blob_gets(&self) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for (digest, _) in self.blob_get_log() {
            *counts.entry(digest).or_default() += 1;
        }
        counts
    }

    /// Bytes served for each blob digest by GET requests, from the access log.
    pub fn blob_bytes_served(&self) -> std::collections::HashMap<String, u64> {
        let mut served = std::collections::HashMap::new();
        for (digest, bytes) in self.blob_get_log() {
            *served.entry(digest).or_default() += bytes;
        }
        served
    }

    /// (digest, bytes sent) of each blob GET in the access log.
    fn blob_get_log(&self) -> Vec<(String, u64)> {
        let mut gets = Vec::new();
        for line in self.log.lock().unwrap().iter() {
            // Apache-style access line: "GET /v2/<repo>/blobs/sha256:<hex> HTTP/1.1" 206 <bytes> …
            let mut quoted = line.split('"');
            let (Some(request), Some(status)) = (quoted.nth(1), quoted.next()) else { continue };
            let mut parts = request.split(' ');
            if parts.next() != Some("GET") {
                continue;
            }
            if let Some(digest) = parts.next().and_then(|uri| uri.split("/blobs/").nth(1))
                && digest.starts_with("sha256:")
            {
                let bytes = status.split_whitespace().nth(1).and_then(|bytes| bytes.parse().ok()).unwrap_or(0);
                gets.push((digest.to_owned(), bytes));
            }
        }
        gets
    }

    /// Requests whose URI contains `needle`, any method, from the access log.
    pub fn requests_for(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.split('"').nth(1).is_some_and(|request| request.contains(needle)))
            .count()
    }

    /// Replaces who is admitted (a registry started with an htpasswd file).
    pub fn set_htpasswd(&self, htpasswd: &str) {
        write_htpasswd(self.storage.path(), htpasswd);
    }

    /// The file the registry serves a blob from (to corrupt it on purpose).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

/// An htpasswd line admitting `user` with `password`.
pub fn htpasswd(user: &str, password: &str) -> String {
    // The lowest bcrypt cost: the registry checks it on every request.
    format!("{user}:{}\n", bcrypt::hash(password, 4).expect("bcrypt"))
}

/// `dir/htpasswd`, replaced atomically.
fn write_htpasswd(dir: &Path, htpasswd: &str) {
    std::fs::write(dir.join("htpasswd.new"), htpasswd).unwrap();
    std::fs::rename(dir.join("htpasswd.new"), dir.join("htpasswd")).unwrap();
}

/// Writes a docker `config.json` under `dir` the way Kubernetes updates a
/// mounted secret: the new version in a directory of its own, then the
/// `..data` symlink swapped to it; `config.json` links through `..data`.
pub fn write_docker_config(dir: &Path, config: &serde_json::Value) {
    let version = tempfile::Builder::new().prefix("..version-").tempdir_in(dir).unwrap().keep();
    std::fs::write(version.join("config.json"), config.to_string()).unwrap();
    let link = dir.join("..data.new");
    std::os::unix::fs::symlink(version.file_name().unwrap(), &link).unwrap();
    std::fs::rename(&link, dir.join("..data")).unwrap();
    if std::fs::symlink_metadata(dir.join("config.json")).is_err() {
        std::os::unix::fs::symlink("..data/config.json", dir.join("config.json")).unwrap();
    }
}

/// A docker config with `user` and `password` for `host`.
pub fn basic_auth(host: &str, user: &str, password: &str) -> serde_json::Value {
    serde_json::json!({ "auths": { host: { "username": user, "password": password } } })
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
