//! Shared helpers of the integration tests: the real `modelcache` binary,
//! the real compiled plugins, and skips that say why.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The crates under `plugins/` and `tests/` built as components for the tests.
const PLUGIN_CRATES: &[&str] = &["exclude-patterns", "quota-watermark", "gc-lru-watermark", "max-pull", "hostile-policy"];

/// Skips the calling test with a printed reason, unless
/// `MODELCACHE_TEST_STRICT=1` (set by CI) turns the skip into a failure.
#[macro_export]
macro_rules! skip_unless {
    ($condition:expr, $($reason:tt)+) => {
        if !$condition {
            $crate::support::skipping(&format!($($reason)+));
            return;
        }
    };
}

/// Says why a test skips, or fails it under `MODELCACHE_TEST_STRICT=1`.
pub fn skipping(reason: &str) {
    if std::env::var_os("MODELCACHE_TEST_STRICT").is_some_and(|value| value == "1") {
        panic!("cannot skip under MODELCACHE_TEST_STRICT=1: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// A loopback registry, or `None` (the test then skips, saying why).
pub fn start_registry() -> Option<Registry> {
    let registry = Registry::start();
    if registry.is_none() {
        skipping("docker-registry is not installed (apt-get install docker-registry)");
    }
    registry
}

/// Pushes `files` as the model `name` (`repository:tag`); its reference, and
/// the directory it was packed from (kept alive for comparisons).
pub fn publish(registry: &Registry, name: &str, files: &[(&str, Vec<u8>)]) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    let reference = registry.reference(name);
    push(registry, dir.path(), &reference);
    (reference, dir)
}

/// Whether the tests run as root (bind mounts, tmpfs).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The cargo target directory this test binary was built into.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors().nth(3).expect("target dir above the test binary").to_owned()
}

/// The `modelcache` binary under test: this package's, or (for the CSI
/// shim's tests) built beside them.
pub fn modelcache_binary() -> PathBuf {
    // Set when several checkouts build into one target directory, where the
    // last build's binary would otherwise be the one tested.
    if let Some(path) = std::env::var_os("MODELCACHE_TEST_BINARY") {
        return PathBuf::from(path);
    }
    if let Some(path) = option_env!("CARGO_BIN_EXE_modelcache") {
        return PathBuf::from(path);
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "modelcache", "--bin", "modelcache"])
                .env("CARGO_TARGET_DIR", target_dir())
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("running cargo to build modelcache");
            assert!(status.success(), "building modelcache failed");
            let profile_dir = std::env::current_exe().unwrap().ancestors().nth(2).unwrap().to_owned();
            profile_dir.join("modelcache")
        })
        .clone()
}

/// The `modelcache` binary under test.
pub fn modelcache() -> Command {
    let mut command = Command::new(modelcache_binary());
    command.env("MODELCACHE_LOG", "info").env_remove("MODELCACHE_LOG_FORMAT");
    command
}

/// Compiled components shared by all tests, so each plugin compiles once.
pub fn component_cache() -> PathBuf {
    target_dir().join("modelcache-test-components")
}

/// The compiled `.wasm` of one of [`PLUGIN_CRATES`], built on first use.
pub fn plugin_wasm(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command.args(["build", "--profile", "plugin", "--target", "wasm32-wasip2"]);
        for name in PLUGIN_CRATES {
            command.args(["-p", name]);
        }
        command.env("CARGO_TARGET_DIR", target_dir()).current_dir(env!("CARGO_MANIFEST_DIR"));
        let status = command.status().expect("running cargo to build the plugins");
        assert!(
            status.success(),
            "building the policy components failed; is the target installed? (`rustup target add wasm32-wasip2`)"
        );
    });
    let path = target_dir().join("wasm32-wasip2/plugin").join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A plugin directory in a temporary dir.
pub struct PluginDir {
    dir: tempfile::TempDir,
}

impl PluginDir {
    pub fn new() -> PluginDir {
        PluginDir { dir: tempfile::tempdir().expect("temp dir") }
    }

