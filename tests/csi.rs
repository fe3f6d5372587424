//! The CSI node shim as kubelet sees it: a real gRPC client on its unix
//! socket, the real `modelcache-csi` and `modelcache serve` processes, the
//! real loopback registry, and real bind mounts (as root; skipped otherwise).
//! Reproduces what csi-sanity checks of a node-only plugin and what kubelet
//! relies on.

// Its own binary: cargo runs test binaries one after another, so these
// deadline-bound calls never share the machine with the other binary's
// builds of plugin projects (its author tests).
#[macro_use]
#[path = "it/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bpfman_csi::v1::controller_client::ControllerClient;
use bpfman_csi::v1::identity_client::IdentityClient;
use bpfman_csi::v1::node_client::NodeClient;
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use bpfman_csi::v1::*;
use modelcache::volumes::{VolumeRecord, VolumeState};
use support::{Daemon, Registry, Unmount, bytes, digest_of, publish, read_tree, start_registry};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request};

const MIB: usize = 1 << 20;

/// A `modelcache-csi` process; killed when dropped.
struct Shim {
    child: std::process::Child,
    endpoint: PathBuf,
    state: PathBuf,
}

impl Shim {
    fn start(dir: &Path, daemon_socket: &Path, publish_timeout: u64) -> Shim {
        Shim::start_with(dir, daemon_socket, publish_timeout, &[])
    }

    /// [`Shim::start`] with more arguments; owed releases are retried every second.
    fn start_with(dir: &Path, daemon_socket: &Path, publish_timeout: u64, args: &[&str]) -> Shim {
        let endpoint = dir.join("csi/csi.sock");
        let _ = std::fs::remove_file(&endpoint);
        let child = std::process::Command::new(support::csi_binary())
            .arg("--endpoint")
            .arg(format!("unix://{}", endpoint.display()))
            .arg("--daemon-socket")
            .arg(daemon_socket)
            .args(["--node-id", "node-1", "--publish-timeout", &publish_timeout.to_string(), "--release-retry", "1"])
            .args(args)
            .arg("--state-dir")
            .arg(dir.join("csi-state"))
            .stderr(std::fs::File::create(dir.join("csi.log")).expect("the shim's log file"))
            .spawn()
            .expect("starting modelcache-csi");
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&endpoint).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the shim never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        Shim { child, endpoint, state: dir.join("csi-state") }
    }

    async fn channel(&self) -> Channel {
        let path = self.endpoint.clone();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| tokio::net::UnixStream::connect(path.clone())))
            .await
            .expect("connecting to the shim")
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The shim stages its bind mounts in a private mount of its own.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.state.join("stage"))
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn mount_capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::MultiNodeReaderOnly as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

/// A publish as kubelet sends it with `podInfoOnMount: true`: the pod's
/// keys are added unless `context` names them.
fn publish_request(volume: &str, target: &Path, context: &[(&str, &str)]) -> NodePublishVolumeRequest {
    let mut volume_context: std::collections::HashMap<String, String> =
        context.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
    // The pod's UID is the one in the target path, as kubelet makes it.
    let components: Vec<String> = target.components().map(|part| part.as_os_str().to_string_lossy().into_owned()).collect();
    let uid =
        components.windows(2).find(|pair| pair[0] == "pods").map(|pair| pair[1].clone()).unwrap_or_else(|| "pod-uid".into());
    for (key, value) in [
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/pod.name", "pod-0"),
        ("csi.storage.k8s.io/pod.uid", uid.as_str()),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
    ] {
        volume_context.entry(key.into()).or_insert_with(|| value.into());
    }
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_capability()),
        readonly: true,
        volume_context,
        ..NodePublishVolumeRequest::default()
    }
}

fn unpublish_request(volume: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest { volume_id: volume.into(), target_path: target.display().to_string() }
}

fn mounts_at(target: &Path) -> Vec<modelcache_csi::mounts::MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    modelcache_csi::mounts::parse_mountinfo(&text).into_iter().filter(|entry| entry.mount_point == target).collect()
}

/// kubelet's pods directory as on a node: a shared mount (a tmpfs here),
/// and a peer of it where the container runtime finds what it hands a pod.
/// Returns both and what unmounts them (the peer first).
fn shared_pods_dir(dir: &Path) -> (PathBuf, PathBuf, [Unmount; 2]) {
    let (pods, runtime_view) = (dir.join("pods"), dir.join("runtime-view"));
    let mount =
        |args: &[&str]| assert!(std::process::Command::new("mount").args(args).status().unwrap().success(), "mount {args:?}");
    std::fs::create_dir_all(&pods).unwrap();
    std::fs::create_dir_all(&runtime_view).unwrap();
    assert!(support::mount_tmpfs(&pods, "16m"), "mounting a tmpfs failed");
    let unmount_pods = Unmount(pods.clone());
    mount(&["--make-shared", pods.to_str().unwrap()]);
    mount(&["--bind", pods.to_str().unwrap(), runtime_view.to_str().unwrap()]);
    (pods, runtime_view.clone(), [Unmount(runtime_view), unmount_pods])
}

fn model(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.safetensors", bytes(seed, MIB)),
        ("config.json", format!("{{\"seed\": {seed}}}").into_bytes()),
        ("README.md", b"# model\n".to_vec()),
    ]
}

