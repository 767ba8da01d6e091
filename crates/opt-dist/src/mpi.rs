//! OpenMPI through a minimal hand-written FFI (the handful of calls the collectives need), so
//! building needs only Debian's `libopenmpi-dev`, not libclang/bindgen as the `mpi` crate does.
//!
//! OpenMPI's handles (`MPI_COMM_WORLD`, `MPI_FLOAT`, `MPI_SUM`, ...) are addresses of global
//! objects exported by libmpi (`ompi_mpi_comm_world`, ...); `MPI_IN_PLACE` is `(void*)1`. This
//! ABI is OpenMPI's, not MPICH's.
//!
//! Hangs: MPI has no per-call timeout, so a watchdog thread ends the process with a clear
//! message when one collective takes longer than the timeout; `mpirun` then stops the other
//! ranks (as it does when any rank exits with an error).

#![allow(non_camel_case_types, non_upper_case_globals)]

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::comm::{check_counts, check_gather, Communicator, ReduceOp};
use crate::{DistError, Result};

type Handle = *mut c_void;

#[repr(C)]
struct Opaque {
    _p: [u8; 0],
}

#[link(name = "mpi")]
extern "C" {
    static ompi_mpi_comm_world: Opaque;
    static ompi_mpi_float: Opaque;
    static ompi_mpi_byte: Opaque;
    static ompi_mpi_op_sum: Opaque;
    static ompi_mpi_op_max: Opaque;
    fn MPI_Initialized(flag: *mut c_int) -> c_int;
    fn MPI_Init(argc: *mut c_int, argv: *mut *mut *mut i8) -> c_int;
    fn MPI_Finalize() -> c_int;
    fn MPI_Comm_rank(comm: Handle, rank: *mut c_int) -> c_int;
    fn MPI_Comm_size(comm: Handle, size: *mut c_int) -> c_int;
    fn MPI_Comm_split(comm: Handle, color: c_int, key: c_int, out: *mut Handle) -> c_int;
    fn MPI_Allreduce(s: *const c_void, r: *mut c_void, n: c_int, t: Handle, op: Handle, comm: Handle) -> c_int;
    fn MPI_Allgather(
        s: *const c_void,
        sn: c_int,
        st: Handle,
        r: *mut c_void,
        rn: c_int,
        rt: Handle,
        comm: Handle,
    ) -> c_int;
    fn MPI_Reduce_scatter_block(
        s: *const c_void,
        r: *mut c_void,
        n: c_int,
        t: Handle,
        op: Handle,
        comm: Handle,
    ) -> c_int;
    fn MPI_Allgatherv(
        s: *const c_void,
        sn: c_int,
        st: Handle,
        r: *mut c_void,
        rcounts: *const c_int,
        displs: *const c_int,
        rt: Handle,
        comm: Handle,
    ) -> c_int;
    fn MPI_Reduce_scatter(
        s: *const c_void,
        r: *mut c_void,
        rcounts: *const c_int,
        t: Handle,
        op: Handle,
        comm: Handle,
    ) -> c_int;
    fn MPI_Bcast(buf: *mut c_void, n: c_int, t: Handle, root: c_int, comm: Handle) -> c_int;
    fn MPI_Barrier(comm: Handle) -> c_int;
}

fn addr(o: &'static Opaque) -> Handle {
    o as *const Opaque as Handle
}
fn world_h() -> Handle {
    // SAFETY: taking the address of an extern static, never reading it.
    addr(unsafe { &ompi_mpi_comm_world })
}
fn float_h() -> Handle {
    // SAFETY: as above.
    addr(unsafe { &ompi_mpi_float })
}
fn byte_h() -> Handle {
    // SAFETY: as above.
    addr(unsafe { &ompi_mpi_byte })
}
fn op_h(op: ReduceOp) -> Handle {
    // SAFETY: as above.
    match op {
        ReduceOp::Sum => addr(unsafe { &ompi_mpi_op_sum }),
        ReduceOp::Max => addr(unsafe { &ompi_mpi_op_max }),
    }
}
// OpenMPI defines MPI_IN_PLACE as the address 1.
const IN_PLACE: *mut c_void = std::ptr::without_provenance_mut(1);

fn check(op: &'static str, rc: c_int) -> Result<()> {
    if rc != 0 {
        return Err(DistError::Collective { op, detail: format!("MPI error code {rc}") });
    }
    Ok(())
}

