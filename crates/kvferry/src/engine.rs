//! The engine: one per process (per device rank). Owns the registry, the
//! listening port and its server, the sessions, the batch table and the
//! async workers.

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, unbounded};
use parking_lot::Mutex;

use crate::batch::{Batch, BatchId, BatchState, BatchTable, OpState};
use crate::board::LeaseBoard;
use crate::config::{EngineConfig, Settings, TestHooks, TransportChoice};
use crate::device::{DeviceState, StagingStats};
use crate::error::{Error, Result};
use crate::memory::{RegionDesc, Registry};
use crate::plan::{Op, Opcode, Plan, plan};
use crate::segment::{Segment, host_identity, random_instance_id};
use crate::server::Server;
use crate::session::{PeerAddr, Session};
use crate::transport::cma::{CmaTransport, CopyPool};
use crate::transport::local::LocalTransport;
use crate::transport::split::SplitTransport;
use crate::transport::tcp::{ClientIdentity, TcpTransport};
use crate::transport::{Job, Transport};

/// Undrained notifications kept before new ones are refused: a receiver
/// that never drains must not let its peers grow its memory without bound.
/// Both the count and the bytes (sender names and messages, each message up
/// to 1 MiB) are capped.
pub const MAX_NOTIFICATIONS: usize = 1 << 16;
/// See [`MAX_NOTIFICATIONS`].
pub const MAX_NOTIFICATION_BYTES: usize = 64 << 20;

/// A message another engine sent to this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sender's session id (`"host:port"`).
    pub from: String,
    pub message: Vec<u8>,
}

/// What this engine serves to peers: its identity, registry and inbox.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    /// The one port this engine listens on.
    pub(crate) port: u16,
    pub(crate) instance_id: u64,
    pub(crate) host_id: String,
    pub(crate) registry: Registry,
    /// The resolved configuration (the server's secret, timeouts and
    /// connection limit; the initiator's transport choice, lanes, ...).
    pub(crate) settings: Settings,
    notifications: Mutex<Inbox>,
    /// The device runtime (if any), its staging pool and device regions.
    pub(crate) device: DeviceState,
    /// The cma lease board same-host peers map (None when the memfd could
    /// not be made: they then take PIN leases).
    pub(crate) board: Option<Arc<LeaseBoard>>,
    /// PIN requests served (test support: the cma fast path takes none).
    pub(crate) pins_served: AtomicU64,
}

impl Shared {
    pub(crate) fn segment(&self) -> Segment {
        let (regions, exports) = self.device.snapshot(&self.registry);
        Segment {
            name: self.name.clone(),
            instance_id: self.instance_id,
            epoch: self.registry.epoch(),
            host_id: self.host_id.clone(),
            pid: std::process::id(),
            regions,
            exports,
        }
    }

    /// Queues a notification, or refuses it when the inbox is full (the
    /// sender sees the refusal as its notify failing, with this message).
    pub(crate) fn push_notification(&self, from: String, message: Vec<u8>) -> Result<()> {
        let mut inbox = self.notifications.lock();
        let n = Notification { from, message };
        if inbox.queue.len() >= MAX_NOTIFICATIONS
            || inbox.bytes + Inbox::size(&n) > MAX_NOTIFICATION_BYTES
        {
            return Err(Error::Unsupported {
                what: format!(
                    "another notification at {}: {} undrained notifications of {} bytes are \
                     queued there (at most {MAX_NOTIFICATIONS} and {} MiB); the receiver \
                     must drain them first",
                    self.name,
                    inbox.queue.len(),
                    inbox.bytes,
                    MAX_NOTIFICATION_BYTES >> 20
                ),
            });
        }
        inbox.push(n);
        Ok(())
    }
}

/// Received notifications not yet drained, and their bytes.
#[derive(Debug, Default)]
struct Inbox {
    queue: VecDeque<Notification>,
    /// Sender names and messages of `queue`, summed.
    bytes: usize,
}

