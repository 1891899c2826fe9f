// The second translation unit of include_twice.cpp: kvferry.hpp first and
// alone, so it must include everything it needs itself.

#include "kvferry.hpp"

#include <string>

std::string version_from_other_tu();
kvf_status status_from_other_tu();

std::string version_from_other_tu() { return kvferry::version(); }

kvf_status status_from_other_tu() {
  try {
    kvferry::Config config;
    config.async_workers(0);
  } catch (const kvferry::Error &e) {
    return e.status();
  }
  return KVF_STATUS_OK;
}
