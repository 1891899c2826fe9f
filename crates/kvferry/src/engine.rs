//! The engine: one per process (per device rank). Owns the registry, the
//! listening port, the sessions, the batch table and the async workers.

use std::collections::HashMap;
use std::net::TcpListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, unbounded};
use parking_lot::Mutex;

use crate::batch::{Batch, BatchId, BatchState, BatchTable, OpState};
use crate::config::{EngineConfig, Settings};
use crate::error::{Error, Result};
use crate::memory::{Location, LocationHint, RegionDesc, Registry};
use crate::plan::{Op, Opcode, Plan, plan};
use crate::segment::{Segment, host_identity, random_instance_id};
use crate::session::{PeerAddr, Session};
use crate::transport::local::LocalTransport;
use crate::transport::{Job, Transport};

/// The state peers may reach (through the local transport, and later the
/// listener): everything an engine serves.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) instance_id: u64,
    pub(crate) host_id: String,
    pub(crate) registry: Registry,
}

impl Shared {
    pub(crate) fn segment(&self) -> Segment {
        Segment {
            name: self.name.clone(),
            instance_id: self.instance_id,
            epoch: self.registry.epoch(),
            host_id: self.host_id.clone(),
            pid: std::process::id(),
            regions: self.registry.descs(),
        }
    }
}

/// Engines of this process, by port, so that a session naming one of them
/// is served by memcpy instead of the network.
static LOCAL_ENGINES: LazyLock<Mutex<HashMap<u16, Weak<Shared>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

type Task = Box<dyn FnOnce() + Send>;

/// A kvferry engine.
///
/// Thread-safe: share it (`&Engine` / `Arc<Engine>`) between threads.
#[derive(Debug)]
pub struct Engine {
    shared: Arc<Shared>,
    settings: Settings,
    port: u16,
    /// Held so the port stays ours; served by the listener of the network
    /// transports.
    _listener: TcpListener,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    batches: BatchTable,
    tasks: Option<Sender<Task>>,
    workers: Vec<JoinHandle<()>>,
}

fn bind(settings: &Settings) -> Result<TcpListener> {
    let any = if settings.hostname.contains(':') {
        "::"
    } else {
        "0.0.0.0"
    };
    let try_port = |p: u16| TcpListener::bind((any, p));
    if let Some(p) = settings.port {
        return try_port(p).map_err(|e| Error::io(format!("cannot listen on port {p}"), e));
    }
    let (lo, hi) = settings.port_range;
    if (lo, hi) == (0, 0) {
        return try_port(0).map_err(|e| Error::io("cannot listen on any port", e));
    }
    // Start at a random port of the range so that engines started together
    // do not all race for the first one.
    let span = u64::from(hi - lo) + 1;
    let start = random_instance_id() % span;
    for k in 0..span {
        let p = lo + ((start + k) % span) as u16;
        if let Ok(l) = try_port(p) {
            return Ok(l);
        }
    }
    Err(Error::io(
        format!("no free port in {lo}-{hi}"),
        std::io::Error::from(std::io::ErrorKind::AddrInUse),
    ))
}

fn is_this_host(host: &str, own: &str) -> bool {
    host == own
        || matches!(host, "localhost" | "::1" | "0.0.0.0" | "::")
        || host.starts_with("127.")
}

