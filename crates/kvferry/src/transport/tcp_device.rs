//! DEVICE_CONTROL requests on a tcp connection: a device runtime's own
//! request to its counterpart in the peer (Ascend: "allow my process to
//! import your IPC exports"). A child module of `tcp`, to use its
//! connection internals without widening them.

use std::time::Instant;

use super::{Conn, TcpTransport};
use crate::error::Result;
use crate::wire::{self, FrameHeader, Kind};

impl Conn {
    /// Sends `request` as a DEVICE_CONTROL frame and returns the peer
    /// runtime's reply.
    pub fn device_control(
        &mut self,
        peer: &str,
        request: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>> {
        self.arm(deadline)
            .map_err(|e| self.io(peer, "device control", e))?;
        let rid = self.id();
        let h = FrameHeader::new(Kind::DeviceControl, rid, request.len() as u64);
        self.send(&h, &[request])
            .map_err(|e| self.io(peer, "device control", e))?;
        let (_, reply) = self.reply(peer, Kind::DeviceControlReply, rid)?;
        Ok(reply)
    }
}

impl TcpTransport {
    /// Sends a device-control request to the peer's device runtime (on the
    /// first lane) and returns its reply. Requests are at most
    /// `wire::MAX_CONTROL` bytes.
    pub fn device_control(&self, request: &[u8], deadline: Instant) -> Result<Vec<u8>> {
        if request.len() as u64 > wire::MAX_CONTROL {
            return Err(crate::error::Error::invalid(format!(
                "a device-control request of {} bytes exceeds {}",
                request.len(),
                wire::MAX_CONTROL
            )));
        }
        self.with_lane(0, |c| c.device_control(self.peer_name(), request, deadline))
    }
}
