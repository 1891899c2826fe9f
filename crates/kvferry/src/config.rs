//! Engine configuration: a builder, resolved once at engine creation against
//! the environment.
//!
//! Precedence, highest first: a value set on [`EngineConfig`]; a `KVFERRY_*`
//! variable; the variable Mooncake users already set (`ASCEND_*` in ms, then
//! `MC_*`); the default. See docs/configuration.md.

use std::sync::Arc;
use std::time::Duration;

use crate::device::DeviceRuntime;
use crate::error::{Error, Result};
use crate::session::host_problem;

/// Which transport to use for remote peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// The best path per peer: local, then same-host, then tcp.
    Auto,
    /// tcp for every peer outside this process.
    Tcp,
}

/// The builder. Unset fields fall back to the environment, then defaults.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    hostname: Option<String>,
    port: Option<u16>,
    port_range: Option<(u16, u16)>,
    connect_timeout: Option<Duration>,
    transfer_timeout: Option<Duration>,
    slice_size: Option<u64>,
    async_workers: Option<usize>,
    max_batches: Option<usize>,
    transport: Option<TransportChoice>,
    secret: Option<Vec<u8>>,
    lanes: Option<usize>,
    max_connections: Option<usize>,
    device_runtime: Option<Arc<dyn DeviceRuntime>>,
    staging_pool: Option<StagingPoolSize>,
    hooks: TestHooks,
}

/// TEST SUPPORT, not an API: faults and shortcuts the integration tests
/// need to reach paths a healthy machine does not take.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct TestHooks {
    /// Use cma (process_vm_* on our own pid) for engines of this process
    /// instead of the in-process copy.
    pub cma_in_process: bool,
    /// Pretend `/proc/<pid>/fd/<fd>` of the peer's lease board cannot be
    /// opened (the fast path then stays off: PIN leases for every batch).
    pub board_open_fails: bool,
    /// Pretend the peer's lease board belongs to another process (our pid
    /// namespace is not the target's): cma must be given up for tcp.
    pub board_in_another_process: bool,
    /// Called on the cma fast path with the lease board slot held and the
    /// ranges checked, right before the copy.
    pub before_cma_copy: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for TestHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHooks")
            .field("cma_in_process", &self.cma_in_process)
            .field("board_open_fails", &self.board_open_fails)
            .field("board_in_another_process", &self.board_in_another_process)
            .field("before_cma_copy", &self.before_cma_copy.is_some())
            .finish()
    }
}

/// The pinned host bounce pool that stages device memory through tcp:
/// `count` buffers of `buffer_bytes` each (Mooncake's `ASCEND_BUFFER_POOL`
/// = `count:MiB`). Buffers are allocated on first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingPoolSize {
    pub count: usize,
    pub buffer_bytes: u64,
}

/// `4:8`: four 8 MiB buffers, the value vllm-ascend's deployment guides set.
pub const DEFAULT_STAGING_POOL: StagingPoolSize = StagingPoolSize {
    count: 4,
    buffer_bytes: 8 << 20,
};

impl StagingPoolSize {
    /// Parses Mooncake's `count:MiB`. `0:0` (Mooncake: no pool) gives
    /// `None`: kvferry then uses the default, since it has no unstaged path
    /// for device memory between hosts yet.
    pub fn parse(text: &str) -> Result<Option<StagingPoolSize>> {
        let bad = || {
            Error::invalid(format!(
                "buffer pool {text:?}: expected \"count:MiB\" with both in 1..=1024 (or \"0:0\")"
            ))
        };
        let (count, mib) = text.trim().split_once(':').ok_or_else(bad)?;
        let count: usize = count.trim().parse().map_err(|_| bad())?;
        let mib: u64 = mib.trim().parse().map_err(|_| bad())?;
        match (count, mib) {
            (0, 0) => Ok(None),
            (1..=1024, 1..=1024) => Ok(Some(StagingPoolSize {
                count,
                buffer_bytes: mib << 20,
            })),
            _ => Err(bad()),
        }
    }
}

