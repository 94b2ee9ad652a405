//! The layout is the architecture: the concerns of `userspace/` import one way (docs/design.md),
//! and no two of its files import each other, however indirectly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Concerns in dependency order: each may import those after it, never those before.
const ORDER: &[&str] = &[
    "main", "cli", "fleet", "output", "host", "pump", "tracer", "timing",
];

/// Concerns allowed to import one before them (docs/design.md): `fleet` reads cgroup paths.
const ALLOWED_BACK: &[(&str, &str)] = &[("fleet", "host")];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("userspace")
}

/// Every .rs file under userspace/, as its module path (`tracer::stream`; `main` for main.rs).
fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            modules(&path, &format!("{prefix}{stem}::"), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = if stem == "mod" {
                prefix.trim_end_matches("::").to_owned()
            } else {
                format!("{prefix}{stem}")
            };
            out.insert(name, path);
        }
    }
}

/// The modules a file imports through `crate::` or `super::` paths, outside its tests: the
/// longest prefix of each path that is a module.
fn imports(module: &str, path: &Path, all: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let code = text.split("#[cfg(test)]").next().unwrap();
    // What `super` is from this file (a mod.rs is its folder's module).
    let mut parent: Vec<&str> = module.split("::").collect();
    parent.pop();
    let mut found = BTreeSet::new();
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        let rest: String = code[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let mut parts: Vec<String> = rest
            .split("::")
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        let base: Vec<String> = match parts.first().map(String::as_str) {
            Some("crate") => Vec::new(),
            Some("super") => parent.iter().map(|p| (*p).to_owned()).collect(),
            _ => continue,
        };
        parts.remove(0);
        let mut target = None;
        for n in 1..=parts.len() {
            let candidate = base
                .iter()
                .chain(&parts[..n])
                .cloned()
                .collect::<Vec<_>>()
                .join("::");
            if all.contains_key(&candidate) {
                target = Some(candidate);
            }
        }
        if let Some(target) = target.filter(|t| t != module) {
            found.insert(target);
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut all = BTreeMap::new();
    modules(&root(), "", &mut all);
    assert!(all.len() > 30, "{} modules under userspace/", all.len());
    all.iter()
        .map(|(module, path)| (module.clone(), imports(module, path, &all)))
        .collect()
}

#[test]
fn no_two_files_import_each_other_even_through_others() {
    let graph = graph();
    // Every file's reach; a file that reaches itself is in a circle.
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = graph[start].iter().collect();
        while let Some(next) = todo.pop() {
            assert!(
                next != start,
                "{start} imports itself through others: {:?}",
                graph[start]
            );
            if seen.insert(next.clone()) {
                todo.extend(graph.get(next).into_iter().flatten());
            }
        }
    }
}

#[test]
fn concerns_import_only_those_after_them() {
    let concern = |module: &str| module.split("::").next().unwrap().to_owned();
    let rank = |c: &str| ORDER.iter().position(|o| *o == c);
    for (module, imports) in graph() {
        let from = concern(&module);
        let Some(from_rank) = rank(&from) else {
            panic!("userspace/{from} is in no concern of tests/layout.rs's ORDER");
        };
        for target in imports {
            let to = concern(&target);
            if to == from || ALLOWED_BACK.contains(&(from.as_str(), to.as_str())) {
                continue;
            }
            let to_rank = rank(&to).unwrap_or_else(|| panic!("{to} is in no concern"));
            assert!(
                to_rank > from_rank,
                "{module} imports {target}: {from} may not import {to} (docs/design.md)"
            );
        }
    }
}
