// Both headers compile on their own and may be included twice: kvferry.h
// comes first here (so it must not need kvferry.hpp), each header twice, and
// include_twice_other.cpp includes kvferry.hpp first in a second translation
// unit. Linking the two proves the header-only wrapper defines nothing twice
// (everything inline); running it checks both TUs see the same library.

#include "kvferry.h"
#include "kvferry.h"
#include "kvferry.hpp"
#include "kvferry.hpp"

#include <cstdio>
#include <string>

// Defined in include_twice_other.cpp.
std::string version_from_other_tu();
kvf_status status_from_other_tu();

int main() {
  const std::string here = kvferry::version();
  const std::string there = version_from_other_tu();
  kvf_status status = KVF_STATUS_OK;
  try {
    kvferry::Config config;
    config.slice_size(0);
  } catch (const kvferry::Error &e) {
    status = e.status();
  }
  const bool ok = here == there && here == kvf_version() &&
                  status == KVF_STATUS_INVALID_ARGUMENT && status_from_other_tu() == status;
  std::printf("kvferry include-twice test: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
