//! The Python found for libnbd imports it, and so does `python3` under the PATH given for
//! tools that look it up there.

use std::process::Command;

#[test]
fn the_python_found_and_the_path_given_both_import_nbd() {
    let (Some(python), Some(path)) = (
        lode_testkit::python_with_nbd(),
        lode_testkit::nbd_python_path(),
    ) else {
        return;
    };
    let direct = Command::new(&python)
        .args(["-c", "import nbd"])
        .status()
        .unwrap();
    assert!(direct.success(), "{}", python.display());
    let via_path = Command::new("python3")
        .args(["-c", "import nbd"])
        .env("PATH", &path)
        .status()
        .unwrap();
    assert!(via_path.success(), "PATH={path}");
}