impl Engine {
    /// Creates an engine; unset config fields come from the environment.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        let settings = config.resolve()?;
        let listener = bind(&settings)?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the listening address", e))?
            .port();
        let name = PeerAddr {
            host: settings.hostname.clone(),
            port,
        }
        .to_string();
        let shared = Arc::new(Shared {
            name,
            instance_id: random_instance_id(),
            host_id: host_identity(),
            registry: Registry::new(),
        });
        let (tx, rx) = unbounded::<Task>();
        let mut workers = Vec::with_capacity(settings.async_workers);
        for i in 0..settings.async_workers {
            let rx = rx.clone();
            let w = std::thread::Builder::new()
                .name(format!("kvferry-async-{i}"))
                .spawn(move || {
                    for task in rx {
                        task();
                    }
                })
                .map_err(|e| Error::io("cannot start an async worker thread", e))?;
            workers.push(w);
        }
        LOCAL_ENGINES.lock().insert(port, Arc::downgrade(&shared));
        Ok(Engine {
            shared,
            batches: BatchTable::new(settings.max_batches),
            settings,
            port,
            _listener: listener,
            sessions: Mutex::new(HashMap::new()),
            tasks: Some(tx),
            workers,
        })
    }

    /// `"host:port"`: the session id peers use for this engine.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The one port this engine listens on.
    pub fn rpc_port(&self) -> u16 {
        self.port
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What peers see of this engine.
    pub fn segment(&self) -> Segment {
        self.shared.segment()
    }

    fn location(hint: &str) -> Result<Location> {
        match hint.parse::<LocationHint>()? {
            LocationHint::Detect | LocationHint::Exactly(Location::Host) => Ok(Location::Host),
            LocationHint::Exactly(Location::Npu(n)) => Err(Error::Unsupported {
                what: format!("location npu:{n}: this engine has no device runtime"),
            }),
        }
    }

    /// Registers `[addr, addr + len)` so peers may read and write it.
    ///
    /// # Safety
    /// The range must be valid, readable and writable memory until it is
    /// unregistered (or the engine dropped); peers may write into it at any
    /// time in between.
    pub unsafe fn register_memory(&self, addr: u64, len: u64, location: &str) -> Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.register_memory_batch(&[(addr, len)], location) }
    }

    /// Registers several regions, all or none.
    ///
    /// # Safety
    /// As [`Engine::register_memory`], for every region.
    pub unsafe fn register_memory_batch(
        &self,
        regions: &[(u64, u64)],
        location: &str,
    ) -> Result<()> {
        let location = Self::location(location)?;
        let descs: Vec<RegionDesc> = regions
            .iter()
            .map(|&(addr, len)| RegionDesc {
                addr,
                len,
                location,
            })
            .collect();
        self.shared.registry.register(&descs)
    }

    /// Unregisters the region starting at `addr`. Waits (up to the transfer
    /// timeout) for in-flight transfers using it; fails with `RegionBusy`
    /// and leaves it registered if they do not end.
    pub fn unregister_memory(&self, addr: u64) -> Result<()> {
        self.unregister_memory_batch(&[addr])
    }

    /// Unregisters several regions, all or none.
    pub fn unregister_memory_batch(&self, addrs: &[u64]) -> Result<()> {
        self.shared
            .registry
            .unregister(addrs, self.settings.transfer_timeout)
    }

    /// The session for `peer`, handshaking on first use.
    fn session(&self, peer: &str) -> Result<Arc<Session>> {
        if let Some(s) = self.sessions.lock().get(peer) {
            return Ok(Arc::clone(s));
        }
        let addr = PeerAddr::parse(peer)?;
        let local = LOCAL_ENGINES
            .lock()
            .get(&addr.port)
            .and_then(Weak::upgrade)
            .filter(|_| is_this_host(&addr.host, &self.settings.hostname));
        let transport: Arc<dyn Transport> = match local {
            Some(shared) => Arc::new(LocalTransport::new(&shared)),
            None => {
                return Err(Error::PeerUnreachable {
                    peer: peer.to_owned(),
                    reason: "no engine of this process listens there (network transports are not enabled)"
                        .into(),
                });
            }
        };
        let session = Arc::new(Session::new(peer.to_owned(), transport)?);
        Ok(Arc::clone(
            self.sessions
                .lock()
                .entry(peer.to_owned())
                .or_insert(session),
        ))
    }

    /// Validates and plans `ops` for `session`. A remote range the cached
    /// segment does not cover triggers one refresh before it is refused.
    fn plan_for(&self, session: &Session, opcode: Opcode, ops: &[Op]) -> Result<Plan> {
        let seg = session.segment();
        let slice = self.settings.slice_size;
        match plan(opcode, ops, &self.shared.registry, &seg, slice) {
            Err(Error::RemoteOutOfRange { .. }) => {
                let fresh = session.refresh()?;
                plan(opcode, ops, &self.shared.registry, &fresh, slice)
            }
            other => other,
        }
    }

    fn prepare(&self, peer: &str, opcode: Opcode, ops: &[Op]) -> Result<(Arc<Session>, Plan)> {
        let session = self.session(peer)?;
        let plan = self.plan_for(&session, opcode, ops)?;
        Ok((session, plan))
    }

    /// Moves `ops` and returns when they are all done, or the first error.
    pub fn transfer_sync(&self, peer: &str, opcode: Opcode, ops: &[Op]) -> Result<()> {
        let (session, plan) = self.prepare(peer, opcode, ops)?;
        let batch = Batch::new(plan.num_ops, plan.slices.len());
        run_plan(&session, &plan, &batch, self.deadline());
        batch.wait(Duration::MAX)
    }

    /// Reads `ops` from `peer` (remote -> local), synchronously.
    pub fn read(&self, peer: &str, ops: &[Op]) -> Result<()> {
        self.transfer_sync(peer, Opcode::Read, ops)
    }

    /// Writes `ops` to `peer` (local -> remote), synchronously.
    pub fn write(&self, peer: &str, ops: &[Op]) -> Result<()> {
        self.transfer_sync(peer, Opcode::Write, ops)
    }

    fn deadline(&self) -> Instant {
        let now = Instant::now();
        now.checked_add(self.settings.transfer_timeout)
            .unwrap_or(now + Duration::from_secs(86400 * 365))
    }

    /// Starts moving `ops` in the background; returns the batch id.
    /// Everything is validated first: an error here means nothing moved.
    pub fn submit(&self, peer: &str, opcode: Opcode, ops: &[Op]) -> Result<BatchId> {
        let (session, plan) = self.prepare(peer, opcode, ops)?;
        let batch = Arc::new(Batch::new(plan.num_ops, plan.slices.len()));
        let id = self.batches.insert(Arc::clone(&batch))?;
        let deadline = self.deadline();
        let task: Task = Box::new(move || run_plan(&session, &plan, &batch, deadline));
        let sent = self.tasks.as_ref().map(|t| t.send(task));
        if !matches!(sent, Some(Ok(()))) {
            // Cannot happen while the engine lives; fail the batch rather
            // than leave it pending forever.
            if let Ok(b) = self.batches.get(id) {
                b.fail_all(Error::Internal {
                    what: "async workers are gone".into(),
                });
            }
        }
        Ok(id)
    }

    /// Where batch `id` stands, without waiting.
    pub fn poll(&self, id: BatchId) -> Result<BatchState> {
        Ok(self.batches.get(id)?.state())
    }

    /// Waits up to `timeout` for batch `id`: `Ok` when done, its first
    /// error when it failed, `Timeout` when it is still running.
    pub fn wait(&self, id: BatchId, timeout: Duration) -> Result<()> {
        self.batches.get(id)?.wait(timeout)
    }

    /// The state of op `index` of batch `id`.
    pub fn op_state(&self, id: BatchId, index: usize) -> Result<OpState> {
        self.batches.get(id)?.op_state(index).ok_or_else(|| {
            Error::invalid(format!(
                "op index {index} is out of range for batch {:#x}",
                id.0
            ))
        })
    }

    /// Frees a finished batch; its id is invalid afterwards.
    pub fn free_batch(&self, id: BatchId) -> Result<()> {
        self.batches.remove(id)
    }
}

