//! The wire protocol: one port per engine carries control and tcp data.
//! docs/wire-protocol.md is the specification; this module is its code.
//!
//! Every frame is a fixed 32-byte little-endian [`FrameHeader`] followed by
//! `payload_len` bytes. The header is read as a POD and validated (magic,
//! version, kind, flags, per-kind payload bound) before anything else is
//! trusted.

use std::io::{self, IoSlice, Read, Write};

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Status};
use crate::memory::{Location, RegionDesc};
use crate::segment::Segment;

/// "KVFR" in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KVFR");
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = std::mem::size_of::<FrameHeader>();

/// Most ranges one READ / WRITE / PIN request may name.
pub const MAX_ENTRIES: usize = 1 << 16;
/// Most data bytes one READ reply or WRITE request carries.
pub const MAX_DATA: u64 = 64 << 20;
/// Bound of control payloads (hello, notify, error, ...).
pub const MAX_CONTROL: u64 = 1 << 20;
/// Bound of a SEGMENT payload.
pub const MAX_SEGMENT: u64 = 16 << 20;
/// Bound of an ERROR message.
pub const MAX_ERROR: u64 = 64 << 10;

/// The fixed header of every frame.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct FrameHeader {
    pub magic: u32,
    pub version: u16,
    pub kind: u16,
    /// No flags are defined in version 1: must be 0.
    pub flags: u32,
    /// Status code of ERROR frames (a [`Status`] value); 0 otherwise.
    pub status: i32,
    /// Chosen by the requester, echoed in the reply.
    pub request_id: u64,
    pub payload_len: u64,
}

const _: () = assert!(HEADER_LEN == 32);

macro_rules! kinds {
    ($($name:ident = $v:expr, $bound:expr;)*) => {
        /// Frame kinds.
        #[repr(u16)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Kind { $($name = $v,)* }

        impl Kind {
            pub fn from_u16(v: u16) -> Option<Kind> {
                match v { $($v => Some(Kind::$name),)* _ => None }
            }
            /// Largest payload a frame of this kind may carry.
            pub fn max_payload(self) -> u64 {
                match self { $(Kind::$name => $bound,)* }
            }
        }
    };
}

const TABLE_MAX: u64 = 16 + 16 * MAX_ENTRIES as u64;
/// Most slots one LEASE_BOARD_GRANT names.
pub const MAX_GRANT: u32 = 64;
const BOARD_GRANT_MAX: u64 = 24 + 4 * MAX_GRANT as u64;

kinds! {
    Hello = 1, 64;
    HelloReply = 2, 128;
    Auth = 3, 64;
    AuthOk = 4, 0;
    GetSegment = 10, 0;
    SegmentReply = 11, MAX_SEGMENT;
    Read = 20, TABLE_MAX;
    ReadData = 21, MAX_DATA;
    Write = 22, TABLE_MAX + MAX_DATA;
    WriteAck = 23, 0;
    Notify = 30, MAX_CONTROL;
    NotifyAck = 31, 0;
    Pin = 40, TABLE_MAX;
    PinOk = 41, 8;
    Unpin = 42, 8;
    LeaseBoard = 43, 16;
    LeaseBoardGrant = 44, BOARD_GRANT_MAX;
    LeaseRegions = 45, 8;
    LeaseRegionsReply = 46, TABLE_MAX;
    Ping = 50, 64;
    Pong = 51, 64;
    DeviceControl = 60, MAX_CONTROL;
    DeviceControlReply = 61, MAX_CONTROL;
    ErrorReply = 127, MAX_ERROR;
}

impl FrameHeader {
    pub fn new(kind: Kind, request_id: u64, payload_len: u64) -> Self {
        FrameHeader {
            magic: MAGIC,
            version: VERSION,
            kind: kind as u16,
            flags: 0,
            status: 0,
            request_id,
            payload_len,
        }
    }

