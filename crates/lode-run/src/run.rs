//! `lode run`: mount an image read-write into a throwaway overlay, work out what to run
//! from its config and the command line (the user looked up inside the image), run it
//! with crun or chroot, and undo everything, whatever happens — an error, the command's
//! end, or a SIGTERM, SIGINT or SIGHUP at any point.

use std::path::Path;
use std::process::ExitStatus;
use std::time::Instant;

use serde_json::Value;

use crate::image::{ImageError, ImageRoot};
use crate::mount::{MountError, MountOptions, mount_timed};
use crate::runtime::{Process, RuntimeError, run_chroot, run_crun};
use crate::signals::{self, SignalGuard};
use crate::timings::{Step, Timings};
use crate::user::{UserError, resolve_user};

/// A run that failed before or around its command.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The image could not be mounted.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A temporary directory could not be made.
    #[error("creating a mount point in {}: {source}", std::env::temp_dir().display())]
    TempDir {
        /// The error.
        source: std::io::Error,
    },
    /// No randomness for the run's name.
    #[error("no randomness for a run name")]
    Random,
    /// The image's root could not be opened.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The user could not be resolved in the image.
    #[error(transparent)]
    User(#[from] UserError),
    /// Neither the command line nor the image says what to run.
    #[error("the image has no entrypoint or cmd; give a command after --")]
    NoCommand,
    /// An `--env` entry without `=`.
    #[error("--env {entry:?} is not KEY=VALUE")]
    BadEnv {
        /// The entry.
        entry: String,
    },
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A signal arrived before the command started; the image was unmounted and detached.
    #[error(
        "interrupted by {} before the command started; the image was unmounted and detached",
        signals::name(*.signal)
    )]
    Interrupted {
        /// The signal.
        signal: libc::c_int,
    },
}

/// How to run the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// crun if it is on PATH, else chroot.
    Auto,
    /// A container from a generated OCI bundle.
    Crun,
    /// chroot(2) with /proc and a private /dev mounted.
    Chroot,
}

/// What `lode run` was asked.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// A tag or a manifest id.
    pub image: String,
    /// The command; empty for the image's entrypoint and cmd.
    pub command: Vec<String>,
    /// How to run it.
    pub runtime: Runtime,
    /// Extra KEY=VALUE pairs, winning over the image's.
    pub env: Vec<String>,
    /// `user[:group]` instead of the image's.
    pub user: Option<String>,
    /// The loop device's readahead, KiB.
    pub readahead_kb: Option<u32>,
    /// Honour setuid bits and device nodes of the image (unsafe for untrusted images).
    pub allow_setuid_and_devices: bool,
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run, before the user is resolved: the arguments, the environment, the working
/// directory and the `user[:group]` spec, from the image `config` (as the agent reports
/// it) and `opts`. `lode vm run` resolves the user inside the guest; `lode run` with
/// [`process`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The program and its arguments.
    pub args: Vec<String>,
    /// KEY=VALUE entries: the image's, PATH if it had none, then `opts.env`.
    pub env: Vec<String>,
    /// The working directory in the image.
    pub cwd: String,
    /// `user[:group]`; empty for root.
    pub user: String,
}

