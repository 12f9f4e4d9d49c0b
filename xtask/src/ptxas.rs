//! Compiling the committed PTX with `ptxas`, with no GPU: a register and spill report per kernel.
//!
//! `ptxas` comes from PyPI's `nvidia-cuda-nvcc` wheel, unpacked into the ignored `.tools/`, so
//! every machine reports with the same compiler.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ptx::{ARCHES, committed_path};

#[path = "../../host/src/ptx_index.rs"]
#[allow(dead_code)]
mod ptx_index;
use crate::{Result, capture, describe, relative, run, stdout_of, step};

/// The `nvidia-cuda-nvcc` release whose `ptxas` compiles the PTX (CUDA 13.0).
const NVCC_WHEEL_VERSION: &str = "13.0.88";
/// The path of `ptxas` inside that wheel.
const PTXAS_IN_WHEEL: &str = "nvidia/cu13/bin/ptxas";

/// What ptxas reports for one function of one architecture.
#[derive(Debug, PartialEq)]
struct FunctionReport {
    name: String,
    arch: String,
    /// Registers per thread; reported for kernels (entry functions) only.
    registers: Option<u32>,
    stack_bytes: u32,
    spill_store_bytes: u32,
    spill_load_bytes: u32,
}

/// Compiles every committed PTX file, prints the table, writes it to `target/ptxas-report.txt`,
/// and fails if ptxas fails or any function spills more than [`SPILLS_ALLOWED`] lets it.
pub fn report(root: &Path) -> Result<()> {
    let ptxas = ensure_ptxas(root)?;
    let (mut rows, mut serialised) = (Vec::new(), Vec::new());
    for arch in &ARCHES {
        let (found, notes) = compile(root, &ptxas, arch.name, &committed_path(root, arch))?;
        rows.extend(found);
        serialised.extend(notes);
        compile_modules(root, &ptxas, arch.name, &committed_path(root, arch))?;
    }
    let table = format_table(&rows);
    print!("{table}");
    let report_path = root.join("target/ptxas-report.txt");
    fs::write(&report_path, &table)
        .map_err(|err| format!("cannot write {}: {err}", report_path.display()))?;
    step(&format!(
        "ptxas report written to {}",
        relative(root, &report_path)
    ));

    if rows.iter().all(|row| row.registers.is_none()) {
        return Err("ptxas reported no kernels".to_string());
    }
    let spilling: Vec<String> = rows
        .iter()
        .filter(|row| spills_too_much(row))
        .map(|row| format!("{} ({})", row.name, row.arch))
        .collect();
    if !spilling.is_empty() {
        return Err(format!(
            "registers spill to local memory in: {}",
            spilling.join(", ")
        ));
    }
    match serialised.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "ptxas waits for warpgroup MMAs the code leaves in flight:\n{}",
            serialised.join("\n")
        )),
    }
}

/// Kernels allowed to spill, by name prefix, up to this many bytes of spill stores and loads
/// together. Only where a cap that spills was measured faster than one that does not, and the
/// spills stay out of the loops over a chunk's vectors (`cargo xtask sass KERNEL`).
///
/// `xent_cluster_capacc_` (16-bit): 12-48 bytes at its cap of 64 (`TIGHT_CAPS` in ptx.rs says
/// what the cap gained). Session 32, its SASS: none in the first pass's or the gradient's
/// loops; one of the two vectors kept in registers was stored after its load and read back in
/// each pass, once a row, because the per-row divisions' slow-path calls sat in its live range
/// (bench/NOTES.md, session 32; 44-152 bytes then). Since session 46 those divisions run in f64
/// (`Mode::F64_DIVISION`), and both vectors stay in registers.
///
/// `xent_split_wsm_` (16-bit): 64-76 bytes at its cap of 80 (`TIGHT_CAPS`). Session 41, its SASS:
/// none in the loops over the chunk's vectors (both passes and the next row's copy); 7 loads and 5
/// stores a row in the row loop.
const SPILLS_ALLOWED: &[(&str, u32)] = &[("xent_cluster_capacc_", 48), ("xent_split_wsm_", 80)];

/// Whether a function spills more than [`SPILLS_ALLOWED`] lets it (nothing, for most).
fn spills_too_much(row: &FunctionReport) -> bool {
    let allowed = SPILLS_ALLOWED
        .iter()
        .find(|(prefix, _)| row.name.starts_with(prefix))
        .map_or(0, |&(_, bytes)| bytes);
    row.spill_store_bytes + row.spill_load_bytes > allowed
}

/// ptxas' notes that it serialised `wgmma`s or injected a wait for them (C7510-C7520): a
/// pipelined kernel that gets one runs its MMAs one group at a time, whatever its source says.
fn wgmma_waits(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| {
            line.contains("warpgroup.wait is injected")
                || line.contains("wgmma.mma_async instructions are serialized")
        })
        .map(|line| line.trim().to_string())
        .collect()
}

