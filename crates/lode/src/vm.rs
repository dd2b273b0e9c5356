//! `lode vm run`: arguments to `lode_vm`, the image attached through the agent's control
//! socket (and detached after), the command's output to stdout, timings to stderr. The
//! work (kernel, initramfs, QEMU, the console protocol) lives in the lode-vm crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::Env;
use crate::agent::control_path;
use crate::cli::{AccelArg, Via, VmRunArgs};
use crate::output::human_bytes;

/// An attachment made for this run, detached when dropped unless kept.
struct Attached {
    socket: PathBuf,
    name: String,
    detach: bool,
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.detach
            && let Err(e) = lode_run::call(
                &self.socket,
                "POST",
                "/detach",
                Some(&json!({"name": self.name, "keep_overlay": false})),
            )
        {
            eprintln!("lode: detaching {}: {e}", self.name);
        }
    }
}

/// Bytes the agent has read from the origin (the store) and from the AZ cache so far.
fn fetched(stats: &Value) -> (u64, u64) {
    let tier = |n: &str| {
        stats["tiers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["name"] == n)
            .and_then(|t| t["bytes"].as_u64())
            .unwrap_or(0)
    };
    (tier("origin"), tier("az"))
}

fn secs(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_secs_f64()))
}

pub fn run(env: &Env, home: &Path, a: VmRunArgs) -> Result<ExitCode> {
    let since = Instant::now();
    let sock = control_path(home, &a.control);
    let signals = lode_run::SignalGuard::install();
    let mmio = a.machine == "microvm";
    let kernel = lode_vm::kernel::find(a.kernel.as_deref(), a.modules.as_deref())?;
    let vm_dir = home.join("vm");
    let base = lode_vm::initramfs::base(
        &vm_dir.join("initramfs"),
        &kernel,
        &lode_vm::initramfs::wanted_modules(mmio),
        &a.busybox,
    )?;
    let before = lode_run::call(&sock, "GET", "/stats", None)?;

    let (att, attached) = match &a.attachment {
        Some(name) => {
            let ls = lode_run::call(&sock, "GET", "/ls", None)?;
            let att = ls
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == name.as_str())
                .cloned()
                .with_context(|| format!("the agent has no attachment named {name:?}"))?;
            if a.rw && att["writable"] != true {
                bail!("attachment {name:?} is read-only; --rw needs a writable attachment");
            }
            (att, None)
        }
        None => {
            let image = a.image.clone().unwrap_or_default();
            let name = match a.name.clone() {
                Some(n) => n,
                None => {
                    let t = lode_vm::Token::random()
                        .map_err(|_| anyhow::anyhow!("no randomness for an attachment name"))?;
                    format!("vm-{}", &t.as_str()[..12])
                }
            };
            let att = lode_run::call(
                &sock,
                "POST",
                "/attach",
                Some(&json!({"image": image, "name": name, "writable": a.rw})),
            )?;
            let guard = Attached {
                socket: sock.clone(),
                name,
                detach: !a.keep,
            };
            (att, Some(guard))
        }
    };
    let name = att["name"].as_str().unwrap_or_default().to_string();
    let size = att["size"].as_u64().unwrap_or(0);
    let attached_at = since.elapsed();
    if let Some(signal) = signals.pending() {
        drop(attached);
        eprintln!(
            "lode: error: interrupted by {}",
            lode_run::signals::name(signal)
        );
        return Ok(ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)));
    }

    let opts = lode_run::RunOptions {
        image: name.clone(),
        command: a.command.clone(),
        runtime: lode_run::Runtime::Chroot,
        env: a.env.clone(),
        user: a.user.clone(),
        readahead_kb: None,
        allow_setuid_and_devices: false,
    };
    let plan = lode_run::plan(&att["config"], &opts)?;
    let token =
        lode_vm::Token::random().map_err(|_| anyhow::anyhow!("no randomness for a token"))?;
    let cmd = lode_vm::GuestCommand {
        args: plan.args,
        env: plan.env,
        cwd: plan.cwd,
        user: plan.user,
        writable: a.rw,
    };
    let initrd = lode_vm::initramfs::for_run(&vm_dir.join("tmp"), &base, &cmd, token.as_str())?;
    let disk = match a.via {
        Via::File => lode_vm::Disk::File {
            path: att["file"].as_str().map(PathBuf::from).context(
                "the agent runs without a FUSE mount (--no-files), so there is no file to boot from; use --via nbd",
            )?,
            writable: a.rw,
        },
        Via::Nbd => lode_vm::Disk::Nbd {
            socket: att["nbd_unix"]
                .as_str()
                .map(PathBuf::from)
                .or(a.nbd_socket.clone())
                .unwrap_or_else(|| sock.with_file_name("nbd.sock")),
            export: name.clone(),
            writable: a.rw,
        },
    };
    let accel = match a.accel {
        AccelArg::Auto => lode_vm::Accel::probe(),
        AccelArg::Kvm => lode_vm::Accel::Kvm,
        AccelArg::Tcg => lode_vm::Accel::Tcg,
    };
    let machine = lode_vm::Machine {
        qemu: a.qemu.clone(),
        machine: a.machine.clone(),
        accel,
        memory_mib: a.memory,
        cpus: a.cpus,
        kernel: kernel.image.clone(),
        initrd: initrd.path().to_path_buf(),
        disk,
        host_tsc_khz: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| lode_vm::qemu::cpu_khz(&c)),
    };
    let stop = || signals.pending().map(lode_run::signals::name);
    let mut stdout = std::io::stdout().lock();
    let result = lode_vm::boot::run(
        &machine,
        &token,
        Duration::from_secs(a.timeout),
        &mut stdout,
        &stop,
        since,
    );
    drop(stdout);
    drop(initrd);
    let after = lode_run::call(&sock, "GET", "/stats", None).ok();
    drop(attached);
    let outcome = match result {
        Ok(o) => o,
        Err(e @ lode_vm::BootError::Interrupted { .. }) => {
            eprintln!("lode: error: {e}");
            let signal = signals.pending().unwrap_or(libc::SIGTERM);
            return Ok(ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)));
        }
        Err(e) => return Err(e.into()),
    };
    if a.timings || env.cli_json {
        let (o0, z0) = fetched(&before);
        let (o1, z1) = after.as_ref().map(fetched).unwrap_or((o0, z0));
        let (origin, az) = (o1.saturating_sub(o0), z1.saturating_sub(z0));
        let share = if size == 0 {
            0.0
        } else {
            (origin + az) as f64 * 100.0 / size as f64
        };
        if env.cli_json {
            let v = json!({
                "attachment": name, "status": outcome.status, "accel": accel.name(),
                "machine": a.machine, "via": format!("{:?}", a.via).to_lowercase(),
                "kernel": kernel.version,
                "attached_s": attached_at.as_secs_f64(),
                "qemu_started_s": outcome.qemu_started.as_secs_f64(),
                "command_started_s": secs(outcome.command_started),
                "first_output_s": secs(outcome.first_output),
                "exited_s": outcome.exited.as_secs_f64(),
                "total_s": outcome.total.as_secs_f64(),
                "image_bytes": size, "fetched_origin_bytes": origin, "fetched_az_bytes": az,
                "fetched_share": share / 100.0,
            });
            eprintln!("{v}");
        } else {
            eprintln!(
                "lode: vm {} ({}, {}): attached {:.2} s, command started {}, first output {}, exit {:.2} s, total {:.2} s; fetched {} of the {} image ({share:.1}%): {} from the store, {} from the AZ cache",
                name,
                accel.name(),
                a.machine,
                attached_at.as_secs_f64(),
                outcome
                    .command_started
                    .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
                outcome
                    .first_output
                    .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
                outcome.exited.as_secs_f64(),
                outcome.total.as_secs_f64(),
                human_bytes(origin + az),
                human_bytes(size),
                human_bytes(origin),
                human_bytes(az),
            );
        }
    }
    Ok(ExitCode::from(outcome.status))
}