/// The [`Plan`] for `config` and `opts`.
pub fn plan(config: &Value, opts: &RunOptions) -> Result<Plan, RunError> {
    let strings = |k: &str| -> Vec<String> {
        config[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let args = if opts.command.is_empty() {
        let mut v = strings("entrypoint");
        v.extend(strings("cmd"));
        v
    } else {
        opts.command.clone()
    };
    if args.is_empty() {
        return Err(RunError::NoCommand);
    }
    let mut env = strings("env");
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    for e in &opts.env {
        let Some((key, _)) = e.split_once('=') else {
            return Err(RunError::BadEnv { entry: e.clone() });
        };
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let cwd = config["working_dir"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("/")
        .to_string();
    let user = opts
        .user
        .clone()
        .unwrap_or_else(|| config["user"].as_str().unwrap_or_default().to_string());
    Ok(Plan {
        args,
        env,
        cwd,
        user,
    })
}

/// The process to run, from the image `config` (as the agent reports it) and `opts`;
/// names in the user are looked up inside the image at `root`.
pub fn process(root: &ImageRoot, config: &Value, opts: &RunOptions) -> Result<Process, RunError> {
    let Plan {
        args,
        env,
        cwd,
        user,
    } = plan(config, opts)?;
    let (uid, gid) = resolve_user(root, &user)?;
    Ok(Process {
        args,
        env,
        cwd,
        uid,
        gid,
    })
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    /// The command's exit status.
    pub status: ExitStatus,
    /// The runtime that ran it (never [`Runtime::Auto`]).
    pub runtime: Runtime,
    /// The time of each step, from the start of [`run`] to the end of the detach.
    pub timings: Timings,
}

/// Runs a command in `opts.image` through the agent at `socket` and returns its exit
/// status and the time each step took. `announce` is told what runs, and how, just
/// before it starts.
pub fn run(
    socket: &Path,
    opts: &RunOptions,
    announce: impl FnOnce(&Process, Runtime),
) -> Result<RunReport, RunError> {
    let started = Instant::now();
    let signals = SignalGuard::install();
    let dir = tempfile::Builder::new()
        .prefix("lode-run-")
        .tempdir()
        .map_err(|source| RunError::TempDir { source })?;
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| RunError::Random)?;
    let name = format!("run-{}", crate::hex8(&nonce));
    let mount_opts = MountOptions {
        image: opts.image.clone(),
        writable: true,
        name: Some(name.clone()),
        readahead_kb: opts.readahead_kb,
        allow_setuid_and_devices: opts.allow_setuid_and_devices,
        throwaway: true,
    };
    // Declared after `dir`, so dropped (unmounted) before it is removed.
    let mut mounted = match mount_timed(
        socket,
        dir.path(),
        &mount_opts,
        &signals,
        Timings::starting_at(started),
    ) {
        Ok(m) => m,
        Err(MountError::Interrupted { signal }) => return Err(RunError::Interrupted { signal }),
        Err(e) => return Err(e.into()),
    };
    let interrupted = || match signals.pending() {
        Some(signal) => Err(RunError::Interrupted { signal }),
        None => Ok(()),
    };
    let t0 = Instant::now();
    let root = ImageRoot::open(mounted.dir())?;
    let p = process(&root, &mounted.attachment()["config"], opts)?;
    mounted.timings_mut().add(Step::User, t0.elapsed());
    interrupted()?;
    let runtime = match opts.runtime {
        Runtime::Auto if crate::runtime::find_program("crun").is_some() => Runtime::Crun,
        Runtime::Auto => Runtime::Chroot,
        r => r,
    };
    announce(&p, runtime);
    let t0 = Instant::now();
    let status = match runtime {
        Runtime::Crun => run_crun(
            mounted.dir(),
            &p,
            &name,
            !opts.allow_setuid_and_devices,
            &signals,
        )?,
        _ => run_chroot(&root, mounted.dir(), &p, &signals)?,
    };
    mounted.timings_mut().add(Step::Runtime, t0.elapsed());
    drop(root);
    let released = mounted.release();
    for e in released.errors {
        eprintln!("lode: {e}");
    }
    Ok(RunReport {
        status,
        runtime,
        timings: released.timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options() -> RunOptions {
        RunOptions {
            image: "x".into(),
            command: vec![],
            runtime: Runtime::Chroot,
            env: vec![],
            user: None,
            readahead_kb: None,
            allow_setuid_and_devices: false,
        }
    }

    #[test]
    fn the_config_and_the_flags_make_the_process() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
        std::fs::write(dir.path().join("etc/passwd"), "app:x:10:20::/:/bin/sh\n").expect("write");
        let root = ImageRoot::open(dir.path()).expect("open");
        let config = json!({
            "entrypoint": ["/bin/app"], "cmd": ["--serve"], "env": ["A=1", "B=2"],
            "working_dir": "/srv", "user": "app"
        });
        let p = process(&root, &config, &options()).expect("process");
        assert_eq!(p.args, ["/bin/app", "--serve"]);
        assert_eq!(p.env, ["A=1", "B=2", DEFAULT_PATH]);
        assert_eq!((p.cwd.as_str(), p.uid, p.gid), ("/srv", 10, 20));
        let mut o = options();
        o.command = vec!["sh".into()];
        o.env = vec!["A=3".into()];
        o.user = Some("0:0".into());
        let p = process(&root, &config, &o).expect("process");
        assert_eq!(p.args, ["sh"]);
        assert_eq!(p.env, ["B=2", DEFAULT_PATH, "A=3"]);
        assert_eq!((p.uid, p.gid), (0, 0));
        o.env = vec!["NOEQUALS".into()];
        assert_eq!(
            process(&root, &config, &o).unwrap_err().to_string(),
            "--env \"NOEQUALS\" is not KEY=VALUE"
        );
        assert_eq!(
            process(&root, &json!({}), &options())
                .unwrap_err()
                .to_string(),
            "the image has no entrypoint or cmd; give a command after --"
        );
    }
}
