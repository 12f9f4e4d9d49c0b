//! NCCL's loader (`xent::nccl`): the search order, a clear error when nothing loads, and, where a
//! library is found (`XENT_NCCL`, or the `nvidia-nccl-cu12/cu13` wheel beside a Python the test
//! can ask), loading it and reading its version (no GPU needed).

use std::path::PathBuf;

use xent::nccl::{self, Nccl};

/// The site-packages folders of `python3`, if there is one.
fn site_packages() -> Vec<PathBuf> {
    std::process::Command::new("python3")
        .args([
            "-c",
            "import site; print('\\n'.join(site.getsitepackages()))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn candidates_look_where_the_wheels_put_nccl() {
    let tries = nccl::candidates(
        Some("/opt/x/libnccl.so.2"),
        &[PathBuf::from("/d")],
        &[PathBuf::from("/site")],
    );
    let shown: Vec<String> = tries.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(
        shown,
        vec![
            "/opt/x/libnccl.so.2",
            "/d/libnccl.so.2",
            "/d/libnccl.so",
            "/site/nvidia/nccl/lib/libnccl.so.2",
            "/site/nvidia/nccl/lib/libnccl.so",
            "libnccl.so.2",
            "libnccl.so",
        ]
    );
}

#[test]
fn nccl_loads_and_reports_its_version_or_says_what_it_tried() {
    match Nccl::open(&[], &site_packages()) {
        Ok(nccl) => {
            let (major, minor, patch) = nccl.version().expect("ncclGetVersion needs no GPU");
            eprintln!(
                "NCCL {major}.{minor}.{patch} from {}",
                nccl.path().display()
            );
            assert_eq!(major, 2, "NCCL 2.x");
        }
        Err(err) => {
            let message = err.to_string();
            assert!(message.contains("libnccl.so.2"), "{message}");
            assert!(message.contains("XENT_NCCL"), "{message}");
            eprintln!("SKIPPED: no NCCL here ({message})");
        }
    }
}
