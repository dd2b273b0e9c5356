//! SIGTERM, SIGINT and SIGHUP while lode holds a mount, a loop device or an attachment.
//! Killed by the default action at any of those points, lode would leave them all behind;
//! so while a [`SignalGuard`] lives the three signals only set a flag, which each step of
//! `lode mount` and `lode run` checks before the next, undoing what exists. Once the
//! command runs, SIGTERM and SIGHUP are passed on to it and lode waits for its end (the
//! command decides how to stop); SIGINT, which a terminal sends to the command too, is left
//! to the command. Handlers, unlike ignored signals, reset to the default in a child at
//! exec, so the command sees the usual dispositions.

use std::sync::atomic::{AtomicI32, Ordering};

/// The first of the three signals that arrived, 0 for none.
static PENDING: AtomicI32 = AtomicI32::new(0);
/// The running command's pid, 0 when none runs.
static CHILD: AtomicI32 = AtomicI32::new(0);

const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

extern "C" fn on_signal(sig: libc::c_int) {
    let _ = PENDING.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 && sig != libc::SIGINT {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The three handlers, installed for the guard's life; the old dispositions come back
/// on drop. The state is the process's: one guard at a time.
#[derive(Debug)]
pub struct SignalGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalGuard {
    /// Installs the handlers and clears any earlier pending signal.
    pub fn install() -> SignalGuard {
        PENDING.store(0, Ordering::SeqCst);
        let mut old = Vec::new();
        for sig in SIGNALS {
            // SAFETY: an all-zero sigaction is valid (empty mask, no flags).
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // Interrupted system calls resume: every step lode takes is bounded and is
            // followed by a check of the flag.
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: as above.
            let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: the handler only touches atomics and calls kill(2), both
            // async-signal-safe; both structs outlive the call.
            if unsafe { libc::sigaction(sig, &action, &mut previous) } == 0 {
                old.push((sig, previous));
            }
        }
        SignalGuard { old }
    }

    /// The signal that arrived since [`SignalGuard::install`], if any.
    pub fn pending(&self) -> Option<libc::c_int> {
        match PENDING.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Marks `pid` as the running command, to which SIGTERM and SIGHUP now go. A signal
    /// that arrived between the last check and now is passed on at once.
    pub fn child_started(&self, pid: u32) {
        let pid = i32::try_from(pid).unwrap_or(0);
        CHILD.store(pid, Ordering::SeqCst);
        if let Some(sig) = self.pending()
            && pid > 0
        {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// The command has ended; signals only set the flag again.
    pub fn child_ended(&self) {
        CHILD.store(0, Ordering::SeqCst);
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        CHILD.store(0, Ordering::SeqCst);
        for (sig, previous) in self.old.drain(..) {
            // SAFETY: restores the disposition sigaction(2) returned for this signal.
            unsafe { libc::sigaction(sig, &previous, std::ptr::null_mut()) };
        }
    }
}

/// A signal's name for messages.
pub fn name(sig: libc::c_int) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        s => format!("signal {s}"),
    }
}

/// Serialises the unit tests that install a guard: the handlers are process-wide.
#[cfg(test)]
pub(crate) fn test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_sets_the_flag_instead_of_killing() {
        let _lock = test_lock();
        let guard = SignalGuard::install();
        assert_eq!(guard.pending(), None);
        // SAFETY: raise(3) to ourselves; the handler is installed.
        unsafe { libc::raise(libc::SIGHUP) };
        assert_eq!(guard.pending(), Some(libc::SIGHUP));
        // SAFETY: as above.
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(guard.pending(), Some(libc::SIGHUP), "the first one wins");
        assert_eq!(name(libc::SIGHUP), "SIGHUP");
    }
}