/// Identity and node information calls answer as csi-sanity expects of a
/// node-only plugin; what it does not do is UNIMPLEMENTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_node_information() {
    let daemon = Daemon::start("");
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let channel = shim.channel().await;
    let mut identity = IdentityClient::new(channel.clone());
    let info = identity.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
    let valid_name = info.name.len() <= 63
        && info.name.starts_with(|c: char| c.is_ascii_alphabetic())
        && info.name.ends_with(|c: char| c.is_ascii_alphabetic())
        && info.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    assert!(valid_name, "{}", info.name);
    assert!(!info.vendor_version.is_empty());
    let capabilities = identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    assert!(capabilities.capabilities.is_empty(), "no controller service");
    assert_eq!(identity.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));

    let mut node = NodeClient::new(channel.clone());
    node.node_get_capabilities(NodeGetCapabilitiesRequest {}).await.unwrap();
    assert_eq!(node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner().node_id, "node-1");
    let unimplemented = |code: Code| assert_eq!(code, Code::Unimplemented);
    unimplemented(node.node_stage_volume(NodeStageVolumeRequest::default()).await.unwrap_err().code());
    unimplemented(node.node_unstage_volume(NodeUnstageVolumeRequest::default()).await.unwrap_err().code());
    unimplemented(node.node_get_volume_stats(NodeGetVolumeStatsRequest::default()).await.unwrap_err().code());
    unimplemented(node.node_expand_volume(NodeExpandVolumeRequest::default()).await.unwrap_err().code());
    let mut controller = ControllerClient::new(channel);
    unimplemented(controller.create_volume(CreateVolumeRequest::default()).await.unwrap_err().code());
    unimplemented(controller.controller_get_capabilities(ControllerGetCapabilitiesRequest::default()).await.unwrap_err().code());

    // The probe is the shim's own liveness: with the daemon down it must
    // stay up, or kubelet would have no socket to unpublish through.
    drop(daemon);
    assert_eq!(identity.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true), "alive without the daemon");
}

/// Malformed publishes are INVALID_ARGUMENT before anything is looked up;
/// an unknown manifest is NOT_FOUND with nothing mounted; an unreachable
/// registry is UNAVAILABLE and a later retry succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_errors_are_typed() {
    let Some(registry) = start_registry() else { return };
    let later_port = support::unassigned_port();
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\", \"127.0.0.1:{later_port}\"]\n", registry.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    let target = daemon.dir.path().join("pods/p1/volumes/model/mount");
    let reference = registry.reference("models/known:v1");
    let good = [("modelcache.io/reference", reference.as_str())];

    let code = |result: Result<tonic::Response<NodePublishVolumeResponse>, tonic::Status>| result.unwrap_err().code();
    let mut no_volume = publish_request("", &target, &good);
    no_volume.volume_context.clear();
    assert_eq!(code(node.node_publish_volume(no_volume).await), Code::InvalidArgument);
    let mut no_target = publish_request("v", &target, &good);
    no_target.target_path.clear();
    assert_eq!(code(node.node_publish_volume(no_target).await), Code::InvalidArgument);
    let mut no_capability = publish_request("v", &target, &good);
    no_capability.volume_capability = None;
    assert_eq!(code(node.node_publish_volume(no_capability).await), Code::InvalidArgument);
    let mut block = publish_request("v", &target, &good);
    block.volume_capability.as_mut().unwrap().access_type = Some(AccessType::Block(BlockVolume {}));
    let status = node.node_publish_volume(block).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("block access is not supported"));
    assert_eq!(code(node.node_publish_volume(publish_request("v", &target, &[])).await), Code::InvalidArgument);
    // Without the pod's namespace no pod may be taken for the operator.
    let mut no_pod_info = publish_request("v", &target, &good);
    no_pod_info.volume_context.remove("csi.storage.k8s.io/pod.namespace");
    let status = node.node_publish_volume(no_pod_info).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("podInfoOnMount"), "{}", status.message());
    // Pod keys a pod's own attributes claim do not match the target kubelet chose.
    let spoofed =
        publish_request("v", &target, &[("modelcache.io/reference", &reference), ("csi.storage.k8s.io/pod.uid", "other")]);
    let status = node.node_publish_volume(spoofed).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("target path"), "{}", status.message());
    assert_eq!(
        code(node.node_publish_volume(publish_request("v", &target, &[("modelcache.io/reference", "Not A Ref")])).await),
        Code::InvalidArgument
    );

    let status = node
        .node_publish_volume(publish_request(
            "v",
            &target,
            &[("modelcache.io/reference", &registry.reference("models/absent:v1"))],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(mounts_at(&target).is_empty(), "nothing left mounted");
    // NOT_FOUND is final: kubelet may never unpublish, so nothing stays.
    assert_eq!(std::fs::read_dir(shim.state.join("targets")).unwrap().count(), 0, "the shim forgot the target");
    let records: Vec<VolumeRecord> = daemon.client().get("/v1/volumes").await.unwrap();
    let failed = records.iter().find(|record| record.volume.as_str() == "v").expect("the daemon's record");
    assert_eq!(failed.state(), VolumeState::Released, "the failed record is released");
    node.node_unpublish_volume(unpublish_request("v", &target)).await.unwrap();

    let later = format!("127.0.0.1:{later_port}/models/later:v1");
    let status =
        node.node_publish_volume(publish_request("later", &target, &[("modelcache.io/reference", &later)])).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    skip_unless!(support::is_root(), "the retry after UNAVAILABLE bind-mounts, which needs root");
    let Some(late_registry) = Registry::start_on(later_port) else { return };
    let (_, source) = publish(&late_registry, "models/later:v1", &model(1));
    node.node_publish_volume(publish_request("later", &target, &[("modelcache.io/reference", &later)])).await.unwrap();
    assert_eq!(read_tree(&target), read_tree(source.path()));
    node.node_unpublish_volume(unpublish_request("later", &target)).await.unwrap();
}

/// An ephemeral publish mounts the model read-only and byte-exact; again is
/// a no-op; another reference or readonly flag is ALREADY_EXISTS; concurrent
/// publishes never mount twice; unpublish undoes it all and is idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_and_unpublish() {
    skip_unless!(support::is_root(), "bind mounts need root");
    let Some(registry) = start_registry() else { return };
    let (reference, source) = publish(&registry, "models/pod:v1", &model(2));
    let (other, _other) = publish(&registry, "models/other:v1", &model(3));
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    let target = daemon.dir.path().join("pods/p2/volumes/kubernetes.io~csi/model/mount");
    let context = [("modelcache.io/reference", reference.as_str()), ("csi.storage.k8s.io/ephemeral", "true")];
    let volume = "csi-4d2a7c9e";

    node.node_publish_volume(publish_request(volume, &target, &context)).await.unwrap();
    let mounted = mounts_at(&target);
    assert_eq!(mounted.len(), 1);
    assert!(mounted[0].read_only);
    assert_eq!(read_tree(&target), read_tree(source.path()));
    let error = std::fs::write(target.join("config.json"), b"overwritten").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()), "{error}");
    let error = std::fs::write(target.join("new-file"), b"x").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()), "{error}");

    node.node_publish_volume(publish_request(volume, &target, &context)).await.unwrap();
    assert_eq!(mounts_at(&target).len(), 1, "publishing again mounts nothing more");
    let status =
        node.node_publish_volume(publish_request(volume, &target, &[("modelcache.io/reference", &other)])).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    // kubelet takes a volume published without readonly as writable.
    let mut writable = publish_request("csi-writable", &daemon.dir.path().join("pods/p4/mount"), &context);
    writable.readonly = false;
    let status = node.node_publish_volume(writable).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("readOnly: true"), "{}", status.message());

    let second = daemon.dir.path().join("pods/p3/volumes/kubernetes.io~csi/model/mount");
    let (mut first_client, mut second_client) = (node.clone(), node.clone());
    let (a, b) = tokio::join!(
        first_client.node_publish_volume(publish_request("csi-concurrent", &second, &context)),
        second_client.node_publish_volume(publish_request("csi-concurrent", &second, &context))
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(mounts_at(&second).len(), 1, "never a double mount");

    let client = daemon.client();
    let records: Vec<VolumeRecord> = client.get("/v1/volumes").await.unwrap();
    let record = records.iter().find(|record| record.volume.as_str() == volume).unwrap().clone();
    assert_eq!(record.state(), VolumeState::Ready);
    node.node_unpublish_volume(unpublish_request(volume, &target)).await.unwrap();
    assert!(mounts_at(&target).is_empty());
    assert!(!target.exists(), "the target is removed");
    let released: VolumeRecord = client.get(&format!("/v1/volumes/{volume}/{}", record.mount_id)).await.unwrap();
    assert_eq!(released.state(), VolumeState::Released);
    node.node_unpublish_volume(unpublish_request(volume, &target)).await.unwrap();
    node.node_unpublish_volume(unpublish_request("csi-never", &daemon.dir.path().join("pods/never/mount"))).await.unwrap();
    node.node_unpublish_volume(unpublish_request("csi-concurrent", &second)).await.unwrap();
    assert!(mounts_at(&second).is_empty());
}

