//! Building `kernels-gpu/` to PTX with its pinned nightly, and the committed copies in `host/ptx/`.
//!
//! The kernel crate is built as an rlib with `cargo rustc ... -- --emit=asm` (there is no
//! `llvm-bitcode-linker` component to link a `cdylib`); the `.s` rustc leaves in `deps/` is the PTX.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, relative, run, stdout_of, step};

/// The kernel crate's folder, relative to the repository root.
const KERNEL_CRATE: &str = "kernels-gpu";
/// The kernel crate's library name, which prefixes the files rustc writes.
const KERNEL_LIB: &str = "xent_kernels";
/// Where the generated PTX is committed, relative to the repository root.
const COMMITTED_DIR: &str = "host/ptx";

/// A GPU architecture the committed PTX targets, with the rustc flags it needs beyond `target-cpu`.
pub struct Arch {
    /// The `sm_XX` name: rustc's `target-cpu`, ptxas' `-arch` and the PTX file's stem.
    pub name: &'static str,
    /// Extra `-C` flags.
    extra_flags: &'static [&'static str],
}

/// Every architecture with committed PTX. sm_90 needs PTX ISA 8.0 for the `.release`/`.acquire`
/// cluster barriers (rustc's default for sm_90 is 7.8). sm_90a is a module apart: the
/// warpgroup-MMA prototype, whose `wgmma` only `sm_90a` PTX may use (and which no later GPU can
/// JIT, so the main PTX stays `sm_90`).
pub const ARCHES: [Arch; 3] = [
    Arch {
        name: "sm_80",
        extra_flags: &[],
    },
    Arch {
        name: "sm_90",
        // `xent_cluster` compiles the thread-block-cluster kernels, which need sm_90.
        extra_flags: &["-C", "target-feature=+ptx80", "--cfg", "xent_cluster"],
    },
    Arch {
        name: "sm_90a",
        extra_flags: &["-C", "target-feature=+ptx80", "--cfg", "xent_wgmma"],
    },
];

/// Environment variables that would leak the stable toolchain, or its flags, into the nightly cargo.
const LEAKY_ENV: [&str; 11] = [
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO",
];

/// `cargo xtask ptx`: builds every architecture and writes `host/ptx/<arch>.ptx`.
pub fn write_committed(root: &Path) -> Result<()> {
    let channel = ensure_nightly(root)?;
    fs::create_dir_all(root.join(COMMITTED_DIR))
        .map_err(|err| format!("cannot create {COMMITTED_DIR}/: {err}"))?;
    for arch in &ARCHES {
        let ptx = build(root, &channel, arch, &[])?;
        let path = committed_path(root, arch);
        fs::write(&path, &ptx).map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        step(&format!(
            "wrote {} ({} kernels, {} bytes)",
            relative(root, &path),
            count_kernels(&ptx),
            ptx.len()
        ));
    }
    Ok(())
}

/// `cargo xtask ptx-trace`: the sm_90 PTX with `--cfg xent_trace` into `target/ptx-trace/sm_90.ptx`
/// (never committed): its cluster kernels stamp a phase timeline into each CTA's chunk of the
/// gradient, which `cargo run --release --example small_trace` reads with `XENT_PTX` set to it.
pub fn write_trace(root: &Path) -> Result<()> {
    let sm_90 = ARCHES
        .iter()
        .find(|arch| arch.name == "sm_90")
        .ok_or("no sm_90 in ARCHES")?;
    let channel = ensure_nightly(root)?;
    let ptx = build(root, &channel, sm_90, &["--cfg", "xent_trace"])?;
    let dir = root.join("target/ptx-trace");
    fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let path = dir.join("sm_90.ptx");
    fs::write(&path, &ptx).map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    step(&format!(
        "wrote {} ({} kernels)",
        relative(root, &path),
        count_kernels(&ptx)
    ));
    Ok(())
}