    /// Checks everything a header alone can say is wrong.
    pub fn validate(&self) -> std::result::Result<Kind, String> {
        if self.magic != MAGIC {
            return Err(format!("bad magic {:#010x}", self.magic));
        }
        if self.version != VERSION {
            return Err(format!(
                "unsupported protocol version {} (this side speaks {VERSION})",
                self.version
            ));
        }
        let kind =
            Kind::from_u16(self.kind).ok_or_else(|| format!("unknown frame kind {}", self.kind))?;
        if self.flags != 0 {
            return Err(format!("unknown flags {:#x}", self.flags));
        }
        if self.payload_len > kind.max_payload() {
            return Err(format!(
                "{kind:?} payload of {} bytes exceeds its bound of {}",
                self.payload_len,
                kind.max_payload()
            ));
        }
        Ok(kind)
    }
}

/// Reads exactly one header. `Ok(None)` on a clean end of stream before
/// the first byte.
pub fn read_header(r: &mut impl Read) -> io::Result<Option<FrameHeader>> {
    let mut h = FrameHeader::zeroed();
    let buf = bytemuck::bytes_of_mut(&mut h);
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated frame header",
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(h))
}

/// Writes a header and payload pieces as one vectored write sequence.
pub fn write_frame(w: &mut impl Write, header: &FrameHeader, payload: &[&[u8]]) -> io::Result<()> {
    let mut bufs: Vec<IoSlice<'_>> = Vec::with_capacity(payload.len() + 1);
    bufs.push(IoSlice::new(bytemuck::bytes_of(header)));
    bufs.extend(
        payload
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p)),
    );
    write_all_vectored(w, &mut bufs)
}

/// `Write::write_all_vectored` (unstable in std) for stable Rust.
pub fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer stopped reading",
                ));
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An ERROR frame's header and message.
pub fn error_frame(request_id: u64, status: Status, message: &str) -> (FrameHeader, Vec<u8>) {
    let mut msg = message.as_bytes().to_vec();
    msg.truncate(MAX_ERROR as usize);
    let mut h = FrameHeader::new(Kind::ErrorReply, request_id, msg.len() as u64);
    h.status = status as i32;
    (h, msg)
}

// ---- payloads -------------------------------------------------------------

/// HELLO, client -> server.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub reserved: u32,
    pub nonce: [u8; 16],
    /// The client engine's instance id (0 for a tool without an engine).
    pub instance_id: u64,
}

/// HELLO_REPLY, server -> client.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct HelloReply {
    pub version: u16,
    /// 1 when the server requires the shared secret (an AUTH frame next).
    pub auth_required: u16,
    pub reserved: u32,
    pub nonce: [u8; 16],
    /// The server engine's instance id: a change means it restarted.
    pub instance_id: u64,
    /// HMAC(secret, "kvferry server" | client nonce | server nonce), zeros without a secret.
    pub proof: [u8; 32],
}

/// AUTH, client -> server: HMAC(secret, "kvferry client" | server nonce | client nonce).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct Auth {
    pub proof: [u8; 32],
}

/// Decodes a fixed-size POD payload.
pub fn pod_from<T: Pod>(payload: &[u8]) -> std::result::Result<T, String> {
    bytemuck::try_pod_read_unaligned(payload).map_err(|_| {
        format!(
            "payload of {} bytes where {} were expected",
            payload.len(),
            std::mem::size_of::<T>()
        )
    })
}

/// The head of READ, WRITE and PIN payloads, followed by `count` [`Range`]s.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct TableHead {
    /// The target's instance id as the initiator knows it: a target that
    /// restarted since refuses the request (no op lands on a stale plan).
    pub target_instance: u64,
    pub count: u32,
    pub reserved: u32,
}

/// A remote range in a request table.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Range {
    pub addr: u64,
    pub len: u64,
}

pub const TABLE_HEAD_LEN: usize = std::mem::size_of::<TableHead>();