impl Inbox {
    /// What a notification counts against `MAX_NOTIFICATION_BYTES`.
    fn size(n: &Notification) -> usize {
        n.from.len() + n.message.len()
    }

    fn push(&mut self, n: Notification) {
        self.bytes += Inbox::size(&n);
        self.queue.push_back(n);
    }

    fn pop_front(&mut self) -> Option<Notification> {
        let n = self.queue.pop_front()?;
        self.bytes -= Inbox::size(&n);
        Some(n)
    }

    fn drain(&mut self) -> Vec<Notification> {
        self.bytes = 0;
        self.queue.drain(..).collect()
    }
}

/// Engines of this process by instance id: a session whose handshake
/// reaches one of them is served by memcpy instead of the network.
static LOCAL_ENGINES: LazyLock<Mutex<HashMap<u64, Weak<Shared>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

type Task = Box<dyn FnOnce() + Send>;

/// What batches need from the engine, also from worker threads.
#[derive(Debug)]
struct Core {
    shared: Arc<Shared>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    hooks: TestHooks,
    /// The cma transports' second copy thread, shared by all sessions.
    copy_pool: Arc<CopyPool>,
}

/// A kvferry engine.
///
/// Thread-safe: share it (`&Engine` / `Arc<Engine>`) between threads.
#[derive(Debug)]
pub struct Engine {
    core: Arc<Core>,
    server: Option<Server>,
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

impl Core {
    fn deadline(&self) -> Instant {
        crate::net::deadline_after(self.shared.settings.transfer_timeout)
    }

    fn identity(&self) -> ClientIdentity {
        ClientIdentity {
            instance_id: self.shared.instance_id,
            secret: self.shared.settings.secret.clone(),
            connect_timeout: self.shared.settings.connect_timeout,
        }
    }

    /// The session for `peer`: on first use, a handshake fetches its
    /// segment, and the transport is chosen by where the peer runs.
    fn session(&self, peer: &str) -> Result<Arc<Session>> {
        if let Some(s) = self.sessions.lock().get(peer) {
            return Ok(Arc::clone(s));
        }
        let addr = PeerAddr::parse(peer)?;
        let tcp = Arc::new(TcpTransport::new(
            addr,
            self.identity(),
            self.shared.settings.lanes,
        ));
        let deadline =
            crate::net::deadline_after(self.shared.settings.connect_timeout.saturating_mul(2));
        let segment = tcp.fetch(deadline)?;
        let local = match self.shared.settings.transport {
            TransportChoice::Auto => in_process_engine(&tcp, &segment),
            TransportChoice::Tcp => None,
        };
        let (tcp_for_device, same_process) = (Arc::clone(&tcp), local.is_some());
        let cma = || -> Arc<dyn Transport> {
            Arc::new(CmaTransport::new(
                Arc::clone(&tcp),
                segment.pid,
                Arc::clone(&self.copy_pool),
                self.hooks.clone(),
            ))
        };
        let transport: Arc<dyn Transport> = match (self.shared.settings.transport, local) {
            (TransportChoice::Tcp, _) => Arc::clone(&tcp) as Arc<dyn Transport>,
            (TransportChoice::Auto, Some(_)) if self.hooks.cma_in_process => cma(),
            (TransportChoice::Auto, Some(shared)) => Arc::new(LocalTransport::new(&shared)),
            (TransportChoice::Auto, None) if segment.host_id == self.shared.host_id => cma(),
            (TransportChoice::Auto, None) => Arc::clone(&tcp) as Arc<dyn Transport>,
        };
        // Slices touching device memory take the device paths.
        let transport: Arc<dyn Transport> = Arc::new(SplitTransport::new(
            &self.shared,
            transport,
            tcp_for_device,
            &segment,
            same_process,
            self.shared.settings.transport == TransportChoice::Auto,
        ));
        log::debug!(
            "kvferry: {} reaches {peer} over {}",
            self.shared.name,
            transport.name()
        );
        let session = Arc::new(Session::new(peer.to_owned(), segment, transport));
        Ok(Arc::clone(
            self.sessions
                .lock()
                .entry(peer.to_owned())
                .or_insert(session),
        ))
    }

