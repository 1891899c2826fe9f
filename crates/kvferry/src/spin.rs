//! When a waiting thread polls instead of sleeping, and for how long.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a waiting thread polls before it sleeps.
///
/// A thread that sleeps in the kernel is woken by an interrupt to its CPU;
/// on a virtual machine whose idle vCPU halted, that wake-up alone costs
/// 40-50 us, and a request/reply round trip pays it twice. Back-to-back
/// batches reply within a few microseconds, so both ends poll this long
/// first: measured on a 2-vCPU KVM guest, a cma batch of 32 x 16 KiB went
/// from 136 us to about 45 us. The cost is at most this much CPU per wait
/// when nothing comes soon. Used by socket waits (net.rs), the cma copy
/// pool and batch waits, each only while `polling_pays`.
pub const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(50);

/// The CPUs this process may run on.
pub fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Threads of this process in the middle of moving a frame's data through
/// a socket (`send_ranges` / `recv_ranges`), on either side of a transfer.
static MOVING: AtomicUsize = AtomicUsize::new(0);

/// Counts its thread in `MOVING` while it lives.
#[derive(Debug)]
pub struct Moving(());

impl Moving {
    #[must_use = "the thread counts as moving only while the guard lives"]
    pub fn enter() -> Moving {
        MOVING.fetch_add(1, Ordering::Relaxed);
        Moving(())
    }
}

impl Drop for Moving {
    fn drop(&mut self) {
        MOVING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether polling instead of sleeping can pay: only while a CPU is left
/// for it. When this process has as many threads moving data as CPUs (a
/// large batch fanned out over lanes, or the server serving as many), every
/// CPU is likely copying; a poller only takes turns with a copier, and the
/// peer it waits for gets its CPU later. A heuristic: a thread counts from
/// the start to the end of its frame's data, also while it sleeps in the
/// kernel for the socket (a slow peer), and cma copies do not count
/// (counting them cost async cma batches, commit b57d8b0). Measured on the 2-vCPU test guest
/// (`tools/te_pingpong.py kvferry:TransferEngine tcp --op read`, batches
/// of 32 on two lanes, three interleaved runs against a build that always
/// polled): 1 MiB blocks 4.24-4.33 -> 4.40-4.49 GB/s, 4 MiB 4.69-4.78 ->
/// 4.94-5.09; writes within noise.
fn polling_pays() -> bool {
    MOVING.load(Ordering::Relaxed) < cpus()
}

/// Calls `ready` until it says `true`, for up to `SPIN_BEFORE_SLEEP`,
/// without sleeping; `false` at once when polling does not pay now. The
/// caller then sleeps until woken.
pub fn poll_briefly(mut ready: impl FnMut() -> bool) -> bool {
    if !polling_pays() {
        return false;
    }
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= SPIN_BEFORE_SLEEP {
            return false;
        }
        std::hint::spin_loop();
    }
}
