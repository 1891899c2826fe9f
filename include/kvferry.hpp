/*
 * kvferry: KV-cache transfer engine, C++17 wrapper over kvferry.h.
 *
 * Header-only; written by hand (kvferry.h is the generated one). Every call
 * goes through the C API, so the conventions of kvferry.h hold, plus:
 *
 * - Errors: a failing call throws kvferry::Error, which carries the
 *   kvf_status and the kvf_last_error() message captured at the moment of
 *   the failure. Read them from the exception, not from kvf_last_error()
 *   afterwards: a destructor running during unwinding may overwrite the
 *   thread's last error.
 * - Ownership: Config, Engine, Batch and Layout each own one C handle and
 *   free it in their destructor. They are move-only. A moved-from object owns nothing:
 *   destroying or assigning it is fine, and any other call throws Error with
 *   KVF_STATUS_NULL_POINTER (the C API refuses the NULL handle) instead of
 *   misbehaving.
 * - Lifetimes: a Batch refers to the engine that made it and must be
 *   destroyed before that engine is (moving the Engine object around is
 *   fine: the Batch holds the C handle, which moves along). Registered
 *   memory must stay valid until it is unregistered or its Engine is
 *   destroyed.
 * - Threads: an Engine may be used from many threads at once (every const
 *   member function is thread-safe); moving, assigning or destroying it must
 *   not race with other calls. Config and Batch objects are not thread-safe:
 *   use each from one thread at a time. A Layout is immutable: its const
 *   member functions (and plan_blocks over it) are thread-safe.
 */

#ifndef KVFERRY_HPP
#define KVFERRY_HPP

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kvferry.h"

namespace kvferry {

/// The name of a status code ("unknown status" for codes this version does
/// not know). Copied at once: the C string is only valid until the next call.
inline std::string status_name(kvf_status status) {
  return std::string(kvf_status_str(static_cast<std::int32_t>(status)));
}

/// The library's version, "MAJOR.MINOR.PATCH".
inline std::string version() { return std::string(kvf_version()); }

/// A failed kvferry call. Carries the status and the library's message (what
/// failed and why, with the address, op index, peer or batch id involved).
/// Copying never throws, so it is safe to catch by value or rethrow.
class Error : public std::runtime_error {
 public:
  /// `call` names the C function that failed and must be a string literal
  /// (it is kept as a pointer); `message` is that call's kvf_last_error().
  Error(kvf_status status, const char *call, const std::string &message)
      : std::runtime_error(compose(status, call, message)),
        status_(status),
        call_(call),
        message_offset_(prefix(status, call).size()) {}

  /// The status code of the failure (always negative for library errors).
  kvf_status status() const noexcept { return status_; }

  /// The C function that failed, e.g. "kvf_transfer_sync".
  const char *call() const noexcept { return call_; }

  /// The library's message (kvf_last_error() right after the failure).
  std::string message() const { return std::string(what() + message_offset_); }

 private:
  static std::string prefix(kvf_status status, const char *call) {
    return std::string(call) + " failed (" + status_name(status) + ", " +
           std::to_string(static_cast<std::int32_t>(status)) + "): ";
  }
  static std::string compose(kvf_status status, const char *call,
                             const std::string &message) {
    return prefix(status, call) + message;
  }

  kvf_status status_;
  const char *call_;
  // what() is "<prefix><message>": the message is kept once, inside the
  // runtime_error, whose copy is noexcept.
  std::size_t message_offset_;
};

namespace detail {

/// Throws Error for anything but KVF_STATUS_OK; the message is read at once,
/// before any other kvf_ call can replace it.
inline void check(kvf_status status, const char *call) {
  if (status != KVF_STATUS_OK) {
    throw Error(status, call, std::string(kvf_last_error()));
  }
}

inline std::uint64_t timeout_ms(std::chrono::milliseconds timeout) {
  return timeout.count() <= 0 ? 0 : static_cast<std::uint64_t>(timeout.count());
}

}  // namespace detail

/// The address of `p` as the C API takes it.
inline std::uint64_t addr_of(const void *p) noexcept {
  // Widened implicitly: an explicit cast is "useless" where uintptr_t is
  // already 64 bits and would warn with -Wuseless-cast.
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  return a;
}

/// One transfer: `len` bytes between `local` (this engine's memory) and
/// `remote` (the peer's), both absolute addresses of registered memory.
struct Op {
  std::uint64_t local;
  std::uint64_t remote;
  std::uint64_t len;
};

/// A region to register: `[addr, addr + len)`.
struct Region {
  std::uint64_t addr;
  std::uint64_t len;
};

/// Direction of a batch, seen from the engine that submits it.
enum class Opcode : std::uint32_t {
  read = KVF_OP_READ,   ///< remote -> local
  write = KVF_OP_WRITE  ///< local -> remote
};

/// Engine settings (owns a kvf_config). Setters chain and throw Error when
/// the library refuses a value. Unset fields come from the environment when
/// the Engine is created. Move-only; not thread-safe.
class Config {
 public:
  Config() { detail::check(kvf_config_new(&config_), "kvf_config_new"); }
  ~Config() { kvf_config_free(config_); }