/// Runs a plan on the calling thread, recording outcomes in `batch`. A panic
/// in the transport fails the batch instead of escaping.
fn run_plan(session: &Session, plan: &Plan, batch: &Batch, deadline: Instant) {
    let job = Job {
        opcode: plan.opcode,
        slices: &plan.slices,
        deadline,
    };
    let report = |i: usize, r: Result<()>| {
        if let Some(s) = plan.slices.get(i) {
            batch.complete_slice(s, r);
        }
    };
    let ran = catch_unwind(AssertUnwindSafe(|| session.transport().run(&job, &report)));
    if ran.is_err() {
        batch.fail_all(Error::Internal {
            what: format!("the {} transport panicked", session.transport().name()),
        });
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        {
            let mut local = LOCAL_ENGINES.lock();
            if local
                .get(&self.port)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.shared)))
            {
                local.remove(&self.port);
            }
        }
        // Let queued batches finish, then stop the workers.
        self.tasks = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // Peers in this process may be copying from our regions right now:
        // unregistering waits for their pins, so the owner can free the
        // memory once drop returns.
        let addrs = self.shared.registry.addrs();
        if let Err(e) = self
            .shared
            .registry
            .unregister(&addrs, self.settings.transfer_timeout)
        {
            eprintln!(
                "kvferry: engine {} shut down with memory still in use: {e}",
                self.name()
            );
        }
    }
}
