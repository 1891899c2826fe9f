// The C++ wrapper (include/kvferry.hpp) as a user sees it: RAII handles,
// exceptions carrying status and message, move-only types whose moved-from
// objects are inert, and a Batch destructor that waits and frees.
//
// Built and run under AddressSanitizer by
// crates/kvferry-capi/tests/c_programs.rs. Prints one summary line; exits 1
// after any failed check, naming its line.

#include "kvferry.hpp"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

using kvferry::addr_of;
using kvferry::Batch;
using kvferry::Config;
using kvferry::Engine;
using kvferry::Layout;
using kvferry::Op;
using kvferry::Opcode;
using kvferry::Region;
using namespace std::chrono_literals;

// ---- compile-time contract -------------------------------------------------

static_assert(!std::is_copy_constructible_v<Config> && !std::is_copy_assignable_v<Config>);
static_assert(!std::is_copy_constructible_v<Engine> && !std::is_copy_assignable_v<Engine>);
static_assert(!std::is_copy_constructible_v<Batch> && !std::is_copy_assignable_v<Batch>);
static_assert(std::is_nothrow_move_constructible_v<Config> &&
              std::is_nothrow_move_assignable_v<Config>);
static_assert(std::is_nothrow_move_constructible_v<Engine> &&
              std::is_nothrow_move_assignable_v<Engine>);
static_assert(std::is_nothrow_move_constructible_v<Batch> &&
              std::is_nothrow_move_assignable_v<Batch>);
static_assert(std::is_nothrow_destructible_v<Batch> && std::is_nothrow_destructible_v<Engine>);
static_assert(!std::is_default_constructible_v<Batch>, "a Batch comes from Engine::submit");
static_assert(!std::is_copy_constructible_v<Layout> && !std::is_copy_assignable_v<Layout>);
static_assert(std::is_nothrow_move_constructible_v<Layout> &&
              std::is_nothrow_move_assignable_v<Layout>);
static_assert(std::is_nothrow_destructible_v<Layout>);
static_assert(std::is_base_of_v<std::runtime_error, kvferry::Error>);
static_assert(std::is_nothrow_copy_constructible_v<kvferry::Error>);
static_assert(std::is_standard_layout_v<Op> && sizeof(Op) == 24);
static_assert(static_cast<std::uint32_t>(Opcode::read) == KVF_OP_READ &&
              static_cast<std::uint32_t>(Opcode::write) == KVF_OP_WRITE);

// ---- checks ----------------------------------------------------------------

namespace {

int checks = 0;
int failures = 0;

bool check_(bool ok, int line, const std::string &what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "api_test.cpp:%d: check failed: %s\n", line, what.c_str());
  }
  return ok;
}
#define CHECK(cond) check_(static_cast<bool>(cond), __LINE__, #cond)

