//! The API's unix sockets: binding one with its mode, and the sockets bound
//! to single volumes that pods receive.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::net::UnixListener;

use super::VolumeSocket;
use super::server::{AppState, Refusal, Scope, refusal, router};
use crate::engine::{Engine, EngineError};
use crate::error::ErrorKind;
use crate::volumes::VolumeId;
use modelcache_api::tenancy::Requester;

/// Binds a unix socket at `path` with `mode`, replacing a stale socket file.
///
/// The socket never exists at `path` with any other mode: it is bound in a
/// fresh staging directory beside `path` (mode 0700 whatever the umask, so
/// only root reaches what is inside), given its mode there and renamed into
/// place, which also replaces a stale file in one step. Narrowing the umask
/// around `bind` instead would race every other thread creating files (the
/// umask is per process), and a unix socket cannot be `fchmod`ed before
/// `bind` gives it a file.
///
/// # Errors
/// When the socket cannot be bound (another daemon serves it, or the
/// directory is not writable).
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    let parent = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is served by another process", path.display()),
        ));
    }
    // Short names: a socket path has room for 107 bytes only.
    let staging = tempfile::Builder::new().prefix(".").rand_bytes(4).tempdir_in(parent)?;
    let staged = staging.path().join("s");
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&staged, path)?;
    Ok(listener)
}

/// Sockets bound to single volumes, made on request. Each is
/// `DIR/<volume>/api.sock`, in a directory of its own beside `socket.json`
/// (whom it speaks for): the CSI shim bind-mounts that directory into the
/// pod, so a socket made again after a daemon restart reaches the pod where
/// the old one was, and a restarted daemon opens again every socket whose
/// `socket.json` it finds. While a socket is open its volume is held (see
/// [`Engine::hold`]). `DIR` is 0700: a pod reaches its own socket through
/// its bind mount only.
#[derive(Default)]
pub struct VolumeSockets {
    dir: PathBuf,
    served: Mutex<HashMap<VolumeId, (VolumeSocket, tokio::task::AbortHandle, Requester)>>,
}

const SOCKET_NAME: &str = "api.sock";
const SOCKET_OWNER: &str = "socket.json";

impl VolumeSockets {
    pub fn new(dir: PathBuf) -> VolumeSockets {
        VolumeSockets { dir, served: Mutex::new(HashMap::new()) }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeId, (VolumeSocket, tokio::task::AbortHandle, Requester)>> {
        self.served.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Serves a socket for `volume` speaking for `requester` (the one
    /// already served, if made for the same requester). All of it under
    /// the lock of the served set: two opens of a volume never both bind.
    /// A failure leaves nothing: no hold, no files.
    pub(super) fn open(&self, state: &AppState, volume: VolumeId, requester: Requester) -> Result<VolumeSocket, Refusal> {
        let mut served = self.served();
        if let Some((socket, _, bound)) = served.get(&volume) {
            if *bound != requester {
                return Err(refusal(
                    ErrorKind::Conflict,
                    format!("volume {volume} already has a socket, made for {bound}; close it first"),
                ));
            }
            return Ok(socket.clone());
        }
        let dir = self.dir.join(volume.as_str());
        let opened = (|| {
            let internal = |what: String| move |error: std::io::Error| refusal(ErrorKind::Internal, format!("{what}: {error}"));
            std::fs::create_dir_all(&self.dir).map_err(internal(format!("cannot make {}", self.dir.display())))?;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(internal(format!("cannot set the mode of {}", self.dir.display())))?;
            std::fs::create_dir_all(&dir).map_err(internal(format!("cannot make {}", dir.display())))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(internal(format!("cannot set the mode of {}", dir.display())))?;
            let trees = state.engine.hold(&volume)?;
            let path = dir.join(SOCKET_NAME);
            // A pod's user is unknown: whoever can reach the file (it is
            // mounted into one pod) may use it, and it can only ever touch
            // this volume.
            let listener = bind(&path, 0o666).map_err(internal(format!("cannot bind {}", path.display())))?;
            // Written once the socket is bound: a `socket.json` is the
            // promise to open the socket again at the next start.
            crate::durable::write_json(&dir.join(SOCKET_OWNER), &requester).map_err(EngineError::from)?;
            Ok::<_, Refusal>((listener, VolumeSocket { volume: volume.to_string(), path, trees }))
        })();
        let (listener, socket) = match opened {
            Ok(opened) => opened,
            Err(refused) => {
                self.remove_files(&state.engine, &volume);
                return Err(refused);
            }
        };
        let scoped = AppState { scope: Scope::Volume(volume.clone(), requester.clone()), ..state.clone() };
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router(scoped)).await {
                tracing::error!("volume socket stopped: {error}");
            }
        });
        served.insert(volume.clone(), (socket.clone(), task.abort_handle(), requester));
        tracing::info!(volume = %volume, path = %socket.path.display(), "volume socket open");
        Ok(socket)
    }

