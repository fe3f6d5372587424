//! A policy for the runtime's tests. Its `mode` setting picks a misbehaviour,
//! the same for every decision:
//! - `well` (default): admission admits (node credentials, no tenant),
//!   exclude skips `*.md`, quota admits, gc evicts all;
//! - `loop`: never returns;
//! - `grow`: allocates until the memory cap stops it;
//! - `panic`: panics (a trap);
//! - `lie`: answers with a path or key that is not in the input (admission,
//!   which has no such answer, behaves well);
//! - `refuse`: answers `err(...)`;
//! - `chatty`: prints to stdout and stderr, then behaves well;
//! - `sleep`: sleeps 30 s (a blocking WASI clock pollable), then behaves well.
//!
//! `validate-mode` applies the same to `validate-settings`. `only-reference`,
//! when set, limits `mode` to the admission, exclude and quota requests whose
//! reference contains it; the others are served well.

modelcache_policy::generate!("full-policy");

use exports::modelcache::policy::{admission, exclude, gc, quota, settings};
use serde::Deserialize;

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct Settings {
    mode: Option<String>,
    validate_mode: Option<String>,
    only_reference: Option<String>,
}

impl Settings {
    /// The mode for a request about `reference`.
    fn mode_for(&self, reference: &str) -> Option<&str> {
        match &self.only_reference {
            Some(only) if !reference.contains(only.as_str()) => None,
            _ => self.mode.as_deref(),
        }
    }
}

fn parse(settings: &str) -> Settings {
    modelcache_policy::parse_settings(settings).unwrap_or_default()
}

/// Misbehaves as `mode` says; returns normally only for `well` and `chatty`.
fn misbehave(mode: Option<&str>) -> Result<(), String> {
    match mode.unwrap_or("well") {
        "loop" => {
            let mut counter: u64 = 0;
            loop {
                counter = std::hint::black_box(counter.wrapping_add(1));
            }
        }
        "grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 8 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "panic" => panic!("hostile policy panics on purpose"),
        "refuse" => Err("hostile policy refuses".to_owned()),
        "chatty" => {
            println!("hello from the policy's stdout");
            eprintln!("hello from the policy's stderr");
            Ok(())
        }
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_secs(30));
            Ok(())
        }
        _ => Ok(()),
    }
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        misbehave(parse(&settings).validate_mode.as_deref())
    }
}

impl exclude::Guest for Policy {
    fn decide(request: exclude::Request) -> Result<Vec<exclude::Skip>, String> {
        let settings = parse(&request.settings);
        let mode = settings.mode_for(&request.artifact.reference);
        misbehave(mode)?;
        if mode == Some("lie") {
            return Ok(vec![exclude::Skip { path: "../not-in-the-model".into(), reason: "lies".into() }]);
        }
        Ok(request
            .files
            .into_iter()
            .filter(|file| file.path.ends_with(".md"))
            .map(|file| exclude::Skip { path: file.path, reason: "hostile: markdown".into() })
            .collect())
    }
}

impl admission::Guest for Policy {
    fn decide(request: admission::Request) -> Result<admission::Verdict, String> {
        misbehave(parse(&request.settings).mode_for(&request.reference.text))?;
        Ok(admission::Verdict::Admit(admission::Grant { node_credentials: true, tenant: None }))
    }
}

impl quota::Guest for Policy {
    fn decide(request: quota::Request) -> Result<quota::Verdict, String> {
        misbehave(parse(&request.settings).mode_for(&request.reference))?;
        Ok(quota::Verdict::Admit)
    }
}

impl gc::Guest for Policy {
    fn decide(request: gc::Request) -> Result<Vec<String>, String> {
        let mode = parse(&request.settings).mode;
        misbehave(mode.as_deref())?;
        if mode.as_deref() == Some("lie") {
            return Ok(vec!["no-such-key".into()]);
        }
        Ok(request.candidates.into_iter().map(|candidate| candidate.key).collect())
    }
}

#[cfg(target_arch = "wasm32")]
export!(Policy);