  Config(Config &&other) noexcept : config_(std::exchange(other.config_, nullptr)) {}
  Config &operator=(Config &&other) noexcept {
    if (this != &other) {
      kvf_config_free(config_);
      config_ = std::exchange(other.config_, nullptr);
    }
    return *this;
  }
  Config(const Config &) = delete;
  Config &operator=(const Config &) = delete;

  /// Host name or address peers reach the engine at (an IPv4 or IPv6
  /// address, or a DNS name: what peers can parse back from "host:port").
  Config &hostname(const std::string &host) {
    detail::check(kvf_config_set_hostname(config_, host.c_str()), "kvf_config_set_hostname");
    return *this;
  }
  /// Listen on exactly `p` (0: any free port).
  Config &port(std::uint16_t p) {
    detail::check(kvf_config_set_port(config_, p), "kvf_config_set_port");
    return *this;
  }
  /// Pick a free port in `[lo, hi]`.
  Config &port_range(std::uint16_t lo, std::uint16_t hi) {
    detail::check(kvf_config_set_port_range(config_, lo, hi), "kvf_config_set_port_range");
    return *this;
  }
  /// Deadline for connecting to a peer (> 0).
  Config &connect_timeout(std::chrono::milliseconds t) {
    detail::check(kvf_config_set_connect_timeout_ms(config_, detail::timeout_ms(t)),
                  "kvf_config_set_connect_timeout_ms");
    return *this;
  }
  /// Deadline of a whole batch (> 0); also how long unregistering waits for it.
  Config &transfer_timeout(std::chrono::milliseconds t) {
    detail::check(kvf_config_set_transfer_timeout_ms(config_, detail::timeout_ms(t)),
                  "kvf_config_set_transfer_timeout_ms");
    return *this;
  }
  /// Ops larger than `bytes` are cut into slices of this size (> 0).
  Config &slice_size(std::uint64_t bytes) {
    detail::check(kvf_config_set_slice_size(config_, bytes), "kvf_config_set_slice_size");
    return *this;
  }
  /// Threads that run submitted batches (> 0).
  Config &async_workers(std::uint32_t workers) {
    detail::check(kvf_config_set_async_workers(config_, workers),
                  "kvf_config_set_async_workers");
    return *this;
  }
  /// "auto" or "tcp".
  Config &transport(const std::string &name) {
    detail::check(kvf_config_set_transport(config_, name.c_str()), "kvf_config_set_transport");
    return *this;
  }
  /// A shared secret every peer must prove (and this engine proves to them).
  Config &secret(const std::string &secret) {
    detail::check(kvf_config_set_secret(config_, secret.c_str()), "kvf_config_set_secret");
    return *this;
  }
  /// tcp connections per peer (1..64).
  Config &lanes(std::uint32_t lanes) {
    detail::check(kvf_config_set_lanes(config_, lanes), "kvf_config_set_lanes");
    return *this;
  }
  /// Connections served at once, from all peers (> 0; default 1024); more
  /// are refused.
  Config &max_connections(std::uint32_t connections) {
    detail::check(kvf_config_set_max_connections(config_, connections),
                  "kvf_config_set_max_connections");
    return *this;
  }
  /// Handle Ascend NPU memory ("npu:N" regions): loads the ACL runtime now;
  /// throws Error (KVF_STATUS_UNSUPPORTED, "Ascend runtime not found: ...")
  /// where there is none, leaving the config as it was.
  Config &use_ascend() {
    detail::check(kvf_config_use_ascend(config_), "kvf_config_use_ascend");
    return *this;
  }

