//! `lode mount`, `lode umount` and `lode run`: arguments to `lode_run`, results to the
//! terminal. The work (loop devices, mounts, runtimes, reading the image's users from
//! inside it, cleanup on signals) lives in the lode-run crate.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

use crate::Env;
use crate::agent::control_path;
use crate::cli::{MountArgs, RunArgs, Runtime, UmountArgs};

/// The exit code of a command a signal interrupted: 128 + the signal, as a shell has it.
fn interrupted(e: &dyn std::fmt::Display, signal: i32) -> ExitCode {
    eprintln!("lode: error: {e}");
    ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
}

pub fn mount(env: &Env, home: &Path, a: MountArgs) -> Result<ExitCode> {
    let sock = control_path(home, &a.control);
    let opts = lode_run::MountOptions {
        image: a.image.clone(),
        writable: a.rw,
        name: a.name,
        readahead_kb: a.readahead_kb,
        allow_setuid_and_devices: a.allow_setuid_and_devices,
        throwaway: false,
    };
    let signals = lode_run::SignalGuard::install();
    let m = match lode_run::mount(&sock, &a.dir, &opts, &signals) {
        Ok(m) => m,
        Err(e @ lode_run::MountError::Interrupted { signal }) => {
            return Ok(interrupted(&e, signal));
        }
        Err(e) => return Err(e.into()),
    };
    if env.cli_json {
        let mut v = m.attachment().clone();
        v["mountpoint"] = json!(m.dir());
        v["loop_device"] = json!(m.loopdev());
        v["setuid_and_devices"] = json!(a.allow_setuid_and_devices);
        crate::output::print_json(&v)?;
    } else if !env.quiet {
        println!(
            "mounted {} ({}) on {}, {}{} via {} (attachment {})",
            a.image,
            m.attachment()["id"].as_str().unwrap_or_default(),
            m.dir().display(),
            if a.rw {
                "read-write into an overlay"
            } else {
                "read-only"
            },
            if a.allow_setuid_and_devices {
                ", setuid and device nodes honoured"
            } else {
                ""
            },
            m.loopdev(),
            m.name()
        );
    }
    m.keep();
    Ok(ExitCode::SUCCESS)
}

pub fn umount(env: &Env, home: &Path, a: UmountArgs) -> Result<()> {
    let sock = control_path(home, &a.control);
    let u = lode_run::umount(&sock, &a.dir, a.keep_overlay)?;
    if u.name.is_none() {
        eprintln!(
            "lode: {} was not backed by a file of this agent; nothing detached",
            u.loopdev
        );
    }
    if !env.quiet && !env.cli_json {
        println!(
            "unmounted {}, released {}{}",
            u.dir.display(),
            u.loopdev,
            u.name
                .map(|n| format!(", detached {n}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

pub fn run(env: &Env, home: &Path, a: RunArgs) -> Result<ExitCode> {
    let sock = control_path(home, &a.control);
    let opts = lode_run::RunOptions {
        image: a.image.clone(),
        command: a.command,
        runtime: match a.runtime {
            Runtime::Auto => lode_run::Runtime::Auto,
            Runtime::Crun => lode_run::Runtime::Crun,
            Runtime::Chroot => lode_run::Runtime::Chroot,
        },
        env: a.env,
        user: a.user,
        readahead_kb: a.readahead_kb,
        allow_setuid_and_devices: a.allow_setuid_and_devices,
    };
    let announce = |p: &lode_run::Process, runtime| {
        if !env.quiet && !env.cli_json {
            eprintln!(
                "lode: running {:?} in {} ({}, uid {} gid {}, cwd {})",
                p.args,
                a.image,
                match runtime {
                    lode_run::Runtime::Crun => "crun",
                    _ => "chroot",
                },
                p.uid,
                p.gid,
                p.cwd
            );
        }
    };
    match lode_run::run(&sock, &opts, announce) {
        Ok(report) => {
            if a.timings {
                eprint!("{}", report.timings.render());
            }
            if env.cli_json {
                // After whatever the command printed on the same stdout.
                crate::output::print_json(&json!({
                    "image": a.image,
                    "runtime": match report.runtime {
                        lode_run::Runtime::Crun => "crun",
                        _ => "chroot",
                    },
                    "exit_code": report.status.code(),
                    "signal": std::os::unix::process::ExitStatusExt::signal(&report.status),
                    "timings": report.timings.to_json(),
                }))?;
            }
            Ok(exit_code(report.status))
        }
        Err(e @ lode_run::RunError::Interrupted { signal }) => Ok(interrupted(&e, signal)),
        Err(e) => Err(e.into()),
    }
}
