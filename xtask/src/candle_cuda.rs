//! `cargo xtask candle-cuda`: what building xent's `candle-cuda` feature needs on a machine
//! without a CUDA toolkit or GPU, and the build itself.
//!
//! candle's `cuda` feature compiles its kernels with nvcc (candle-kernels) and links libcuda,
//! cuBLAS, cuRAND and NVRTC. PyPI has all of it: the CUDA 13.0 wheels below go into
//! `.tools/cuda13/` (nvcc and its headers must be of one minor version: 13.5's headers break
//! `__cudaLaunch` with 13.0's nvcc). Linking needs `lib<name>.so` names (the wheels ship
//! `.so.13`) and a libcuda: `.tools/cuda13/stubs/` holds symlinks to the wheels' libraries and a
//! stub `libcuda.so` (soname `libcuda.so.1`) defining every `cu*` function of cudarc's driver
//! bindings, as a toolkit's own `stubs/` folder does. At run time the GPU machine's driver
//! provides libcuda, and PyTorch's `nvidia/cu13/lib` the other libraries (run.sh sets
//! LD_LIBRARY_PATH). The build goes to `target/candle-cuda/` so that the default build's cache
//! stays as it is.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, describe, stdout_of, step};

/// The wheels, pinned to one CUDA minor version.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-curand==10.4.5.25",
    "nvidia-cublas==13.0.2.14",
];

/// Libraries linked by name, and the file of the wheels each name points to.
const LINKED: &[(&str, &str)] = &[
    ("cublas", "libcublas.so.13"),
    ("cublasLt", "libcublasLt.so.13"),
    ("cudart", "libcudart.so.13"),
    ("curand", "libcurand.so.10"),
    ("nvrtc", "libnvrtc.so.13"),
];

/// The prepared tree: the wheels' `nvidia/cu13` and the link stubs.
pub struct CudaTree {
    pub cu13: PathBuf,
    pub stubs: PathBuf,
}

impl CudaTree {
    /// The environment of a cargo build of the `candle-cuda` feature.
    pub fn apply(&self, root: &Path, cargo: &mut Command) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.cu13.join("bin")];
        paths.extend(std::env::split_paths(&path));
        cargo
            .env("PATH", std::env::join_paths(paths).expect("PATH entries"))
            .env("CUDA_ROOT", &self.cu13)
            .env("CUDA_PATH", &self.cu13)
            .env("CUDA_COMPUTE_CAP", "90")
            .env("RUSTFLAGS", format!("-L {}", self.stubs.display()))
            .env("CARGO_TARGET_DIR", root.join("target/candle-cuda"));
    }
}

/// Installs the wheels (once) and makes the stubs; returns the tree.
pub fn setup(root: &Path) -> Result<CudaTree> {
    let tools = root.join(".tools/cuda13");
    let cu13 = tools.join("nvidia/cu13");
    let marker = tools.join(".installed");
    let wanted = WHEELS.join("\n");
    if fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        step("installing CUDA 13.0's nvcc, headers and libraries from PyPI into .tools/cuda13");
        let mut pip = Command::new("python3");
        pip.args([
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--upgrade",
            "--target",
        ])
        .arg(&tools)
        .args(WHEELS);
        let status = pip
            .status()
            .map_err(|err| format!("could not start `{}`: {err}", describe(&pip)))?;
        if !status.success() {
            return Err(format!("`{}` failed ({status})", describe(&pip)));
        }
        fs::write(&marker, &wanted).map_err(|err| format!("cannot write {marker:?}: {err}"))?;
    }
    if !cu13.join("bin/nvcc").is_file() {
        return Err(format!("no nvcc in {}", cu13.display()));
    }
    let stubs = tools.join("stubs");
    fs::create_dir_all(&stubs).map_err(|err| format!("cannot create {stubs:?}: {err}"))?;
    for (name, file) in LINKED {
        let target = cu13.join("lib").join(file);
        if !target.is_file() {
            return Err(format!("the wheels have no {}", target.display()));
        }
        let link = stubs.join(format!("lib{name}.so"));
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .map_err(|err| format!("cannot link {link:?}: {err}"))?;
    }
    let libcuda = stubs.join("libcuda.so");
    if !libcuda.is_file() {
        let names = driver_function_names(root)?;
        let source = stubs.join("cuda_stub.c");
        let text: String = names
            .iter()
            .map(|n| format!("void {n}(void) {{}}\n"))
            .collect();
        fs::write(&source, text).map_err(|err| format!("cannot write {source:?}: {err}"))?;
        let mut cc = Command::new("cc");
        cc.args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
            .arg(&libcuda)
            .arg(&source);
        stdout_of(&mut cc)?;
        step(&format!("made a libcuda stub of {} functions", names.len()));
    }
    Ok(CudaTree { cu13, stubs })
}

/// The cudarc version of the workspace's lock file.
fn cudarc_version(root: &Path) -> Result<String> {
    let lock = fs::read_to_string(root.join("Cargo.lock"))
        .map_err(|err| format!("cannot read Cargo.lock: {err}"))?;
    let after = lock
        .split("name = \"cudarc\"\nversion = \"")
        .nth(1)
        .ok_or("no cudarc in Cargo.lock")?;
    Ok(after.split('"').next().unwrap_or_default().to_string())
}

/// Every `cu*` function of cudarc's driver bindings (the source cargo downloaded).
fn driver_function_names(root: &Path) -> Result<Vec<String>> {
    let version = cudarc_version(root)?;
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let registry = home.join("registry/src");
    let mut names = Vec::new();
    for index in
        fs::read_dir(&registry).map_err(|err| format!("cannot read {registry:?}: {err}"))?
    {
        let sys = index
            .map_err(|err| err.to_string())?
            .path()
            .join(format!("cudarc-{version}/src/driver/sys/mod.rs"));
        if let Ok(text) = fs::read_to_string(&sys) {
            for word in text.split("pub unsafe fn ").skip(1) {
                let name: String = word
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.starts_with("cu") {
                    names.push(name);
                }
            }
            break;
        }
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(format!(
            "no cudarc {version} driver bindings under {} (run a cargo build first)",
            registry.display()
        ));
    }
    Ok(names)
}

/// `cargo xtask candle-cuda`: sets up the tree and builds the feature's tests, bench and example
/// (release), as the bundle takes them.
pub fn command(root: &Path) -> Result<()> {
    let tree = setup(root)?;
    for args in BUILDS {
        let mut cargo = Command::new("cargo");
        cargo.current_dir(root).args(*args);
        tree.apply(root, &mut cargo);
        eprintln!("$ {}", describe(&cargo));
        let status = cargo
            .status()
            .map_err(|err| format!("could not start `{}`: {err}", describe(&cargo)))?;
        if !status.success() {
            return Err(format!("`{}` failed ({status})", describe(&cargo)));
        }
    }
    step("built the candle-cuda tests, bench and example in target/candle-cuda/");
    Ok(())
}

/// The candle-cuda builds: its test and bench (tests crate) and the example (xent).
pub const BUILDS: &[&[&str]] = &[
    &[
        "test",
        "-p",
        "xent-tests",
        "--features",
        "candle-cuda",
        "--release",
        "--no-run",
        "--test",
        "candle_cuda",
    ],
    &[
        "bench",
        "-p",
        "xent-tests",
        "--features",
        "candle-cuda",
        "--no-run",
        "--bench",
        "candle",
    ],
    &[
        "build",
        "-p",
        "xent",
        "--features",
        "candle-cuda",
        "--release",
        "--example",
        "candle_train",
    ],
];