    /// Forgets a session whose peer restarted; the next use handshakes again.
    fn forget(&self, session: &Arc<Session>) {
        let mut map = self.sessions.lock();
        if map
            .get(&session.name)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            map.remove(&session.name);
        }
    }

    /// Validates and plans `ops` for `session`. A remote range the cached
    /// segment does not cover triggers one refresh before it is refused.
    fn plan_for(&self, session: &Session, opcode: Opcode, ops: &[Op]) -> Result<Plan> {
        let seg = session.segment();
        let slice = self.shared.settings.slice_size;
        match plan(opcode, ops, &self.shared.registry, &seg, slice) {
            Err(Error::RemoteOutOfRange { .. }) => {
                let fresh = session.refresh()?;
                plan(opcode, ops, &self.shared.registry, &fresh, slice)
            }
            other => other,
        }
    }

    /// Runs `f` on `peer`'s session; when the peer turns out to have
    /// restarted, forgets that session and runs `f` once more on a new one.
    fn with_session<T>(&self, peer: &str, f: impl Fn(&Arc<Session>) -> Result<T>) -> Result<T> {
        let session = self.session(peer)?;
        match f(&session) {
            Err(Error::PeerRestarted { .. }) => {
                self.forget(&session);
                f(&self.session(peer)?)
            }
            other => other,
        }
    }

    /// Session and plan; a restarted peer gets a fresh session first.
    fn prepare(&self, peer: &str, opcode: Opcode, ops: &[Op]) -> Result<(Arc<Session>, Plan)> {
        self.with_session(peer, |session| {
            Ok((Arc::clone(session), self.plan_for(session, opcode, ops)?))
        })
    }

    /// Runs a batch to the end, by `deadline` (set when it was submitted,
    /// so time queued behind other batches counts): when the peer turns out
    /// to have restarted (nothing was sent to the new instance), the batch
    /// is planned again against the new segment and run once more.
    fn execute(
        &self,
        peer: &str,
        session: Arc<Session>,
        plan: Plan,
        batch: &Batch,
        notify: Option<&[u8]>,
        deadline: Instant,
    ) {
        let (session, plan) = match run_plan(&session, &plan, deadline) {
            Err(Error::PeerRestarted { .. }) => {
                self.forget(&session);
                match self.prepare(peer, plan.opcode, &plan.ops) {
                    Ok(again) => again,
                    Err(e) => return batch.fail_all(e),
                }
            }
            Err(e) => return batch.fail_all(e),
            Ok(outcomes) => {
                return finish(
                    batch,
                    &plan,
                    outcomes,
                    &session,
                    &self.shared.name,
                    notify,
                    deadline,
                );
            }
        };
        match run_plan(&session, &plan, deadline) {
            Ok(outcomes) => finish(
                batch,
                &plan,
                outcomes,
                &session,
                &self.shared.name,
                notify,
                deadline,
            ),
            Err(e) => batch.fail_all(e),
        }
    }
}

/// The engine of this process `segment` names, once the claim is proven.
/// The instance id comes off the wire: whoever learnt it (every peer gets
/// ours in our HELLO) could answer a handshake with it, and our memcpy
/// would then read or write that engine's memory instead of the peer's.
/// So this very process must hold the server end of the connection the
/// handshake used (lane 0), on the port that engine listens on
/// (socket_owner.rs; the same proof cma makes for a pid). A claim that
/// fails, or cannot be checked, makes the peer another process: cma's own
/// pid check or tcp follows.
fn in_process_engine(tcp: &TcpTransport, segment: &Segment) -> Option<Arc<Shared>> {
    let claimed = LOCAL_ENGINES
        .lock()
        .get(&segment.instance_id)
        .and_then(Weak::upgrade)?;
    let served_here = |stream: &std::net::TcpStream| -> std::io::Result<bool> {
        Ok(stream.peer_addr()?.port() == claimed.port
            && crate::socket_owner::holds_peer_end(std::process::id(), stream)?)
    };
    let why_not = match tcp.with_lane(0, |c| Ok(served_here(c.stream()))) {
        Ok(Ok(true)) => return Some(claimed),
        Ok(Ok(false)) => format!(
            "this process does not serve our connection on port {}",
            claimed.port
        ),
        Ok(Err(e)) => format!("cannot tell who serves our connection: {e}"),
        Err(e) => format!("no connection to check: {e}"),
    };
    log::debug!(
        "kvferry: {} names engine {:#x} of this process, unproven ({why_not}); \
         not using the in-process copy",
        tcp.peer_name(),
        segment.instance_id
    );
    None
}