/// Encodes a table of ranges.
pub fn encode_table(target_instance: u64, ranges: &[Range]) -> Vec<u8> {
    let head = TableHead {
        target_instance,
        count: ranges.len() as u32,
        reserved: 0,
    };
    let mut out = Vec::with_capacity(TABLE_HEAD_LEN + 16 * ranges.len());
    out.extend_from_slice(bytemuck::bytes_of(&head));
    out.extend_from_slice(bytemuck::cast_slice(ranges));
    out
}

/// Decodes a table head from its 16 bytes; checks count against the bound
/// and against the bytes that remain in the frame.
pub fn decode_table_head(bytes: &[u8], payload_len: u64) -> std::result::Result<TableHead, String> {
    let head: TableHead = pod_from(bytes)?;
    if head.count == 0 || head.count as usize > MAX_ENTRIES {
        return Err(format!(
            "table of {} ranges (allowed 1..={MAX_ENTRIES})",
            head.count
        ));
    }
    let table = TABLE_HEAD_LEN as u64 + 16 * u64::from(head.count);
    if table > payload_len {
        return Err(format!(
            "table of {} ranges does not fit a {payload_len}-byte payload",
            head.count
        ));
    }
    Ok(head)
}

/// Decodes the ranges following a table head; sums their lengths with
/// overflow checks.
pub fn decode_ranges(bytes: &[u8]) -> std::result::Result<(Vec<Range>, u64), String> {
    if !bytes.len().is_multiple_of(16) {
        return Err("range table is not a whole number of ranges".into());
    }
    let ranges: Vec<Range> = bytes
        .chunks_exact(16)
        .map(bytemuck::pod_read_unaligned::<Range>)
        .collect();
    let mut total = 0u64;
    for r in &ranges {
        if r.len == 0 {
            return Err(format!("zero-length range at {:#x}", r.addr));
        }
        if r.addr.checked_add(r.len).is_none() {
            return Err(format!("range {:#x} + {} overflows", r.addr, r.len));
        }
        total = total.checked_add(r.len).ok_or("range lengths overflow")?;
    }
    Ok((ranges, total))
}

// ---- cma lease board (board.rs) ---------------------------------------------

/// LEASE_BOARD, initiator -> target: "give this connection `slots` slots
/// of your lease board".
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BoardRequest {
    pub target_instance: u64,
    pub slots: u32,
    /// The initiator's pid (0: not given): the target keeps a dead
    /// connection's slots until this process is gone (board.rs).
    pub pid: u32,
}

/// LEASE_BOARD_GRANT, target -> initiator, followed by `count` u32 slot
/// indexes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BoardGrant {
    pub pid: u32,
    /// The board's descriptor in the target: `/proc/<pid>/fd/<fd>`.
    pub fd: i32,
    pub board_len: u64,
    pub count: u32,
    pub reserved: u32,
}

pub const BOARD_GRANT_LEN: usize = std::mem::size_of::<BoardGrant>();

pub fn encode_grant(g: &BoardGrant, slots: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BOARD_GRANT_LEN + 4 * slots.len());
    out.extend_from_slice(bytemuck::bytes_of(g));
    for s in slots {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// Decodes a grant: the head, then exactly `count` (at most `MAX_GRANT`)
/// slot indexes.
pub fn decode_grant(bytes: &[u8]) -> std::result::Result<(BoardGrant, Vec<u32>), String> {
    let g: BoardGrant = pod_from(
        bytes
            .get(..BOARD_GRANT_LEN)
            .ok_or("LEASE_BOARD_GRANT shorter than its head")?,
    )?;
    let rest = &bytes[BOARD_GRANT_LEN..];
    if g.count > MAX_GRANT || rest.len() != 4 * g.count as usize {
        return Err(format!(
            "LEASE_BOARD_GRANT of {} slots carries {} bytes of indexes",
            g.count,
            rest.len()
        ));
    }
    let slots = rest
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((g, slots))
}

/// LEASE_REGIONS_REPLY: the lease board's `retire_epoch` read before the
/// regions were listed, then `count` regions `{addr, len}`, sorted and
/// non-overlapping.
pub fn encode_lease_regions(epoch: u64, regions: &[Range]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 16 * regions.len());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(bytemuck::cast_slice(regions));
    out
}