    /// A directory holding the three reference plugins.
    pub fn reference() -> PluginDir {
        let dir = PluginDir::new();
        for name in ["exclude-patterns", "quota-watermark", "gc-lru-watermark"] {
            dir.add(name, name);
        }
        dir
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies the component of `crate_name` in as `NAME.wasm`.
    pub fn add(&self, crate_name: &str, name: &str) -> PathBuf {
        let target = self.dir.path().join(format!("{name}.wasm"));
        std::fs::copy(plugin_wasm(crate_name), &target).expect("copying a plugin");
        target
    }

    /// Writes `NAME.toml`.
    pub fn configure(&self, name: &str, toml: &str) {
        std::fs::write(self.dir.path().join(format!("{name}.toml")), toml).expect("writing a plugin config");
    }

    /// Writes `NAME.wasm` from WAT text.
    pub fn add_wat(&self, name: &str, wat: &str) -> PathBuf {
        let target = self.dir.path().join(format!("{name}.wasm"));
        std::fs::write(&target, wat::parse_str(wat).expect("valid WAT")).expect("writing a plugin");
        target
    }
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

    /// GET requests for each blob digest (`sha256:…`), from the access log.
    pub fn blob_gets(&self) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for line in self.log.lock().unwrap().iter() {
            // Apache-style access line: "GET /v2/<repo>/blobs/sha256:<hex> HTTP/1.1" 206 …
            let Some(request) = line.split('"').nth(1) else { continue };
            let mut parts = request.split(' ');
            if parts.next() != Some("GET") {
                continue;
            }
            if let Some(digest) = parts.next().and_then(|uri| uri.split("/blobs/").nth(1)) {
                if digest.starts_with("sha256:") {
                    *counts.entry(digest.to_owned()).or_default() += 1;
                }
            }
        }
        counts
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

/// A private certificate authority and a server certificate it signed for
/// 127.0.0.1, made with the openssl command in `dir`.
pub struct TestAuthority {
    /// The authority's certificate (PEM): what a client must trust.
    pub authority: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl TestAuthority {
    /// `None` (the caller skips, saying why) without an openssl command.
    pub fn make(dir: &Path) -> Option<TestAuthority> {
        let openssl = |args: &[&str]| Command::new("openssl").args(args).current_dir(dir).output();
        if openssl(&["version"]).is_err() {
            skipping("the openssl command is not installed (apt-get install openssl)");
            return None;
        }
        let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
        for step in [
            [
                &["req", "-x509"][..],
                &p256,
                &["-subj", "/CN=modelcache test CA", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            ]
            .concat(),
            [&["req"][..], &p256, &["-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"]].concat(),
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
                .into_iter()
                .chain(["-extfile", "server.ext", "-out", "server.pem"])
                .collect(),
        ] {
            let output = openssl(&step).unwrap();
            assert!(output.status.success(), "openssl {step:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Some(TestAuthority { authority: dir.join("ca.pem"), certificate: dir.join("server.pem"), key: dir.join("server.key") })
    }
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

/// Writes `files` (relative path, bytes) under `dir`.
pub fn write_tree(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (path, bytes) in files {
        let target = dir.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
}

/// Deterministic pseudo-random bytes (so content differs per seed).
pub fn bytes(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(length + 8);
    while out.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(length);
    out
}

/// `sha256:<hex>` of bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    modelcache::digest::Digest::of(bytes).to_string()
}

/// Pushes the directory `dir` as `reference` with the real binary.
pub fn push(registry: &Registry, dir: &Path, reference: &str) -> String {
    push_as(registry, dir, reference, None)
}

/// [`push`] with the credentials of the docker config in `docker_config`.
pub fn push_as(registry: &Registry, dir: &Path, reference: &str, docker_config: Option<&Path>) -> String {
    let mut command = modelcache();
    command.arg("push").arg(dir).arg(reference).args(["--insecure-registry", &registry.host()]);
    if let Some(docker_config) = docker_config {
        command.arg("--docker-config").arg(docker_config);
    }
    let output = command.output().expect("running modelcache push");
    assert!(output.status.success(), "push failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Every file under `dir` with its bytes, by relative path.
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                let content = if kind.is_symlink() {
                    format!("-> {}", std::fs::read_link(&path).unwrap().display()).into_bytes()
                } else {
                    std::fs::read(&path).unwrap()
                };
                files.insert(relative, content);
            }
        }
    }
    files
}

/// A TCP proxy in front of a registry that cuts the first blob response
/// after `cut_after` bytes, or holds every HEAD for a while, and remembers
/// every request line and its Range.
pub struct FlakyProxy {
    pub port: u16,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>,
}

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

/// A `modelcache serve` process with its own root and socket; killed when
/// dropped.
pub struct Daemon {
    pub child: Option<std::process::Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub metrics: Option<std::net::SocketAddr>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Environment variables the process gets besides the test's own.
    pub env: Vec<(String, std::ffi::OsString)>,
}

/// A loopback port nobody listens on (for the metrics address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Daemon {
    /// Starts a daemon with `extra` appended to a config that sets its root,
    /// socket and metrics address; waits until it answers.
    pub fn start(extra: &str) -> Daemon {
        Daemon::start_with_env(extra, Vec::new())
    }

    /// [`Daemon::start`] with `env` set for the process.
    pub fn start_with_env(extra: &str, env: Vec<(String, std::ffi::OsString)>) -> Daemon {
        Daemon::start_in(None, extra, env)
    }

    /// [`Daemon::start`] with its root at `root` (a tmpfs, say).
    pub fn start_at(root: &Path, extra: &str) -> Daemon {
        Daemon::start_in(Some(root.to_owned()), extra, Vec::new())
    }

    fn start_in(root: Option<PathBuf>, extra: &str, env: Vec<(String, std::ffi::OsString)>) -> Daemon {
        let dir = tempfile::tempdir().expect("daemon dir");
        let root = root.unwrap_or_else(|| dir.path().join("root"));
        let socket = dir.path().join("run/modelcache.sock");
        let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = format!(
            "root = {root:?}\n{extra}\n[api]\nsocket = {socket:?}\nvolume-sockets = {volumes:?}\n[metrics]\naddress = \"{metrics}\"\n",
            volumes = dir.path().join("run/volumes"),
        );
        let mut daemon = Daemon { child: None, dir, socket, root, metrics: Some(metrics), log: Default::default(), env };
        std::fs::write(daemon.dir.path().join("modelcache.toml"), config).unwrap();
        daemon.spawn();
        daemon
    }

    /// (Re)starts the process on the same config and waits for its socket.
    pub fn spawn(&mut self) {
        use std::io::BufRead;
        let mut child = modelcache()
            .args(["serve", "--config"])
            .arg(self.dir.path().join("modelcache.toml"))
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting modelcache serve");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        let started = std::time::Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("modelcache serve exited with {status}: {:?}", self.log.lock().unwrap());
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(120), "the daemon never answered");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> modelcache::api::client::Client {
        modelcache::api::client::Client::new(&self.socket)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("a running daemon");
        rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM).unwrap();
        child.wait().unwrap()
    }

    /// The metrics page, as `name{labels}` → value.
    pub fn metrics(&self) -> std::collections::HashMap<String, f64> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics.unwrap()).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let body = response.split("\r\n\r\n").nth(1).expect("an HTTP body");
        body.lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Mounts a tmpfs of `size` (e.g. `64m`) at `dir`; needs root.
pub fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|status| status.success())
}

/// Lazily unmounts what is mounted at the path, and below it, when dropped.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg("-l").arg(&self.0).status();
    }
}

