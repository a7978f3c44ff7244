//! The README's embedding example is the example kernel's code, word for
//! word, so the example a new user copies is the one CI compiles for
//! `x86_64-unknown-none`.

use std::fs;
use std::path::Path;

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .parent()
        .unwrap()
}

/// The Rust blocks of the README section `heading`, without the lines that
/// only say code is left out (`// ...`).
fn rust_blocks(readme: &str, heading: &str) -> Vec<String> {
    let start = readme.find(heading).expect("the section");
    let section = &readme[start + heading.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .split("```rust\n")
        .skip(1)
        .map(|block| {
            block[..block.find("```").expect("a closed block")]
                .lines()
                .filter(|line| !line.trim_start().starts_with("// ..."))
                .map(|line| format!("{line}\n"))
                .collect()
        })
        .collect()
}

#[test]
fn every_rust_block_of_the_embedding_section_is_the_example_kernels_code() {
    let root = repository();
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    let sources: Vec<String> = ["os.rs", "tdx.rs", "snp.rs"]
        .iter()
        .map(|f| fs::read_to_string(root.join("tests/example-kernel/src").join(f)).unwrap())
        .collect();
    let blocks = rust_blocks(&readme, "## Embedding the engine");
    assert_eq!(blocks.len(), 3, "the OS's side, TDX, SNP");
    for block in blocks {
        assert!(
            sources.iter().any(|s| s.contains(&block)),
            "this README block is not in tests/example-kernel:\n{block}"
        );
    }
}