/// A target the shim cannot mount at after the daemon answered ready is
/// INTERNAL, which kubelet takes as final and may never unpublish: the shim
/// releases the record itself, so it does not hold its model against GC for
/// good. And an unpublish of a target never published here succeeds even
/// with the daemon down, so pods on such a node can finish terminating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_releases_and_unpublish_needs_no_daemon() {
    let Some(registry) = start_registry() else { return };
    let (reference, _source) = publish(&registry, "models/unmountable:v1", &model(5));
    let mut daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    let blocker = daemon.dir.path().join("pods/p9");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"a file where kubelet's directory should be").unwrap();
    let target = blocker.join("volumes/kubernetes.io~csi/model/mount");

    let status = node
        .node_publish_volume(publish_request("csi-unmountable", &target, &[("modelcache.io/reference", &reference)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let records: Vec<VolumeRecord> = daemon.client().get("/v1/volumes").await.unwrap();
    let record = records.iter().find(|record| record.volume.as_str() == "csi-unmountable").expect("a record");
    assert_eq!(record.state(), VolumeState::Released, "the shim released what it could not mount");

    daemon.terminate();
    let never = daemon.dir.path().join("pods/p10/volumes/kubernetes.io~csi/model/mount");
    node.node_unpublish_volume(unpublish_request("csi-never-here", &never)).await.unwrap();
}

/// kubelet's pods directory is a shared mount, and the container runtime
/// hands the pod a peer's copy of the volume: that copy is read-only as well
/// (a remount after the bind reached only the shim's own copy), and the
/// unpublish takes it away too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_peer_of_a_shared_pods_dir_gets_a_read_only_volume() {
    skip_unless!(support::is_root(), "mounts need root");
    let Some(registry) = start_registry() else { return };
    let (reference, source) = publish(&registry, "models/peers:v1", &model(4));
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    let (pods, runtime_view, _unmount) = shared_pods_dir(daemon.dir.path());

    let target = pods.join("p/volumes/kubernetes.io~csi/model/mount");
    let pods_copy = runtime_view.join("p/volumes/kubernetes.io~csi/model/mount");
    node.node_publish_volume(publish_request("csi-peers", &target, &[("modelcache.io/reference", &reference)])).await.unwrap();
    assert_eq!(read_tree(&pods_copy), read_tree(source.path()));
    let error = std::fs::write(pods_copy.join("config.json"), b"overwritten").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()), "the pod's copy is writable: {error}");
    let copies = mounts_at(&pods_copy);
    assert!(!copies.is_empty() && copies.iter().all(|entry| entry.read_only), "{copies:?}");

    node.node_unpublish_volume(unpublish_request("csi-peers", &target)).await.unwrap();
    assert!(mounts_at(&target).is_empty());
    assert!(mounts_at(&pods_copy).is_empty(), "the unmount reaches the pod's copy");
}

