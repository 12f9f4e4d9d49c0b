//! `cargo xtask bundle`: everything a GPU machine without a Rust toolchain needs to run the
//! tests, the quickstart example and the benchmarks, in `bundle/`:
//!
//! - `bin.tar.xz`, holding `bin/NAME` (and the wheel, below): release test binaries
//!   (integration tests by target name, unit tests as `unit-<crate>`), `bin/example-NAME` and
//!   `bin/bench-NAME`, stripped. Packed
//!   because each binary embeds the PTX (several MB of text that gzip shrinks about 5x), which
//!   keeps the bundle within what the GPU machine's carry takes; `run.sh` unpacks it;
//! - `run.sh`: runs them (`./run.sh`, `./run.sh bench`, `./run.sh sanitize`, `./run.sh sweep`),
//!   see its header;
//! - `peers.py`, `peers_linear.py`, `peers_options.py`: the peers' benchmarks, copied from
//!   `../shared/bench/` when they exist; `linear_bench.py` (from `bench/`): linear +
//!   cross-entropy, xent's methods beside `peers_linear.py`'s; `vocab_parallel_bench.py` and
//!   `softcap_error.py` (the soft cap's error against float64, xent beside Liger);
//! - `table.py`, `sweep.py` and `ab.py` (from `bench/`): the combined table of a bench run, the
//!   tables of a cluster-plan sweep, the table of an A/B of PTX builds; `configs.txt`: the default
//!   benchmark configs; `ptxentries.py` and `ptx.sha256` (the hashes of the PTX the binaries
//!   embed), so that an A/B can take a variant as its changed entries only;
//! - `python/`: the Python package's tests and examples; its wheel (`cargo xtask wheel`) travels
//!   unpacked in `bin.tar.xz` as `python/site/`; and
//!   `torch_bench.py` (from `bench/`), the PyTorch package's row of the combined table.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{Result, describe, relative, stable_cargo, stdout_of, step};

/// The script that runs the bundle on the GPU machine.
const RUN_SH: &str = include_str!("run.sh");

/// One cargo invocation of the bundle, and the name in `bin/` of each artifact it keeps.
struct Build {
    args: &'static [&'static str],
    bin_name: fn(&Artifact) -> Option<String>,
}

/// The builds, in order: tests, examples, benches (none yet is fine). xtask itself stays out.
const BUILDS: [Build; 3] = [
    Build {
        args: &[
            "test",
            "--workspace",
            "--exclude",
            "xtask",
            "--release",
            "--no-run",
        ],
        bin_name: test_name,
    },
    Build {
        args: &["build", "--release", "-p", "xent", "--examples"],
        bin_name: example_name,
    },
    Build {
        args: &["bench", "--workspace", "--exclude", "xtask", "--no-run"],
        bin_name: bench_name,
    },
];

/// An executable cargo reported building.
#[derive(Debug, PartialEq)]
struct Artifact {
    /// The target's first kind: `test`, `lib`, `bin`, `example`, `bench`, ...
    kind: String,
    /// The target's name.
    name: String,
    /// Whether it was built with libtest's harness (`false` for `harness = false` targets).
    harness: bool,
    /// Where cargo left the binary.
    executable: PathBuf,
}