  /// The C handle, still owned by this object (NULL when moved from).
  const kvf_config *get() const noexcept { return config_; }
  kvf_config *get() noexcept { return config_; }

 private:
  kvf_config *config_ = nullptr;
};

/// One side's KV cache layout (owns a kvf_layout): for every layer, every
/// cache's (base, block_len, stride, scale), each cache holding `num_blocks`
/// logical blocks (see kvf_layout_new). Move-only; immutable once made, so
/// const calls may run on many threads at once. A moved-from Layout owns
/// nothing, and planning with it throws Error (KVF_STATUS_NULL_POINTER).
class Layout {
 public:
  /// `caches` holds `num_layers * caches_per_layer` entries, layer-major.
  /// Throws Error (KVF_STATUS_INVALID_ARGUMENT) for any other count, and for
  /// everything kvf_layout_new refuses.
  Layout(std::uint64_t num_blocks, std::size_t num_layers, std::size_t caches_per_layer,
         const std::vector<kvf_cache_layout> &caches) {
    if (caches_per_layer != 0 && (num_layers > caches.size() / caches_per_layer ||
                                  num_layers * caches_per_layer != caches.size())) {
      throw Error(KVF_STATUS_INVALID_ARGUMENT, "kvf_layout_new",
                  std::to_string(caches.size()) + " caches given for " +
                      std::to_string(num_layers) + " layers x " +
                      std::to_string(caches_per_layer) + " caches");
    }
    detail::check(kvf_layout_new(num_blocks, num_layers, caches_per_layer, caches.data(),
                                 &layout_),
                  "kvf_layout_new");
  }
  ~Layout() { kvf_layout_free(layout_); }

  Layout(Layout &&other) noexcept : layout_(std::exchange(other.layout_, nullptr)) {}
  Layout &operator=(Layout &&other) noexcept {
    if (this != &other) {
      kvf_layout_free(layout_);
      layout_ = std::exchange(other.layout_, nullptr);
    }
    return *this;
  }
  Layout(const Layout &) = delete;
  Layout &operator=(const Layout &) = delete;

  /// The C handle, still owned by this object (NULL when moved from).
  const kvf_layout *get() const noexcept { return layout_; }

 private:
  kvf_layout *layout_ = nullptr;
};

/// The copies that move `remote_ids` into `local_ids` (or back) between two
/// layouts (kvf_plan_blocks): for each layer, cache and run, one Op.
/// `options` nullptr means one pull, offset 0, no prefix hit. Throws Error
/// when the library refuses the request; nothing is returned then.
inline std::vector<Op> plan_blocks(const Layout &local, const Layout &remote,
                                   const std::vector<std::uint64_t> &local_ids,
                                   const std::vector<std::uint64_t> &remote_ids,
                                   const kvf_plan_options *options = nullptr) {
  std::size_t n = 0;
  kvf_status s = kvf_plan_blocks(local.get(), remote.get(), local_ids.data(), local_ids.size(),
                                 remote_ids.data(), remote_ids.size(), options, nullptr, nullptr,
                                 nullptr, 0, &n);
  std::vector<std::uint64_t> la, ra, len;
  if (s == KVF_STATUS_BUFFER_TOO_SMALL) {
    la.resize(n);
    ra.resize(n);
    len.resize(n);
    s = kvf_plan_blocks(local.get(), remote.get(), local_ids.data(), local_ids.size(),
                        remote_ids.data(), remote_ids.size(), options, la.data(), ra.data(),
                        len.data(), n, &n);
  }
  detail::check(s, "kvf_plan_blocks");
  std::vector<Op> ops;
  ops.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    ops.push_back(Op{la[i], ra[i], len[i]});
  }
  return ops;
}

class Engine;