/// A slow pull and a short deadline: a retryable code first while the pull
/// goes on, then OK on retry, with one download. An unpublish during a pull
/// releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_pulls_are_retried_and_released() {
    skip_unless!(support::is_root(), "bind mounts need root");
    let Some(registry) = start_registry() else { return };
    let files = vec![("big.safetensors", bytes(4, 192 * MIB)), ("config.json", b"{}".to_vec())];
    let (reference, source) = publish(&registry, "models/slow:v1", &files);
    let (abandoned, _abandoned_source) = publish(&registry, "models/abandoned:v1", &[("huge.safetensors", bytes(5, 192 * MIB))]);
    // Tags resolve through a proxy that holds every HEAD for 4 s, so a pull
    // surely outlasts the hurried calls' 3 s deadline however fast the
    // machine; the shim answers 500 ms before that deadline.
    let proxy = support::FlakyProxy::slow_heads(registry.port(), Duration::from_secs(4));
    let reference = reference.replace(&registry.host(), &proxy.host());
    let abandoned = abandoned.replace(&registry.host(), &proxy.host());
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", proxy.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    let target = daemon.dir.path().join("pods/slow/mount");
    let context = [("modelcache.io/reference", reference.as_str())];

    let mut hurried = Request::new(publish_request("csi-slow", &target, &context));
    hurried.set_timeout(Duration::from_secs(3));
    let status = node.node_publish_volume(hurried).await.unwrap_err();
    assert!(matches!(status.code(), Code::Aborted | Code::Unavailable | Code::DeadlineExceeded), "{status:?}");
    assert!(mounts_at(&target).is_empty());
    let mut patient = Request::new(publish_request("csi-slow", &target, &context));
    patient.set_timeout(Duration::from_secs(110));
    node.node_publish_volume(patient).await.unwrap();
    assert_eq!(read_tree(&target), read_tree(source.path()));
    assert_eq!(registry.blob_gets().get(&digest_of(&files[0].1)), Some(&1), "one download");
    node.node_unpublish_volume(unpublish_request("csi-slow", &target)).await.unwrap();

    let gone = daemon.dir.path().join("pods/gone/mount");
    let mut hurried = Request::new(publish_request("csi-gone", &gone, &[("modelcache.io/reference", &abandoned)]));
    hurried.set_timeout(Duration::from_secs(3));
    assert!(node.node_publish_volume(hurried).await.is_err());
    node.node_unpublish_volume(unpublish_request("csi-gone", &gone)).await.unwrap();
    let records: Vec<VolumeRecord> = daemon.client().get("/v1/volumes").await.unwrap();
    let record = records.iter().find(|record| record.volume.as_str() == "csi-gone").unwrap();
    assert_eq!(record.state(), VolumeState::Released, "the pull was released");
    let health: modelcache::api::Health = daemon.client().get("/v1/health").await.unwrap();
    assert_eq!(health.active_mounts, 0);
}

/// After a shim restart an existing mount is recognised and unpublishes;
/// large volume contexts, long target paths and odd static PV handles work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_large_requests_and_static_volumes() {
    skip_unless!(support::is_root(), "bind mounts need root");
    let Some(registry) = start_registry() else { return };
    let (reference, source) = publish(&registry, "models/static:v1", &model(6));
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);

    let long_target = daemon.dir.path().join(format!("pods/{}/volumes/kubernetes.io~csi/model/mount", "p".repeat(160)));
    assert!(long_target.display().to_string().len() > 128);
    let padding = "x".repeat(4096);
    let big_context = [("modelcache.io/reference", reference.as_str()), ("example.com/annotation", padding.as_str())];
    node.node_publish_volume(publish_request("csi-big", &long_target, &big_context)).await.unwrap();
    assert_eq!(read_tree(&long_target), read_tree(source.path()));

    // A pre-provisioned PV: any volume handle, the same publish path.
    let pv_target = daemon.dir.path().join("pods/pv/volumes/kubernetes.io~csi/pv-model/mount");
    let pv_context = [("modelcache.io/reference", reference.as_str()), ("modelcache.io/mount-id", "llm")];
    node.node_publish_volume(publish_request("models/llama weights", &pv_target, &pv_context)).await.unwrap();
    assert_eq!(read_tree(&pv_target), read_tree(source.path()));

    drop(shim);
    // The PV's record is lost (a wiped state directory): its live mount
    // shows this volume's tree, so a publish again adopts it.
    modelcache_csi::targets::Targets::new(daemon.dir.path().join("csi-state/targets")).remove(&pv_target).unwrap();
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    node.node_publish_volume(publish_request("csi-big", &long_target, &big_context)).await.unwrap();
    assert_eq!(mounts_at(&long_target).len(), 1, "recognised, not mounted again");
    node.node_publish_volume(publish_request("models/llama weights", &pv_target, &pv_context)).await.unwrap();
    assert_eq!(mounts_at(&pv_target).len(), 1, "adopted, not mounted again");
    // A mount of something else is no volume of ours: ALREADY_EXISTS.
    let foreign = daemon.dir.path().join("pods/foreign/volumes/kubernetes.io~csi/model/mount");
    std::fs::create_dir_all(&foreign).unwrap();
    assert!(support::mount_tmpfs(&foreign, "1m"));
    let _unmount_foreign = Unmount(foreign.clone());
    let status = node
        .node_publish_volume(publish_request("csi-foreign", &foreign, &[("modelcache.io/reference", &reference)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let records: Vec<VolumeRecord> = daemon.client().get("/v1/volumes").await.unwrap();
    let foreign_record = records.iter().find(|record| record.volume.as_str() == "csi-foreign").expect("its record");
    assert_eq!(foreign_record.state(), VolumeState::Released, "a final error releases its record");
    assert!(modelcache_csi::targets::Targets::new(shim.state.join("targets")).load(&foreign).is_none());
    for (volume, target) in [("csi-big", &long_target), ("models/llama weights", &pv_target)] {
        node.node_unpublish_volume(unpublish_request(volume, target)).await.unwrap();
        assert!(mounts_at(target).is_empty() && !target.exists());
    }
    let records: Vec<VolumeRecord> = daemon.client().get("/v1/volumes").await.unwrap();
    assert!(records.iter().all(|record| record.state() == VolumeState::Released), "{records:?}");
}

/// A publish for a pod of `namespace` with a `kubernetes.io/basic-auth`
/// pull secret (`nodePublishSecretRef`).
fn tenant_publish(
    volume: &str,
    target: &Path,
    reference: &str,
    namespace: &str,
    user: &str,
    password: &str,
) -> NodePublishVolumeRequest {
    let mut request = publish_request(
        volume,
        target,
        &[("modelcache.io/reference", reference), ("csi.storage.k8s.io/pod.namespace", namespace)],
    );
    request.secrets = [("username".to_owned(), user.to_owned()), ("password".to_owned(), password.to_owned())].into();
    request
}

/// A registry that claims every manifest: a HEAD for any digest answers 200
/// with that digest, a GET finds nothing. Returns its `host:port`.
fn lying_registry() -> String {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|read| read > 2) {
                header.clear();
            }
            let mut parts = line.split(' ');
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let claimed = path.split("/manifests/").nth(1).filter(|digest| digest.starts_with("sha256:"));
            let answer = match (method, claimed) {
                ("HEAD", Some(digest)) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                     Docker-Content-Digest: {digest}\r\nContent-Length: 500\r\nConnection: close\r\n\r\n"
                ),
                _ if path == "/v2/" => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_owned(),
                _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
            };
            let mut stream = stream;
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    host
}