/// The resolved configuration an engine runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The host part of the engine's name; peers connect to it.
    pub hostname: String,
    /// A fixed port, or `None` to pick one in `port_range`.
    pub port: Option<u16>,
    /// Inclusive range a free port is picked from (Mooncake: 15000-17000);
    /// `(0, 0)` means any free port.
    pub port_range: (u16, u16),
    /// Bounds a connect and its handshake; also how long a new connection
    /// to this engine may take to say HELLO (and AUTH).
    pub connect_timeout: Duration,
    /// Deadline of a whole batch; also how long unregister waits for pins,
    /// and how long a frame this engine serves may take, from its first byte
    /// to the end of its reply.
    pub transfer_timeout: Duration,
    /// Ops larger than this are cut into slices of this size.
    pub slice_size: u64,
    /// Threads that run asynchronous batches.
    pub async_workers: usize,
    /// Live (unfreed) batches allowed at once.
    pub max_batches: usize,
    pub transport: TransportChoice,
    /// Shared secret peers must prove in the hello (`KVFERRY_SECRET`).
    pub secret: Option<Vec<u8>>,
    /// tcp connections per peer.
    pub lanes: usize,
    /// Connections this engine's server takes at once (every peer's lanes,
    /// lease board connections, and connections that have not said HELLO
    /// yet); more are refused.
    pub max_connections: usize,
    /// The staging pool for device memory over tcp (used only with a
    /// device runtime).
    pub staging_pool: StagingPoolSize,
}

/// `host` as an engine's hostname, or why it cannot be one: what
/// [`host_problem`] accepts, which is what peers accept in a session id
/// (`"[::1]"` is taken as `"::1"`).
pub fn check_hostname(host: &str) -> std::result::Result<String, &'static str> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .filter(|h| h.contains(':'))
        .unwrap_or(host);
    match host_problem(bare) {
        None => Ok(bare.to_owned()),
        Some(reason) => Err(reason),
    }
}

pub const DEFAULT_PORT_RANGE: (u16, u16) = (15000, 17000);
/// Mooncake's code uses 10 s for Ascend transfers; kvferry takes the same.
pub const DEFAULT_TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_SLICE_SIZE: u64 = 4 << 20;
pub const DEFAULT_MAX_BATCHES: usize = 1 << 16;
/// A thread each: 1024 leaves room for 250 peers at 4 lanes.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

