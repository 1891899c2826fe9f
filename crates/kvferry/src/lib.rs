//! kvferry: a KV-cache transfer engine.
//!
//! Register memory once; then read and write peers' registered memory in
//! batches of one-sided ops, over the best path between the two engines.
//!
//! ```
//! use kvferry::{Engine, EngineConfig, Op};
//!
//! let a = Engine::new(EngineConfig::new().port(0)).unwrap();
//! let b = Engine::new(EngineConfig::new().port(0)).unwrap();
//! let mut src = vec![7u8; 4096];
//! let mut dst = vec![0u8; 4096];
//! // SAFETY: both buffers outlive the engines' use of them (the engines are
//! // dropped, or the memory unregistered, before the vectors).
//! unsafe {
//!     a.register_memory(dst.as_mut_ptr() as u64, 4096, "cpu:0").unwrap();
//!     b.register_memory(src.as_mut_ptr() as u64, 4096, "cpu:0").unwrap();
//! }
//! let op = Op { local: dst.as_ptr() as u64, remote: src.as_ptr() as u64, len: 4096 };
//! a.read(b.name(), &[op]).unwrap();
//! drop((a, b));
//! assert_eq!(dst, src);
//! ```

// Library code reports failures; it never panics on them.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod batch;
pub mod board;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod memory;
pub mod net;
pub mod plan;
pub mod segment;
pub mod server;
pub mod session;
pub mod socket_owner;
pub(crate) mod spin;
pub mod staging;
pub mod transport;
pub mod wire;

pub use batch::{BatchId, BatchState, OpState};
pub use config::{EngineConfig, Settings, StagingPoolSize, TestHooks, TransportChoice};
pub use device::{
    CopyDirection, CopyRange, DeviceJob, DevicePeer, DeviceRuntime, DeviceSlice, DeviceTransport,
    PinnedBuffer,
};
pub use engine::{Engine, Notification};
pub use error::{Error, Result, Status};
pub use memory::{Location, LocationHint, RegionDesc};
pub use plan::{Op, Opcode};
pub use segment::Segment;