/// Every file under `dir`, read whole (sockets and the like skipped).
fn every_file(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().filter_map(Result::ok) {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file()
                && let Ok(bytes) = std::fs::read(entry.path())
            {
                found.push((entry.path(), bytes));
            }
        }
    }
    found
}

/// Two tenants on one node, through the shim as kubelet drives it: tenant
/// A's pull secret reads `private/a`, tenant B's does not. B is refused the
/// tag before anything is cached, and again the same way once A's mount
/// put the model in the cache, by tag and by digest, with no blob requested
/// and nothing of the model where B could see it; B with a secret the
/// registry accepts is then served from the cache without a download. A
/// public model costs B no registry request at all after A mounted it. No
/// secret is left in a file, a log line or a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_get_only_what_their_pull_secrets_reach() {
    skip_unless!(support::is_root(), "bind mounts need root");
    let (a_password, b_password) = ("a-pass-7Qe2", "b-pass-Zx91");
    let Some(private) = Registry::start_with_htpasswd(&support::htpasswd("alice", a_password)) else { return };
    let Some(public) = start_registry() else { return };
    let pusher = tempfile::tempdir().unwrap();
    support::write_docker_config(pusher.path(), &support::basic_auth(&private.host(), "alice", a_password));
    let source = tempfile::tempdir().unwrap();
    support::write_tree(source.path(), &model(41));
    let tagged = private.reference("private/a:v1");
    let pushed = support::push_as(&private, source.path(), &tagged, Some(pusher.path()));
    let digest = pushed.rsplit_once('@').expect("a pinned reference").1;
    let by_digest = format!("{}@{digest}", private.reference("private/a"));
    let (public_model, public_source) = publish(&public, "public/m:v1", &model(42));

    let liar = lying_registry();
    let daemon =
        Daemon::start(&format!("[registries]\ninsecure = [\"{}\", \"{}\", \"{liar}\"]\n", private.host(), public.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 60_000);
    let mut node = NodeClient::new(shim.channel().await);
    let target = |name: &str| daemon.dir.path().join(format!("pods/{name}/volumes/kubernetes.io~csi/model/mount"));

    let before = node
        .node_publish_volume(tenant_publish("csi-b1", &target("b1"), &tagged, "tenant-b", "bob", b_password))
        .await
        .unwrap_err();
    assert_eq!(before.code(), Code::PermissionDenied, "{before:?}");

    node.node_publish_volume(tenant_publish("csi-a", &target("a"), &tagged, "tenant-a", "alice", a_password)).await.unwrap();
    assert_eq!(read_tree(&target("a")), read_tree(source.path()));
    let gets = private.blob_gets();

    let cached_tag = node
        .node_publish_volume(tenant_publish("csi-b2", &target("b2"), &tagged, "tenant-b", "bob", b_password))
        .await
        .unwrap_err();
    assert_eq!(
        (cached_tag.code(), cached_tag.message()),
        (before.code(), before.message()),
        "the cache changes nothing B learns"
    );
    let cached_digest = node
        .node_publish_volume(tenant_publish("csi-b3", &target("b3"), &by_digest, "tenant-b", "bob", b_password))
        .await
        .unwrap_err();
    assert_eq!(cached_digest.code(), Code::PermissionDenied, "{cached_digest:?}");
    assert_eq!(cached_digest.message(), before.message().replace(&tagged, &by_digest));
    // A registry of B's choosing that claims A's digest proves nothing: only
    // a repository that served the manifest's bytes may answer a HEAD.
    let claimed = format!("{liar}/mine/a@{digest}");
    let lie = node.node_publish_volume(tenant_publish("csi-b5", &target("b5"), &claimed, "tenant-b", "bob", b_password)).await;
    assert!(lie.is_err(), "a HEAD from a registry that lacks the manifest must not prove access");
    assert_eq!(private.blob_gets(), gets, "a refused tenant makes no blob request");
    for volume in ["b1", "b2", "b3", "b5"] {
        assert!(mounts_at(&target(volume)).is_empty() && every_file(&target(volume)).is_empty(), "{volume} sees nothing");
    }
    let volumes = daemon.dir.path().join("root/volumes");
    for (path, _) in every_file(&volumes) {
        assert!(!path.to_string_lossy().contains("csi-b"), "a refused volume holds {}", path.display());
    }

    // B's own secret, once the registry accepts it: served from the cache.
    private.set_htpasswd(&(support::htpasswd("alice", a_password) + &support::htpasswd("bob", b_password)));
    node.node_publish_volume(tenant_publish("csi-b4", &target("b4"), &by_digest, "tenant-b", "bob", b_password)).await.unwrap();
    assert_eq!(read_tree(&target("b4")), read_tree(source.path()));
    assert_eq!(private.blob_gets(), gets, "served from the cache");
    let records: Vec<VolumeRecord> = daemon.client().get("/v1/volumes").await.unwrap();
    let b4 = records.iter().find(|record| record.volume.as_str() == "csi-b4").unwrap();
    assert_eq!(b4.requester.as_ref().and_then(|requester| requester.namespace.as_deref()), Some("tenant-b"));
    assert_eq!(b4.access, Some(modelcache_api::record::Proof::PullSecret));

    // A public model: B after A asks the registry nothing.
    node.node_publish_volume(tenant_publish("csi-pa", &target("pa"), &public_model, "tenant-a", "alice", a_password))
        .await
        .unwrap();
    let asked = public.requests_for("/v2/");
    node.node_publish_volume(tenant_publish("csi-pb", &target("pb"), &public_model, "tenant-b", "bob", b_password))
        .await
        .unwrap();
    assert_eq!(read_tree(&target("pb")), read_tree(public_source.path()));
    assert_eq!(public.requests_for("/v2/"), asked, "a public model is checked once, for everyone");

    for volume in ["a", "b4", "pa", "pb"] {
        node.node_unpublish_volume(unpublish_request(&format!("csi-{volume}"), &target(volume))).await.unwrap();
    }
    let metrics = daemon.metrics_text();
    let logs = daemon.log_text() + &std::fs::read_to_string(daemon.dir.path().join("csi.log")).unwrap();
    drop(shim);
    for password in [a_password, b_password] {
        assert!(!logs.contains(password) && !metrics.contains(password), "a secret in the logs or metrics");
        for (path, bytes) in every_file(daemon.dir.path()) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(password), "a secret in {}", path.display());
        }
    }
}