/// A submitted batch (owns its id in the engine's batch table). Move-only.
///
/// The destructor waits for the batch to end (at most the engine's transfer
/// timeout) and frees it; it never throws, and so cannot report a failed
/// batch: call wait() (or poll()) first when the outcome matters. Must be
/// destroyed before the engine that made it. Not thread-safe.
class Batch {
 public:
  Batch(Batch &&other) noexcept
      : engine_(std::exchange(other.engine_, nullptr)), id_(std::exchange(other.id_, 0)) {}
  /// Finishes (waits for and frees) the batch this object held, then takes
  /// over `other`'s.
  Batch &operator=(Batch &&other) noexcept {
    if (this != &other) {
      finish();
      engine_ = std::exchange(other.engine_, nullptr);
      id_ = std::exchange(other.id_, 0);
    }
    return *this;
  }
  Batch(const Batch &) = delete;
  Batch &operator=(const Batch &) = delete;
  ~Batch() { finish(); }

  /// true when every op is done, false while the batch runs; throws Error
  /// with the batch's first error if it failed.
  bool poll() const {
    const kvf_status s = kvf_batch_poll(engine_, id_);
    if (s == KVF_STATUS_IN_PROGRESS) {
      return false;
    }
    detail::check(s, "kvf_batch_poll");
    return true;
  }

  /// Waits up to `timeout`: true when done, false when still running (it
  /// keeps running); throws Error with the batch's first error if it failed
  /// (KVF_STATUS_TRANSFER_TIMEOUT when the transfer timeout ended it).
  bool wait(std::chrono::milliseconds timeout) const {
    const kvf_status s = kvf_batch_wait(engine_, id_, detail::timeout_ms(timeout));
    if (s == KVF_STATUS_TIMEOUT) {
      return false;
    }
    detail::check(s, "kvf_batch_wait");
    return true;
  }

  /// Waits until the batch ends (the engine's transfer timeout bounds it);
  /// throws Error with its first error if it failed.
  void wait() const {
    detail::check(kvf_batch_wait(engine_, id_, KVF_WAIT_FOREVER), "kvf_batch_wait");
  }

  /// The state of op `index`: KVF_STATUS_OK, KVF_STATUS_IN_PROGRESS, or the
  /// batch's first error for an op that failed. Throws Error for a bad index.
  kvf_status op_status(std::size_t index) const {
    kvf_status s = KVF_STATUS_OK;
    detail::check(kvf_batch_op_status(engine_, id_, index, &s), "kvf_batch_op_status");
    return s;
  }

  /// The batch id (0 when moved from), for the C API.
  std::uint64_t id() const noexcept { return id_; }

 private:
  friend class Engine;
  Batch(const kvf_engine *engine, std::uint64_t id) noexcept : engine_(engine), id_(id) {}

  void finish() noexcept {
    if (engine_ != nullptr) {
      // Both calls only return statuses (nothing unwinds out of the C API).
      // The outcome is dropped on purpose: see the class comment.
      (void)kvf_batch_wait(engine_, id_, KVF_WAIT_FOREVER);
      (void)kvf_batch_free(engine_, id_);
      engine_ = nullptr;
      id_ = 0;
    }
  }

  const kvf_engine *engine_ = nullptr;
  std::uint64_t id_ = 0;
};

/// A transfer engine (owns a kvf_engine). Move-only. Thread-safe: its const
/// member functions may run on many threads at once. The destructor waits for
/// the engine's in-flight batches, unregisters its memory and closes its port.
class Engine {
 public:
  /// Creates an engine from `config` (which is not consumed). A moved-from
  /// Config is refused (KVF_STATUS_NULL_POINTER) rather than taken for "all
  /// defaults", which is what its NULL handle would mean to the C API; use
  /// from_env() for that.
  explicit Engine(const Config &config) {
    if (config.get() == nullptr) {
      throw Error(KVF_STATUS_NULL_POINTER, "kvf_engine_new",
                  "config is NULL (a moved-from kvferry::Config)");
    }
    detail::check(kvf_engine_new(config.get(), &engine_), "kvf_engine_new");
  }
  /// Creates an engine configured by the environment and defaults only.
  static Engine from_env() {
    kvf_engine *e = nullptr;
    detail::check(kvf_engine_new(nullptr, &e), "kvf_engine_new");
    return Engine(e);
  }
  ~Engine() { kvf_engine_free(engine_); }

  Engine(Engine &&other) noexcept : engine_(std::exchange(other.engine_, nullptr)) {}
  Engine &operator=(Engine &&other) noexcept {
    if (this != &other) {
      kvf_engine_free(engine_);
      engine_ = std::exchange(other.engine_, nullptr);
    }
    return *this;
  }
  Engine(const Engine &) = delete;
  Engine &operator=(const Engine &) = delete;

