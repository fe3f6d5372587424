//! The cluster tier: nodes (daemons, each its own root) that name the
//! shipped nginx tier as their registry mirror, against a real origin.

use crate::support;

use modelcache::api::MountBody;
use modelcache::api::client::Client;
use modelcache::volumes::VolumeRecord;
use support::{
    CacheTier, Daemon, Registry, basic_auth, bytes, digest_of, htpasswd, push_as, read_tree, write_docker_config, write_tree,
};

const MIB: usize = 1 << 20;

/// More than one of the tier's 16 MiB slices, and two small files.
fn model() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.safetensors", bytes(21, 20 * MIB)),
        ("config.json", b"{\"layers\": 2}".to_vec()),
        ("tokenizer/vocab.txt", bytes(22, 64 * 1024)),
    ]
}

fn start_tier(origin: &Registry) -> Option<CacheTier> {
    if !support::is_root() {
        support::skipping("nginx's cache tier runs as root here (its default paths)");
        return None;
    }
    let tier = CacheTier::start(origin);
    if tier.is_none() {
        support::skipping("nginx is not installed (apt-get install nginx-light)");
    }
    tier
}

/// A node whose mirror for `origin` is the tier, with `docker_config`'s
/// credentials (for both hosts) if any.
fn node(origin: &Registry, tier: &CacheTier, docker_config: Option<&std::path::Path>) -> Daemon {
    let credentials = docker_config.map(|dir| format!("docker-config = {dir:?}\n")).unwrap_or_default();
    Daemon::start(&format!(
        "[registries]\ninsecure = [\"{origin}\", \"{tier}\"]\n{credentials}[registries.mirrors.\"{origin}\"]\nendpoints = [\"http://{tier}\"]\n",
        origin = origin.host(),
        tier = tier.host(),
    ))
}

async fn mount(client: &Client, volume: &str, reference: &str) -> VolumeRecord {
    let body = MountBody { reference: reference.into(), wait_seconds: 120.0, ..MountBody::default() };
    client.put::<_, VolumeRecord>(&format!("/v1/volumes/{volume}/default"), &body).await.expect("a mount through the tier").body
}

/// Four nodes mount one model at the same moment through the tier: each gets
/// the whole model, and the origin serves each blob's bytes once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_herd_of_nodes_costs_the_origin_one_copy() {
    let Some(origin) = support::start_registry() else { return };
    let Some(tier) = start_tier(&origin) else { return };
    let files = model();
    let source = tempfile::tempdir().unwrap();
    write_tree(source.path(), &files);
    let reference = origin.reference("models/herd:v1");
    push_as(&origin, source.path(), &reference, None);

    let nodes: Vec<Daemon> = (0..4).map(|_| node(&origin, &tier, None)).collect();
    let mounts = nodes.iter().map(|node| {
        let client = node.client();
        let reference = reference.clone();
        tokio::spawn(async move { mount(&client, "pod", &reference).await })
    });
    for record in futures_util::future::join_all(mounts).await {
        assert_eq!(read_tree(&record.unwrap().path), read_tree(source.path()), "every node gets the whole model");
    }

    let served = origin.blob_bytes_served();
    for (path, content) in &files {
        let digest = digest_of(content);
        assert_eq!(served.get(&digest).copied(), Some(content.len() as u64), "{path}: the origin serves its bytes once");
    }
    assert!(tier.blob_gets_served() >= 4 * files.len(), "the nodes were served by the tier: {}", tier.error_log());
}

/// The tier holds a private model after an entitled node pulled it; what it
/// holds goes only to whom the origin would serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tier_serves_a_private_blob_only_to_whom_the_origin_would() {
    let Some(origin) = Registry::start_with_htpasswd(&htpasswd("reader", "s3cret")) else { return };
    let Some(tier) = start_tier(&origin) else { return };
    let files = model();
    let source = tempfile::tempdir().unwrap();
    write_tree(source.path(), &files);
    let secrets = tempfile::tempdir().unwrap();
    let mut auths = basic_auth(&origin.host(), "reader", "s3cret");
    auths["auths"][tier.host()] = auths["auths"][origin.host()].clone();
    write_docker_config(secrets.path(), &auths);
    let reference = origin.reference("models/private:v1");
    push_as(&origin, source.path(), &reference, Some(secrets.path()));

    let entitled = node(&origin, &tier, Some(secrets.path()));
    let record = mount(&entitled.client(), "pod", &reference).await;
    assert_eq!(read_tree(&record.path), read_tree(source.path()));
    assert!(tier.blob_gets_served() >= files.len(), "the node was served by the tier: {}", tier.error_log());
    let weights = digest_of(&files[0].1);
    let before = origin.blob_bytes_served();
    assert_eq!(before.get(&weights).copied(), Some(files[0].1.len() as u64), "the tier holds the weights");

    let path = format!("/v2/models/private/blobs/{weights}");
    // A path the cache would read as the private blob's once its dot
    // segments are resolved, but that the check would put to the origin as
    // sent: under another repository (one the requester may read, say).
    let public = format!("/v2/models/public/blobs/{weights}");
    let dotted = format!("{public}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/models/private/blobs/{weights}");
    for (who, path, credentials) in [
        ("nobody", path.clone(), None),
        ("a wrong password", path.clone(), Some("reader:guess")),
        ("a path with dot segments", dotted, None),
        ("a doubled slash", format!("/v2/models//private/blobs/{weights}"), None),
        ("a query", format!("{path}?x=1"), None),
        // The cache is keyed by repository: another one's path is a miss,
        // and the origin knows no such blob there.
        ("another repository", public, Some("reader:s3cret")),
    ] {
        let (status, body) = tier.get(&path, credentials);
        assert!(status >= 400, "{who}: {status}");
        if path.contains("%2e") || path.contains("//") || path.contains('?') {
            assert_eq!(status, 400, "{who}: the tier refuses a path the origin might read otherwise");
        }
        assert!(body.len() < MIB, "{who} gets none of the weights ({} bytes)", body.len());
    }
    let (status, body) = tier.get(&path, Some("reader:s3cret"));
    assert_eq!(status, 200, "{}", tier.error_log());
    assert!(body == files[0].1, "the entitled get the weights");
    assert_eq!(origin.blob_bytes_served().get(&weights), before.get(&weights), "from the tier, not the origin");
}
