//! Plugins built against `modelcache:policy@0.1.0`, served unchanged: each
//! decision's current request lowered to its 0.1 shape (0.2 only added the
//! requester and the admission decision), and the 0.1 answer read back as
//! the current one. 0.1 plugins are called through the same runtime,
//! limits and checks; they just cannot see who asks.

use super::bindings::{exclude, gc, quota, types, v0_1};
use super::{FailureCause, Plugin};

fn filesystem(filesystem: types::Filesystem) -> v0_1::types::Filesystem {
    v0_1::types::Filesystem { total_bytes: filesystem.total_bytes, free_bytes: filesystem.free_bytes }
}

/// The exclude decision of a 0.1 plugin.
pub(super) fn exclude(
    plugin: &Plugin,
    indices: &v0_1::exclude::GuestIndices,
    request: &exclude::Request<'_>,
) -> Result<Result<Vec<exclude::Skip>, String>, FailureCause> {
    let annotations: Vec<_> = request
        .artifact
        .annotations
        .iter()
        .map(|annotation| v0_1::types::Annotation { key: annotation.key, value: annotation.value })
        .collect();
    let files: Vec<_> = request
        .files
        .iter()
        .map(|file| v0_1::exclude::ModelFile {
            path: file.path,
            size: file.size,
            media_type: file.media_type,
            layer_digest: file.layer_digest,
        })
        .collect();
    let legacy = v0_1::exclude::Request {
        artifact: v0_1::exclude::Artifact {
            reference: request.artifact.reference,
            manifest_digest: request.artifact.manifest_digest,
            annotations: &annotations,
        },
        files: &files,
        options: v0_1::exclude::Options { exclude_weights: request.options.exclude_weights, patterns: request.options.patterns },
        settings: request.settings,
    };
    let answer =
        plugin.call("exclude", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, legacy))?;
    Ok(answer.map(|skips| skips.into_iter().map(|skip| exclude::Skip { path: skip.path, reason: skip.reason }).collect()))
}

/// The quota decision of a 0.1 plugin.
pub(super) fn quota(
    plugin: &Plugin,
    indices: &v0_1::quota::GuestIndices,
    request: &quota::Request<'_>,
) -> Result<Result<quota::Verdict, String>, FailureCause> {
    let legacy = v0_1::quota::Request {
        reference: request.reference,
        manifest_digest: request.manifest_digest,
        incoming_bytes: request.incoming_bytes,
        cache_bytes: request.cache_bytes,
        reserved_bytes: request.reserved_bytes,
        filesystem: filesystem(request.filesystem),
        settings: request.settings,
    };
    let answer = plugin.call("quota", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, legacy))?;
    Ok(answer.map(|verdict| match verdict {
        v0_1::quota::Verdict::Admit => quota::Verdict::Admit,
        v0_1::quota::Verdict::Deny(reason) => quota::Verdict::Deny(reason),
    }))
}

/// The gc decision of a 0.1 plugin: the same request, under 0.1's names.
pub(super) fn gc(
    plugin: &Plugin,
    indices: &v0_1::gc::GuestIndices,
    request: &gc::Request<'_>,
) -> Result<Result<Vec<String>, String>, FailureCause> {
    let candidates: Vec<_> = request
        .candidates
        .iter()
        .map(|candidate| v0_1::gc::Candidate {
            key: candidate.key,
            manifest_digest: candidate.manifest_digest,
            references: candidate.references,
            bytes_on_disk: candidate.bytes_on_disk,
            exclusive_bytes: candidate.exclusive_bytes,
            created_at: candidate.created_at,
            last_used_at: candidate.last_used_at,
            use_count: candidate.use_count,
        })
        .collect();
    let legacy = v0_1::gc::Request {
        filesystem: filesystem(request.filesystem),
        cache_bytes: request.cache_bytes,
        now: request.now,
        candidates: &candidates,
        settings: request.settings,
    };
    plugin.call("gc", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, legacy))
}