pub fn decode_lease_regions(bytes: &[u8]) -> std::result::Result<(u64, Vec<Range>), String> {
    let head = bytes
        .get(..16)
        .ok_or("LEASE_REGIONS_REPLY shorter than 16")?;
    let epoch = u64::from_le_bytes(head[..8].try_into().map_err(|_| "epoch")?);
    let count = u32::from_le_bytes(head[8..12].try_into().map_err(|_| "count")?) as usize;
    let rest = &bytes[16..];
    if count > MAX_ENTRIES || rest.len() != 16 * count {
        return Err(format!(
            "LEASE_REGIONS_REPLY of {count} regions carries {} bytes",
            rest.len()
        ));
    }
    let regions: Vec<Range> = rest
        .chunks_exact(16)
        .map(bytemuck::pod_read_unaligned::<Range>)
        .collect();
    let mut prev_end = 0u64;
    for r in &regions {
        let end = r.addr.checked_add(r.len).ok_or("region overflows")?;
        if r.len == 0 || r.addr < prev_end {
            return Err("lease regions are empty, unsorted or overlapping".into());
        }
        prev_end = end;
    }
    Ok((epoch, regions))
}

// ---- segment ---------------------------------------------------------------

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct SegmentHead {
    instance_id: u64,
    epoch: u64,
    pid: u32,
    region_count: u32,
    name_len: u32,
    host_len: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct WireRegion {
    addr: u64,
    len: u64,
    /// 0 host, 1 npu.
    kind: u32,
    device: u32,
}

const MAX_REGIONS: usize = 1 << 16;

/// Most bytes one region's export (an Ascend IPC key: 65) may have.
pub const MAX_EXPORT: usize = 1024;

/// "KVFX": the optional exports section after a segment's regions. Segments
/// without exports end with their regions, as in the first version of the
/// encoding, so host-only engines read each other's segments either way.
const EXPORTS_MAGIC: u32 = u32::from_le_bytes(*b"KVFX");

#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct ExportsHead {
    magic: u32,
    count: u32,
}

/// One export: the index of its region in the segment, then `len` bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct ExportHead {
    region_index: u32,
    len: u32,
}

fn encode_exports(s: &Segment, out: &mut Vec<u8>) {
    let listed: Vec<(u32, &[u8])> = s
        .regions
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i as u32, s.export(r.addr)?)))
        .filter(|(_, e)| e.len() <= MAX_EXPORT)
        .collect();
    if listed.is_empty() {
        return;
    }
    let head = ExportsHead {
        magic: EXPORTS_MAGIC,
        count: listed.len() as u32,
    };
    out.extend_from_slice(bytemuck::bytes_of(&head));
    for (region_index, export) in listed {
        let h = ExportHead {
            region_index,
            len: export.len() as u32,
        };
        out.extend_from_slice(bytemuck::bytes_of(&h));
        out.extend_from_slice(export);
    }
}

