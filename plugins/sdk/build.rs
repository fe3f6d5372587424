//! Bakes the location of the WIT package into the `generate!` macro, so a
//! policy crate gets its bindings without vendoring the WIT files.

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    // A packaged SDK carries its own copy in `wit/`; in this repository the
    // package lives at the top.
    let wit = [manifest_dir.join("wit"), manifest_dir.join("../../wit")]
        .into_iter()
        .find(|dir| dir.join("policy.wit").is_file())
        .expect("the modelcache:policy WIT package (wit/policy.wit) is missing");
    let wit = wit.canonicalize().unwrap();
    println!("cargo::rerun-if-changed={}", wit.display());

    let path = format!("{:?}", wit.display().to_string());
    let source = format!(
        r#"
/// Generates the bindings of one `modelcache:policy` world in the calling
/// module: `"admission-policy"`, `"exclude-policy"`, `"quota-policy"`,
/// `"gc-policy"` or `"full-policy"`. Then implement
/// `exports::modelcache::policy::settings::Guest` and the decision's `Guest`
/// trait on one type and call `export!(Type)`.
#[macro_export]
macro_rules! generate {{
    ($world:literal) => {{
        $crate::wit_bindgen::generate!({{
            path: {path},
            world: $world,
            runtime_path: "::modelcache_policy::wit_bindgen::rt",
            additional_derives: [PartialEq],
        }});
    }};
}}
"#
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("generate.rs");
    std::fs::write(out, source).unwrap();
}
