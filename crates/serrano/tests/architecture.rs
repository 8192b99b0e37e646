//! The module graph of every crate points one way, like the crate graph: no two modules import
//! each other, directly or in a loop. Read from the sources: every `crate::` path outside
//! comments and test modules is an edge to the module it names (or, for a name the crate root
//! re-exports, to the module that defines it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `a/b.rs` → `a::b`; `a/mod.rs` → `a`; `lib.rs`/`main.rs` → `` (the root).
fn module_name(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without its test module and comments.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths written after `crate::` (`a::b::Name`, each segment an identifier).
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    code.match_indices("crate::")
        .map(|(i, _)| {
            let mut path = Vec::new();
            for seg in code[i + 7..].split("::") {
                let ident: String = seg
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let whole = ident.len() == seg.len();
                if !ident.is_empty() {
                    path.push(ident);
                }
                // The path ends where a segment has more than an identifier.
                if !whole || path.is_empty() {
                    break;
                }
            }
            path
        })
        .collect()
}

/// Names the crate root re-exports (`pub use module::{A, B}` / `pub use module::A;`), with the
/// module each comes from.
fn reexports(root: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in root.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.trim_start_matches('{').trim_end_matches('}');
        for n in names.split(',') {
            let n = n.split(" as ").next().unwrap_or("").trim();
            if !n.is_empty() {
                out.insert(n.to_string(), module.trim().to_string());
            }
        }
    }
    out
}

/// The module graph of one crate's `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let texts: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            (
                module_name(src, f),
                code(&std::fs::read_to_string(f).unwrap()),
            )
        })
        .collect();
    let reexported = reexports(texts.get("").map_or("", String::as_str));
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &texts {
        let out = edges.entry(m.clone()).or_default();
        for path in crate_paths(text) {
            let longest = (1..=path.len())
                .rev()
                .map(|k| path[..k].join("::"))
                .find(|p| texts.contains_key(p));
            let target = longest.or_else(|| reexported.get(path.first()?).cloned());
            let Some(t) = target.filter(|t| texts.contains_key(t)) else {
                continue;
            };
            // A module and its own parent or children are one unit.
            let related = t == *m
                || m.starts_with(&format!("{t}::"))
                || t.starts_with(&format!("{m}::"))
                || t.is_empty()
                || m.is_empty();
            if !related {
                out.insert(t);
            }
        }
    }
    edges
}

/// Modules on a loop, if any: those from which `m` can be reached again.
fn loops(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = edges[from].iter().cloned().collect();
        while let Some(n) = stack.pop() {
            if seen.insert(n.clone()) {
                stack.extend(edges.get(&n).into_iter().flatten().cloned());
            }
        }
        seen
    };
    edges
        .keys()
        .filter(|m| reach(m).contains(*m))
        .cloned()
        .collect()
}

#[test]
fn no_two_modules_import_each_other_in_any_crate() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for c in std::fs::read_dir(&crates).unwrap().flatten() {
        let src = c.path().join("src");
        if !src.is_dir() {
            continue;
        }
        let edges = graph(&src);
        assert!(
            loops(&edges).is_empty(),
            "{}: modules on an import loop: {:?}\n{edges:#?}",
            c.path().display(),
            loops(&edges)
        );
        checked += edges.len();
    }
    assert!(checked > 50, "only {checked} modules read");
}

#[test]
fn the_checker_sees_a_loop() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.insert("a".into(), ["b".to_string()].into());
    edges.insert("b".into(), ["c".to_string()].into());
    edges.insert("c".into(), ["a".to_string()].into());
    edges.insert("d".into(), ["a".to_string()].into());
    assert_eq!(loops(&edges), ["a", "b", "c"]);
    assert_eq!(
        crate_paths("use crate::x::Y; let z = crate::w::f();"),
        [vec!["x", "Y"], vec!["w", "f"]]
    );
    let r = reexports("pub use store::{Governance, NewKey as N};\npub use ticket::Ticket;");
    assert_eq!(r["Governance"], "store");
    assert_eq!(r["NewKey"], "store");
    assert_eq!(r["Ticket"], "ticket");
}
