//! Running QEMU for one command: its console parsed as it arrives, the command's output
//! passed on at once, the exit status taken from the marker, and QEMU never outliving the
//! run — killed at the timeout, when the caller says stop (a signal), or when lode itself
//! dies (`PR_SET_PDEATHSIG`).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::protocol::{Console, Event, Token};
use crate::qemu::{Machine, QEMU_PACKAGE};

/// A run that did not end with the command's exit status.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// QEMU could not be started.
    #[error("starting {qemu}: {source}{hint}", hint = if source.kind() == std::io::ErrorKind::NotFound { format!("; install {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE}) or give --qemu FILE") } else { String::new() })]
    Spawn {
        /// The executable.
        qemu: String,
        /// The error.
        source: std::io::Error,
    },
    /// The run took longer than its timeout; QEMU was killed.
    #[error("the VM ran longer than the timeout ({timeout:?}) and was killed{}{}", started_note(*.started), detail("", .console))]
    Timeout {
        /// The timeout.
        timeout: Duration,
        /// Whether the command had started.
        started: bool,
        /// The end of what the console printed outside the command's output.
        console: String,
    },
    /// The caller asked to stop (a signal); QEMU was killed.
    #[error("interrupted by {reason}; the VM was killed")]
    Interrupted {
        /// What interrupted it.
        reason: String,
    },
    /// The guest's init could not run the command.
    #[error("the guest could not run the command: {message}")]
    Guest {
        /// The init's message.
        message: String,
    },
    /// QEMU ended without the guest reporting an exit status.
    #[error("QEMU ended ({status}) before the guest reported an exit status{}{}", started_note(*.started), detail(.stderr, .console))]
    NoStatus {
        /// QEMU's exit status.
        status: ExitStatus,
        /// Whether the command had started.
        started: bool,
        /// The end of QEMU's stderr.
        stderr: String,
        /// The end of what the console printed outside the command's output.
        console: String,
    },
    /// Writing the command's output failed (stdout closed).
    #[error("writing the command's output: {0}")]
    Output(std::io::Error),
}

fn started_note(started: bool) -> &'static str {
    if started {
        " (the command had started)"
    } else {
        " (the command had not started)"
    }
}

fn detail(stderr: &str, console: &str) -> String {
    let mut s = String::new();
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        s.push_str(&format!("; QEMU said: {stderr}"));
    }
    let console = printable(console);
    if !console.trim().is_empty() {
        let tail: String = console
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(" | ");
        s.push_str(&format!("; the console's last lines: {tail}"));
    }
    s
}

/// `text` without terminal escape sequences and control characters other than newlines:
/// the firmware clears the screen on the console before the kernel starts.
fn printable(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final-byte; other escapes are two characters.
                if chars.next_if_eq(&'[').is_some() {
                    while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
                } else {
                    chars.next();
                }
            }
            '\n' => out.push('\n'),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// How a run ended, and when things happened (from the `since` given to [`run`]).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The command's exit status.
    pub status: u8,
    /// When QEMU was started.
    pub qemu_started: Duration,
    /// When the init said the command starts.
    pub command_started: Option<Duration>,
    /// When the command's first output byte arrived.
    pub first_output: Option<Duration>,
    /// When the exit status arrived.
    pub exited: Duration,
    /// When QEMU had ended.
    pub total: Duration,
}

/// How long QEMU may take to power off after the exit status, before it is killed.
const POWER_OFF_GRACE: Duration = Duration::from_secs(10);
/// The most bytes of QEMU's stderr kept for an error message.
const STDERR_TAIL: usize = 4096;

enum Msg {
    Stdout(Vec<u8>),
    StdoutEnd,
}

