//! The TLS fixture: a private certificate authority and a server certificate
//! for 127.0.0.1, made with the openssl command.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::skipping;

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
