//! Training computation at a lowered scheduling priority. A session round
//! computes on the async runtime's blocking pool with its thread's nice
//! value raised by [`TRAINING_NICE`] and put back afterwards, so that
//! while the node (or anything else on its machine) computes, the threads
//! that carry messages get a core as soon as they wake: a round's answer,
//! or another request, does not wait out a computing thread's time slice.
//!
//! Putting a nice value back down needs `CAP_SYS_NICE` or an `RLIMIT_NICE`
//! that allows it (systemd: `LimitNICE=+0`, as `deploy/systemd` sets). A
//! process that may not is found out once, on a thread of its own, and
//! then computes at the priority it has: a blocking-pool thread left
//! lowered would run later, unrelated work lowered too.

use std::sync::OnceLock;

/// How much a training computation lowers its thread's priority (nice
/// value, capped at 19, the lowest).
pub const TRAINING_NICE: i32 = 10;

/// Runs `work` on this thread at a priority lowered by [`TRAINING_NICE`]
/// (when this process may put it back), and puts it back afterwards, also
/// when `work` panics.
pub fn lowered<T>(work: impl FnOnce() -> T) -> T {
    let _lowered = Lowered::here();
    work()
}

/// Whether this process may lower a thread's priority and put it back;
/// tried once, on a thread that ends afterwards (the node asks when its
/// API is made, so what it found is logged at start-up).
pub fn may_lower() -> bool {
    static MAY: OnceLock<bool> = OnceLock::new();
    *MAY.get_or_init(|| {
        let tried = std::thread::Builder::new()
            .name("ghx-priority-probe".to_owned())
            .spawn(|| {
                let Ok(base) = imp::get() else { return false };
                imp::set(base.saturating_add(1).min(19)).is_ok() && imp::set(base).is_ok()
            })
            .ok()
            .and_then(|t| t.join().ok())
            .unwrap_or(false);
        if !tried {
            tracing::info!(
                "training computes at normal priority: this process cannot lower a thread's priority and put it back (on Linux it needs CAP_SYS_NICE or RLIMIT_NICE; systemd: LimitNICE=+0)"
            );
        }
        tried
    })
}

/// This thread's lowered priority, put back when dropped.
struct Lowered {
    base: i32,
}

impl Lowered {
    fn here() -> Option<Lowered> {
        if !may_lower() {
            return None;
        }
        let base = imp::get().ok()?;
        imp::set(base.saturating_add(TRAINING_NICE).min(19)).ok()?;
        Some(Lowered { base })
    }
}

impl Drop for Lowered {
    fn drop(&mut self) {
        if let Err(e) = imp::set(self.base) {
            tracing::warn!(error = %e, "a blocking-pool thread stays at lowered priority");
        }
    }
}

/// The calling thread's nice value. On Linux a nice value is the thread's
/// own (setpriority(2), NOTES: `PRIO_PROCESS` with 0 is the calling
/// thread), and threads it starts inherit it.
#[cfg(target_os = "linux")]
mod imp {
    pub(super) fn get() -> std::io::Result<i32> {
        Ok(rustix::process::getpriority_process(None)?)
    }

    pub(super) fn set(nice: i32) -> std::io::Result<()> {
        Ok(rustix::process::setpriority_process(None, nice)?)
    }
}

/// Elsewhere a nice value is the whole process's: nothing is lowered.
#[cfg(not(target_os = "linux"))]
mod imp {
    pub(super) fn get() -> std::io::Result<i32> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }

    pub(super) fn set(_: i32) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run on a thread of its own so the test harness's threads keep
    /// their priority whatever happens.
    fn on_own_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn work_runs_lowered_and_the_priority_is_put_back() {
        let (before, during, after) = on_own_thread(|| {
            let before = imp::get().ok();
            let during = lowered(|| imp::get().ok());
            (before, during, imp::get().ok())
        });
        assert_eq!(after, before, "the priority is put back");
        if may_lower() {
            let base = before.unwrap();
            assert_eq!(during, Some((base + TRAINING_NICE).min(19)));
        } else {
            assert_eq!(
                during, before,
                "nothing lowered where it cannot be put back"
            );
        }
    }

    #[test]
    fn a_panic_in_the_work_still_puts_the_priority_back() {
        let (before, after) = on_own_thread(|| {
            let before = imp::get().ok();
            let panicked = std::panic::catch_unwind(|| lowered(|| panic!("boom")));
            assert!(panicked.is_err());
            (before, imp::get().ok())
        });
        assert_eq!(after, before);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn lowering_is_per_thread() {
        let here = imp::get().unwrap();
        let other = on_own_thread(|| {
            lowered(|| std::thread::spawn(|| imp::get().unwrap()).join().unwrap())
        });
        // This thread is untouched; a thread started while lowered inherits it.
        assert_eq!(imp::get().unwrap(), here);
        if may_lower() {
            assert_eq!(other, (here + TRAINING_NICE).min(19));
        }
    }
}
