//! The module map in CONTRIBUTING.md is true: every `crate::…` a module of `src/` names (in a
//! `use` or a path in its code) is itself, the crate root, or a module its row lets it depend
//! on; each row depends only on rows above it, so dependencies point one way; and the map,
//! `lib.rs`'s `pub mod` list and its module table name the same modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use iamlet_testkit::repo_root;

/// One row of the map: a module, and what it may depend on (`None`: everything).
#[derive(Debug)]
struct Row {
    module: String,
    depends_on: Option<BTreeSet<String>>,
}

/// The words in backticks of a table cell.
fn quoted(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// The module map: the table under "## The module map" in CONTRIBUTING.md.
fn module_map() -> Vec<Row> {
    let text = std::fs::read_to_string(repo_root().join("CONTRIBUTING.md")).unwrap();
    let section = text.split("## The module map").nth(1).expect("CONTRIBUTING.md has a module map");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 3, "a map row is | module | concern | depends on |: {line}");
            let depends_on = match cells[2] {
                "everything" => None,
                "nothing" => Some(BTreeSet::new()),
                cell => Some(quoted(cell).into_iter().collect()),
            };
            let modules = quoted(cells[0]);
            assert_eq!(modules.len(), 1, "one module per row: {line}");
            Row { module: modules[0].clone(), depends_on }
        })
        .collect()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The module a file of `src/` belongs to (`None` for the crate root and the binary).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        name => Some(name.trim_end_matches(".rs").to_string()),
    }
}

/// The `crate::<name>` references of a line of code (comments skipped), as `name`s.
fn crate_references(line: &str) -> Vec<String> {
    let code = line.trim_start();
    if code.starts_with("//") {
        return Vec::new();
    }
    let code = code.split(" //").next().unwrap_or(code);
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        // `iamlet_crate::x` or `$crate::` are not this crate's paths.
        if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            found.push(name);
        }
    }
    // `use crate::{a, b::c}`: each name in the braces.
    if let Some(braced) = code.strip_prefix("use crate::{").or_else(|| code.strip_prefix("pub use crate::{")) {
        for part in braced.split(',') {
            let name: String = part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

/// The names the crate root defines besides its modules (`describe`), which any module may use.
fn root_items(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub fn ").or_else(|| l.strip_prefix("pub struct ")))
        .map(|rest| rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
        .collect()
}

/// Where the imports of `src/` break the map: one line each, naming the file, the line and the rule.
fn violations(src: &Path, map: &[Row]) -> Vec<String> {
    let rules: BTreeMap<&str, &Row> = map.iter().map(|row| (row.module.as_str(), row)).collect();
    let roots = root_items(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut found = Vec::new();
    let mut files = rust_files(src);
    files.sort();
    for file in files {
        let Some(module) = module_of(src, &file) else { continue };
        let Some(row) = rules.get(module.as_str()) else {
            found.push(format!("{}: module `{module}` has no row in the module map", file.display()));
            continue;
        };
        let Some(allowed) = &row.depends_on else { continue };
        let text = std::fs::read_to_string(&file).unwrap();
        // A file's unit tests may reach further than the module: they are not the module.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        for (number, line) in code.lines().enumerate() {
            for name in crate_references(line) {
                if name == module || roots.contains(&name) || allowed.contains(&name) {
                    continue;
                }
                let rule = match allowed.is_empty() {
                    true => "on nothing".to_string(),
                    false => {
                        format!("only on {}", allowed.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "))
                    }
                };
                found.push(format!(
                    "{}:{}: `{module}` uses `crate::{name}`, but the module map (CONTRIBUTING.md) lets `{module}` \
                     depend {rule}",
                    file.strip_prefix(src.parent().unwrap()).unwrap_or(&file).display(),
                    number + 1
                ));
            }
        }
    }
    found
}

#[test]
fn every_import_points_the_way_the_module_map_says() {
    let src = repo_root().join("src");
    let found = violations(&src, &module_map());
    assert!(found.is_empty(), "imports against the module map:\n{}", found.join("\n"));
}

#[test]
fn the_map_points_one_way_and_names_every_module() {
    let map = module_map();
    for (position, row) in map.iter().enumerate() {
        let above: BTreeSet<&str> = map[..position].iter().map(|r| r.module.as_str()).collect();
        for dependency in row.depends_on.iter().flatten() {
            assert!(
                above.contains(dependency.as_str()),
                "`{}` depends on `{dependency}`, which is not above it in the module map",
                row.module
            );
        }
    }
    let mapped: BTreeSet<String> = map.iter().map(|r| r.module.clone()).collect();
    let lib = std::fs::read_to_string(repo_root().join("src/lib.rs")).unwrap();
    let declared: BTreeSet<String> =
        lib.lines().filter_map(|l| l.strip_prefix("pub mod ")).map(|m| m.trim_end_matches(';').to_string()).collect();
    assert_eq!(declared, mapped, "lib.rs's modules and the module map");
    let documented: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! | [`"))
        .map(|rest| rest.split('`').next().unwrap().to_string())
        .collect();
    assert_eq!(documented, mapped, "lib.rs's module table and the module map");
}

/// The check itself: a wrong-way import in a copy of `src/` is found, with its file, line and rule.
#[test]
fn a_wrong_way_import_is_named_with_its_file_line_and_rule() {
    let copy = tempfile::tempdir().unwrap();
    let src = copy.path().join("src");
    for file in rust_files(&repo_root().join("src")) {
        let to = src.join(file.strip_prefix(repo_root().join("src")).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&file, &to).unwrap();
    }
    let pod = src.join("pod.rs");
    let text = std::fs::read_to_string(&pod).unwrap();
    std::fs::write(&pod, format!("use crate::cluster::PodStore;\n{text}")).unwrap();
    let policy = src.join("policy/mod.rs");
    let text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(&policy, format!("use crate::{{pod::PodIdentity, credentials::CredentialCache}};\n{text}")).unwrap();

    let found = violations(&src, &module_map());
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found.contains(
            &"src/policy/mod.rs:1: `policy` uses `crate::credentials`, but the module map (CONTRIBUTING.md) lets \
          `policy` depend only on `pod`"
                .to_string()
        )
    );
    assert!(
        found.contains(
            &"src/pod.rs:1: `pod` uses `crate::cluster`, but the module map (CONTRIBUTING.md) lets `pod` depend on \
          nothing"
                .to_string()
        )
    );
}
