//! The crate's layering (docs/architecture.md): each module may use only the modules below it, so
//! that the runtime can grow without tying itself in knots. This test reads every source file and
//! fails, naming the file, the line and the two modules, when a `crate::` path runs upward.

use std::path::{Path, PathBuf};

/// The layers, lowest first; modules on one line are peers and may use each other.
const LAYERS: &[&[&str]] = &[
    &["error", "Error", "Result", "console", "say"],
    &["kernels"],
    &["model"],
    &["optimizer"],
    &["storage"],
    &["config", "data"],
    &["net", "chaos"],
    &["actors"],
    &["elastic"],
    &["train"],
    &["telemetry", "infer"],
    &["serve"],
    &["bench"],
];

/// Leaves every layer may use: the metric names and the recorder (they depend on nothing of the
/// crate but `error`), so that the storage tiers and the actors can record figures.
const LEAVES: &[&str] = &["telemetry::metrics"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its `#[cfg(test)]` module (tests may use anything) and comments.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // An inline test module ends the code (`mod tests;` in another file does not).
        if line.trim_start() == "#[cfg(test)]" && text.lines().nth(i + 1).is_some_and(|l| l.starts_with("mod tests {"))
        {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        out.push((i + 1, code.to_string()));
    }
    out
}

/// The module each `crate::<module>` path on a line names (with `telemetry::metrics` kept whole).
fn crate_paths(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let first: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let full = if first == "telemetry" && after["telemetry".len()..].starts_with("::metrics") {
            "telemetry::metrics".to_string()
        } else {
            first
        };
        out.push(full);
        rest = after;
    }
    out
}

#[test]
fn every_import_runs_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut checked = 0;
    let mut violations = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component");
        let module = first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        // lib.rs declares the modules; main.rs and cli/ are the binary, above everything.
        if matches!(module.as_str(), "lib" | "main" | "cli") {
            continue;
        }
        let own = layer_of(&module).unwrap_or_else(|| panic!("{} is in no layer: add it to LAYERS", rel.display()));
        let text = std::fs::read_to_string(file).expect("read");
        for (line_no, code) in code_lines(&text) {
            for used in crate_paths(&code) {
                checked += 1;
                if LEAVES.contains(&used.as_str()) {
                    continue;
                }
                let Some(theirs) = layer_of(&used) else {
                    violations.push(format!("{}:{line_no}: crate::{used} is in no layer", rel.display()));
                    continue;
                };
                if theirs > own {
                    violations.push(format!(
                        "{}:{line_no}: {module} (layer {own}) uses crate::{used} (layer {theirs}), which is above it",
                        rel.display()
                    ));
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} crate paths found: is the scan broken?");
    assert!(
        violations.is_empty(),
        "imports against the layering:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scan_sees_an_upward_import() {
    let lines = code_lines(
        "use crate::actors::Runtime; // crate::bench in a comment\n#[cfg(test)]\nmod tests {\n use crate::bench;\n}\n",
    );
    let found: Vec<String> = lines.iter().flat_map(|(_, l)| crate_paths(l)).collect();
    assert_eq!(found, vec!["actors".to_string()]);
    assert_eq!(
        crate_paths("x: crate::telemetry::metrics::LOSS, y: crate::telemetry::report"),
        vec!["telemetry::metrics".to_string(), "telemetry".to_string()]
    );
}
