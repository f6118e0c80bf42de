//! The shape ARCHITECTURE.md promises, checked on the source text: no import cycle between the
//! modules of the daemon (`src/`) or of the load generator (`loadtest/src/`), neither between
//! files nor between top-level components; `lib.rs` stays a module list; every folder of the
//! tree is named in ARCHITECTURE.md.
//!
//! A module is a file. An edge runs from a file to the module named by each `crate::…` or
//! `super::…` path in it (`use` lines, `crate::a::{b, c}` groups and paths in code alike). A
//! parent and its descendants may use each other (`ingest` ↔ `ingest::https`); everything else
//! must form a directed acyclic graph, and so must the graph of top-level components.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;
type Graph = BTreeMap<Module, BTreeSet<Module>>;

#[test]
fn the_daemon_has_no_import_cycle() {
    assert_acyclic(&root().join("src"));
}

#[test]
fn the_load_generator_has_no_import_cycle() {
    assert_acyclic(&root().join("loadtest/src"));
}

#[test]
fn lib_rs_is_the_module_list_and_the_crate_docs() {
    let lines = std::fs::read_to_string(root().join("src/lib.rs")).unwrap().lines().count();
    assert!(lines < 120, "src/lib.rs has {lines} lines: assembly belongs in src/relay/");
}

#[test]
fn architecture_md_names_every_folder() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut missing = Vec::new();
    for top in ["src", "loadtest/src", "testkit/src", "client/src", "ops/src", "proto/src"] {
        for dir in folders(&root().join(top)) {
            let rel = dir.strip_prefix(root()).unwrap().to_string_lossy().into_owned();
            if !text.contains(&format!("{rel}/")) && !text.contains(&format!("`{rel}`")) {
                missing.push(rel);
            }
        }
    }
    assert!(missing.is_empty(), "ARCHITECTURE.md does not name: {missing:?}");
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn assert_acyclic(src: &Path) {
    let graph = graph(src);
    let mut top: Graph = BTreeMap::new();
    for (from, to) in &graph {
        let a = from.iter().take(1).cloned().collect::<Module>();
        let entry = top.entry(a.clone()).or_default();
        entry.extend(to.iter().map(|t| t.iter().take(1).cloned().collect()).filter(|t| *t != a));
    }
    let cycles: Vec<String> = cycles(&graph)
        .into_iter()
        .map(|c| format!("modules: {}", describe(&c, &graph)))
        .chain(cycles(&top).into_iter().map(|c| format!("components: {}", describe(&c, &top))))
        .collect();
    assert!(cycles.is_empty(), "import cycles in {}:\n{}", src.display(), cycles.join("\n"));
}

/// Every folder below `dir` (the module trees), `dir` excluded; nothing if it does not exist.
fn folders(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push(p.clone());
            out.extend(folders(&p));
        }
    }
    out
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a file is: `src/a/b.rs` is `a::b`; `lib.rs`/`main.rs` are the root.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut m: Module = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if m.last().is_some_and(|l| l == "mod") {
        m.pop();
    }
    if m == ["lib"] || m == ["main"] {
        m.clear();
    }
    m
}

fn graph(src: &Path) -> Graph {
    let mut paths = Vec::new();
    files(src, &mut paths);
    let modules: BTreeMap<Module, PathBuf> =
        paths.into_iter().map(|p| (module_of(src, &p), p)).collect();
    let resolve = |path: &[String]| -> Module {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|m| modules.contains_key(m))
            .unwrap()
    };
    let mut graph = Graph::new();
    for (m, file) in &modules {
        let text = strip_comments(&std::fs::read_to_string(file).unwrap());
        let edges = graph.entry(m.clone()).or_default();
        for (kind, path) in references(&text) {
            let target = match kind {
                Kind::Crate => resolve(&path),
                // `super` from a file is its parent; from an inline `mod tests` it is the file
                // itself. Both readings point inside this module's family, or to a sibling.
                Kind::Super => {
                    let parent = m[..m.len().saturating_sub(1)].to_vec();
                    let t = resolve(&[parent, path].concat());
                    if t == *m || m.starts_with(&t) {
                        continue;
                    }
                    t
                }
            };
            let related = m.starts_with(&target) || target.starts_with(m);
            if !related {
                edges.insert(target);
            }
        }
    }
    graph
}

enum Kind {
    Crate,
    Super,
}

/// Every `crate::a::b…` / `super::a…` path in `text`, groups (`crate::a::{b, c::d}`) expanded.
fn references(text: &str) -> Vec<(Kind, Vec<String>)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    for (kw, kind) in [("crate::", 0), ("super::", 1)] {
        let mut from = 0;
        while let Some(at) = text[from..].find(kw).map(|i| i + from) {
            from = at + kw.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let (path, rest) = path_at(&text[from..]);
            let kind = || if kind == 0 { Kind::Crate } else { Kind::Super };
            if let Some(group) = rest.strip_prefix("::{").or(rest.strip_prefix('{')) {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                for item in inner.split(',') {
                    let (sub, _) = path_at(item.trim());
                    let sub = sub.into_iter().filter(|s| s != "self");
                    out.push((kind(), path.iter().cloned().chain(sub).collect()));
                }
            } else {
                out.push((kind(), path));
            }
        }
    }
    out
}

/// The `a::b::c` identifiers at the start of `s`, and what follows them.
fn path_at(s: &str) -> (Vec<String>, &str) {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        parts.push(rest[..end].to_owned());
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(r) if !r.starts_with('{') => rest = r,
            _ => break,
        }
    }
    (parts, rest)
}

fn strip_comments(text: &str) -> String {
    text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = s.graph.get_key_value(w) else { continue };
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                s.low.entry(v).and_modify(|l| *l = (*l).min(lw));
            } else if s.stack.contains(&w) {
                let iw = s.index[w];
                s.low.entry(v).and_modify(|l| *l = (*l).min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn describe(cycle: &[Module], graph: &Graph) -> String {
    let name = |m: &Module| if m.is_empty() { "<root>".to_owned() } else { m.join("::") };
    let members: BTreeSet<&Module> = cycle.iter().collect();
    cycle
        .iter()
        .map(|m| {
            let to: Vec<String> =
                graph[m].iter().filter(|t| members.contains(t)).map(name).collect();
            format!("{} -> {}", name(m), to.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}
