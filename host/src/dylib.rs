//! Finding a shared library at run time (cuBLASLt, NCCL): the files to try, in order, and the
//! loader's cause when one does not open.

use std::path::{Path, PathBuf};

/// `env` (a file, or a folder searched for `names`), each of `dirs` searched for `names`, then the
/// bare `names` (the loader's own path: `LD_LIBRARY_PATH`, the system's folders).
pub(crate) fn candidates(
    env: Option<&str>,
    dirs: impl IntoIterator<Item = PathBuf>,
    names: &[&str],
) -> Vec<PathBuf> {
    let mut tries = Vec::new();
    let in_dir = |dir: &Path, tries: &mut Vec<PathBuf>| {
        tries.extend(names.iter().map(|name| dir.join(name)));
    };
    if let Some(path) = env.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if path.is_dir() {
            in_dir(&path, &mut tries);
        } else {
            tries.push(path);
        }
    }
    for dir in dirs {
        in_dir(&dir, &mut tries);
    }
    tries.extend(names.iter().map(PathBuf::from));
    tries
}

/// A loader's error with its cause (libloading's `dlopen failed` says why only in its source: the
/// file is missing, or a library it needs is).
pub(crate) fn load_error(err: &libloading::Error) -> String {
    use std::error::Error as _;
    match err.source() {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}