/// Runs `ptxas -v` on one PTX file into a cubin under `target/ptxas/` and parses its report,
/// with its notes of `wgmma`s serialised ([`wgmma_waits`]).
fn compile(
    root: &Path,
    ptxas: &Path,
    arch: &str,
    ptx: &Path,
) -> Result<(Vec<FunctionReport>, Vec<String>)> {
    let cubin_dir = root.join("target/ptxas");
    fs::create_dir_all(&cubin_dir)
        .map_err(|err| format!("cannot create {}: {err}", cubin_dir.display()))?;
    let mut command = Command::new(ptxas);
    command.arg(format!("-arch={arch}")).arg("-v").arg(ptx);
    command
        .arg("-o")
        .arg(cubin_dir.join(format!("{arch}.cubin")));
    step(&format!("compiling {} with ptxas", relative(root, ptx)));
    let output = capture(&mut command)?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "`{}` failed ({}):\n{}",
            describe(&command),
            output.status,
            text.trim_end()
        ));
    }
    Ok((parse_verbose(&text, arch), wgmma_waits(&text)))
}

/// Compiles each module of one entry point that the host makes of `ptx` when it loads kernels on
/// their first use (the default, `host/src/ptx_index.rs`), so that a function a kernel
/// calls but its module lacks fails here, not on a GPU. As many ptxas processes at once as the
/// machine has cores; the modules go to `target/ptx-modules/ARCH/`.
fn compile_modules(root: &Path, ptxas: &Path, arch: &str, ptx: &Path) -> Result<()> {
    let text =
        fs::read_to_string(ptx).map_err(|err| format!("cannot read {}: {err}", ptx.display()))?;
    let index = ptx_index::PtxIndex::parse(text);
    let dir = root.join("target/ptx-modules").join(arch);
    fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let mut names: Vec<&str> = index.entry_names().collect();
    names.sort_unstable();
    let mut paths = Vec::new();
    for name in &names {
        let path = dir.join(format!("{name}.ptx"));
        let module = index.module_for(name).expect("an entry of the index");
        fs::write(&path, module)
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        paths.push(path);
    }
    step(&format!(
        "compiling {}'s {} kernels one a module with ptxas",
        relative(root, ptx),
        paths.len()
    ));
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let paths = &paths;
                scope.spawn(move || {
                    let mut failed = Vec::new();
                    for path in paths.iter().skip(w).step_by(workers) {
                        let mut command = Command::new(ptxas);
                        // -O0: this checks that each module stands alone (its functions,
                        // its declarations); the optimised code is the whole file's, above.
                        command
                            .arg(format!("-arch={arch}"))
                            .arg("-O0")
                            .arg(path)
                            .arg("-o")
                            .arg(path.with_extension("cubin"));
                        match capture(&mut command) {
                            Ok(output) if output.status.success() => {
                                let _ = fs::remove_file(path.with_extension("cubin"));
                            }
                            Ok(output) => failed.push(format!(
                                "{}: {}",
                                path.display(),
                                String::from_utf8_lossy(&output.stderr).trim_end()
                            )),
                            Err(err) => failed.push(err),
                        }
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["a ptxas worker panicked".into()])
            })
            .collect()
    });
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "ptxas failed on {} of {arch}'s one-kernel modules:\n{}",
            failures.len(),
            failures.join("\n")
        ))
    }
}

/// Parses `ptxas -v` output: one row per "Function properties for NAME" block, with the registers
/// of the "Used N registers" line that follows a "Compiling entry function" line.
fn parse_verbose(text: &str, arch: &str) -> Vec<FunctionReport> {
    let mut rows: Vec<FunctionReport> = Vec::new();
    let mut entry: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            entry = rest.split('\'').next().map(str::to_string);
        } else if let Some(name) = line.split("Function properties for ").nth(1) {
            rows.push(FunctionReport {
                name: name.trim().to_string(),
                arch: arch.to_string(),
                registers: None,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            });
        } else if line.contains("bytes stack frame") {
            if let Some(row) = rows.last_mut() {
                row.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                row.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                row.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if let Some(rest) = line.split("Used ").nth(1) {
            let registers = rest
                .split_whitespace()
                .next()
                .and_then(|word| word.parse().ok());
            let kernel = rows
                .iter_mut()
                .rev()
                .find(|row| Some(&row.name) == entry.as_ref());
            if let Some(row) = kernel {
                row.registers = registers;
            }
        }
    }
    rows
}

/// The integer just before `label` in `line`, as in "24 bytes spill stores".
fn number_before(line: &str, label: &str) -> Option<u32> {
    let (before, _) = line.split_once(label)?;
    before.split_whitespace().next_back()?.parse().ok()
}

/// The report as an aligned text table, one row per function.
fn format_table(rows: &[FunctionReport]) -> String {
    let width = rows
        .iter()
        .map(|row| row.name.len())
        .max()
        .unwrap_or(0)
        .max("kernel".len());
    let mut table = format!(
        "{:<width$}  {:<5}  {:>9}  {:>5}  {:>12}  {:>11}\n",
        "kernel", "arch", "registers", "stack", "spill stores", "spill loads"
    );
    for row in rows {
        let registers = row
            .registers
            .map_or("-".to_string(), |count| count.to_string());
        let _ = writeln!(
            table,
            "{:<width$}  {:<5}  {:>9}  {:>5}  {:>12}  {:>11}",
            row.name,
            row.arch,
            registers,
            row.stack_bytes,
            row.spill_store_bytes,
            row.spill_load_bytes
        );
    }
    table
}