fn count(op: &'static str, n: usize) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| DistError::Collective { op, detail: format!("{n} elements exceed MPI's int count") })
}

/// The watchdog is started once per process, with the world's timeout; later callers (groups
/// made by `split`) get the same one.
/// A collective in flight: start time in ms since the watchdog's epoch (0 = none).
struct Watchdog {
    epoch: Instant,
    since: AtomicU64,
    what: Mutex<&'static str>,
}

static WATCHDOG: OnceLock<Arc<Watchdog>> = OnceLock::new();

fn watchdog(timeout: Duration, rank: usize) -> Arc<Watchdog> {
    WATCHDOG
        .get_or_init(|| {
            let w = Arc::new(Watchdog { epoch: Instant::now(), since: AtomicU64::new(0), what: Mutex::new("") });
            let wc = w.clone();
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let s = wc.since.load(Ordering::Relaxed);
                let now = wc.epoch.elapsed().as_millis() as u64;
                if s > 0 && now.saturating_sub(s) > timeout.as_millis() as u64 {
                    let what = wc.what.lock().map(|w| *w).unwrap_or("?");
                    eprintln!(
                        "opt-dist: rank {rank}: MPI {what} did not complete within {timeout:.0?}; a peer died or \
                         hangs. Exiting so that mpirun stops the job."
                    );
                    std::process::exit(3);
                }
            });
            w
        })
        .clone()
}

/// An MPI communicator (the world, or a group made by [`Communicator::split`]).
pub struct MpiComm {
    comm: usize,
    rank: usize,
    size: usize,
    dog: Arc<Watchdog>,
}

