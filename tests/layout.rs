//! The file tree is the architecture (docs/architecture.md): these read `src/` as text and
//! hold it to its rules, so a change that breaks one fails here with the offending lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each top-level module of the crate (a folder or a file under `src/`) and the modules it
/// names as `crate::module` outside comments.
fn dependencies() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut deps: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let entry = deps.entry(module.clone()).or_default();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    entry
                        .entry(name)
                        .or_insert_with(|| format!("{}:{}: {}", rel.display(), n + 1, line.trim()));
                }
            }
        }
    }
    deps
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let deps = dependencies();
    // Depth-first search; a back edge is a cycle, reported with the lines that make it.
    fn visit(
        m: &str,
        deps: &BTreeMap<String, BTreeMap<String, String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if done.contains(m) {
            return None;
        }
        if let Some(at) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        stack.push(m.to_string());
        for next in deps.get(m).into_iter().flat_map(|d| d.keys()) {
            if let Some(c) = visit(next, deps, done, stack) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in deps.keys() {
        if let Some(cycle) = visit(m, &deps, &mut done, &mut Vec::new()) {
            let why: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("  {} -> {}: {}", w[0], w[1], deps[&w[0]][&w[1]]))
                .collect();
            panic!("import cycle {}:\n{}", cycle.join(" -> "), why.join("\n"));
        }
    }
}

#[test]
fn the_layers_point_down() {
    // docs/architecture.md, "Layers": a module may use only modules of lower layers (and
    // its own). Every top-level module is named here, so a new one must be placed.
    let layers: &[&[&str]] = &[
        &["identity", "time", "stats"],
        &["protocol"],
        &["multipath"],
        &["config", "quic"],
        &["tunnel", "media"],
        &["rtsp", "http"],
        &["runtime"],
        &["nat"],
        &["connect", "expose"],
        &["node"],
        &["cli"],
    ];
    let layer_of = |m: &str| layers.iter().position(|l| l.contains(&m));
    let deps = dependencies();
    let mut wrong = Vec::new();
    for (m, uses) in &deps {
        let Some(mine) = layer_of(m) else {
            wrong.push(format!(
                "{m} is in no layer of this test and docs/architecture.md"
            ));
            continue;
        };
        for (used, line) in uses {
            match layer_of(used) {
                Some(l) if l < mine => {}
                Some(_) => wrong.push(format!("{m} uses {used} (same or higher layer): {line}")),
                None => wrong.push(format!("{m} uses {used}, which is in no layer: {line}")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn byte_order_is_written_only_in_protocol() {
    // Every wire format lives in protocol/; outside it, big-endian encoding is a format
    // growing in the wrong place (test code building RTP packets is exempt).
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel.starts_with("protocol") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        for (n, line) in code.lines().enumerate() {
            if line.contains("to_be_bytes") || line.contains("from_be_bytes") {
                wrong.push(format!("{}:{}: {}", rel.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "wire formats outside protocol/:\n{}",
        wrong.join("\n")
    );
}
