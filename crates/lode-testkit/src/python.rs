//! A Python that has libnbd's binding, for tests that drive NBD from Python (nbdsh, or a
//! script of their own).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{skip, which};

/// A `python3` that can `import nbd`: the first on `PATH`, else the system's
/// `/usr/bin/python3`. Debian's python3-libnbd installs the module for the system Python
/// only, which a pyenv or virtualenv `python3` first on `PATH` does not see. `None` after
/// [`skip`] when neither has it.
pub fn python_with_nbd() -> Option<PathBuf> {
    let found = [which("python3"), Some(PathBuf::from("/usr/bin/python3"))]
        .into_iter()
        .flatten()
        .find(|python| {
            Command::new(python)
                .args(["-c", "import nbd"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if found.is_none() {
        skip("no python3 with the nbd module (apt-get install python3-libnbd)");
    }
    found
}

/// This process's `PATH` with the directory of [`python_with_nbd`] first, for a tool
/// that runs `python3` from `PATH` (nbdsh). `None` after [`skip`] as for
/// [`python_with_nbd`].
pub fn nbd_python_path() -> Option<String> {
    let python = python_with_nbd()?;
    let dir = python
        .parent()
        .expect("an interpreter's path has a directory");
    let path = std::env::var("PATH").unwrap_or_default();
    Some(format!("{}:{path}", dir.display()))
}