/// Rebuilds every architecture into `target/ptx/<arch>.ptx` and fails if a committed file differs.
pub fn check_committed(root: &Path) -> Result<()> {
    let channel = ensure_nightly(root)?;
    let mut stale = Vec::new();
    for arch in &ARCHES {
        let fresh = build(root, &channel, arch, &[])?;
        let fresh_path = root.join("target/ptx").join(format!("{}.ptx", arch.name));
        fs::write(&fresh_path, &fresh)
            .map_err(|err| format!("cannot write {}: {err}", fresh_path.display()))?;
        let committed_path = committed_path(root, arch);
        match fs::read(&committed_path) {
            Ok(committed) if committed == fresh => step(&format!(
                "{} is up to date",
                relative(root, &committed_path)
            )),
            Ok(_) => stale.push(format!("{COMMITTED_DIR}/{}.ptx is stale", arch.name)),
            Err(_) => stale.push(format!("{COMMITTED_DIR}/{}.ptx is missing", arch.name)),
        }
    }
    match stale.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "{}: run `cargo xtask ptx` and commit",
            stale.join(", ")
        )),
    }
}

/// The committed PTX file of an architecture.
pub fn committed_path(root: &Path, arch: &Arch) -> PathBuf {
    root.join(COMMITTED_DIR).join(format!("{}.ptx", arch.name))
}