  /// The session id peers use for this engine, "host:port".
  std::string name() const {
    std::string buf(64, '\0');
    std::size_t len = 0;
    kvf_status s = kvf_engine_name(engine_, &buf[0], buf.size(), &len);
    if (s == KVF_STATUS_BUFFER_TOO_SMALL) {
      buf.assign(len + 1, '\0');
      s = kvf_engine_name(engine_, &buf[0], buf.size(), &len);
    }
    detail::check(s, "kvf_engine_name");
    buf.resize(len);
    return buf;
  }

  /// The port the engine listens on.
  std::uint16_t rpc_port() const {
    std::uint16_t port = 0;
    detail::check(kvf_engine_rpc_port(engine_, &port), "kvf_engine_rpc_port");
    return port;
  }

  /// Registers `[addr, addr + len)`. `location`: "cpu:0", "npu:N", or
  /// nullptr / "*" to detect. The memory must stay valid until unregistered
  /// or the engine is destroyed.
  void register_memory(std::uint64_t addr, std::uint64_t len,
                       const char *location = nullptr) const {
    detail::check(kvf_register_memory(engine_, addr, len, location), "kvf_register_memory");
  }

  /// Registers every region, or none.
  void register_memory(const std::vector<Region> &regions,
                       const char *location = nullptr) const {
    std::vector<std::uint64_t> addrs, lens;
    addrs.reserve(regions.size());
    lens.reserve(regions.size());
    for (const Region &r : regions) {
      addrs.push_back(r.addr);
      lens.push_back(r.len);
    }
    detail::check(kvf_register_memory_batch(engine_, addrs.data(), lens.data(), regions.size(),
                                            location),
                  "kvf_register_memory_batch");
  }

  /// Unregisters the region starting at `addr`, after the transfers using it
  /// end; afterwards the memory may be freed.
  void unregister_memory(std::uint64_t addr) const {
    detail::check(kvf_unregister_memory(engine_, addr), "kvf_unregister_memory");
  }

  /// Unregisters every region, or none.
  void unregister_memory(const std::vector<std::uint64_t> &addrs) const {
    detail::check(kvf_unregister_memory_batch(engine_, addrs.data(), addrs.size()),
                  "kvf_unregister_memory_batch");
  }

  /// Moves `ops` and returns when all are done. Every op is validated first;
  /// on Error from validation nothing was moved.
  void transfer(Opcode opcode, const std::string &session, const std::vector<Op> &ops) const {
    const Columns c(ops);
    detail::check(kvf_transfer_sync(engine_, session.c_str(), static_cast<std::uint32_t>(opcode),
                                    c.local.data(), c.remote.data(), c.len.data(), ops.size()),
                  "kvf_transfer_sync");
  }
  /// Copies the peer's memory into ours (synchronously).
  void read(const std::string &session, const std::vector<Op> &ops) const {
    transfer(Opcode::read, session, ops);
  }
  /// Copies our memory into the peer's (synchronously).
  void write(const std::string &session, const std::vector<Op> &ops) const {
    transfer(Opcode::write, session, ops);
  }

  /// Validates `ops`, starts moving them in the background and returns the
  /// running Batch.
  Batch submit(Opcode opcode, const std::string &session, const std::vector<Op> &ops) const {
    const Columns c(ops);
    std::uint64_t id = 0;
    detail::check(kvf_batch_submit(engine_, session.c_str(), static_cast<std::uint32_t>(opcode),
                                   c.local.data(), c.remote.data(), c.len.data(), ops.size(),
                                   &id),
                  "kvf_batch_submit");
    return Batch(engine_, id);
  }

  /// Like submit(KVF_OP_WRITE...), then sends `message` to the peer once all
  /// of the data has landed (not at all if an op failed).
  Batch submit_write_notify(const std::string &session, const std::vector<Op> &ops,
                            const std::string &message) const {
    const Columns c(ops);
    std::uint64_t id = 0;
    detail::check(kvf_batch_submit_write_notify(
                      engine_, session.c_str(), c.local.data(), c.remote.data(), c.len.data(),
                      ops.size(), reinterpret_cast<const std::uint8_t *>(message.data()),
                      message.size(), &id),
                  "kvf_batch_submit_write_notify");
    return Batch(engine_, id);
  }

