//! Finding a shared library at run time (cuBLASLt, NCCL): the files to try, in order, and the
//! loader's cause when one does not open.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use libloading::Library;

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

/// The first of `candidates` that loads and in which `bind` finds every entry point it needs:
/// the library, its file and what `bind` made of it; else, for each file tried, why it failed
/// (the loader's cause, or the entry point `bind` missed).
pub(crate) fn open_first<F, E: Display>(
    candidates: Vec<PathBuf>,
    bind: impl Fn(&Library) -> Result<F, E>,
) -> Result<(Library, PathBuf, F), Vec<String>> {
    let mut tried = Vec::new();
    for path in candidates {
        // SAFETY: loading runs the library's initialisers; those of the CUDA libraries searched
        // here are safe to run in a process that uses CUDA.
        let lib = match unsafe { Library::new(&path) } {
            Ok(lib) => lib,
            Err(err) => {
                tried.push(format!("{}: {}", path.display(), load_error(&err)));
                continue;
            }
        };
        match bind(&lib) {
            Ok(fns) => return Ok((lib, path, fns)),
            Err(missing) => tried.push(format!("{}: missing {missing}", path.display())),
        }
    }
    Err(tried)
}

/// A loader's error with its cause (libloading's `dlopen failed` says why only in its source: the
/// file is missing, or a library it needs is).
fn load_error(err: &libloading::Error) -> String {
    use std::error::Error as _;
    match err.source() {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}
