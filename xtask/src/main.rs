//! `cargo xtask <command>`: the project's chores, written in Rust so they run wherever cargo does.
//!
//! - `ptx`: build `kernels-gpu/` with its pinned nightly and write the committed `host/ptx/*.ptx`.
//! - `ptx-trace`: the sm_90 PTX with `--cfg xent_trace` (the small calls' phase timeline) into
//!   `target/ptx-trace/sm_90.ptx`, for `examples/small_trace.rs`; never committed.
//! - `check`: rebuild the PTX, fail if the committed files differ, then compile them with `ptxas`
//!   and fail on a register spill (but those `ptxas.rs` allows by name and size); also compile
//!   each kernel's one-kernel module (what a handle loads on the kernel's first use) on its own.
//! - `test`: what CI runs: `cargo fmt --check`, `cargo clippy -D warnings`, `cargo doc` with
//!   warnings as errors, `check`, `cargo test --workspace`.
//! - `bundle`: release test, example and bench binaries plus `run.sh` in `bundle/`, for a GPU
//!   machine without a Rust toolchain.
//! - `sass`: one kernel's SASS (ptxas + nvdisasm, no GPU), its live registers and its loops'
//!   instruction counts, of the committed PTX or a variant, at its own register cap or another.
//! - `bench`: `cargo bench` over the workspace.
//! - `chart`: an SVG bar chart of each `bench/results/*.jsonl`, next to it.

mod bundle;
mod candle_cuda;
mod chart;
mod ptx;
mod ptxas;
mod sass;
mod wheel;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};

/// Every failure is a message for the person at the terminal, never a panic.
type Result<T> = std::result::Result<T, String>;

/// What `cargo xtask help` prints.
const USAGE: &str = "usage: cargo xtask <command>