/// Builds the kernel crate for one architecture (with `more_flags` after its own: `ptx-trace`'s
/// cfg); returns the PTX behind its `@generated` line.
fn build(root: &Path, channel: &str, arch: &Arch, more_flags: &[&str]) -> Result<Vec<u8>> {
    step(&format!(
        "building {KERNEL_CRATE}/ for {} with {channel}",
        arch.name
    ));
    let target_dir = root.join("target/ptx").join(arch.name);
    let out_dir = target_dir.join("nvptx64-nvidia-cuda/release");
    // Cargo does not track `--emit=asm` outputs: without the fingerprint it would call the crate
    // fresh and leave no `.s`. Removing both makes rustc run and rules out picking an old `.s`.
    remove_matching(&out_dir.join("deps"), &format!("{KERNEL_LIB}-"), ".s")?;
    remove_matching(
        &out_dir.join(".fingerprint"),
        &format!("{}-", KERNEL_LIB.replace('_', "-")),
        "",
    )?;

    let mut cargo = Command::new("cargo");
    for name in LEAKY_ENV {
        cargo.env_remove(name);
    }
    cargo.current_dir(root).arg(format!("+{channel}")).args([
        "rustc",
        "--release",
        "--target",
        "nvptx64-nvidia-cuda",
        "-Zbuild-std=core",
        "--lib",
        "--manifest-path",
    ]);
    cargo
        .arg(root.join(KERNEL_CRATE).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    cargo.args([
        "--",
        "--emit=asm",
        "-C",
        &format!("target-cpu={}", arch.name),
    ]);
    cargo
        .args(arch.extra_flags)
        .args(more_flags)
        .arg("-Zlocation-detail=none");
    run(&mut cargo)?;

    let asm = find_one(&out_dir.join("deps"), &format!("{KERNEL_LIB}-"), ".s")?;
    let body = fs::read(&asm).map_err(|err| format!("cannot read {}: {err}", asm.display()))?;
    let mut ptx = format!(
        "// @generated by `cargo xtask ptx` from {KERNEL_CRATE}/ (rustc NVPTX backend, {channel}, {}). Do not edit.\n",
        arch.name
    )
    .into_bytes();
    ptx.extend_from_slice(align_params(&cap_registers(&String::from_utf8_lossy(&body))).as_bytes());
    Ok(ptx)
}

/// Registers per thread that ptxas may give a kernel (`.maxnreg`, which rustc cannot emit). The
/// kernels hold 8 16-byte vectors per thread; uncapped, ptxas takes up to 80 registers, which
/// allows one 512-thread block per SM. Capped at 64, the cluster kernel runs four 256-thread CTAs
/// per SM: on an H200 at 8192 x 128256 bf16 it went from 75% to 83% of copy bandwidth, and
/// 8192 x 32000 from 75% to 81% (2026-11-28).
pub const MAX_REGISTERS: u32 = 64;
/// Kernels left uncapped because ptxas would spill under `MAX_REGISTERS`.
const UNCAPPED: &[&str] = &[
    "xent_fused_",
    "xent_chunk_grad_coef_",
    "xent_chunk_grad_acc_",
    // The soft cap's polynomial in the batched loops: 24-224 bytes of spills at 64.
    "xent_chunk_partial_cap_",
    "xent_chunk_grad_cap_",
    "xent_backward_cap_",
    // The split plan's per-element kernels take 55-68 registers uncapped. The soft cap's with
    // token accuracy (`capacc_`) in 16 bits take 96: one 384-thread CTA an SM, which ran 0.4-2.0
    // points of copy faster than two at 64 or 80 registers with accuracy, and within 1.5 of them
    // for all five (session 42, H100 under an A100's limits). The others are capped below.
    "xent_split_opt_",
    "xent_split_capacc_bf16_",
    "xent_split_capacc_f16_",
];
/// Kernels with a tighter cap: the plain and per-row option cluster kernels, which keep 2
/// vectors per thread in registers (39-40 used, no spills): 40 lets 6 CTAs of 256 threads or 3
/// of 512 share an SM's 64 K registers. (Before the keep, the per-row option kernel took 44-46
/// uncapped and ran two 512-thread CTAs per SM; `xent_cluster_opt_` spills at 40.)
///
/// And looser caps for the token-accuracy kernels (`acc_`), which count it in the first pass: the
/// chunked plan's first kernel spills at 64 and 72 (sm_90) and takes 93 uncapped, 80 fits; the
/// cluster kernel spills 4 bytes at 40 with i64 labels and takes 46-47 under 48 (ptxas); with
/// the soft cap too (`capacc_`), 72.
const TIGHT_CAPS: &[(&str, u32)] = &[
    ("xent_chunk_partial_acc_", 80),
    ("xent_cluster_coef_", 40),
    ("xent_cluster_acc_", 48),
    // The soft cap with token accuracy (and all five options): 64 lets four 256-thread CTAs share
    // an SM (72 allowed three). In 16 bits that spilled 44-152 bytes (12-48 since session 46's f64
    // divisions, `Mode::F64_DIVISION`; `SPILLS_ALLOWED` in ptxas.rs),
    // and still paid: session 32, with the chunk in two pieces, % of copy at 8192 x 128256, 4096 x
    // 262144, 16384 x 151936 bf16 and 8192 x 128256 f16, 72 -> 64 registers: soft cap + accuracy
    // 67.5 / 65.5 / 71.2 / 69.0 -> 70.8 / 70.1 / 69.1 / 71.9, all five 51.0 / 48.3 / 54.5 / 51.7 ->
    // 56.2 / 53.2 / 53.2 / 57.2 (16384 x 151936 is held to three CTAs an SM by its chunk's shared
    // memory either way, and lost 1.5-2 points at 64 in two runs). In f32, 60 with no spills.
    ("xent_cluster_capacc_", 64),
    // Class-weighted smoothing (with token accuracy on at run time): 47-48 registers, no
    // spills, at 48 while the first pass summed the smoothing; its gradient pass summing it
    // spills 32-40 bytes there (16-bit). 56 still lets four 256-thread CTAs share an SM (the
    // most the chunks' shared memory allows at 8192 x 128256 bf16).
    ("xent_cluster_wsm_", 56),
    // The split plan's per-row constant and token accuracy kernels (256 threads a CTA): 80 lets
    // three CTAs share an SM, not two (94-123 uncapped), with no spills. On an H200 under an
    // A100's limits (session 18, 8192 x 128256 bf16) smoothing went from 53.0 to 64.4% of copy,
    // the z-loss 55.2 to 67.0, class weights 54.0 to 65.6, token accuracy 48.1 to 59.3.
    ("xent_split_coef_", 80),
    // Class-weighted smoothing's (105-123 uncapped): at 80 it spills 40-76 bytes in 16 bits, none
    // in f32, and with 384 threads a CTA (two an A100 SM, `plan::SPLIT_OPTION_THREADS`) it beat
    // the same kernel uncapped at 256 by 3.7-8.2 points of copy and the chunked plan by 11-18 in
    // 16 bits (session 41, H100 under an A100's limits).
    ("xent_split_wsm_", 80),
    // The soft cap's, whose passes take one vector at a time from the chunk in shared memory
    // (session 42; H100 under an A100's limits, % of copy). In f32 (53-61 registers uncapped) 64
    // lets two 512-thread CTAs share an SM (`plan::SPLIT_CAP_THREADS`): 83.2 against 81.8 at 384
    // threads at 8192 x 128256, with token accuracy 77.0 against 75.5, all five 58.7 against 53.2.
    // In 16 bits (91 uncapped) 80 lets two 384-thread CTAs share one: 73.2 / 72.6 / 77.8 at
    // 4096 x 262144, 8192 x 128256 and 16384 x 151936 bf16, against 72.1 / 72.0 / 77.0 uncapped
    // (one CTA an SM) and 69.8 / 71.3 / 75.0 at 64 (two). No spills at these caps.
    ("xent_split_cap_f32_", 64),
    ("xent_split_capacc_f32_", 64),
    ("xent_split_cap_", 80),
    ("xent_split_acc_", 80),
    // The plain ones: 72-80 registers uncapped before their handshake waited on tagged summaries
    // (session 37), 80-95 since; 80, no spills, keeps three CTAs an SM where their chunk allows.
    ("xent_split_bf16_", 80),
    ("xent_split_f16_", 80),
    ("xent_split_f32_", 80),
    // The split plan with the chunks in L2 (session 38): 80-96 uncapped; at 72 it spills 24-60
    // bytes, at 80 none (three 256-thread CTAs an SM).
    ("xent_split_l2_", 80),
    ("xent_cluster_bf16_", 40),
    ("xent_cluster_f16_", 40),
    ("xent_cluster_f32_", 40),
    // The GEMM + log-sum-exp prototype: 64 accumulators and 24 fragment registers a thread; 128
    // lets two 256-thread CTAs share an SM.
    ("xent_lse_gemm_", 128),
    // Its warpgroup-MMA version: 64 accumulators and the epilogue's values; two 256-thread CTAs
    // an SM.
    ("xent_lse_wgmma_", 128),
    // The TMA kernel: 128 accumulators a thread, 288 threads. An SM's registers are four
    // quadrants of 16 K, warp `w` in quadrant `w % 4`: the first quadrant holds three of the nine
    // warps, so at most 170 a thread (224 failed at launch: out of resources). 168: no spills.
    ("xent_lse_tma_", 168),
    // The weight-gradient GEMM: the same threads and accumulators.
    ("xent_gemm_tn_", 168),
    ("xent_gemm_grads_", 168),
];

/// Raises the declared alignment of the parameter block of every entry that uses TMA
/// (`cp.async.bulk.tensor`: its tensor maps live in the parameter block and must be 64-byte
/// aligned in parameter space) to 64 bytes; rustc's NVPTX kernel ABI declares at most 16. Found
/// from the entries' bodies, so a new TMA kernel cannot be missed (one was, in session 24: the
/// pair kernel's first launch failed with a misaligned address).
fn align_params(ptx: &str) -> String {
    let mut out = String::with_capacity(ptx.len());
    let mut rest = ptx;
    while let Some(at) = rest.find(".visible .entry ") {
        let next = rest[at + 1..]
            .find(".visible .entry ")
            .map_or(rest.len(), |n| at + 1 + n);
        let (before, entry) = (&rest[..at], &rest[at..next]);
        out.push_str(before);
        if entry.contains("cp.async.bulk.tensor") {
            let name = entry[".visible .entry ".len()..]
                .split(|c: char| c == '(' || c.is_whitespace())
                .next()
                .unwrap_or_default();
            out.push_str(&entry.replacen(
                &format!(".param .align 16 .b8 {name}_param_0["),
                &format!(".param .align 64 .b8 {name}_param_0["),
                1,
            ));
        } else {
            out.push_str(entry);
        }
        rest = &rest[next..];
    }
    out.push_str(rest);
    out
}

/// Inserts `.maxnreg MAX_REGISTERS` between each entry's parameter list and its body.
fn cap_registers(ptx: &str) -> String {
    let mut out = String::with_capacity(ptx.len() + 4096);
    let mut pending = None;
    for line in ptx.split_inclusive('\n') {
        if let Some(name) = line.split(".entry ").nth(1) {
            pending = if UNCAPPED.iter().any(|prefix| name.starts_with(prefix)) {
                None
            } else {
                let tight = TIGHT_CAPS
                    .iter()
                    .find(|(prefix, _)| name.starts_with(prefix));
                Some(tight.map_or(MAX_REGISTERS, |&(_, cap)| cap))
            };
        }
        if let Some(cap) = pending
            && line.trim_end() == "{"
        {
            out.push_str(&format!(".maxnreg {cap}\n"));
            pending = None;
        }
        out.push_str(line);
    }
    out
}

/// The number of `.entry` (kernel) declarations in a PTX file.
fn count_kernels(ptx: &[u8]) -> usize {
    String::from_utf8_lossy(ptx)
        .lines()
        .filter(|line| line.contains(".entry "))
        .count()
}

/// The channel pinned by `kernels-gpu/rust-toolchain.toml`, e.g. `nightly-2026-05-20`.
fn nightly_channel(root: &Path) -> Result<String> {
    let path = root.join(KERNEL_CRATE).join("rust-toolchain.toml");
    let text = fs::read_to_string(&path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    parse_channel(&text).ok_or_else(|| format!("no `channel = \"...\"` line in {}", path.display()))
}

/// The value of the `channel = "..."` line of a `rust-toolchain.toml`.
fn parse_channel(toml: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        let value = value.trim().strip_prefix('"')?.split('"').next()?;
        (key.trim() == "channel" && !value.is_empty()).then(|| value.to_string())
    })
}