fn decode_exports(
    bytes: &[u8],
    regions: &[RegionDesc],
) -> std::result::Result<std::collections::BTreeMap<u64, Vec<u8>>, String> {
    let mut exports = std::collections::BTreeMap::new();
    if bytes.is_empty() {
        return Ok(exports);
    }
    let hl = std::mem::size_of::<ExportsHead>();
    let head: ExportsHead = pod_from(bytes.get(..hl).ok_or("truncated segment exports")?)?;
    if head.magic != EXPORTS_MAGIC || head.count as usize > regions.len() {
        return Err("segment exports section is malformed".into());
    }
    let mut rest = &bytes[hl..];
    let mut next_index = 0u32;
    for _ in 0..head.count {
        let el = std::mem::size_of::<ExportHead>();
        let h: ExportHead = pod_from(rest.get(..el).ok_or("truncated segment export")?)?;
        let len = h.len as usize;
        if h.region_index < next_index || h.region_index as usize >= regions.len() {
            return Err("segment exports name regions out of order or out of range".into());
        }
        if len == 0 || len > MAX_EXPORT {
            return Err(format!(
                "segment export of {len} bytes (allowed 1..={MAX_EXPORT})"
            ));
        }
        let blob = rest
            .get(el..el + len)
            .ok_or("segment export runs past the payload")?;
        exports.insert(regions[h.region_index as usize].addr, blob.to_vec());
        next_index = h.region_index + 1;
        rest = &rest[el + len..];
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} stray bytes after the segment exports",
            rest.len()
        ));
    }
    Ok(exports)
}

pub fn encode_segment(s: &Segment) -> Vec<u8> {
    let head = SegmentHead {
        instance_id: s.instance_id,
        epoch: s.epoch,
        pid: s.pid,
        region_count: s.regions.len() as u32,
        name_len: s.name.len() as u32,
        host_len: s.host_id.len() as u32,
    };
    let mut out = Vec::new();
    out.extend_from_slice(bytemuck::bytes_of(&head));
    out.extend_from_slice(s.name.as_bytes());
    out.extend_from_slice(s.host_id.as_bytes());
    for r in &s.regions {
        let (kind, device) = match r.location {
            Location::Host => (0, 0),
            Location::Npu(n) => (1, n),
        };
        let w = WireRegion {
            addr: r.addr,
            len: r.len,
            kind,
            device,
        };
        out.extend_from_slice(bytemuck::bytes_of(&w));
    }
    encode_exports(s, &mut out);
    out
}

pub fn decode_segment(bytes: &[u8]) -> std::result::Result<Segment, String> {
    let hl = std::mem::size_of::<SegmentHead>();
    let head: SegmentHead = pod_from(bytes.get(..hl).ok_or("segment shorter than its head")?)?;
    let (nl, hl2, rc) = (
        head.name_len as usize,
        head.host_len as usize,
        head.region_count as usize,
    );
    if nl > 1024 || hl2 > 1024 || rc > MAX_REGIONS {
        return Err("segment head announces oversized fields".into());
    }
    let need = hl + nl + hl2 + rc * std::mem::size_of::<WireRegion>();
    // Anything after the regions is the optional exports section.
    if bytes.len() < need {
        return Err(format!(
            "segment of {} bytes, its head announces {need}",
            bytes.len()
        ));
    }
    let text = |b: &[u8]| {
        String::from_utf8(b.to_vec()).map_err(|_| "segment text is not UTF-8".to_string())
    };
    let name = text(&bytes[hl..hl + nl])?;
    let host_id = text(&bytes[hl + nl..hl + nl + hl2])?;
    let mut regions = Vec::with_capacity(rc);
    let mut prev_end = 0u64;
    for c in bytes[hl + nl + hl2..need].chunks_exact(std::mem::size_of::<WireRegion>()) {
        let w: WireRegion = bytemuck::pod_read_unaligned(c);
        let location = match w.kind {
            0 => Location::Host,
            1 => Location::Npu(w.device),
            k => return Err(format!("unknown region kind {k}")),
        };
        let end = w.addr.checked_add(w.len).ok_or("region overflows")?;
        if w.len == 0 || w.addr < prev_end {
            return Err("segment regions are empty, unsorted or overlapping".into());
        }
        prev_end = end;
        regions.push(RegionDesc {
            addr: w.addr,
            len: w.len,
            location,
        });
    }
    let exports = decode_exports(&bytes[need..], &regions)?;
    Ok(Segment {
        name,
        instance_id: head.instance_id,
        epoch: head.epoch,
        host_id,
        pid: head.pid,
        regions,
        exports,
    })
}

// ---- notify ----------------------------------------------------------------