  /// Plans a request's blocks between two layouts (as plan_blocks) and moves
  /// them to or from `session` in one call (kvf_transfer_blocks): read copies
  /// the remote blocks into the local ones. `local`'s memory must be
  /// registered here, `remote`'s with the peer. Nothing moves unless the
  /// whole plan is valid; no ids is nothing to do.
  void transfer_blocks(Opcode opcode, const std::string &session, const Layout &local,
                       const Layout &remote, const std::vector<std::uint64_t> &local_ids,
                       const std::vector<std::uint64_t> &remote_ids,
                       const kvf_plan_options *options = nullptr) const {
    detail::check(kvf_transfer_blocks(engine_, session.c_str(), static_cast<std::uint32_t>(opcode),
                                      local.get(), remote.get(), local_ids.data(),
                                      local_ids.size(), remote_ids.data(), remote_ids.size(),
                                      options),
                  "kvf_transfer_blocks");
  }

  /// Sends `message` to `session`; returns once the peer has queued it.
  void notify(const std::string &session, const std::string &message) const {
    detail::check(kvf_notify(engine_, session.c_str(),
                             reinterpret_cast<const std::uint8_t *>(message.data()),
                             message.size()),
                  "kvf_notify");
  }

  /// A received notification: the sender's session id and its message.
  struct Notification {
    std::string from;
    std::string message;
  };

  /// Takes the oldest received notification into `out`; false when none is queued.
  bool next_notification(Notification &out) const {
    std::string from(64, '\0'), message(256, '\0');
    for (;;) {
      std::size_t from_len = 0, message_len = 0;
      std::int32_t received = 0;
      kvf_status s = kvf_notify_recv(engine_, &from[0], from.size(), &from_len,
                                     reinterpret_cast<std::uint8_t *>(&message[0]),
                                     message.size(), &message_len, &received);
      if (s == KVF_STATUS_BUFFER_TOO_SMALL) {
        from.assign(from_len + 1, '\0');
        message.assign(message_len + 1, '\0');
        continue;
      }
      detail::check(s, "kvf_notify_recv");
      if (received == 0) return false;
      from.resize(from_len);
      message.resize(message_len);
      out.from = std::move(from);
      out.message = std::move(message);
      return true;
    }
  }

  /// The transport that carries ops to `session`: "local", "cma" or "tcp".
  std::string transport_to(const std::string &session) const {
    char buf[32] = {0};
    std::size_t len = 0;
    detail::check(kvf_engine_transport_to(engine_, session.c_str(), buf, sizeof buf, &len),
                  "kvf_engine_transport_to");
    return std::string(buf, len);
  }

  /// The regions `session` has registered now, sorted by address (asked of
  /// the peer on every call).
  std::vector<Region> peer_regions(const std::string &session) const {
    // Room for the usual few regions: one round trip, not a count first.
    std::vector<std::uint64_t> addrs(16), lens(16);
    std::size_t count = 0;
    for (;;) {
      kvf_status s = kvf_engine_peer_regions(engine_, session.c_str(), addrs.data(), lens.data(),
                                             addrs.size(), &count);
      if (s == KVF_STATUS_BUFFER_TOO_SMALL && count > addrs.size()) {
        addrs.assign(count, 0);  // more than that (or the peer registered more meanwhile)
        lens.assign(count, 0);
        continue;
      }
      detail::check(s, "kvf_engine_peer_regions");
      std::vector<Region> out(count);
      for (std::size_t i = 0; i < count; i++) out[i] = Region{addrs[i], lens[i]};
      return out;
    }
  }

  /// The C handle, still owned by this object (NULL when moved from).
  const kvf_engine *get() const noexcept { return engine_; }

 private:
  explicit Engine(kvf_engine *engine) noexcept : engine_(engine) {}

  /// Ops as the three arrays the C API takes.
  struct Columns {
    explicit Columns(const std::vector<Op> &ops) {
      local.reserve(ops.size());
      remote.reserve(ops.size());
      len.reserve(ops.size());
      for (const Op &op : ops) {
        local.push_back(op.local);
        remote.push_back(op.remote);
        len.push_back(op.len);
      }
    }
    std::vector<std::uint64_t> local, remote, len;
  };

  kvf_engine *engine_ = nullptr;
};

}  // namespace kvferry

#endif  // KVFERRY_HPP