/// Boots `machine`, passes the command's output to `out` as it comes, and returns how it
/// ended. `stop` is asked every few milliseconds whether to give up (it returns why);
/// times in the outcome count from `since`.
pub fn run(
    machine: &Machine,
    token: &Token,
    timeout: Duration,
    out: &mut dyn Write,
    stop: &dyn Fn() -> Option<String>,
    since: Instant,
) -> Result<Outcome, BootError> {
    let mut cmd = Command::new(&machine.qemu);
    cmd.args(machine.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| BootError::Spawn {
        qemu: machine.qemu.display().to_string(),
        source,
    })?;
    let qemu_started = since.elapsed();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut guard = KillOnDrop(Some(&mut child));
    let (Some(mut stdout), Some(mut stderr)) = (stdout, stderr) else {
        return Err(BootError::Spawn {
            qemu: machine.qemu.display().to_string(),
            source: std::io::Error::other("no pipe to its stdout or stderr"),
        });
    };
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Msg::Stdout(buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Msg::StdoutEnd);
    });
    let errors = std::thread::spawn(move || {
        let mut tail = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        String::from_utf8_lossy(&tail).into_owned()
    });
    let result = supervise(&rx, token, timeout, out, stop, since, &mut guard);
    // QEMU has ended or been killed: both pipes close, the threads end.
    let status = guard.finish();
    let _ = reader.join();
    let stderr = errors.join().unwrap_or_default();
    let mut outcome = match result? {
        Supervised::Exit(o) => o,
        Supervised::Ended { console, started } => {
            return Err(BootError::NoStatus {
                status,
                started,
                stderr,
                console,
            });
        }
    };
    outcome.qemu_started = qemu_started;
    outcome.total = since.elapsed();
    Ok(outcome)
}

enum Supervised {
    Exit(Outcome),
    Ended { console: String, started: bool },
}

fn supervise(
    rx: &mpsc::Receiver<Msg>,
    token: &Token,
    timeout: Duration,
    out: &mut dyn Write,
    stop: &dyn Fn() -> Option<String>,
    since: Instant,
    qemu: &mut KillOnDrop<'_>,
) -> Result<Supervised, BootError> {
    let deadline = Instant::now() + timeout;
    let mut console = Console::new(token);
    let mut outcome = Outcome {
        status: 0,
        qemu_started: Duration::ZERO,
        command_started: None,
        first_output: None,
        exited: Duration::ZERO,
        total: Duration::ZERO,
    };
    let mut exited = None;
    loop {
        if let Some(reason) = stop() {
            qemu.kill();
            return Err(BootError::Interrupted { reason });
        }
        let now = Instant::now();
        let limit = match exited {
            Some(at) => at + POWER_OFF_GRACE,
            None => deadline,
        };
        if now >= limit {
            if exited.is_some() {
                // The status is in; a guest slow to power off only costs time.
                qemu.kill();
                break;
            }
            qemu.kill();
            return Err(BootError::Timeout {
                timeout,
                started: outcome.command_started.is_some(),
                console: console.noise(),
            });
        }
        let wait = (limit - now).min(Duration::from_millis(50));
        let bytes = match rx.recv_timeout(wait) {
            Ok(Msg::Stdout(b)) => b,
            Ok(Msg::StdoutEnd) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
        };
        for e in console.feed(&bytes) {
            match e {
                Event::Started => outcome.command_started = Some(since.elapsed()),
                Event::Output(b) => {
                    outcome.first_output.get_or_insert_with(|| since.elapsed());
                    out.write_all(&b).map_err(BootError::Output)?;
                    out.flush().map_err(BootError::Output)?;
                }
                Event::Exit(s) => {
                    outcome.status = s;
                    outcome.exited = since.elapsed();
                    exited = Some(Instant::now());
                }
                Event::GuestError(message) => {
                    qemu.kill();
                    return Err(BootError::Guest { message });
                }
            }
        }
    }
    if exited.is_some() {
        return Ok(Supervised::Exit(outcome));
    }
    // A SIGINT from a terminal reaches QEMU too, which then ends first.
    if let Some(reason) = stop() {
        return Err(BootError::Interrupted { reason });
    }
    Ok(Supervised::Ended {
        console: console.noise(),
        started: outcome.command_started.is_some(),
    })
}

/// QEMU, killed and reaped unless it has ended by itself.
struct KillOnDrop<'a>(Option<&'a mut Child>);

impl KillOnDrop<'_> {
    fn kill(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
        }
    }

    /// Waits for QEMU's end and returns its status.
    fn finish(&mut self) -> ExitStatus {
        let c = self.0.take().expect("child");
        match c.wait() {
            Ok(s) => s,
            Err(_) => {
                let _ = c.kill();
                c.wait().unwrap_or_default()
            }
        }
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tails_lose_escapes_and_blank_lines() {
        let t = printable("c\x1b[?7l\x1b[2JSeaBIOS\r\n\n\x1bcKernel panic - not syncing\x07\n");
        assert_eq!(t, "cSeaBIOS\n\nKernel panic - not syncing\n");
        let d = detail("", "Booting\x1b[2J\nend Kernel panic\n");
        assert_eq!(d, "; the console's last lines: Booting | end Kernel panic");
    }
}