/// `cargo xtask bundle`: builds, copies and strips the binaries, and writes `run.sh`.
pub fn bundle(root: &Path) -> Result<()> {
    let bundle_dir = root.join("bundle");
    let bin_dir = bundle_dir.join("bin");
    if bundle_dir.exists() {
        fs::remove_dir_all(&bundle_dir)
            .map_err(|err| format!("cannot remove old bundle/: {err}"))?;
    }
    fs::create_dir_all(&bin_dir).map_err(|err| format!("cannot create bundle/bin/: {err}"))?;

    let mut binaries: Vec<(String, PathBuf)> = Vec::new();
    for build in &BUILDS {
        for artifact in build_artifacts(root, build.args)? {
            let Some(name) = (build.bin_name)(&artifact) else {
                continue;
            };
            if let Some((_, other)) = binaries.iter().find(|(taken, _)| *taken == name) {
                let (a, b) = (other.display(), artifact.executable.display());
                return Err(format!(
                    "two binaries would be bundle/bin/{name}: {a} and {b}"
                ));
            }
            binaries.push((name, artifact.executable));
        }
    }
    if binaries.is_empty() {
        return Err("cargo built no test, example or bench binaries".to_string());
    }
    // The candle-cuda feature's binaries, once `cargo xtask candle-cuda` has set up its tree.
    if root.join(".tools/cuda13/.installed").is_file() {
        let tree = crate::candle_cuda::setup(root)?;
        for args in crate::candle_cuda::BUILDS {
            let mut cargo = stable_cargo(root);
            cargo.args(*args);
            tree.apply(root, &mut cargo);
            for artifact in artifacts_of(cargo)? {
                let name = match artifact.kind.as_str() {
                    "test" => test_name(&artifact),
                    "example" => example_name(&artifact),
                    "bench" => bench_name(&artifact),
                    _ => None,
                };
                if let Some(name) = name {
                    binaries.push((name, artifact.executable));
                }
            }
        }
    } else {
        step(
            "no .tools/cuda13 (`cargo xtask candle-cuda`): the bundle has no candle-cuda binaries",
        );
    }

    let strip = strip_available();
    for (name, executable) in &binaries {
        let dest = bin_dir.join(name);
        fs::copy(executable, &dest).map_err(|err| {
            format!(
                "cannot copy {} to {}: {err}",
                executable.display(),
                dest.display()
            )
        })?;
        if strip {
            stdout_of(Command::new("strip").arg(&dest))?;
        }
        let size = fs::metadata(&dest).map(|meta| meta.len()).unwrap_or(0);
        step(&format!(
            "bundled {} ({:.1} MB)",
            relative(root, &dest),
            size as f64 / 1e6
        ));
    }

    // The wheel goes in unpacked beside the binaries (`python/site/`): its library embeds the
    // same PTX, which then packs as a reference to theirs.
    bundle_python(root, &bundle_dir)?;
    // `run.sh` unpacks this when `bin/` is missing. xz: the binaries embed PTX and candle's
    // kernels, which xz packs to less than half of gzip's size. One thread and a dictionary
    // larger than the whole tar (1 GB without the candle-cuda binaries; about 11 GB of memory
    // here, 1 GiB to unpack), so each binary's copy of the same PTX packs as a reference to the
    // first: session 30 measured 9.7 MB for the binaries with a 1536 MiB dictionary, 20-30 MB
    // with 256 MiB or `-T2`, and the carry to the GPU machine holds 64 MiB with the tracked tree
    // (about 49 MB, most of it PTX).
    stdout_of(
        Command::new("tar")
            .args(["-cJf", "bin.tar.xz", "bin", "python/site"])
            .env("XZ_OPT", "-T1 --lzma2=preset=6,dict=1536MiB")
            .current_dir(&bundle_dir),
    )?;
    fs::remove_dir_all(&bin_dir).map_err(|err| format!("cannot remove bundle/bin/: {err}"))?;
    let site = bundle_dir.join("python/site");
    fs::remove_dir_all(&site).map_err(|err| format!("cannot remove bundle/python/site/: {err}"))?;
    let packed = fs::metadata(bundle_dir.join("bin.tar.xz")).map_or(0, |meta| meta.len());
    step(&format!(
        "packed bundle/bin/ and bundle/python/site/ into bundle/bin.tar.xz ({:.1} MB)",
        packed as f64 / 1e6
    ));

    // The peers' benchmarks, from the team's shared folder when it exists.
    for name in ["peers.py", "peers_linear.py", "peers_options.py"] {
        match root
            .parent()
            .map(|parent| parent.join("shared/bench").join(name))
        {
            Some(peers) if peers.is_file() => {
                fs::copy(&peers, bundle_dir.join(name))
                    .map_err(|err| format!("cannot copy {}: {err}", peers.display()))?;
                step(&format!("bundled bundle/{name}"));
            }
            _ => step(&format!(
                "no ../shared/bench/{name}: the bundle runs without it"
            )),
        }
    }

    for (from, to) in [
        ("bench/table.py", "table.py"),
        ("bench/sweep.py", "sweep.py"),
        ("bench/ab.py", "ab.py"),
        ("bench/ptxentries.py", "ptxentries.py"),
        ("bench/torch_bench.py", "torch_bench.py"),
        ("bench/linear_bench.py", "linear_bench.py"),
        ("bench/vocab_parallel_bench.py", "vocab_parallel_bench.py"),
        ("bench/softcap_error.py", "softcap_error.py"),
        ("host/benches/configs.txt", "configs.txt"),
    ] {
        fs::copy(root.join(from), bundle_dir.join(to))
            .map_err(|err| format!("cannot copy {from}: {err}"))?;
        step(&format!("bundled bundle/{to}"));
    }
    // The PTX the binaries embed, by hash: `run.sh ab` splices a variant's entries
    // (`NAME.entries.ptx`) into the working tree's copy only where it is this one.
    let sums = stdout_of(
        Command::new("sha256sum")
            .current_dir(root)
            .args(["host/ptx/sm_80.ptx", "host/ptx/sm_90.ptx"]),
    )?;
    fs::write(bundle_dir.join("ptx.sha256"), sums)
        .map_err(|err| format!("cannot write bundle/ptx.sha256: {err}"))?;
    step("bundled bundle/ptx.sha256");
    // The Python peers' wheels, if downloaded: `pip download --no-deps -d .whl liger-kernel
    // crossentropy-triton` (the GPU machine has no network).
    let wheels: Vec<PathBuf> = fs::read_dir(root.join(".whl"))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "whl"))
                .collect()
        })
        .unwrap_or_default();
    if wheels.is_empty() {
        step("no .whl/*.whl: peers.py will run only the peers already on the GPU machine");
    } else {
        fs::create_dir_all(bundle_dir.join("wheels"))
            .map_err(|err| format!("cannot create bundle/wheels: {err}"))?;
        for wheel in &wheels {
            let name = wheel.file_name().expect("a file");
            fs::copy(wheel, bundle_dir.join("wheels").join(name))
                .map_err(|err| format!("cannot copy {}: {err}", wheel.display()))?;
        }
        step(&format!(
            "bundled {} wheel(s) into bundle/wheels",
            wheels.len()
        ));
    }

    let run_sh = bundle_dir.join("run.sh");
    fs::write(&run_sh, RUN_SH).map_err(|err| format!("cannot write bundle/run.sh: {err}"))?;
    make_executable(&run_sh)?;
    step(
        "wrote bundle/run.sh: copy bundle/ to the GPU machine and run `bash bundle/run.sh [bench|sanitize]`",
    );
    Ok(())
}

