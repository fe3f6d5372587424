//! Any bytes as a tar layer: read entry by entry through the layer rules,
//! as unpacking does. Nothing may panic, allocate past the caps, or yield
//! an entry outside the layer's path.
#![no_main]

use std::collections::HashMap;
use std::io::Read;

use libfuzzer_sys::fuzz_target;
use modelcache_fuzz::archive::ArchiveReader;
use modelcache_fuzz::modelpack::{ModelPath, Node, TarAction, TarRules, check_tree};

fuzz_target!(|bytes: &[u8]| {
    let layer = ModelPath::parse("pkg").unwrap();
    let mut rules = TarRules::new(&layer);
    let mut reader = ArchiveReader::new(bytes);
    let mut nodes = HashMap::new();
    while let Ok(Some(entry)) = reader.next_entry() {
        let kind = entry.kind;
        let (Ok(name), Ok(link)) = (String::from_utf8(entry.name), entry.link.map(String::from_utf8).transpose()) else {
            break;
        };
        let Ok(action) = rules.check(&name, kind, link.as_deref()) else { break };
        let (path, node) = match action {
            TarAction::Skip => continue,
            TarAction::Directory(path) => (path, Node::Directory),
            TarAction::File(path) => (path, Node::File),
            TarAction::Symlink(path, target) => (path, Node::Symlink(target)),
        };
        assert!(path.is_within(&layer), "{path} lies outside the layer");
        let mut sink = Vec::new();
        let _ = reader.data().take(1 << 20).read_to_end(&mut sink);
        nodes.insert(path.to_string(), node);
    }
    let _ = check_tree(&nodes);
});