/// One layer of a hand-built artifact: `(path annotation, media type, bytes)`.
pub type RawLayer<'a> = (&'a str, &'a str, Vec<u8>);

/// Pushes a manifest built by hand from `layers` (not packed by `modelcache
/// push`, so hostile layouts survive) as `name`; its reference.
pub fn push_layers(registry: &Registry, name: &str, layers: &[RawLayer<'_>]) -> String {
    use modelcache::digest::Digest;
    use modelcache::registry::{ModelRef, Registry as Client, RegistryConfig};
    let reference = registry.reference(name);
    let model_ref = ModelRef::parse(&reference).unwrap();
    let client = Client::new(RegistryConfig { insecure: vec![registry.host()], ..RegistryConfig::default() }).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut descriptors = Vec::new();
        let config = b"{}".to_vec();
        let blobs = layers.iter().map(|(_, _, content)| content.clone()).chain([config.clone()]);
        for content in blobs {
            let digest = Digest::of(&content);
            let size = content.len() as u64;
            let chunk = bytes::Bytes::from(content);
            client.push_blob(&model_ref, &digest, size, futures_util::stream::once(async { Ok(chunk) })).await.unwrap();
        }
        for (path, media_type, content) in layers {
            descriptors.push(serde_json::json!({
                "mediaType": media_type,
                "digest": Digest::of(content).to_string(),
                "size": content.len(),
                "annotations": { "org.cncf.model.filepath": path },
            }));
        }
        client.push_manifest(&model_ref, modelcache::pack::manifest_json(&config, descriptors)).await.unwrap();
    });
    reference
}

/// A tar archive built entry by entry, names written raw (GNU headers, no
/// normalisation) so hostile ones survive: `(name, type, link target, data)`.
pub fn tar_archive(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, content) in entries {
        let mut header = tar::Header::new_gnu();
        let raw = header.as_gnu_mut().unwrap();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_size(content.len() as u64);
        header.set_mode(if *kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
        header.set_cksum();
        builder.append(&header, *content).unwrap();
    }
    builder.into_inner().unwrap()
}