/// Installs the kernel crate's nightly, with `rust-src`, where it is missing; returns its channel.
///
/// Needed because `RUSTUP_AUTO_INSTALL=0` stops rustup from installing a toolchain by itself.
fn ensure_nightly(root: &Path) -> Result<String> {
    let channel = nightly_channel(root)?;
    let toolchains = stdout_of(Command::new("rustup").args(["toolchain", "list"]))?;
    let installed = toolchains
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|name| {
            name == channel
                || name
                    .strip_prefix(channel.as_str())
                    .is_some_and(|host| host.starts_with('-'))
        });
    if !installed {
        step(&format!(
            "installing {channel} (with rust-src) for {KERNEL_CRATE}/"
        ));
        run(Command::new("rustup")
            .args(["toolchain", "install", &channel])
            .args(["--profile", "minimal", "--component", "rust-src"]))?;
    }
    let components = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &channel,
    ]))?;
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        step(&format!("adding rust-src to {channel}"));
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &channel,
        ]))?;
    }
    Ok(channel)
}

/// Removes every entry of `dir` whose name starts with `prefix` and ends with `suffix`.
fn remove_matching(dir: &Path, prefix: &str, suffix: &str) -> Result<()> {
    for path in matching(dir, prefix, suffix)? {
        let removed = match path.is_dir() {
            true => fs::remove_dir_all(&path),
            false => fs::remove_file(&path),
        };
        removed.map_err(|err| format!("cannot remove {}: {err}", path.display()))?;
    }
    Ok(())
}