impl EngineConfig {
    pub fn new() -> Self {
        Self::default()
    }
    /// The host peers reach this engine at: an IPv4 or IPv6 address (the
    /// latter also in brackets) or a host name, as [`check_hostname`]
    /// accepts; checked when the engine is created.
    pub fn hostname(mut self, h: impl Into<String>) -> Self {
        self.hostname = Some(h.into());
        self
    }
    /// Listen on exactly this port (0 = any free port).
    pub fn port(mut self, p: u16) -> Self {
        self.port = Some(p);
        self
    }
    pub fn port_range(mut self, lo: u16, hi: u16) -> Self {
        self.port_range = Some((lo, hi));
        self
    }
    /// Deadline for connecting to a peer and its handshake (> 0).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = Some(d);
        self
    }
    /// Deadline of a whole batch (> 0); also how long unregistering waits
    /// for in-flight transfers.
    pub fn transfer_timeout(mut self, d: Duration) -> Self {
        self.transfer_timeout = Some(d);
        self
    }
    pub fn slice_size(mut self, bytes: u64) -> Self {
        self.slice_size = Some(bytes);
        self
    }
    pub fn async_workers(mut self, n: usize) -> Self {
        self.async_workers = Some(n);
        self
    }
    pub fn max_batches(mut self, n: usize) -> Self {
        self.max_batches = Some(n);
        self
    }
    pub fn transport(mut self, t: TransportChoice) -> Self {
        self.transport = Some(t);
        self
    }
    /// A shared secret every peer must prove (and this engine proves to
    /// them); empty means none.
    pub fn secret(mut self, s: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(s.into());
        self
    }
    /// tcp connections per peer (default 4).
    pub fn lanes(mut self, n: usize) -> Self {
        self.lanes = Some(n);
        self
    }
    /// Connections this engine serves at once, from all peers (default
    /// 1024); a connection over the limit is refused at once.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }
    /// The runtime that handles device (NPU) memory: registration of
    /// `"npu:N"` regions, detection for `"*"`, staging, same-host device
    /// transports. Without one the engine handles host memory only.
    pub fn device_runtime(mut self, runtime: Arc<dyn DeviceRuntime>) -> Self {
        self.device_runtime = Some(runtime);
        self
    }
    /// The staging pool: `count` pinned buffers of `mib` MiB (default
    /// `KVFERRY_STAGING_POOL`, then `ASCEND_BUFFER_POOL`, then 4:8).
    pub fn staging_pool(mut self, count: usize, mib: u64) -> Self {
        self.staging_pool = Some(StagingPoolSize {
            count,
            buffer_bytes: mib << 20,
        });
        self
    }

    /// TEST SUPPORT: see [`TestHooks`].
    #[doc(hidden)]
    pub fn test_hooks(mut self, hooks: TestHooks) -> Self {
        self.hooks = hooks;
        self
    }

    pub(crate) fn hooks(&self) -> &TestHooks {
        &self.hooks
    }

    /// The device runtime set with [`EngineConfig::device_runtime`].
    pub(crate) fn runtime(&self) -> Option<&Arc<dyn DeviceRuntime>> {
        self.device_runtime.as_ref()
    }

    /// Resolves against the process environment.
    pub fn resolve(&self) -> Result<Settings> {
        self.resolve_with(|k| std::env::var(k).ok())
    }

    /// Resolves against `env` (a lookup function, so tests need not touch the
    /// process environment).
    pub fn resolve_with(&self, env: impl Fn(&str) -> Option<String>) -> Result<Settings> {
        let num = |key: &str| -> Result<Option<u64>> {
            match env(key) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    Error::invalid(format!("environment variable {key}={v:?} is not a number"))
                }),
            }
        };
        let ms =
            |key: &str| -> Result<Option<Duration>> { Ok(num(key)?.map(Duration::from_millis)) };
        let flag = |key: &str| parse_flag(key, env(key).as_deref());

        // The builder's, else the environment's (named in the error), else loopback.
        let given = match &self.hostname {
            Some(h) => Some((h.clone(), "hostname ")),
            None => env("KVFERRY_HOSTNAME")
                .filter(|h| !h.is_empty())
                .map(|h| (h, "environment variable KVFERRY_HOSTNAME=")),
        };
        let hostname = match given {
            Some((h, source)) => check_hostname(&h)
                .map_err(|reason| Error::invalid(format!("{source}{h:?}: {reason}")))?,
            None => "127.0.0.1".to_owned(),
        };
        let port = match self.port {
            Some(p) => Some(p),
            None => num("KVFERRY_PORT")?
                .map(|p| u16::try_from(p).map_err(|_| Error::invalid("KVFERRY_PORT > 65535")))
                .transpose()?,
        };
        let port_range = match self.port_range {
            Some(r) => r,
            None => {
                let lo = num("KVFERRY_MIN_PORT")?.or(num("MC_MIN_RPC_PORT")?);
                let hi = num("KVFERRY_MAX_PORT")?.or(num("MC_MAX_RPC_PORT")?);
                let lo = lo.map_or(Ok(DEFAULT_PORT_RANGE.0), u16::try_from);
                let hi = hi.map_or(Ok(DEFAULT_PORT_RANGE.1), u16::try_from);
                match (lo, hi) {
                    (Ok(lo), Ok(hi)) => (lo, hi),
                    _ => return Err(Error::invalid("port range bound > 65535")),
                }
            }
        };
        if port_range.0 > port_range.1 {
            return Err(Error::invalid(format!(
                "port range {}-{} is empty",
                port_range.0, port_range.1
            )));
        }
        // A timeout of 0 would fail every connection or transfer at once
        // ("timed out after 0 ms"): refused, naming where it came from.
        // Every variable is read (a malformed one is an error even when one
        // before it is set); the first one set wins.
        let timeout = |what: &str,
                       set: Option<Duration>,
                       vars: &[(&str, Option<Duration>)],
                       default: Duration|
         -> Result<Duration> {
            let (d, from) = match set {
                Some(d) => (d, String::new()),
                None => match vars.iter().find_map(|&(k, v)| Some((v?, k))) {
                    Some((d, key)) => (d, format!(" (environment variable {key})")),
                    None => (default, String::new()),
                },
            };
            if d.is_zero() {
                return Err(Error::invalid(format!(
                    "{what} of 0 ms{from}: nothing could finish in time; give at least 1 ms"
                )));
            }
            Ok(d)
        };
        let connect_timeout = timeout(
            "connect timeout",
            self.connect_timeout,
            &[
                (
                    "KVFERRY_CONNECT_TIMEOUT_MS",
                    ms("KVFERRY_CONNECT_TIMEOUT_MS")?,
                ),
                ("ASCEND_CONNECT_TIMEOUT", ms("ASCEND_CONNECT_TIMEOUT")?),
            ],
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let transfer_timeout = timeout(
            "transfer timeout",
            self.transfer_timeout,
            &[
                (
                    "KVFERRY_TRANSFER_TIMEOUT_MS",
                    ms("KVFERRY_TRANSFER_TIMEOUT_MS")?,
                ),
                ("ASCEND_TRANSFER_TIMEOUT", ms("ASCEND_TRANSFER_TIMEOUT")?),
                (
                    "MC_TRANSFER_TIMEOUT",
                    num("MC_TRANSFER_TIMEOUT")?.map(Duration::from_secs),
                ),
            ],
            DEFAULT_TRANSFER_TIMEOUT,
        )?;
        let slice_size = match self.slice_size {
            Some(s) => s,
            None => num("KVFERRY_SLICE_SIZE")?.unwrap_or(DEFAULT_SLICE_SIZE),
        };
        if slice_size == 0 {
            return Err(Error::invalid("slice size is zero"));
        }
        let async_workers = match self.async_workers {
            Some(n) => n,
            None => num("KVFERRY_ASYNC_WORKERS")?.map_or(2, |n| n as usize),
        };
        if async_workers == 0 {
            return Err(Error::invalid("async_workers is zero"));
        }
        let max_batches = self.max_batches.unwrap_or(DEFAULT_MAX_BATCHES);
        if max_batches == 0 || max_batches > u32::MAX as usize {
            return Err(Error::invalid("max_batches must be in 1..=2^32-1"));
        }
        // Read even when something before it decides, as the timeouts are:
        // a malformed value is an error wherever it stands.
        let force_tcp = flag("MC_FORCE_TCP")?;
        let transport = match self.transport {
            Some(t) => t,
            None => match env("KVFERRY_TRANSPORT").as_deref().map(str::trim) {
                Some("tcp") => TransportChoice::Tcp,
                Some("auto") | Some("") => TransportChoice::Auto,
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "KVFERRY_TRANSPORT={other:?}: expected \"auto\" or \"tcp\""
                    )));
                }
                None if force_tcp == Some(true) => TransportChoice::Tcp,
                None => TransportChoice::Auto,
            },
        };
        let secret = match &self.secret {
            Some(s) => Some(s.clone()),
            None => env("KVFERRY_SECRET").map(String::into_bytes),
        }
        .filter(|s| !s.is_empty());
        let lanes = match self.lanes {
            Some(n) => n,
            None => num("KVFERRY_LANES")?.map_or(4, |n| n as usize),
        };
        if lanes == 0 || lanes > 64 {
            return Err(Error::invalid("lanes must be in 1..=64"));
        }
        let max_connections = match self.max_connections {
            Some(n) => n,
            None => num("KVFERRY_MAX_CONNECTIONS")?.map_or(DEFAULT_MAX_CONNECTIONS, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
        };
        if max_connections == 0 {
            return Err(Error::invalid("max_connections is zero"));
        }
        let staging_pool = match self.staging_pool {
            Some(p) if p.count == 0 || p.buffer_bytes == 0 => {
                return Err(Error::invalid(
                    "the staging pool needs at least one buffer of 1 MiB",
                ));
            }
            Some(p) => p,
            None => {
                let from = |key: &str| -> Result<Option<StagingPoolSize>> {
                    match env(key) {
                        Some(v) if !v.trim().is_empty() => {
                            StagingPoolSize::parse(&v).map_err(|e| {
                                Error::invalid(format!("environment variable {key}: {e}"))
                            })
                        }
                        _ => Ok(None),
                    }
                };
                from("KVFERRY_STAGING_POOL")?
                    .or(from("ASCEND_BUFFER_POOL")?)
                    .unwrap_or(DEFAULT_STAGING_POOL)
            }
        };
        Ok(Settings {
            hostname,
            port,
            port_range,
            connect_timeout,
            transfer_timeout,
            slice_size,
            async_workers,
            max_batches,
            transport,
            secret,
            lanes,
            max_connections,
            staging_pool,
        })
    }
}