commands:
  ptx            build kernels-gpu/ to PTX (sm_80, sm_90, sm_90a) and write host/ptx/<arch>.ptx
  ptx-trace      build the sm_90 PTX with the small calls' phase timeline (--cfg xent_trace) into
                 target/ptx-trace/sm_90.ptx, for `XENT_PTX=... cargo run --release --example
                 small_trace` on a GPU
  check          fail if host/ptx/ is stale; compile it with ptxas, print registers, fail on spills
                 (but those allowed by name and size);
                 compile every one-kernel module (what a handle loads) on its own
  test           cargo fmt --check, clippy, rustdoc, check, cargo test --workspace (and xent's candle
                 feature), then the Python wheel and its CPU tests (what CI runs)
  bundle         release test/example/bench binaries and run.sh in bundle/, for a GPU machine
                 (with the candle-cuda binaries once `cargo xtask candle-cuda` has run)
  candle-cuda    CUDA 13.0's nvcc and libraries from PyPI into .tools/cuda13, link stubs, and
                 a release build of the candle-cuda feature's test, bench and example
  wheel          the Python package (python/) as an abi3 wheel in target/wheels/ (maturin)
  sass KERNEL [ARCH] [--ptx FILE] [--maxnreg N]
                 one kernel's SASS in target/sass/ (ptxas, nvdisasm from PyPI; no GPU) with
                 live registers, and each loop's instructions, most live registers, shared/global
                 loads and stores, ex2, MMAs and spills; from FILE instead of the committed PTX,
                 at N registers instead of the kernel's cap
  bench [ARGS]   cargo bench --workspace [ARGS] (criterion + throughput JSON lines)
  chart [FILES]  SVG bar chart (% of copy bandwidth) next to each results .jsonl
                 (default: bench/results/*.jsonl)";

/// Runs the command named by the first argument and turns its error into a message and exit code 1.
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = repo_root();
    let no_args = |run: fn(&Path) -> Result<()>| match args.len() {
        1 => run(&root),
        _ => Err(format!("`{}` takes no arguments\n\n{USAGE}", args[0])),
    };
    let result = match args.first().map(String::as_str) {
        Some("ptx") => no_args(ptx::write_committed),
        Some("ptx-trace") => no_args(ptx::write_trace),
        Some("check") => no_args(check),
        Some("test") => no_args(test),
        Some("bundle") => no_args(bundle::bundle),
        Some("candle-cuda") => no_args(candle_cuda::command),
        Some("wheel") => no_args(|root| wheel::wheel(root).map(drop)),
        Some("bench") => bench(&root, &args[1..]),
        Some("chart") => chart::chart(&root, &args[1..]),
        Some("sass") => sass::command(&root, &args[1..]),
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{USAGE}")),
        None => Err(format!("no command given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask check`: the committed PTX is current, and ptxas compiles it without spills (but
/// those it allows by name and size).
fn check(root: &Path) -> Result<()> {
    ptx::check_committed(root)?;
    ptxas::report(root)
}

/// `cargo xtask test`: formatting, `check`, then the workspace's tests on the pinned stable.
fn test(root: &Path) -> Result<()> {
    step("checking formatting");
    run(stable_cargo(root).args(["fmt", "--all", "--check"]))?;
    step("linting (clippy, warnings are errors)");
    run(stable_cargo(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The optional candle integration: built, linted and tested apart, so the default build
    // stays without candle.
    run(stable_cargo(root).args([
        "clippy",
        "-p",
        "xent",
        "--features",
        "candle",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("documenting xent (rustdoc, warnings are errors: no broken or private links)");
    run(stable_cargo(root)
        .args(["doc", "-p", "xent", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    check(root)?;
    step("running the workspace's tests");
    let mut totals = run_tests(stable_cargo(root).args(["test", "--workspace"]))?;
    let candle = run_tests(stable_cargo(root).args([
        "test",
        "-p",
        "xent",
        "--features",
        "candle",
        "--lib",
    ]))?;
    totals.passed += candle.passed;
    totals.failed += candle.failed;
    totals.ignored += candle.ignored;
    wheel::test(root)?;
    step("all checks passed");
    // One plain summary line for whoever reads the log's end. A GPU test without a GPU returns
    // early after printing `SKIPPED` (libtest counts it as passed): it is counted as skipped here.
    let skipped = totals.ignored + totals.gpu_skipped;
    println!(
        "tests: {} passed, {} failed, {skipped} skipped",
        totals.passed - totals.gpu_skipped,
        totals.failed
    );
    Ok(())
}

/// What `cargo test` reported, added up over its test binaries.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// `SKIPPED:` lines: GPU tests that found no GPU (see tests/common/mod.rs).
    gpu_skipped: u64,
}

/// Runs `cargo test`, streaming its output, and adds up its `test result:` and `SKIPPED:` lines;
/// fails if cargo does.
fn run_tests(command: &mut Command) -> Result<TestTotals> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let line = describe(command);
    eprintln!("$ {line}");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("could not start `{line}`: {err}"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let skips = std::thread::spawn(move || {
        let mut skipped = 0;
        for text in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            eprintln!("{text}");
            skipped += text.contains("SKIPPED:") as u64;
        }
        skipped
    });
    let mut totals = TestTotals::default();
    for text in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let text = text.map_err(|err| format!("reading `{line}`: {err}"))?;
        println!("{text}");
        if let Some((passed, failed, ignored)) = parse_test_result(&text) {
            totals.passed += passed;
            totals.failed += failed;
            totals.ignored += ignored;
        }
    }
    totals.gpu_skipped = skips.join().unwrap_or(0);
    let status = child
        .wait()
        .map_err(|err| format!("waiting for `{line}`: {err}"))?;
    match status.success() {
        true => Ok(totals),
        false => Err(format!("`{line}` failed ({status})")),
    }
}

/// (passed, failed, ignored) of a libtest `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
fn parse_test_result(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(word)?
                .trim()
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some((count(" passed")?, count(" failed")?, count(" ignored")?))
}

/// `cargo xtask bench ARGS`: the workspace's benchmarks (the criterion benches and the JSON-lines
/// `throughput` bench), with ARGS forwarded to `cargo bench`. On a GPU machine without Rust, the
/// bundle's `run.sh bench` runs the same binaries next to `peers.py` and prints one table.
fn bench(root: &Path, args: &[String]) -> Result<()> {
    step("running the workspace's benchmarks");
    run(stable_cargo(root)
        .args(["bench", "--workspace", "--exclude", "xtask"])
        .args(args))
}

/// The repository root: the parent of this crate's folder, as `cargo run` sets it at run time
/// (the path compiled in is only a fallback: a moved checkout can reuse a stale build).
fn repo_root() -> PathBuf {
    let xtask_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    xtask_dir
        .parent()
        .map_or(xtask_dir.clone(), Path::to_path_buf)
}

/// `cargo` from PATH, in the repository root, so the root `rust-toolchain.toml` picks the stable.
fn stable_cargo(root: &Path) -> Command {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(root);
    cargo
}

/// Prints a progress line to stderr, where cargo and the tools it runs report theirs.
fn step(message: &str) {
    eprintln!("xtask: {message}");
}

/// The command line as a person would type it, for messages.
fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned()),
    );
    words.join(" ")
}

/// Runs a command with inherited stdio (output streams through) and fails unless it exits 0.
fn run(command: &mut Command) -> Result<()> {
    let line = describe(command);
    eprintln!("$ {line}");
    let status = command
        .status()
        .map_err(|err| format!("could not start `{line}`: {err}"))?;
    match status.success() {
        true => Ok(()),
        false => Err(format!("`{line}` failed ({status})")),
    }
}

/// Runs a command to completion with its stdout and stderr captured, whatever its exit status.
fn capture(command: &mut Command) -> Result<Output> {
    let line = describe(command);
    command
        .output()
        .map_err(|err| format!("could not start `{line}`: {err}"))
}

/// Runs a command and returns its stdout, or fails with its stderr unless it exits 0.
fn stdout_of(command: &mut Command) -> Result<String> {
    let output = capture(command)?;
    if !output.status.success() {
        return Err(format!(
            "`{}` failed ({}):\n{}",
            describe(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The path relative to the repository root, for messages.
fn relative<'a>(root: &Path, path: &'a Path) -> std::borrow::Cow<'a, str> {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy()
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn test_result_lines_are_added_up() {
        let line = "test result: ok. 55 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.09s";
        assert_eq!(parse_test_result(line), Some((55, 0, 2)));
        assert_eq!(
            parse_test_result("test result: FAILED. 1 passed; 2 failed; 0 ignored;"),
            Some((1, 2, 0))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
