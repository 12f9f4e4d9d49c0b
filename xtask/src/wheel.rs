//! `cargo xtask wheel`: the Python package (`python/`, pyo3 + maturin) as an abi3 wheel in
//! `target/wheels/`, built with the stable toolchain and a maturin of its own in a virtual
//! environment under `.tools/venv` (made when missing, so a fresh machine needs only python3).
//! `cargo xtask test` then installs the wheel there and runs `python/tests` on the CPU path.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, run, step};

/// What the virtual environment holds, pinned: maturin builds the wheel, NumPy and pytest run
/// the CPU tests (ml_dtypes gives NumPy a bfloat16, so they cover it too), pyflakes reads the
/// Python code that CI cannot run (the CUDA paths).
const VENV_PACKAGES: [&str; 5] = [
    "maturin==1.16.0",
    "numpy==2.2.6",
    "ml_dtypes==0.5.3",
    "pytest==8.4.2",
    "pyflakes==3.4.0",
];

/// The virtual environment's python, made (with [`VENV_PACKAGES`]) when missing.
pub fn venv_python(root: &Path) -> Result<PathBuf> {
    let venv = root.join(".tools/venv");
    let python = venv.join("bin/python");
    let marker = venv.join("xtask-packages.txt");
    let wanted = VENV_PACKAGES.join("\n");
    if python.is_file() && fs::read_to_string(&marker).is_ok_and(|have| have == wanted) {
        return Ok(python);
    }
    step("making the Python environment .tools/venv (maturin, numpy, ml_dtypes, pytest, pyflakes)");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(pip_install(&python).args(VENV_PACKAGES))?;
    fs::write(&marker, wanted)
        .map_err(|err| format!("cannot write {}: {err}", marker.display()))?;
    Ok(python)
}

/// `python -m pip install --quiet` (the caller adds what to install).
fn pip_install(python: &Path) -> Command {
    let mut pip = Command::new(python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    pip
}

/// `cargo xtask wheel`: builds the wheel and returns its path.
pub fn wheel(root: &Path) -> Result<PathBuf> {
    let python = venv_python(root)?;
    let out = root.join("target/wheels");
    if out.exists() {
        fs::remove_dir_all(&out).map_err(|err| format!("cannot empty target/wheels: {err}"))?;
    }
    step("building the Python wheel (maturin, abi3)");
    run(Command::new(&python)
        .args(["-m", "maturin", "build", "--release", "--quiet", "--out"])
        .arg(&out)
        .current_dir(root.join("python")))?;
    let wheel = fs::read_dir(&out)
        .map_err(|err| format!("cannot read target/wheels: {err}"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .ok_or("maturin wrote no wheel into target/wheels")?;
    step(&format!("wrote {}", crate::relative(root, &wheel)));
    Ok(wheel)
}

/// Builds the wheel, installs it into `.tools/venv` and runs `python/tests` there (no GPU and no
/// PyTorch in CI: the NumPy tests run, the PyTorch ones report themselves skipped).
pub fn test(root: &Path) -> Result<()> {
    let wheel = wheel(root)?;
    let python = venv_python(root)?;
    run(pip_install(&python)
        .args(["--no-deps", "--force-reinstall"])
        .arg(&wheel))?;
    // Undefined names and the like, also on the lines only a GPU runs.
    step("pyflakes on python/");
    run(Command::new(&python)
        .args(["-m", "pyflakes", "xent", "tests", "examples"])
        .current_dir(root.join("python")))?;
    step("running python/tests against the installed wheel");
    // From python/tests, so that `import xent` finds the installed wheel, not python/xent.
    run(Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "."])
        .current_dir(root.join("python/tests")))
}