/// The value of boolean environment variable `key`, given its `value`:
/// `None` when unset or empty (as for every variable); `1`, `true`, `yes`,
/// `on` and `0`, `false`, `no`, `off` in any case; anything else is an
/// error naming the variable, as a malformed number is: a typo
/// (`MC_FORCE_TCP=ture`) must not silently mean "off".
pub fn parse_flag(key: &str, value: Option<&str>) -> Result<Option<bool>> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(Some(true)),
        "0" | "false" | "no" | "off" => Ok(Some(false)),
        _ => Err(Error::invalid(format!(
            "environment variable {key}={:?} is not a boolean: expected 1/0, true/false, yes/no or on/off (any case)",
            value.unwrap_or_default()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults() {
        let s = EngineConfig::new().resolve_with(with(&[])).unwrap();
        assert_eq!(s.port_range, (15000, 17000));
        assert_eq!(s.transfer_timeout, DEFAULT_TRANSFER_TIMEOUT);
        assert_eq!(s.transport, TransportChoice::Auto);
        assert_eq!(s.port, None);
        assert_eq!(s.max_connections, DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn max_connections_from_the_builder_then_the_environment() {
        let env = with(&[("KVFERRY_MAX_CONNECTIONS", "16")]);
        let s = EngineConfig::new().resolve_with(&env).unwrap();
        assert_eq!(s.max_connections, 16);
        let s = EngineConfig::new()
            .max_connections(3)
            .resolve_with(&env)
            .unwrap();
        assert_eq!(s.max_connections, 3);
        assert!(
            EngineConfig::new()
                .max_connections(0)
                .resolve_with(with(&[]))
                .is_err()
        );
        let zero = with(&[("KVFERRY_MAX_CONNECTIONS", "0")]);
        assert!(EngineConfig::new().resolve_with(zero).is_err());
    }

    #[test]
    fn precedence_builder_then_kvferry_then_mooncake() {
        let env = with(&[
            ("ASCEND_TRANSFER_TIMEOUT", "33064"),
            ("MC_TRANSFER_TIMEOUT", "5"),
            ("ASCEND_CONNECT_TIMEOUT", "1500"),
            ("MC_FORCE_TCP", "1"),
            ("MC_MIN_RPC_PORT", "20000"),
            ("MC_MAX_RPC_PORT", "20010"),
        ]);
        let s = EngineConfig::new().resolve_with(&env).unwrap();
        assert_eq!(s.transfer_timeout, Duration::from_millis(33064));
        assert_eq!(s.connect_timeout, Duration::from_millis(1500));
        assert_eq!(s.transport, TransportChoice::Tcp);
        assert_eq!(s.port_range, (20000, 20010));

        let s = EngineConfig::new()
            .resolve_with(with(&[("MC_TRANSFER_TIMEOUT", "5")]))
            .unwrap();
        assert_eq!(s.transfer_timeout, Duration::from_secs(5));

        let s = EngineConfig::new()
            .resolve_with(with(&[
                ("KVFERRY_TRANSFER_TIMEOUT_MS", "7"),
                ("ASCEND_TRANSFER_TIMEOUT", "33064"),
                ("KVFERRY_TRANSPORT", "auto"),
                ("MC_FORCE_TCP", "1"),
            ]))
            .unwrap();
        assert_eq!(s.transfer_timeout, Duration::from_millis(7));
        assert_eq!(s.transport, TransportChoice::Auto);

        let s = EngineConfig::new()
            .transfer_timeout(Duration::from_secs(1))
            .resolve_with(&env)
            .unwrap();
        assert_eq!(s.transfer_timeout, Duration::from_secs(1));
    }

    #[test]
    fn staging_pool_takes_mooncakes_count_colon_mib() {
        let pool = |vars: &[(&str, &str)]| {
            EngineConfig::new()
                .resolve_with(with(vars))
                .map(|s| s.staging_pool)
        };
        assert_eq!(pool(&[]).unwrap(), DEFAULT_STAGING_POOL);
        assert_eq!(
            pool(&[("ASCEND_BUFFER_POOL", "2:16")]).unwrap(),
            StagingPoolSize {
                count: 2,
                buffer_bytes: 16 << 20
            }
        );
        assert_eq!(
            pool(&[("ASCEND_BUFFER_POOL", "0:0")]).unwrap(),
            DEFAULT_STAGING_POOL
        );
        assert_eq!(
            pool(&[
                ("KVFERRY_STAGING_POOL", "1:1"),
                ("ASCEND_BUFFER_POOL", "2:16")
            ])
            .unwrap()
            .count,
            1
        );
        for bad in ["4", "4:", ":8", "x:8", "0:8", "4:0", "2000:8"] {
            assert!(pool(&[("ASCEND_BUFFER_POOL", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_timeouts_are_refused_naming_their_source() {
        let refused = |c: EngineConfig, vars: &[(&str, &str)], words: &[&str]| {
            let e = c.resolve_with(with(vars)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
            for w in words {
                assert!(e.to_string().contains(w), "{w:?} not in: {e}");
            }
        };
        let zero = Duration::ZERO;
        refused(
            EngineConfig::new().transfer_timeout(zero),
            &[],
            &["transfer timeout of 0 ms"],
        );
        refused(
            EngineConfig::new().connect_timeout(zero),
            &[],
            &["connect timeout of 0 ms"],
        );
        for (var, what) in [
            ("KVFERRY_TRANSFER_TIMEOUT_MS", "transfer timeout"),
            ("ASCEND_TRANSFER_TIMEOUT", "transfer timeout"),
            ("MC_TRANSFER_TIMEOUT", "transfer timeout"),
            ("KVFERRY_CONNECT_TIMEOUT_MS", "connect timeout"),
            ("ASCEND_CONNECT_TIMEOUT", "connect timeout"),
        ] {
            refused(EngineConfig::new(), &[(var, "0")], &[what, var]);
        }
        // The first variable set decides; a 0 below it does not matter, a
        // 0 above it does.
        let s = EngineConfig::new()
            .resolve_with(with(&[
                ("ASCEND_TRANSFER_TIMEOUT", "500"),
                ("MC_TRANSFER_TIMEOUT", "0"),
            ]))
            .unwrap();
        assert_eq!(s.transfer_timeout, Duration::from_millis(500));
        refused(
            EngineConfig::new(),
            &[
                ("KVFERRY_TRANSFER_TIMEOUT_MS", "0"),
                ("ASCEND_TRANSFER_TIMEOUT", "500"),
            ],
            &["KVFERRY_TRANSFER_TIMEOUT_MS"],
        );
        // Set on the config, a good value wins over a 0 in the environment.
        let s = EngineConfig::new()
            .connect_timeout(Duration::from_millis(1))
            .resolve_with(with(&[("ASCEND_CONNECT_TIMEOUT", "0")]))
            .unwrap();
        assert_eq!(s.connect_timeout, Duration::from_millis(1));
    }

    #[test]
    fn hostnames_are_what_peers_can_parse() {
        let host =
            |c: EngineConfig, vars: &[(&str, &str)]| c.resolve_with(with(vars)).map(|s| s.hostname);
        for good in [
            "10.0.0.7",
            "node-7.cluster",
            "prefill_0",
            "::1",
            "fe80::1:2",
        ] {
            assert_eq!(host(EngineConfig::new().hostname(good), &[]).unwrap(), good);
            assert_eq!(
                host(EngineConfig::new(), &[("KVFERRY_HOSTNAME", good)]).unwrap(),
                good
            );
        }
        assert_eq!(
            host(EngineConfig::new().hostname("[::1]"), &[]).unwrap(),
            "::1"
        );
        for bad in [
            "",
            "a b",
            "a b:c",
            "host:80",
            "[::1]:80",
            "[host]",
            "a..b",
            "1.2.3",
            "h\u{e9}te",
        ] {
            let e = host(EngineConfig::new().hostname(bad), &[]).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("hostname"), "{e}");
            if !bad.is_empty() {
                let e = host(EngineConfig::new(), &[("KVFERRY_HOSTNAME", bad)]).unwrap_err();
                assert!(e.to_string().contains("KVFERRY_HOSTNAME"), "{e}");
            }
        }
    }

    #[test]
    fn flags_take_every_usual_spelling_in_any_case() {
        let transport = |v: &str| {
            EngineConfig::new()
                .resolve_with(with(&[("MC_FORCE_TCP", v)]))
                .map(|s| s.transport)
        };
        for on in [
            "1", "true", "True", "TRUE", "yes", "YES", "Yes", "on", "ON", " On ",
        ] {
            assert_eq!(transport(on).unwrap(), TransportChoice::Tcp, "{on:?}");
        }
        for off in [
            "0", "false", "False", "FALSE", "no", "NO", "off", "Off", "", "  ",
        ] {
            assert_eq!(transport(off).unwrap(), TransportChoice::Auto, "{off:?}");
        }
        for bad in ["ture", "2", "y", "n", "enable", "-1", "tcp", "yes please"] {
            let e = transport(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{bad:?}: {e}");
            let m = e.to_string();
            assert!(m.contains(&format!("MC_FORCE_TCP={bad:?}")), "{m}");
            assert!(m.contains("not a boolean"), "{m}");
        }
        // Malformed is an error even where another setting decides, as a
        // malformed timeout is.
        for decided in [
            EngineConfig::new().transport(TransportChoice::Auto),
            EngineConfig::new(),
        ] {
            let e = decided
                .resolve_with(with(&[
                    ("KVFERRY_TRANSPORT", "tcp"),
                    ("MC_FORCE_TCP", "ture"),
                ]))
                .unwrap_err();
            assert!(e.to_string().contains("MC_FORCE_TCP"), "{e}");
        }
        assert_eq!(parse_flag("X", None).unwrap(), None);
        assert_eq!(parse_flag("X", Some("oN")).unwrap(), Some(true));
        assert_eq!(parse_flag("X", Some("nO")).unwrap(), Some(false));
    }

    #[test]
    fn bad_values_are_errors() {
        for vars in [
            [("ASCEND_TRANSFER_TIMEOUT", "soon")],
            [("KVFERRY_TRANSPORT", "carrier-pigeon")],
            [("MC_FORCE_TCP", "maybe")],
            [("MC_MIN_RPC_PORT", "70000")],
            [("KVFERRY_SLICE_SIZE", "0")],
        ] {
            let e = EngineConfig::new().resolve_with(with(&vars)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{vars:?}: {e}");
        }
        assert!(
            EngineConfig::new()
                .port_range(10, 9)
                .resolve_with(with(&[]))
                .is_err()
        );
    }
}