    /// A socket's files and its volume's hold, gone.
    fn remove_files(&self, engine: &Engine, volume: &VolumeId) {
        let dir = self.dir.join(volume.as_str());
        for file in [SOCKET_NAME, SOCKET_OWNER] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        let _ = std::fs::remove_dir(&dir);
        engine.unhold(volume);
    }

    /// Closes `volume`'s socket for good: its files go, and its volume may
    /// be pruned again. What a socket not served now left behind (a failed
    /// start, say) goes too; `None` when no socket was served.
    pub(super) fn close(&self, engine: &Engine, volume: &VolumeId) -> Option<VolumeSocket> {
        let closed = self.served().remove(volume);
        if let Some((_, task, _)) = &closed {
            task.abort();
        }
        self.remove_files(engine, volume);
        closed.map(|(socket, _, _)| socket)
    }

    /// Stops serving every volume socket (the daemon is stopping); each
    /// `socket.json` stays, for the next start to open it again.
    pub fn close_all(&self) {
        for (_, (socket, task, _)) in self.served().drain() {
            task.abort();
            let _ = std::fs::remove_file(socket.path);
        }
    }

    /// Opens again the sockets a previous run served, checked as the API
    /// checks a new one.
    pub(super) fn reopen(&self, state: &AppState) {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let owner = entry.path().join(SOCKET_OWNER);
            let Ok(volume) = VolumeId::new(&entry.file_name().to_string_lossy()) else { continue };
            let requester = match std::fs::read(&owner) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => Err(error.to_string()),
                Ok(bytes) => {
                    serde_json::from_slice::<Requester>(&bytes).map_err(|error| error.to_string()).and_then(|requester| {
                        requester.validate().map_err(|error| error.to_string())?;
                        requester.namespace.is_some().then_some(requester).ok_or_else(|| "no namespace".to_owned())
                    })
                }
            };
            let opened = requester
                .and_then(|requester| self.open(state, volume.clone(), requester).map_err(|Refusal(error)| error.message));
            if let Err(error) = opened {
                tracing::warn!(volume = %volume, path = %owner.display(), "not opening a volume socket again: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket appears at its path with the mode asked for and its mode
    /// never changes there afterwards, whatever the umask: the directory's
    /// inotify events show it arrive by a rename, with no change of
    /// attributes after. A stale socket file is replaced.
    #[tokio::test]
    async fn sockets_appear_with_their_mode() {
        use rustix::fs::inotify;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let watch = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
        let flags = inotify::WatchFlags::CREATE | inotify::WatchFlags::ATTRIB | inotify::WatchFlags::MOVED_TO;
        inotify::add_watch(&watch, dir.path(), flags).unwrap();

        let _listener = bind(&path, 0o600).unwrap();

        let metadata = std::fs::metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()));
        assert_eq!(metadata.permissions().mode() & 0o7777, 0o600);
        std::os::unix::net::UnixStream::connect(&path).expect("the renamed socket serves");
        let mut buffer = [std::mem::MaybeUninit::uninit(); 4096];
        let mut events = inotify::Reader::new(&watch, &mut buffer);
        let mut seen = Vec::new();
        loop {
            match events.next() {
                Ok(event) if event.file_name().is_some_and(|name| name.to_bytes() == b"api.sock") => seen.push(event.events()),
                Ok(_) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(error) => panic!("reading inotify events: {error}"),
            }
        }
        assert_eq!(seen, [inotify::ReadFlags::MOVED_TO], "the socket must arrive whole, by a rename");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["api.sock"], "no staging directory is left");
    }
}