/// The Python package into `bundle/python/`: the wheel unpacked into `site/` (what `pip install
/// --target` would make of it: importable as it is), and `python/tests/*.py` and
/// `python/examples/*.py` beside it.
fn bundle_python(root: &Path, bundle_dir: &Path) -> Result<()> {
    let wheel = crate::wheel::wheel(root)?;
    let py_dir = bundle_dir.join("python");
    for folder in ["tests", "examples"] {
        let dest = py_dir.join(folder);
        fs::create_dir_all(&dest)
            .map_err(|err| format!("cannot create {}: {err}", dest.display()))?;
        let sources = fs::read_dir(root.join("python").join(folder))
            .map_err(|err| format!("cannot read python/{folder}: {err}"))?;
        for source in sources.flatten().map(|e| e.path()) {
            if source.extension().is_some_and(|ext| ext == "py") {
                let name = source.file_name().expect("a file");
                fs::copy(&source, dest.join(name))
                    .map_err(|err| format!("cannot copy {}: {err}", source.display()))?;
            }
        }
    }
    // A wheel is a zip of the installed layout; Python's zipfile unpacks it.
    stdout_of(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(py_dir.join("site")),
    )?;
    step(&format!(
        "bundled bundle/python/ ({} unpacked into site/, tests, examples)",
        relative(root, &wheel)
    ));
    Ok(())
}

/// Runs `cargo ARGS --message-format=json-render-diagnostics` and returns the executables it built.
fn build_artifacts(root: &Path, args: &[&str]) -> Result<Vec<Artifact>> {
    let mut cargo = stable_cargo(root);
    cargo.args(args);
    artifacts_of(cargo)
}