/// The pinned `ptxas`, unpacked from the `nvidia-cuda-nvcc` wheel into `.tools/` on first use.
pub(crate) fn ensure_ptxas(root: &Path) -> Result<PathBuf> {
    ensure_tool(
        root,
        "nvidia-cuda-nvcc",
        NVCC_WHEEL_VERSION,
        PTXAS_IN_WHEEL,
        "ptxas",
    )
}

/// A binary from an NVIDIA wheel on PyPI, unpacked on first use into
/// `.tools/<package>-<version>/<name>` (only that file: the wheels hold whole toolkits).
pub(crate) fn ensure_tool(
    root: &Path,
    package: &str,
    version: &str,
    member: &str,
    name: &str,
) -> Result<PathBuf> {
    let tool_dir = root.join(".tools").join(format!("{package}-{version}"));
    let tool = tool_dir.join(name);
    if tool.is_file() {
        return Ok(tool);
    }
    step(&format!(
        "installing {name} from {package}=={version} into {}",
        relative(root, &tool_dir)
    ));
    let wheel_dir = root.join(".tools/wheels");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&wheel_dir)
        .arg(format!("{package}=={version}")))?;
    // Unpack the one binary to a temporary name, then rename it, so an interrupted install never
    // leaves a truncated binary behind.
    let unpack = r#"
import glob, os, sys, zipfile
wheel_dir, stem, member, version, dest = sys.argv[1:]
wheels = glob.glob(os.path.join(wheel_dir, f"{stem}-{version}-*.whl"))
if not wheels:
    sys.exit(f"no {stem}-{version} wheel in {wheel_dir}")
os.makedirs(os.path.dirname(dest), exist_ok=True)
with zipfile.ZipFile(wheels[0]) as wheel, open(dest + ".part", "wb") as out:
    out.write(wheel.read(member))
os.chmod(dest + ".part", 0o755)
os.replace(dest + ".part", dest)
for wheel in wheels:
    os.remove(wheel)
"#;
    stdout_of(
        Command::new("python3")
            .args(["-c", unpack])
            .arg(&wheel_dir)
            .arg(package.replace('-', "_"))
            .arg(member)
            .arg(version)
            .arg(&tool),
    )?;
    Ok(tool)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'xent_fused_bf16_i32' for 'sm_90'
ptxas info    : Function properties for xent_fused_bf16_i32
    16 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
ptxas info    : Compile time = 51.315 ms
";

    #[test]
    fn injected_warpgroup_waits_are_found() {
        let text = "ptxas info    : (C7517) warpgroup.wait is injected in around line 1998 by \
                    compiler to allow use of registers defined by GMMA in function 'k'\n\
                    ptxas info    : Used 122 registers, used 1 barriers\n";
        let found = wgmma_waits(text);
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("ptxas info    : (C7517)"), "{found:?}");
        assert!(wgmma_waits(SAMPLE).is_empty());
    }

    #[test]
    fn only_the_named_kernels_may_spill_and_only_so_much() {
        let row = |name: &str, stores, loads| FunctionReport {
            name: name.to_string(),
            arch: "sm_90".to_string(),
            registers: Some(64),
            stack_bytes: 112,
            spill_store_bytes: stores,
            spill_load_bytes: loads,
        };
        assert!(!spills_too_much(&row("xent_cluster_cap_bf16_i32", 0, 0)));
        assert!(spills_too_much(&row("xent_cluster_cap_bf16_i32", 4, 0)));
        assert!(spills_too_much(&row("xent_cluster_cap_bf16_i32", 0, 4)));
        assert!(!spills_too_much(&row(
            "xent_cluster_capacc_bf16_i64",
            24,
            24
        )));
        // Session 32's spills, before the f64 divisions: no longer allowed.
        assert!(spills_too_much(&row(
            "xent_cluster_capacc_bf16_i64",
            36,
            116
        )));
        assert!(spills_too_much(&row(
            "xent_cluster_capacc_bf16_i64",
            28,
            24
        )));
        assert!(spills_too_much(&row("xent_split_capacc_bf16_i64", 4, 4)));
    }

    #[test]
    fn verbose_output_gives_registers_and_spills_per_function() {
        let rows = parse_verbose(SAMPLE, "sm_90");
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (
                rows[0].name.as_str(),
                rows[0].registers,
                rows[0].stack_bytes
            ),
            ("helper", None, 8)
        );
        let kernel = &rows[1];
        assert_eq!(kernel.name, "xent_fused_bf16_i32");
        assert_eq!(kernel.registers, Some(40));
        assert_eq!(
            (
                kernel.stack_bytes,
                kernel.spill_store_bytes,
                kernel.spill_load_bytes
            ),
            (16, 24, 32)
        );
    }
}
