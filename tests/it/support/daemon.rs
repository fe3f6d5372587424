//! The daemon fixture: a `modelcache serve` process with its own root, socket
//! and metrics address.

use std::path::{Path, PathBuf};

use super::modelcache;

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

    /// The metrics page as served.
    pub fn metrics_text(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics.unwrap()).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response.split("\r\n\r\n").nth(1).expect("an HTTP body").to_owned()
    }

    /// The metrics page, as `name{labels}` → value.
    pub fn metrics(&self) -> std::collections::HashMap<String, f64> {
        self.metrics_text()
            .lines()
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