pub fn encode_notify(name: &str, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + message.len());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(message);
    out
}

pub fn decode_notify(bytes: &[u8]) -> std::result::Result<(String, Vec<u8>), String> {
    let len = u32::from_le_bytes(
        bytes
            .get(..4)
            .ok_or("notify shorter than 4 bytes")?
            .try_into()
            .map_err(|_| "notify head")?,
    ) as usize;
    let name = bytes
        .get(4..4 + len)
        .ok_or("notify name runs past the payload")?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| "notify name is not UTF-8")?;
    Ok((name, bytes[4 + len..].to_vec()))
}

/// Turns a received ERROR frame into an error for the initiator.
pub fn remote_error(peer: &str, h: &FrameHeader, message: &[u8]) -> Error {
    let message = String::from_utf8_lossy(message).into_owned();
    match Status::from_code(h.status) {
        // Refusals of one request: the target keeps the stream in step
        // (a WRITE's data read and dropped), so the connection goes on.
        Some(Status::RemoteOutOfRange | Status::RegionNotMapped) => Error::RequestRefused {
            peer: peer.to_owned(),
            message,
        },
        Some(Status::PeerRestarted) => Error::PeerRestarted {
            peer: peer.to_owned(),
            detail: message,
        },
        Some(Status::PeerUnreachable) => Error::PeerUnreachable {
            peer: peer.to_owned(),
            reason: format!("the target refused the connection: {message}"),
        },
        _ => Error::TransferFailed {
            peer: peer.to_owned(),
            reason: format!(
                "the target answered with an error ({}): {message}",
                h.status
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_request_reads_as_before_and_keeps_its_status() {
        for status in [Status::RemoteOutOfRange, Status::RegionNotMapped] {
            let (h, msg) = error_frame(7, status, "range 0 is out");
            let e = remote_error("p:1", &h, &msg);
            assert!(matches!(e, Error::RequestRefused { .. }), "{e:?}");
            assert_eq!(
                e.to_string(),
                "transfer with peer p:1 failed: the target refused the request: range 0 is out"
            );
            assert_eq!(e.status(), Status::TransferFailed);
        }
        let (h, msg) = error_frame(7, Status::Internal, "boom");
        assert!(matches!(
            remote_error("p:1", &h, &msg),
            Error::TransferFailed { .. }
        ));
    }

    #[test]
    fn header_validation() {
        let ok = FrameHeader::new(Kind::Read, 1, 32);
        assert_eq!(ok.validate(), Ok(Kind::Read));
        let mut h = ok;
        h.magic ^= 1;
        assert!(h.validate().unwrap_err().contains("magic"));
        let mut h = ok;
        h.version = 2;
        assert!(h.validate().unwrap_err().contains("version"));
        let mut h = ok;
        h.kind = 999;
        assert!(h.validate().unwrap_err().contains("kind"));
        let mut h = ok;
        h.flags = 1;
        assert!(h.validate().unwrap_err().contains("flags"));
        let h = FrameHeader::new(Kind::GetSegment, 1, 1);
        assert!(h.validate().unwrap_err().contains("exceeds"));
        let h = FrameHeader::new(Kind::Write, 1, u64::MAX);
        assert!(h.validate().unwrap_err().contains("exceeds"));
    }

    #[test]
    fn segment_round_trip_and_rejects_garbage() {
        let s = Segment {
            name: "[::1]:15000".into(),
            instance_id: 42,
            epoch: 3,
            host_id: "boot-id".into(),
            pid: 77,
            regions: vec![
                RegionDesc {
                    addr: 0x1000,
                    len: 0x100,
                    location: Location::Host,
                },
                RegionDesc {
                    addr: 0x2000,
                    len: 0x100,
                    location: Location::Npu(3),
                },
            ],
            exports: Default::default(),
        };
        let b = encode_segment(&s);
        assert_eq!(decode_segment(&b).unwrap(), s);
        assert!(decode_segment(&b[..b.len() - 1]).is_err());
        // With an export: the section follows the regions and round-trips;
        // truncated, padded or oversized forms are refused.
        let mut with = s.clone();
        with.exports
            .insert(0x2000, b"kvfsi:/kvfsi-1-0:0:256".to_vec());
        let e = encode_segment(&with);
        assert_eq!(e.len(), b.len() + 8 + 8 + 22);
        assert_eq!(decode_segment(&e).unwrap(), with);
        assert!(decode_segment(&e[..e.len() - 1]).is_err());
        let mut padded = e.clone();
        padded.push(0);
        assert!(decode_segment(&padded).is_err());
        let mut stray = b.clone();
        stray.extend_from_slice(&[0; 8]);
        assert!(decode_segment(&stray).is_err(), "no magic");
        let mut huge = with.clone();
        huge.exports.insert(0x2000, vec![1; MAX_EXPORT + 1]);
        assert_eq!(
            encode_segment(&huge),
            b,
            "an oversized export is not published"
        );
        assert!(decode_segment(&[0xff; 40]).is_err());
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 24..n - 16].copy_from_slice(&0x1000u64.to_le_bytes()); // overlaps the first
        assert!(decode_segment(&bad).is_err());
    }

    #[test]
    fn tables() {
        let t = encode_table(9, &[Range { addr: 1, len: 2 }, Range { addr: 5, len: 7 }]);
        let head = decode_table_head(&t[..16], t.len() as u64).unwrap();
        assert_eq!((head.target_instance, head.count), (9, 2));
        let (r, total) = decode_ranges(&t[16..]).unwrap();
        assert_eq!((r.len(), total), (2, 9));
        assert!(decode_table_head(&t[..16], 20).is_err());
        assert!(
            decode_ranges(
                &encode_table(
                    1,
                    &[Range {
                        addr: u64::MAX,
                        len: 2
                    }]
                )[16..]
            )
            .is_err()
        );
        assert!(decode_ranges(&encode_table(1, &[Range { addr: 1, len: 0 }])[16..]).is_err());
    }

    #[test]
    fn lease_payloads_round_trip_and_reject_garbage() {
        let g = BoardGrant {
            pid: 7,
            fd: 9,
            board_len: 20480,
            count: 2,
            reserved: 0,
        };
        let b = encode_grant(&g, &[3, 4]);
        let (g2, slots) = decode_grant(&b).unwrap();
        assert_eq!(
            (g2.pid, g2.fd, g2.board_len, slots),
            (7, 9, 20480, vec![3, 4])
        );
        assert!(decode_grant(&b[..b.len() - 1]).is_err());
        assert!(decode_grant(&b[..10]).is_err());
        let mut many = g;
        many.count = MAX_GRANT + 1;
        assert!(decode_grant(&encode_grant(&many, &[0; MAX_GRANT as usize + 1])).is_err());

        let regions = [Range { addr: 16, len: 16 }, Range { addr: 64, len: 8 }];
        let b = encode_lease_regions(5, &regions);
        assert_eq!(decode_lease_regions(&b).unwrap(), (5, regions.to_vec()));
        assert!(decode_lease_regions(&b[..20]).is_err());
        assert!(decode_lease_regions(&[0xff; 40]).is_err());
        let overlapping = [Range { addr: 16, len: 16 }, Range { addr: 20, len: 8 }];
        assert!(decode_lease_regions(&encode_lease_regions(1, &overlapping)).is_err());
        let empty = [Range { addr: 16, len: 0 }];
        assert!(decode_lease_regions(&encode_lease_regions(1, &empty)).is_err());
    }

    #[test]
    fn notify_round_trip() {
        let b = encode_notify("a:1", b"hello");
        assert_eq!(
            decode_notify(&b).unwrap(),
            ("a:1".to_string(), b"hello".to_vec())
        );
        assert!(decode_notify(&[9, 0, 0, 0, b'x']).is_err());
    }
}