/// The single entry of `dir` whose name starts with `prefix` and ends with `suffix`.
fn find_one(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    let mut found = matching(dir, prefix, suffix)?;
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(format!(
            "expected one {prefix}*{suffix} in {}, found {n}",
            dir.display()
        )),
    }
}

/// The entries of `dir` whose names start with `prefix` and end with `suffix`; none if `dir` is absent.
fn matching(dir: &Path, prefix: &str, suffix: &str) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(format!("cannot list {}: {err}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|err| format!("cannot list {}: {err}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            found.push(entry.path());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_cap_goes_between_parameters_and_body_of_capped_kernels() {
        let ptx = ".visible .entry xent_cluster_x(\n\t.param .b64 p\n)\n{\n\tret;\n}\n\
                   .visible .entry xent_fused_y(\n\t.param .b64 p\n)\n{\n\tret;\n}\n";
        let capped = cap_registers(ptx);
        assert!(capped.contains(&format!(")\n.maxnreg {MAX_REGISTERS}\n{{\n\tret;")));
        assert_eq!(capped.matches(".maxnreg").count(), 1, "{capped}");
    }

    #[test]
    fn parameter_blocks_of_tma_kernels_are_64_byte_aligned() {
        let ptx = ".visible .entry xent_a(\n\t.param .align 16 .b8 xent_a_param_0[576]\n)\n{\n\t\
                   cp.async.bulk.tensor.2d.shared::cluster.global [r], [t, {x, y}], [m];\n}\n\
                   .visible .entry xent_b(\n\t.param .align 16 .b8 xent_b_param_0[64]\n)\n{\n\tret;\n}\n";
        let aligned = align_params(ptx);
        assert!(
            aligned.contains(".param .align 64 .b8 xent_a_param_0[576]"),
            "{aligned}"
        );
        assert!(
            aligned.contains(".param .align 16 .b8 xent_b_param_0[64]"),
            "{aligned}"
        );
        assert_eq!(aligned.len(), ptx.len());
    }

    #[test]
    fn channel_is_read_from_the_toolchain_file() {
        let toml = "# comment\n[toolchain]\nchannel = \"nightly-2026-05-20\"\ncomponents = [\"rust-src\"]\n";
        assert_eq!(parse_channel(toml).as_deref(), Some("nightly-2026-05-20"));
        assert_eq!(parse_channel("[toolchain]\nprofile = \"minimal\"\n"), None);
    }
}