/// With the daemon down, an unpublish still takes the pod's mount away and
/// answers OK (an error would be retried for ever and keep the pod
/// Terminating); the release is owed, and made once the daemon is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_with_the_daemon_down_releases_when_it_returns() {
    skip_unless!(support::is_root(), "bind mounts need root");
    let Some(registry) = start_registry() else { return };
    let (reference, source) = publish(&registry, "models/drain:v1", &model(7));
    let mut daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    let target = daemon.dir.path().join("pods/drain/volumes/kubernetes.io~csi/model/mount");
    node.node_publish_volume(publish_request("csi-drain", &target, &[("modelcache.io/reference", &reference)])).await.unwrap();
    assert_eq!(read_tree(&target), read_tree(source.path()));
    let records: Vec<VolumeRecord> = daemon.client().get("/v1/volumes").await.unwrap();
    let mount_id = records.iter().find(|record| record.volume.as_str() == "csi-drain").unwrap().mount_id.clone();

    daemon.terminate();
    node.node_unpublish_volume(unpublish_request("csi-drain", &target)).await.unwrap();
    assert!(mounts_at(&target).is_empty() && !target.exists(), "the pod's side is done");
    assert_eq!(std::fs::read_dir(shim.state.join("releases")).unwrap().count(), 1, "the release is owed");

    daemon.spawn();
    let path = format!("/v1/volumes/csi-drain/{mount_id}");
    let started = Instant::now();
    loop {
        let record: VolumeRecord = daemon.client().get(&path).await.unwrap();
        if record.state() == VolumeState::Released {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the owed release never came: {record:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    while std::fs::read_dir(shim.state.join("releases")).unwrap().count() > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "a done release is still kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// kubelet's directory reached through a symlink: the mount table shows
/// the resolved path, yet a publish again mounts nothing more and the
/// unpublish takes the mount away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_kubelet_dir_mounts_once() {
    skip_unless!(support::is_root(), "bind mounts need root");
    let Some(registry) = start_registry() else { return };
    let (reference, source) = publish(&registry, "models/linked:v1", &model(8));
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    let real = daemon.dir.path().join("kubelet-real");
    std::fs::create_dir_all(real.join("pods")).unwrap();
    std::os::unix::fs::symlink(&real, daemon.dir.path().join("kubelet")).unwrap();
    let target = daemon.dir.path().join("kubelet/pods/linked/volumes/kubernetes.io~csi/model/mount");
    let resolved = real.canonicalize().unwrap().join("pods/linked/volumes/kubernetes.io~csi/model/mount");
    let context = [("modelcache.io/reference", reference.as_str())];

    node.node_publish_volume(publish_request("csi-linked", &target, &context)).await.unwrap();
    node.node_publish_volume(publish_request("csi-linked", &target, &context)).await.unwrap();
    assert_eq!(mounts_at(&resolved).len(), 1, "one mount, however the path is spelt");
    assert_eq!(read_tree(&target), read_tree(source.path()));
    node.node_unpublish_volume(unpublish_request("csi-linked", &target)).await.unwrap();
    assert!(mounts_at(&resolved).is_empty());
    assert!(!resolved.exists(), "the target is removed");
}

/// Every call is a log line (method, volume, pod, code, duration) and is
/// counted; published volumes are counted by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_logged_and_counted() {
    skip_unless!(support::is_root(), "bind mounts need root");
    let Some(registry) = start_registry() else { return };
    let (reference, _source) = publish(&registry, "models/counted:v1", &model(9));
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let port = support::free_port();
    let address = format!("127.0.0.1:{port}");
    let shim = Shim::start_with(daemon.dir.path(), &daemon.socket, 100, &["--metrics-address", &address]);
    let mut node = NodeClient::new(shim.channel().await);
    let target = daemon.dir.path().join("pods/counted/volumes/kubernetes.io~csi/model/mount");
    let context = [("modelcache.io/reference", reference.as_str()), ("csi.storage.k8s.io/ephemeral", "true")];
    node.node_publish_volume(publish_request("csi-counted", &target, &context)).await.unwrap();
    let absent = registry.reference("models/absent:v1");
    let missing = daemon.dir.path().join("pods/missing/volumes/kubernetes.io~csi/model/mount");
    node.node_publish_volume(publish_request("csi-missing", &missing, &[("modelcache.io/reference", &absent)]))
        .await
        .unwrap_err();

    let scrape = || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(&address).unwrap();
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    let text = scrape();
    for line in [
        r#"modelcache_csi_calls_total{method="NodePublishVolume",code="OK"} 1"#,
        r#"modelcache_csi_calls_total{method="NodePublishVolume",code="NOT_FOUND"} 1"#,
        r#"modelcache_csi_call_duration_seconds_count{method="NodePublishVolume"} 2"#,
        r#"modelcache_csi_published_volumes{kind="ephemeral"} 1"#,
        r#"modelcache_csi_published_volumes{kind="persistent"} 0"#,
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
    node.node_unpublish_volume(unpublish_request("csi-counted", &target)).await.unwrap();
    assert!(scrape().contains(r#"modelcache_csi_published_volumes{kind="ephemeral"} 0"#));

    let log = std::fs::read_to_string(daemon.dir.path().join("csi.log")).unwrap();
    let published = log.lines().find(|line| line.contains("NodePublishVolume") && line.contains("csi-counted")).expect(&log);
    for field in ["pod=\"default/pod-0\"", "code=\"OK\"", "duration_ms="] {
        assert!(published.contains(field), "no {field} in {published}");
    }
    let failed = log.lines().find(|line| line.contains("NodePublishVolume") && line.contains("csi-missing")).expect(&log);
    assert!(failed.contains("NOT_FOUND") && failed.contains("not found"), "{failed}");
}

/// Dynamic provisioning as the external-provisioner drives it: the
/// controller creates a volume from StorageClass parameters (what
/// csi-sanity checks of CreateVolume, DeleteVolume and
/// ValidateVolumeCapabilities), and the node publishes the created volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_provisioning() {
    let Some(registry) = start_registry() else { return };
    let (reference, source) = publish(&registry, "models/provisioned:v1", &model(10));
    let other = registry.reference("models/other:v1");
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let controller_dir = tempfile::tempdir().unwrap();
    let controller_shim = Shim::start_with(controller_dir.path(), Path::new("/nonexistent"), 100, &["--mode", "controller"]);
    let channel = controller_shim.channel().await;
    let mut identity = IdentityClient::new(channel.clone());
    let capabilities = identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    let services: Vec<i32> = capabilities
        .capabilities
        .iter()
        .filter_map(|capability| match &capability.r#type {
            Some(plugin_capability::Type::Service(service)) => Some(service.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(services, [plugin_capability::service::Type::ControllerService as i32]);
    assert_eq!(identity.probe(ProbeRequest {}).await.unwrap().into_inner().ready, Some(true), "no daemon needed");
    let mut controller = ControllerClient::new(channel);
    let offered = controller.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let rpcs: Vec<i32> = offered
        .capabilities
        .iter()
        .filter_map(|capability| capability.r#type.as_ref())
        .map(|controller_service_capability::Type::Rpc(rpc)| rpc.r#type)
        .collect();
    assert_eq!(rpcs, [controller_service_capability::rpc::Type::CreateDeleteVolume as i32]);

    let reader = VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::MultiNodeReaderOnly as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    };
    let create = |name: &str, model: &str| CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
        volume_capabilities: vec![reader.clone()],
        parameters: [
            ("modelcache.io/reference", model),
            ("csi.storage.k8s.io/pvc/name", "llama"),
            ("csi.storage.k8s.io/pvc/namespace", "default"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect(),
        ..CreateVolumeRequest::default()
    };
    let code = |result: Result<tonic::Response<CreateVolumeResponse>, tonic::Status>| result.unwrap_err().code();
    assert_eq!(code(controller.create_volume(create("", &reference)).await), Code::InvalidArgument);
    let mut no_capability = create("pvc-1", &reference);
    no_capability.volume_capabilities.clear();
    assert_eq!(code(controller.create_volume(no_capability).await), Code::InvalidArgument);
    let mut writer = create("pvc-1", &reference);
    writer.volume_capabilities[0].access_mode = Some(AccessMode { mode: Mode::SingleNodeWriter as i32 });
    let status = controller.create_volume(writer).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("ReadOnlyMany"), "{}", status.message());
    let mut misspelt = create("pvc-1", &reference);
    misspelt.parameters.insert("modelcache.io/refrence".into(), reference.clone());
    assert_eq!(code(controller.create_volume(misspelt).await), Code::InvalidArgument);

    let volume = controller.create_volume(create("pvc-1", &reference)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(volume.volume_id, "pvc-1");
    assert_eq!(volume.capacity_bytes, 1 << 30);
    assert_eq!(volume.volume_context.get("modelcache.io/reference"), Some(&reference));
    assert_eq!(volume.volume_context.len(), 1, "the provisioner's keys stay out: {:?}", volume.volume_context);
    let again = controller.create_volume(create("pvc-1", &reference)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again, volume, "CreateVolume is idempotent");
    assert_eq!(code(controller.create_volume(create("pvc-1", &other)).await), Code::AlreadyExists);

    let validate = |volume_id: &str, capability: VolumeCapability| ValidateVolumeCapabilitiesRequest {
        volume_id: volume_id.into(),
        volume_capabilities: vec![capability],
        ..ValidateVolumeCapabilitiesRequest::default()
    };
    let answer = controller.validate_volume_capabilities(validate("pvc-1", reader.clone())).await.unwrap().into_inner();
    assert!(answer.confirmed.is_some(), "{answer:?}");
    let mut writes = reader.clone();
    writes.access_mode = Some(AccessMode { mode: Mode::MultiNodeMultiWriter as i32 });
    let answer = controller.validate_volume_capabilities(validate("pvc-1", writes)).await.unwrap().into_inner();
    assert!(answer.confirmed.is_none() && answer.message.contains("read-only"), "{answer:?}");
    let status = controller.validate_volume_capabilities(validate("pvc-absent", reader.clone())).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    if support::is_root() {
        // The node publishes the created volume with the context it carries.
        let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
        let mut node = NodeClient::new(shim.channel().await);
        let target = daemon.dir.path().join("pods/claimer/volumes/kubernetes.io~csi/pvc-1/mount");
        let context: Vec<(&str, &str)> =
            volume.volume_context.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
        node.node_publish_volume(publish_request(&volume.volume_id, &target, &context)).await.unwrap();
        assert_eq!(read_tree(&target), read_tree(source.path()));
        node.node_unpublish_volume(unpublish_request(&volume.volume_id, &target)).await.unwrap();
    } else {
        support::skipping("publishing the provisioned volume bind-mounts, which needs root");
    }

    let delete = |volume_id: &str| DeleteVolumeRequest { volume_id: volume_id.into(), ..DeleteVolumeRequest::default() };
    controller.delete_volume(delete("pvc-1")).await.unwrap();
    controller.delete_volume(delete("pvc-1")).await.unwrap();
    assert_eq!(controller.delete_volume(delete("")).await.unwrap_err().code(), Code::InvalidArgument);
    let status = controller.validate_volume_capabilities(validate("pvc-1", reader)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "deleted");
}

/// A runtime volume: an inline volume naming no model gets a read-only
/// directory with the volume's socket in `api/`; through it the pod mounts
/// models, which appear under `models/` in a mount namespace made before
/// they were mounted (a running pod's), and go when unmounted. The socket
/// touches only its volume; the unpublish closes it and releases every
/// model the pod mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_volumes_mount_models_through_their_socket() {
    skip_unless!(support::is_root(), "mounts need root");
    let Some(registry) = start_registry() else { return };
    let (first, first_source) = publish(&registry, "models/first:v1", &model(11));
    let (second, second_source) = publish(&registry, "models/second:v1", &model(12));
    let mut daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let shim = Shim::start(daemon.dir.path(), &daemon.socket, 100);
    let mut node = NodeClient::new(shim.channel().await);
    let (pods, runtime_view, _unmount) = shared_pods_dir(daemon.dir.path());

    let target = pods.join("rt/volumes/kubernetes.io~csi/models/mount");
    let pod_view = runtime_view.join("rt/volumes/kubernetes.io~csi/models/mount");
    let context = [("csi.storage.k8s.io/ephemeral", "true")];
    node.node_publish_volume(publish_request("csi-runtime", &target, &context)).await.unwrap();
    node.node_publish_volume(publish_request("csi-runtime", &target, &context)).await.unwrap();
    assert_eq!(std::fs::read_dir(pod_view.join("models")).unwrap().count(), 0, "no model yet");
    let error = std::fs::create_dir(pod_view.join("models/x")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()), "{error}");

    // A mount namespace made now, as a running pod's: it must see what is
    // mounted from here on.
    let mut namespace = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "unchanged", "sleep", "120"])
        .spawn()
        .expect("unshare");
    let listed_in_namespace = |dir: &Path| -> Vec<String> {
        let output = std::process::Command::new("nsenter")
            .args(["-t", &namespace.id().to_string(), "-m", "ls", "-1"])
            .arg(dir)
            .output()
            .expect("nsenter");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The pod's side: its socket, in its view.
    let pod_client = modelcache::api::client::Client::new(pod_view.join("api/api.sock"));
    let body = |reference: &str| serde_json::json!({ "reference": reference, "wait-seconds": 60.0 });
    // `_` is the socket's own volume, whose id the pod cannot know.
    for (path, reference) in [("/v1/volumes/_/first", &first), ("/v1/volumes/csi-runtime/second", &second)] {
        let record: VolumeRecord = pod_client.put(path, &body(reference)).await.unwrap().body;
        assert_eq!(record.state(), VolumeState::Ready, "{record:?}");
    }
    assert_eq!(read_tree(&pod_view.join("models/first")), read_tree(first_source.path()));
    assert_eq!(read_tree(&pod_view.join("models/second")), read_tree(second_source.path()));
    assert_eq!(listed_in_namespace(&pod_view.join("models")), ["first", "second"]);
    let error = std::fs::write(pod_view.join("models/first/config.json"), b"overwritten").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(rustix::io::Errno::ROFS.raw_os_error()), "{error}");

    let _: VolumeRecord = pod_client.delete("/v1/volumes/csi-runtime/second").await.unwrap();
    assert_eq!(listed_in_namespace(&pod_view.join("models")), ["first"], "an unmounted model goes");
    // The daemon restarts: the pod's socket, at the same place, is served
    // again, and what it mounts still appears.
    daemon.terminate();
    daemon.spawn();
    let _: serde_json::Value = daemon.client().get("/v1/health").await.unwrap();
    let record: VolumeRecord = pod_client.put("/v1/volumes/_/again", &body(&second)).await.unwrap().body;
    assert_eq!(record.state(), VolumeState::Ready, "{record:?}");
    assert_eq!(listed_in_namespace(&pod_view.join("models")), ["again", "first"]);
    let refused = pod_client.put::<_, VolumeRecord>("/v1/volumes/csi-other/first", &body(&first)).await.unwrap_err();
    assert_eq!(refused.kind(), modelcache::error::ErrorKind::PermissionDenied, "{refused}");

    node.node_unpublish_volume(unpublish_request("csi-runtime", &target)).await.unwrap();
    let _ = namespace.kill();
    let _ = namespace.wait();
    assert!(mounts_at(&target).is_empty() && mounts_at(&pod_view).is_empty());
    assert!(!target.exists());
    let records: Vec<VolumeRecord> = daemon.client().get("/v1/volumes").await.unwrap();
    let runtime: Vec<_> = records.iter().filter(|record| record.volume.as_str() == "csi-runtime").collect();
    assert_eq!(runtime.len(), 3);
    assert!(runtime.iter().all(|record| record.state() == VolumeState::Released), "{runtime:?}");
    let socket = daemon.client().delete::<serde_json::Value>("/v1/volume-sockets/csi-runtime").await.unwrap_err();
    assert_eq!(socket.kind(), modelcache::error::ErrorKind::NotFound, "the socket is closed");
}