// SAFETY: the handle is an opaque pointer owned by libmpi; collectives are issued by one thread
// at a time (the training loop), as MPI_THREAD_SINGLE/FUNNELED requires.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialise MPI (once) and return `MPI_COMM_WORLD`.
    pub fn world(timeout: Duration) -> Result<MpiComm> {
        let mut flag: c_int = 0;
        // SAFETY: plain C calls with valid out-pointers; MPI_Init accepts null argc/argv.
        unsafe {
            check("init", MPI_Initialized(&mut flag))?;
            if flag == 0 {
                check("init", MPI_Init(std::ptr::null_mut(), std::ptr::null_mut()))?;
            }
        }
        Self::wrap(world_h(), timeout)
    }

    fn wrap(h: Handle, timeout: Duration) -> Result<MpiComm> {
        let (mut r, mut s): (c_int, c_int) = (0, 0);
        // SAFETY: valid communicator handle and out-pointers.
        unsafe {
            check("comm_rank", MPI_Comm_rank(h, &mut r))?;
            check("comm_size", MPI_Comm_size(h, &mut s))?;
        }
        let dog = watchdog(timeout, r as usize);
        Ok(MpiComm { comm: h as usize, rank: r as usize, size: s as usize, dog })
    }

    fn h(&self) -> Handle {
        self.comm as Handle
    }

    /// Run `f` with the watchdog armed.
    fn guarded<T>(&self, what: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if let Ok(mut w) = self.dog.what.lock() {
            *w = what;
        }
        self.dog.since.store(self.dog.epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        let out = f();
        self.dog.since.store(0, Ordering::Relaxed);
        out
    }

    /// `MPI_Finalize` (call once at the end of `main`, after every communicator is dropped).
    pub fn finalize() -> Result<()> {
        // SAFETY: plain C call.
        check("finalize", unsafe { MPI_Finalize() })
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce(&self, x: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = count("all_reduce", x.len())?;
        // SAFETY: x is a valid buffer of n floats; MPI_IN_PLACE reduces into it.
        self.guarded("all_reduce", || {
            check("all_reduce", unsafe {
                MPI_Allreduce(IN_PLACE, x.as_mut_ptr().cast(), n, float_h(), op_h(op), self.h())
            })
        })
    }
    fn all_gather(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather("all_gather", self.size, x.len(), out.len())?;
        let n = count("all_gather", x.len())?;
        // SAFETY: out holds size·n floats as checked above.
        self.guarded("all_gather", || {
            check("all_gather", unsafe {
                MPI_Allgather(x.as_ptr().cast(), n, float_h(), out.as_mut_ptr().cast(), n, float_h(), self.h())
            })
        })
    }
    fn reduce_scatter(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather("reduce_scatter", self.size, out.len(), x.len())?;
        let n = count("reduce_scatter", out.len())?;
        // SAFETY: x holds size·n floats as checked above.
        self.guarded("reduce_scatter", || {
            check("reduce_scatter", unsafe {
                MPI_Reduce_scatter_block(
                    x.as_ptr().cast(),
                    out.as_mut_ptr().cast(),
                    n,
                    float_h(),
                    op_h(ReduceOp::Sum),
                    self.h(),
                )
            })
        })
    }
    fn all_gather_v(&self, x: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        check_counts("all_gather_v", self, counts, x.len(), out.len())?;
        count("all_gather_v", out.len())?;
        let c: Vec<c_int> = counts.iter().map(|&n| n as c_int).collect();
        let d: Vec<c_int> = counts.iter().scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n) as c_int)).collect();
        let n = c[self.rank];
        // SAFETY: x holds counts[rank] floats and out their sum (checked above, below int range);
        // c and d hold one entry per rank.
        self.guarded("all_gather_v", || {
            check("all_gather_v", unsafe {
                MPI_Allgatherv(
                    x.as_ptr().cast(),
                    n,
                    float_h(),
                    out.as_mut_ptr().cast(),
                    c.as_ptr(),
                    d.as_ptr(),
                    float_h(),
                    self.h(),
                )
            })
        })
    }
    fn reduce_scatter_v(&self, x: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        check_counts("reduce_scatter_v", self, counts, out.len(), x.len())?;
        count("reduce_scatter_v", x.len())?;
        let c: Vec<c_int> = counts.iter().map(|&n| n as c_int).collect();
        // SAFETY: x holds the sum of the counts and out this rank's count (checked above).
        self.guarded("reduce_scatter_v", || {
            check("reduce_scatter_v", unsafe {
                MPI_Reduce_scatter(
                    x.as_ptr().cast(),
                    out.as_mut_ptr().cast(),
                    c.as_ptr(),
                    float_h(),
                    op_h(ReduceOp::Sum),
                    self.h(),
                )
            })
        })
    }
    fn broadcast(&self, x: &mut [f32], root: usize) -> Result<()> {
        let n = count("broadcast", x.len())?;
        // SAFETY: x is a valid buffer of n floats on every rank (same length everywhere).
        self.guarded("broadcast", || {
            check("broadcast", unsafe { MPI_Bcast(x.as_mut_ptr().cast(), n, float_h(), root as c_int, self.h()) })
        })
    }
    fn broadcast_bytes(&self, x: &mut Vec<u8>, root: usize) -> Result<()> {
        // Only the root knows the length: broadcast it first, as 8 bytes.
        let mut lenb = (x.len() as u64).to_le_bytes().to_vec();
        // SAFETY: 8-byte buffer on every rank.
        self.guarded("broadcast", || {
            check("broadcast", unsafe { MPI_Bcast(lenb.as_mut_ptr().cast(), 8, byte_h(), root as c_int, self.h()) })
        })?;
        let n = u64::from_le_bytes(lenb.try_into().unwrap_or([0; 8])) as usize;
        x.resize(n, 0);
        let c = count("broadcast", n)?;
        // SAFETY: x now holds n bytes on every rank.
        self.guarded("broadcast", || {
            check("broadcast", unsafe { MPI_Bcast(x.as_mut_ptr().cast(), c, byte_h(), root as c_int, self.h()) })
        })
    }
    fn barrier(&self) -> Result<()> {
        // SAFETY: valid communicator.
        self.guarded("barrier", || check("barrier", unsafe { MPI_Barrier(self.h()) }))
    }
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>> {
        let mut out: Handle = std::ptr::null_mut();
        let (c, k) = (count("split", color)?, count("split", key)?);
        // SAFETY: valid communicator and out-pointer.
        self.guarded("split", || check("split", unsafe { MPI_Comm_split(self.h(), c, k, &mut out) }))?;
        // The watchdog is per process; the sub-group shares it (and its timeout).
        Ok(Arc::new(MpiComm::wrap(out, Duration::ZERO)?))
    }
    fn describe(&self) -> String {
        format!("mpi {}/{}", self.rank, self.size)
    }
}
