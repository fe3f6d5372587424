//! Any bytes as a manifest: parsed or refused, never a panic; an accepted
//! model's paths are valid, distinct and not nested, and any selection of
//! it has a key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelcache_fuzz::digest::Digest;
use modelcache_fuzz::modelpack::{Model, ModelPath};

fuzz_target!(|bytes: &[u8]| {
    let Ok(model) = Model::parse(&Digest::of(bytes), bytes) else { return };
    for layer in &model.layers {
        assert_eq!(ModelPath::parse(layer.path.as_str()).as_ref(), Ok(&layer.path));
        for other in &model.layers {
            assert!(other.index == layer.index || !layer.path.is_within(&other.path), "nested layers accepted");
        }
    }
    let skipped: Vec<&str> = model.layers.iter().step_by(2).map(|layer| layer.path.as_str()).collect();
    let selection = model.select(skipped);
    assert!(selection.layers(&model).count() <= model.layers.len());
});