/// Runs a cargo build and returns the executables it reported.
fn artifacts_of(mut cargo: Command) -> Result<Vec<Artifact>> {
    cargo.arg("--message-format=json-render-diagnostics");
    eprintln!("$ {}", describe(&cargo));
    // Diagnostics and progress go to the terminal; the JSON lines come back on stdout.
    let output = cargo
        .stderr(Stdio::inherit())
        .output()
        .map_err(|err| format!("could not start `{}`: {err}", describe(&cargo)))?;
    if !output.status.success() {
        return Err(format!("`{}` failed ({})", describe(&cargo), output.status));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(parse_artifact)
        .collect())
}

/// The executable of a `compiler-artifact` JSON line from cargo, if it has one.
fn parse_artifact(line: &str) -> Option<Artifact> {
    let message: Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" {
        return None;
    }
    Some(Artifact {
        kind: message["target"]["kind"][0].as_str()?.to_string(),
        name: message["target"]["name"].as_str()?.to_string(),
        harness: message["profile"]["test"].as_bool().unwrap_or(false),
        executable: PathBuf::from(message["executable"].as_str()?),
    })
}

/// Test binaries: an integration test keeps its target's name, a lib's or bin's unit tests are
/// `unit-NAME` (the plain lib, bin and examples `cargo test` also builds are left out).
fn test_name(artifact: &Artifact) -> Option<String> {
    match (artifact.kind.as_str(), artifact.harness) {
        ("test", _) => Some(artifact.name.clone()),
        ("lib" | "bin", true) => Some(format!("unit-{}", artifact.name)),
        _ => None,
    }
}

/// Examples are `example-NAME`.
fn example_name(artifact: &Artifact) -> Option<String> {
    (artifact.kind == "example").then(|| format!("example-{}", artifact.name))
}

/// Benchmarks are `bench-NAME`; the lib unit tests `cargo bench` also builds are left out.
fn bench_name(artifact: &Artifact) -> Option<String> {
    (artifact.kind == "bench").then(|| format!("bench-{}", artifact.name))
}

/// Whether binutils' `strip` runs here; warns when it does not.
fn strip_available() -> bool {
    let found = Command::new("strip")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        step("warning: `strip` not found, the bundled binaries keep their symbols");
    }
    found
}

/// Sets the executable bits of a file written by xtask.
#[cfg(unix)]
fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|err| format!("cannot make {} executable: {err}", path.display()))
}

/// Executable bits do not exist here: nothing to set.
#[cfg(not(unix))]
fn make_executable(_path: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `compiler-artifact` line as cargo prints it, trimmed to the fields read here.
    fn artifact_line(kind: &str, name: &str, harness: bool, executable: Option<&str>) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "target": { "kind": [kind], "name": name },
            "profile": { "test": harness },
            "executable": executable,
        })
        .to_string()
    }

    #[test]
    fn artifacts_without_an_executable_are_skipped() {
        assert_eq!(
            parse_artifact(&artifact_line("lib", "xent", false, None)),
            None
        );
        assert_eq!(
            parse_artifact(r#"{"reason":"build-finished","success":true}"#),
            None
        );
    }

    #[test]
    fn binaries_are_named_by_what_they_run() {
        let named = |builder: fn(&Artifact) -> Option<String>, kind, name, harness| {
            builder(&parse_artifact(&artifact_line(kind, name, harness, Some("/t/x"))).unwrap())
        };
        assert_eq!(
            named(test_name, "test", "gpu", true).as_deref(),
            Some("gpu")
        );
        assert_eq!(
            named(test_name, "lib", "xent", true).as_deref(),
            Some("unit-xent")
        );
        assert_eq!(named(test_name, "example", "quickstart", false), None);
        assert_eq!(
            named(example_name, "example", "quickstart", false).as_deref(),
            Some("example-quickstart")
        );
        assert_eq!(
            named(bench_name, "bench", "xent", false).as_deref(),
            Some("bench-xent")
        );
        assert_eq!(named(bench_name, "lib", "xent", true), None);
    }
}