std::string hex(std::uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

bool contains(const std::string &s, const std::string &part) {
  return s.find(part) != std::string::npos;
}

// `body` must throw kvferry::Error with status `want`, a message containing
// every fragment, and a what() naming the call, the status and the message.
template <class F>
kvferry::Error expect_error_(F &&body, kvf_status want, std::initializer_list<std::string> frags,
                             int line, const char *expr) {
  ++checks;
  try {
    body();
  } catch (const kvferry::Error &e) {
    const std::string msg = e.message();
    const std::string what = e.what();
    bool ok = e.status() == want && !msg.empty() && contains(what, msg) &&
              contains(what, e.call()) && contains(what, kvferry::status_name(want));
    for (const std::string &f : frags) {
      ok = ok && contains(msg, f);
    }
    if (!ok) {
      ++failures;
      std::fprintf(stderr, "api_test.cpp:%d: %s\n  threw status %d, expected %d\n  what(): %s\n",
                   line, expr, static_cast<int>(e.status()), static_cast<int>(want), e.what());
      for (const std::string &f : frags) {
        std::fprintf(stderr, "  wanted in message: \"%s\"\n", f.c_str());
      }
    }
    return e;
  } catch (const std::exception &e) {
    ++failures;
    std::fprintf(stderr, "api_test.cpp:%d: %s threw a non-kvferry exception: %s\n", line, expr,
                 e.what());
    return kvferry::Error(KVF_STATUS_INTERNAL, "(test)", "wrong exception");
  }
  ++failures;
  std::fprintf(stderr, "api_test.cpp:%d: %s did not throw\n", line, expr);
  return kvferry::Error(KVF_STATUS_INTERNAL, "(test)", "no exception");
}
#define EXPECT_ERROR(stmt, want, ...) \
  expect_error_([&] { stmt; }, want, {__VA_ARGS__}, __LINE__, #stmt)

void fill(std::vector<std::uint8_t> &v, unsigned seed) {
  std::uint32_t x = seed * 2654435761u + 1;
  for (auto &b : v) {
    x = x * 1103515245u + 12345u;
    b = static_cast<std::uint8_t>(x >> 16);
  }
}

Engine make_engine(std::uint32_t workers = 2, std::uint64_t slice = 0) {
  Config cfg;
  cfg.hostname("127.0.0.1").port(0).async_workers(workers).transfer_timeout(10s);
  if (slice != 0) {
    cfg.slice_size(slice);
  }
  return Engine(cfg);
}

constexpr std::size_t kLen = 1 << 20;

// ---- tests -----------------------------------------------------------------

void test_version_and_status() {
  const std::string expected = std::to_string(KVF_VERSION_MAJOR) + "." +
                               std::to_string(KVF_VERSION_MINOR) + "." +
                               std::to_string(KVF_VERSION_PATCH);
  CHECK(kvferry::version() == expected);
  CHECK(kvferry::status_name(KVF_STATUS_OK) == "ok");
  CHECK(kvferry::status_name(KVF_STATUS_LOCAL_OUT_OF_RANGE) ==
        "local range outside registered memory");
  CHECK(kvferry::status_name(static_cast<kvf_status>(-99)) == "unknown status");
}

void test_config() {
  Config cfg;
  // Setters chain and return the same object.
  Config &same = cfg.hostname("127.0.0.1")
                     .port(0)
                     .port_range(20000, 20100)
                     .connect_timeout(1500ms)
                     .transfer_timeout(5s)
                     .slice_size(1 << 16)
                     .async_workers(3)
                     .transport("auto");
  CHECK(&same == &cfg);
  CHECK(cfg.get() != nullptr);

  kvferry::Error e = EXPECT_ERROR(cfg.slice_size(0), KVF_STATUS_INVALID_ARGUMENT, "slice size");
  CHECK(std::string(e.call()) == "kvf_config_set_slice_size");
  EXPECT_ERROR(cfg.async_workers(0), KVF_STATUS_INVALID_ARGUMENT, "async_workers");
  EXPECT_ERROR(cfg.port_range(10, 9), KVF_STATUS_INVALID_ARGUMENT, "10-9");
  EXPECT_ERROR(cfg.transport("carrier-pigeon"), KVF_STATUS_INVALID_ARGUMENT, "carrier-pigeon");

  // A host name no peer could parse back from "host:port", and a timeout
  // of 0, are refused by the setter.
  EXPECT_ERROR(cfg.hostname(""), KVF_STATUS_INVALID_ARGUMENT, "hostname");
  EXPECT_ERROR(cfg.hostname("a b"), KVF_STATUS_INVALID_ARGUMENT, "hostname");
  EXPECT_ERROR(cfg.transfer_timeout(0ms), KVF_STATUS_INVALID_ARGUMENT, "transfer timeout");
  EXPECT_ERROR(cfg.connect_timeout(0ms), KVF_STATUS_INVALID_ARGUMENT, "connect timeout");

  // Moved-from: owns nothing, refuses use, destroys and reassigns fine.
  Config moved = std::move(cfg);
  CHECK(cfg.get() == nullptr);
  CHECK(moved.get() != nullptr);
  EXPECT_ERROR(cfg.port(1), KVF_STATUS_NULL_POINTER, "config");
  // An engine from a moved-from config is refused, not silently made
  // from defaults.
  EXPECT_ERROR(Engine{cfg}, KVF_STATUS_NULL_POINTER, "config");
  cfg = std::move(moved);
  CHECK(cfg.get() != nullptr && moved.get() == nullptr);
  cfg.port(0);
}

void test_errors_carry_status_and_message(const Engine &a, const std::string &b_name,
                                          std::vector<std::uint8_t> &abuf) {
  const std::uint64_t bad = addr_of(abuf.data()) + kLen - 8;
  try {
    a.read(b_name, {{addr_of(abuf.data()), 0, 16}, {bad, 0, 16}});
    CHECK(!"read with a bad op did not throw");
  } catch (const std::runtime_error &base) {
    // Catchable as std::runtime_error; the dynamic type is kvferry::Error.
    const auto *e = dynamic_cast<const kvferry::Error *>(&base);
    if (CHECK(e != nullptr)) {
      // Op 0 is checked first: its remote address 0 is outside the peer.
      CHECK(e->status() == KVF_STATUS_REMOTE_OUT_OF_RANGE);
      CHECK(contains(e->message(), "op 0"));
      CHECK(e->message() == std::string(kvf_last_error()));
      CHECK(std::string(e->call()) == "kvf_transfer_sync");
      // Copies keep everything.
      const kvferry::Error copy = *e;
      CHECK(copy.status() == e->status() && copy.message() == e->message() &&
            std::string(copy.what()) == e->what());
    }
  }
  // A thrown Error keeps its message although later calls fail differently.
  try {
    a.unregister_memory(0x1234);
    CHECK(!"unregister of an unknown address did not throw");
  } catch (const kvferry::Error &e) {
    EXPECT_ERROR(a.unregister_memory(0x5678), KVF_STATUS_NOT_REGISTERED, "0x5678");
    CHECK(e.status() == KVF_STATUS_NOT_REGISTERED);
    CHECK(contains(e.message(), "0x1234") && !contains(e.message(), "0x5678"));
  }
}

void test_registration(const Engine &a, std::vector<std::uint8_t> &abuf) {
  std::vector<std::uint8_t> spare(4096);
  const std::uint64_t s = addr_of(spare.data());
  const std::uint64_t abase = addr_of(abuf.data());
  EXPECT_ERROR(a.register_memory(s, 0), KVF_STATUS_ZERO_LENGTH_REGION, hex(s));
  EXPECT_ERROR(a.register_memory(abase + 16, 32), KVF_STATUS_REGION_OVERLAP, hex(abase + 16),
               hex(abase));
  EXPECT_ERROR(a.register_memory(s, 64, "gpu:0"), KVF_STATUS_BAD_LOCATION, "gpu:0");
  EXPECT_ERROR(a.register_memory(s, 64, "npu:0"), KVF_STATUS_UNSUPPORTED, "npu:0");
  EXPECT_ERROR(a.register_memory(UINT64_MAX - 1, 4), KVF_STATUS_ADDRESS_OVERFLOW,
               "0xfffffffffffffffe");
  EXPECT_ERROR(a.register_memory(std::vector<Region>{}), KVF_STATUS_INVALID_ARGUMENT, "n == 0");
  // All or none.
  EXPECT_ERROR(a.register_memory({{s, 64}, {s + 32, 64}}), KVF_STATUS_REGION_OVERLAP,
               hex(s + 32));
  EXPECT_ERROR(a.unregister_memory(s), KVF_STATUS_NOT_REGISTERED, hex(s));

  a.register_memory({{s, 1024}, {s + 1024, 1024}, {s + 2048, 2048}}, "cpu:0");
  EXPECT_ERROR(a.unregister_memory({s, s + 1024, s + 3000}), KVF_STATUS_NOT_REGISTERED,
               hex(s + 3000));
  EXPECT_ERROR(a.unregister_memory(std::vector<std::uint64_t>{}), KVF_STATUS_INVALID_ARGUMENT,
               "n == 0");
  a.unregister_memory({s, s + 1024, s + 2048});
  EXPECT_ERROR(a.unregister_memory(s + 1024), KVF_STATUS_NOT_REGISTERED, hex(s + 1024));
  a.register_memory(s, spare.size());
  a.unregister_memory(s);
  EXPECT_ERROR(a.unregister_memory(s), KVF_STATUS_NOT_REGISTERED, hex(s));
}

void test_sync(const Engine &a, const std::string &b_name, std::vector<std::uint8_t> &abuf,
               std::vector<std::uint8_t> &bbuf) {
  const std::uint64_t la = addr_of(abuf.data()), rb = addr_of(bbuf.data());
  const std::vector<Op> ops = {
      {la, rb + 4096, 4096},
      {la + 8192, rb + 100000, 5 * 4096 + 17},  // several slices (A slices at 4 KiB)
      {la + 40000, rb + 7, 1},
      {la + 65536, rb + 500000, 4096},
      {la + 69632, rb + 504096, 3000},  // contiguous with the previous op on both sides
  };
  auto apply = [&](std::vector<std::uint8_t> &dst, const std::vector<std::uint8_t> &src,
                   bool dst_is_local) {
    for (const Op &op : ops) {
      const std::uint64_t d = (dst_is_local ? op.local - la : op.remote - rb);
      const std::uint64_t s = (dst_is_local ? op.remote - rb : op.local - la);
      std::memcpy(dst.data() + d, src.data() + s, op.len);
    }
  };

  fill(abuf, 1);
  fill(bbuf, 2);
  std::vector<std::uint8_t> want = abuf;
  apply(want, bbuf, true);
  a.read(b_name, ops);
  CHECK(abuf == want);

  fill(abuf, 3);
  fill(bbuf, 4);
  want = bbuf;
  apply(want, abuf, false);
  a.write(b_name, ops);
  CHECK(bbuf == want);

  fill(abuf, 5);
  want = abuf;
  a.transfer(Opcode::read, b_name, {{la, rb, kLen}});
  CHECK(abuf == bbuf);

  // Refused requests move nothing; op 0 is valid each time.
  fill(abuf, 6);
  fill(bbuf, 7);
  const std::vector<std::uint8_t> a_before = abuf, b_before = bbuf;
  const Op good{la, rb, 3 * 4096};
  EXPECT_ERROR(a.read(b_name, {good, {la + kLen - 8, rb, 16}}), KVF_STATUS_LOCAL_OUT_OF_RANGE,
               "op 1", hex(la + kLen - 8));
  EXPECT_ERROR(a.write(b_name, {good, {la, rb + kLen - 8, 16}}), KVF_STATUS_REMOTE_OUT_OF_RANGE,
               "op 1", hex(rb + kLen - 8), b_name);
  EXPECT_ERROR(a.write(b_name, {good, {la, rb, 0}}), KVF_STATUS_ZERO_LENGTH_OP, "op 1");
  EXPECT_ERROR(a.read(b_name, {good, {UINT64_MAX - 4, rb, 16}}), KVF_STATUS_ADDRESS_OVERFLOW,
               "op 1");
  EXPECT_ERROR(a.read(b_name, {}), KVF_STATUS_INVALID_ARGUMENT, "n == 0");
  EXPECT_ERROR(a.transfer(static_cast<Opcode>(7), b_name, {good}), KVF_STATUS_INVALID_ARGUMENT,
               "opcode 7");
  EXPECT_ERROR(a.read("nohost", {good}), KVF_STATUS_BAD_SESSION, "nohost");
  EXPECT_ERROR(a.read("host:0", {good}), KVF_STATUS_BAD_SESSION, "host:0");
  EXPECT_ERROR(a.read("[zz]:1", {good}), KVF_STATUS_BAD_SESSION, "[zz]:1");
  EXPECT_ERROR(a.write("127.0.0.1:1", {good}), KVF_STATUS_PEER_UNREACHABLE, "127.0.0.1:1");
  EXPECT_ERROR(a.submit(Opcode::write, b_name, {good, {la, rb, 0}}), KVF_STATUS_ZERO_LENGTH_OP,
               "op 1");
  std::this_thread::sleep_for(2ms);
  CHECK(abuf == a_before);
  CHECK(bbuf == b_before);
}

void test_async(const Engine &a, const std::string &b_name, std::vector<std::uint8_t> &abuf,
                std::vector<std::uint8_t> &bbuf) {
  const std::uint64_t la = addr_of(abuf.data()), rb = addr_of(bbuf.data());
  fill(abuf, 10);
  fill(bbuf, 11);
  {
    Batch batch = a.submit(Opcode::read, b_name, {{la, rb, 4096}, {la + 4096, rb + 8192, 65536}});
    CHECK(batch.id() != 0);
    int spins = 0;
    while (!batch.poll() && spins++ < 100000) {
      std::this_thread::sleep_for(100us);
    }
    CHECK(batch.poll());
    CHECK(batch.wait(0ms));
    batch.wait();
    CHECK(batch.op_status(0) == KVF_STATUS_OK && batch.op_status(1) == KVF_STATUS_OK);
    EXPECT_ERROR(batch.op_status(2), KVF_STATUS_INVALID_ARGUMENT, "op index 2", hex(batch.id()));
    CHECK(std::memcmp(abuf.data(), bbuf.data(), 4096) == 0);
    CHECK(std::memcmp(abuf.data() + 4096, bbuf.data() + 8192, 65536) == 0);
  }

  // Destructor: waits for the batch and frees its id, without being asked.
  fill(abuf, 12);
  std::uint64_t id = 0;
  {
    Batch batch = a.submit(Opcode::write, b_name, {{la, rb, kLen}});
    id = batch.id();
  }
  CHECK(abuf == bbuf);
  CHECK(kvf_batch_poll(a.get(), id) == KVF_STATUS_BAD_BATCH_ID);

  // Move construction: the source becomes inert.
  fill(abuf, 13);
  Batch first = a.submit(Opcode::read, b_name, {{la, rb, 4096}});
  const std::uint64_t first_id = first.id();
  Batch second = std::move(first);
  CHECK(first.id() == 0 && second.id() == first_id);
  EXPECT_ERROR(first.poll(), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT_ERROR(first.wait(), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT_ERROR(first.wait(1ms), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT_ERROR(first.op_status(0), KVF_STATUS_NULL_POINTER, "engine");
  second.wait();

  // Move assignment: the batch held before is finished and freed.
  Batch third = a.submit(Opcode::read, b_name, {{la + 4096, rb + 4096, 4096}});
  const std::uint64_t third_id = third.id();
  second = std::move(third);
  CHECK(kvf_batch_poll(a.get(), first_id) == KVF_STATUS_BAD_BATCH_ID);
  CHECK(second.id() == third_id && third.id() == 0);
  second.wait();
  CHECK(std::memcmp(abuf.data(), bbuf.data(), 8192) == 0);
  // Assigning into a moved-from batch is fine as well.
  first = std::move(second);
  CHECK(first.id() == third_id && second.id() == 0);
}

// A batch that fails while it runs: A's view of B still lists a region B has
// since unregistered (if a later library re-validates at submit, submit
// throws the same status instead).
void test_failed_batch(const Engine &a, const Engine &b, const std::string &b_name,
                       std::vector<std::uint8_t> &abuf) {
  std::vector<std::uint8_t> gone(8192, 0x5a);
  const std::uint64_t g = addr_of(gone.data());
  const std::uint64_t la = addr_of(abuf.data());
  b.register_memory(g, gone.size());
  a.read(b_name, {{la, g, 4096}});
  b.unregister_memory(g);
  for (int round = 0; round < 2; ++round) {
    try {
      Batch batch = a.submit(Opcode::write, b_name, {{la, g, 4096}});
      if (round == 0) {
        EXPECT_ERROR(batch.wait(), KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0", hex(g));
        EXPECT_ERROR(batch.poll(), KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0");
        EXPECT_ERROR(batch.wait(1s), KVF_STATUS_REMOTE_OUT_OF_RANGE, "op 0");
        CHECK(batch.op_status(0) == KVF_STATUS_REMOTE_OUT_OF_RANGE);
      }
      // Round 1: the failed batch is dropped unexamined; its destructor
      // must neither throw nor leak the id.
    } catch (const kvferry::Error &e) {
      CHECK(e.status() == KVF_STATUS_REMOTE_OUT_OF_RANGE);
    }
  }
  CHECK(gone == std::vector<std::uint8_t>(8192, 0x5a));
}

// Batch::wait(timeout) returns false while the batch runs. One async worker
// and a big batch ahead make the small one wait; retried in case a loaded
// machine lets the big one finish first.
void test_wait_timeout(const Engine &b, const std::string &b_name) {
  Engine w = make_engine(1);
  const std::size_t big = 24u << 20;
  std::vector<std::uint8_t> src(big), dst(big);
  fill(src, 20);
  b.register_memory(addr_of(src.data()), big);
  w.register_memory(addr_of(dst.data()), big);
  bool saw_running = false;
  for (int attempt = 0; attempt < 6 && !saw_running; ++attempt) {
    std::vector<Op> ops;
    for (std::size_t i = 0; i < 8; ++i) {
      ops.push_back({addr_of(dst.data()) + i * (big / 8), addr_of(src.data()) + i * (big / 8),
                     big / 8 - 4096});
    }
    Batch ahead = w.submit(Opcode::read, b_name, ops);
    Batch behind = w.submit(Opcode::read, b_name,
                            {{addr_of(dst.data()) + big - 4096, addr_of(src.data()), 4096}});
    saw_running = !behind.wait(0ms);
    CHECK(behind.wait(30s));
    ahead.wait();
  }
  CHECK(saw_running);
  CHECK(std::memcmp(dst.data(), src.data(), big / 8 - 4096) == 0);
  CHECK(std::memcmp(dst.data() + big - 4096, src.data(), 4096) == 0);
  w.unregister_memory(addr_of(dst.data()));
  b.unregister_memory(addr_of(src.data()));
}

void test_engine_moves(const Engine &a) {
  Engine e1 = make_engine();
  const std::string name1 = e1.name();
  const std::uint16_t port1 = e1.rpc_port();
  CHECK(name1 == "127.0.0.1:" + std::to_string(port1));

  Engine e2 = std::move(e1);
  CHECK(e1.get() == nullptr);
  CHECK(e2.name() == name1);
  EXPECT_ERROR(e1.name(), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT_ERROR(e1.rpc_port(), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT_ERROR(e1.register_memory(0x1000, 16), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT_ERROR(e1.unregister_memory(0x1000), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT_ERROR(e1.read(name1, {{1, 1, 1}}), KVF_STATUS_NULL_POINTER, "engine");
  EXPECT_ERROR(e1.submit(Opcode::read, name1, {{1, 1, 1}}), KVF_STATUS_NULL_POINTER, "engine");

  // Assigning over a live engine frees it (its port closes); the source
  // becomes inert.
  Engine e3 = make_engine();
  const std::string name3 = e3.name();
  std::vector<std::uint8_t> mem(4096);
  e3.register_memory(addr_of(mem.data()), mem.size());
  e3 = std::move(e2);
  CHECK(e3.name() == name1 && e2.get() == nullptr);
  EXPECT_ERROR(a.read(name3, {{1, addr_of(mem.data()), 1}}), KVF_STATUS_PEER_UNREACHABLE, name3);
  e1 = std::move(e3);  // into a moved-from engine
  CHECK(e1.name() == name1 && e3.get() == nullptr);

  Engine from_env = Engine::from_env();
  CHECK(from_env.rpc_port() >= 15000 && from_env.rpc_port() <= 17000);
}

// Layouts: RAII over kvf_layout, plans, and a transfer planned by the library.
void test_layouts(const Engine &a, const std::string &b_name, std::vector<std::uint8_t> &abuf,
                  std::vector<std::uint8_t> &bbuf) {
  // Two layers x K/V of 16 blocks of 64 bytes, at the start of each buffer.
  auto caches = [](std::uint64_t base) {
    std::vector<kvf_cache_layout> c;
    for (std::uint64_t i = 0; i < 4; ++i) {
      c.push_back(kvf_cache_layout{base + i * 16 * 64, 64, 64, 1});
    }
    return c;
  };
  Layout local(16, 2, 2, caches(addr_of(abuf.data())));
  Layout remote(16, 2, 2, caches(addr_of(bbuf.data())));
  CHECK(local.get() != nullptr && remote.get() != nullptr);

  // local [2,3,4] <- remote [7,8,9]: one 192-byte op per cache.
  const std::vector<Op> ops = kvferry::plan_blocks(local, remote, {2, 3, 4}, {7, 8, 9});
  CHECK(ops.size() == 4);
  for (std::size_t i = 0; i < ops.size() && i < 4; ++i) {
    CHECK(ops[i].local == addr_of(abuf.data()) + i * 1024 + 2 * 64);
    CHECK(ops[i].remote == addr_of(bbuf.data()) + i * 1024 + 7 * 64);
    CHECK(ops[i].len == 192);
  }
  CHECK(kvferry::plan_blocks(local, remote, {}, {}).empty());
  // n = 2 needs half-size remote blocks: refused, with the library's reason.
  kvf_plan_options two{};
  two.pulls = 2;
  two.split = KVF_SPLIT_LOCAL;
  two.prefix = KVF_PREFIX_NONE;
  EXPECT_ERROR(kvferry::plan_blocks(local, remote, {1}, {1}, &two), KVF_STATUS_INVALID_ARGUMENT,
               "remote block_len 64 must equal 32");
  EXPECT_ERROR(kvferry::plan_blocks(local, remote, {16}, {1}), KVF_STATUS_INVALID_ARGUMENT,
               "local block id 16");
  EXPECT_ERROR(Layout(16, 2, 2, {kvf_cache_layout{0x1000, 64, 64, 1}}),
               KVF_STATUS_INVALID_ARGUMENT, "1 caches given for 2 layers x 2 caches");
  EXPECT_ERROR(Layout(16, 1, 1, {kvf_cache_layout{0x1000, 64, 32, 1}}),
               KVF_STATUS_INVALID_ARGUMENT, "stride 32 is below block_len 64");
  EXPECT_ERROR(Layout(16, 0, 1, {}), KVF_STATUS_INVALID_ARGUMENT, "0 layers");

  // The library plans and moves: bbuf's blocks 7..9 land in abuf's 2..4.
  fill(bbuf, 7);
  a.transfer_blocks(Opcode::read, b_name, local, remote, {2, 3, 4}, {7, 8, 9});
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(std::memcmp(abuf.data() + i * 1024 + 2 * 64, bbuf.data() + i * 1024 + 7 * 64, 192) ==
          0);
  }

  // Moves: the source becomes inert, and planning with it is refused.
  Layout moved = std::move(local);
  CHECK(local.get() == nullptr && moved.get() != nullptr);
  EXPECT_ERROR(kvferry::plan_blocks(local, remote, {1}, {1}), KVF_STATUS_NULL_POINTER,
               "local_layout");
  local = std::move(moved);  // into a moved-from layout
  CHECK(local.get() != nullptr && moved.get() == nullptr);
  Layout other(4, 1, 1, {kvf_cache_layout{0x1000, 64, 64, 1}});
  other = std::move(remote);  // assigning over a live layout frees it
  CHECK(kvferry::plan_blocks(local, other, {2}, {7}).size() == 4);
}

void test_threads(const Engine &a, const std::string &b_name, std::vector<std::uint8_t> &abuf,
                  std::vector<std::uint8_t> &bbuf) {
  fill(abuf, 30);
  fill(bbuf, 31);
  const std::uint64_t la = addr_of(abuf.data()), rb = addr_of(bbuf.data());
  std::vector<std::thread> threads;
  std::vector<int> bad(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 32; ++k) {
        const std::uint64_t off = (static_cast<std::uint64_t>(t) * 32 + k) * 4096;
        try {
          if (k % 2 == 0) {
            a.read(b_name, {{la + off, rb + off, 4096}});
          } else {
            a.submit(Opcode::write, b_name, {{la + off, rb + off, 4096}}).wait();
          }
          bad[t] += std::memcmp(abuf.data() + off, bbuf.data() + off, 4096) != 0;
        } catch (const kvferry::Error &) {
          ++bad[t];
        }
      }
    });
  }
  for (auto &th : threads) {
    th.join();
  }
  CHECK(bad == std::vector<int>(4, 0));
}

}  // namespace

// Notifications, write-with-notify and the transport report.
void test_notifications(const Engine &a, const Engine &b, const std::string &b_name,
                        std::vector<std::uint8_t> &abuf, std::vector<std::uint8_t> &bbuf) {
  Engine::Notification n;
  CHECK(!b.next_notification(n));
  a.notify(b_name, "hello");
  const std::string big(1000, 'x');  // larger than the wrapper's first buffer
  a.notify(b_name, big);
  CHECK(b.next_notification(n) && n.from == a.name() && n.message == "hello");
  CHECK(b.next_notification(n) && n.message == big);
  CHECK(!b.next_notification(n));

  fill(abuf, 21);
  const std::uint64_t la = addr_of(abuf.data()), rb = addr_of(bbuf.data());
  {
    Batch batch = a.submit_write_notify(b_name, {{la, rb, 8192}}, "landed");
    batch.wait();
  }
  CHECK(b.next_notification(n) && n.message == "landed");
  CHECK(std::memcmp(abuf.data(), bbuf.data(), 8192) == 0);
  CHECK(a.transport_to(b_name) == "local");
  {
    const std::vector<kvferry::Region> regions = a.peer_regions(b_name);
    CHECK(regions.size() == 1 && regions[0].addr == addr_of(bbuf.data()) &&
          regions[0].len == bbuf.size());
  }
  EXPECT_ERROR(a.notify("127.0.0.1:1", "x"), KVF_STATUS_PEER_UNREACHABLE, "127.0.0.1:1");
}

int main() {
  try {
    test_version_and_status();
    test_config();

    std::vector<std::uint8_t> abuf(kLen), bbuf(kLen);
    Engine a = make_engine(2, 4096);
    Engine b = make_engine();
    const std::string b_name = b.name();
    CHECK(contains(b_name, ":" + std::to_string(b.rpc_port())));
    a.register_memory(addr_of(abuf.data()), kLen, "cpu:0");
    b.register_memory(addr_of(bbuf.data()), kLen);

    test_errors_carry_status_and_message(a, b_name, abuf);
    test_registration(a, abuf);
    test_sync(a, b_name, abuf, bbuf);
    test_async(a, b_name, abuf, bbuf);
    test_failed_batch(a, b, b_name, abuf);
    test_wait_timeout(b, b_name);
    test_engine_moves(a);
    test_layouts(a, b_name, abuf, bbuf);
    test_threads(a, b_name, abuf, bbuf);
    test_notifications(a, b, b_name, abuf, bbuf);
  } catch (const std::exception &e) {
    ++failures;
    std::fprintf(stderr, "api_test.cpp: unexpected exception: %s\n", e.what());
  }
  std::printf("kvferry C++ API test (%s): %d checks, %d failed\n", kvferry::version().c_str(),
              checks, failures);
  return failures == 0 ? 0 : 1;
}