/// Per-slice outcomes of one run of a plan.
type Outcomes = Vec<Result<()>>;

/// Runs a plan on the calling thread. `Err(PeerRestarted)` when any slice
/// found the peer restarted (the caller re-plans); otherwise every slice's
/// outcome. A panic in the transport fails every slice instead of escaping.
fn run_plan(session: &Session, plan: &Plan, deadline: Instant) -> Result<Outcomes> {
    let job = Job {
        opcode: plan.opcode,
        slices: &plan.slices,
        deadline,
    };
    let outcomes: Mutex<Vec<Option<Result<()>>>> = Mutex::new(vec![None; plan.slices.len()]);
    let report = |i: usize, r: Result<()>| {
        if let Some(slot) = outcomes.lock().get_mut(i) {
            slot.get_or_insert(r);
        }
    };
    let ran = catch_unwind(AssertUnwindSafe(|| session.transport().run(&job, &report)));
    if ran.is_err() {
        return Err(Error::Internal {
            what: format!("the {} transport panicked", session.transport().name()),
        });
    }
    let outcomes = outcomes.into_inner();
    if outcomes
        .iter()
        .any(|o| matches!(o, Some(Err(Error::PeerRestarted { .. }))))
    {
        let detail = outcomes.iter().find_map(|o| match o {
            Some(Err(e @ Error::PeerRestarted { .. })) => Some(e.clone()),
            _ => None,
        });
        return Err(detail.unwrap_or(Error::Internal {
            what: "restart".into(),
        }));
    }
    Ok(outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Err(Error::Internal {
                    what: format!(
                        "the {} transport left a slice unreported",
                        session.transport().name()
                    ),
                })
            })
        })
        .collect())
}

/// Records outcomes; when all succeeded and a notification is asked for,
/// sends it first, so the peer sees it only after all data landed.
fn finish(
    batch: &Batch,
    plan: &Plan,
    outcomes: Outcomes,
    session: &Session,
    from: &str,
    notify: Option<&[u8]>,
    deadline: Instant,
) {
    let all_ok = outcomes.iter().all(|o| o.is_ok());
    if let (true, Some(message)) = (all_ok, notify)
        && let Err(e) = session.transport().notify(from, message, deadline)
    {
        return batch.fail_all(e);
    }
    for (slice, outcome) in plan.slices.iter().zip(outcomes) {
        batch.complete_slice(slice, outcome);
    }
}

impl Engine {
    /// Creates an engine: binds its port, starts its server and workers.
    /// Unset config fields come from the environment.
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
        let instance_id = random_instance_id();
        let board = match LeaseBoard::create(instance_id) {
            Ok(b) => Some(Arc::new(b)),
            Err(e) => {
                log::debug!("kvferry: no cma lease board ({e}); peers take PIN leases");
                None
            }
        };
        let shared = Arc::new(Shared {
            name,
            port,
            instance_id,
            host_id: host_identity(),
            registry: Registry::new(),
            notifications: Mutex::new(Inbox::default()),
            device: DeviceState::new(config.runtime().cloned(), settings.staging_pool),
            board: board.clone(),
            pins_served: AtomicU64::new(0),
            settings,
        });
        let settings = &shared.settings;
        if let Some(b) = board {
            shared.registry.set_retire_guard(b);
        }
        let server = Server::start(listener, Arc::clone(&shared))
            .map_err(|e| Error::io("cannot start the listener thread", e))?;
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
        LOCAL_ENGINES
            .lock()
            .insert(shared.instance_id, Arc::downgrade(&shared));
        Ok(Engine {
            batches: BatchTable::new(settings.max_batches),
            core: Arc::new(Core {
                shared,
                sessions: Mutex::new(HashMap::new()),
                hooks: config.hooks().clone(),
                copy_pool: Arc::new(CopyPool::new()),
            }),
            server: Some(server),
            tasks: Some(tx),
            workers,
        })
    }

    /// `"host:port"`: the session id peers use for this engine.
    pub fn name(&self) -> &str {
        &self.core.shared.name
    }

    /// The one port this engine listens on.
    pub fn rpc_port(&self) -> u16 {
        self.core.shared.port
    }

    pub fn settings(&self) -> &Settings {
        &self.core.shared.settings
    }

    /// What peers see of this engine.
    pub fn segment(&self) -> Segment {
        self.core.shared.segment()
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
        // Device regions are checked and exported by the device runtime.
        crate::device::register(&self.core.shared, regions, location)
    }

    /// Unregisters the region starting at `addr`. Waits (up to the transfer
    /// timeout) for in-flight transfers using it, local or from peers;
    /// fails with `RegionBusy` and leaves it registered if they do not end.
    pub fn unregister_memory(&self, addr: u64) -> Result<()> {
        self.unregister_memory_batch(&[addr])
    }

    /// Unregisters several regions, all or none.
    pub fn unregister_memory_batch(&self, addrs: &[u64]) -> Result<()> {
        crate::device::unregister(
            &self.core.shared,
            addrs,
            self.core.shared.settings.transfer_timeout,
        )
    }

    /// Moves `ops` and returns when they are all done, or the first error.
    pub fn transfer_sync(&self, peer: &str, opcode: Opcode, ops: &[Op]) -> Result<()> {
        let (session, plan) = self.core.prepare(peer, opcode, ops)?;
        let batch = Batch::new(plan.num_ops, plan.slices.len());
        let deadline = self.core.deadline();
        self.core
            .execute(peer, session, plan, &batch, None, deadline);
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

    /// Starts moving `ops` in the background; returns the batch id.
    /// Everything is validated first: an error here means nothing moved.
    pub fn submit(&self, peer: &str, opcode: Opcode, ops: &[Op]) -> Result<BatchId> {
        self.submit_inner(peer, opcode, ops, None)
    }

    /// Writes `ops` in the background, then sends `message` to the peer; the
    /// peer sees the message only after all of the batch's data landed, and
    /// not at all if any op failed.
    pub fn submit_write_with_notify(
        &self,
        peer: &str,
        ops: &[Op],
        message: &[u8],
    ) -> Result<BatchId> {
        self.submit_inner(peer, Opcode::Write, ops, Some(message.to_vec()))
    }

    fn submit_inner(
        &self,
        peer: &str,
        opcode: Opcode,
        ops: &[Op],
        notify: Option<Vec<u8>>,
    ) -> Result<BatchId> {
        let (session, plan) = self.core.prepare(peer, opcode, ops)?;
        let batch = Arc::new(Batch::new(plan.num_ops, plan.slices.len()));
        let id = self.batches.insert(Arc::clone(&batch))?;
        let core = Arc::clone(&self.core);
        let peer = peer.to_owned();
        let deadline = self.core.deadline();
        let task: Task = Box::new(move || {
            let ran = catch_unwind(AssertUnwindSafe(|| {
                core.execute(&peer, session, plan, &batch, notify.as_deref(), deadline)
            }));
            if ran.is_err() {
                batch.fail_all(Error::Internal {
                    what: "a batch worker panicked".into(),
                });
            }
        });
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
    /// error when it failed (`TransferTimeout` when a timeout ended it),
    /// `Timeout` only when it is still running.
    pub fn wait(&self, id: BatchId, timeout: Duration) -> Result<()> {
        self.batches.get(id)?.wait(timeout).map_err(|e| match e {
            Error::Timeout { ms, .. } => Error::Timeout {
                what: format!("waiting for batch {:#x}", id.0),
                ms,
            },
            other => other,
        })
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

    /// Sends `message` to `peer`; returns once the peer has queued it.
    pub fn notify(&self, peer: &str, message: &[u8]) -> Result<()> {
        let deadline = self.core.deadline();
        self.core.with_session(peer, |session| {
            session.transport().notify(self.name(), message, deadline)
        })
    }

    /// Takes the oldest notification if its sender name and message fit in
    /// `max_from` and `max_message` bytes. When it does not fit it stays
    /// queued and `Err((from_len, message_len))` says what it needs.
    pub fn next_notification_within(
        &self,
        max_from: usize,
        max_message: usize,
    ) -> std::result::Result<Option<Notification>, (usize, usize)> {
        let mut q = self.core.shared.notifications.lock();
        match q.queue.front() {
            None => Ok(None),
            Some(n) if n.from.len() <= max_from && n.message.len() <= max_message => {
                Ok(q.pop_front())
            }
            Some(n) => Err((n.from.len(), n.message.len())),
        }
    }

    /// Takes every notification received so far, oldest first.
    pub fn drain_notifications(&self) -> Vec<Notification> {
        self.core.shared.notifications.lock().drain()
    }

    /// The transport that carries ops to `peer` ("local", "cma", "tcp"),
    /// handshaking if this is the first contact.
    pub fn transport_to(&self, peer: &str) -> Result<&'static str> {
        Ok(self.core.session(peer)?.transport().name())
    }

    /// The regions `peer` has registered now (host and device, sorted by
    /// address), fetched afresh: a session's cached copy may predate the
    /// peer's latest registrations. Handshakes on first contact; a peer that
    /// restarted gets a new session.
    pub fn peer_regions(&self, peer: &str) -> Result<Vec<RegionDesc>> {
        // A new session fetches the segment as it starts: no second ask.
        let known = self.core.sessions.lock().contains_key(peer);
        let segment = self.core.with_session(peer, |session| {
            if known {
                session.refresh()
            } else {
                Ok(session.segment())
            }
        })?;
        Ok(segment.regions.clone())
    }

    /// What carries slices that touch device memory with `peer`: the device
    /// runtime's transport ("ascend-ipc") or "tcp" (staged through pinned
    /// buffers), handshaking if this is the first contact.
    pub fn device_transport_to(&self, peer: &str) -> Result<&'static str> {
        let session = self.core.session(peer)?;
        Ok(session.transport().device_path().unwrap_or("tcp"))
    }

    /// TEST SUPPORT: PIN requests this engine served (the cma fast path
    /// takes none).
    #[doc(hidden)]
    pub fn pin_requests_served(&self) -> u64 {
        self.core.shared.pins_served.load(Ordering::Relaxed)
    }

    /// The device runtime this engine was created with, if any.
    pub fn device_runtime(&self) -> Option<&Arc<dyn crate::device::DeviceRuntime>> {
        self.core.shared.device.runtime.as_ref()
    }

    /// The staging pool's buffers: allocated, and in use right now (0 when
    /// no transfer is staging).
    pub fn staging_stats(&self) -> StagingStats {
        self.core
            .shared
            .device
            .pool
            .as_ref()
            .map(|p| p.stats())
            .unwrap_or_default()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        LOCAL_ENGINES.lock().remove(&self.core.shared.instance_id);
        // Let queued batches finish, then stop the workers.
        self.tasks = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // Stop serving peers: closes every connection, releasing their pins.
        self.server = None;
        // Peers in this process may be copying from our regions right now:
        // unregistering waits for their pins, so the owner can free the
        // memory once drop returns.
        let addrs = self.core.shared.registry.addrs();
        if let Err(e) = self
            .core
            .shared
            .registry
            .unregister(&addrs, self.core.shared.settings.transfer_timeout)
        {
            log::error!(
                "kvferry: engine {} shut down with memory still in use: {e}",
                self.name()
            );
        }
        crate::device::release_all(&self.core.shared);
    }
}
