#pragma once
// A rank grid: named dimensions with sizes, the first dimension innermost
// (stride 1), offset by a first global rank. This is the convention of
// megatron-core's RankGenerator (order "tp-cp-ep-dp-pp": tp innermost) and of
// its HyperCommGrid (dim_names[0] innermost).
//
// Thread-safety: immutable after construction; every method is const and may
// be called from any thread.
#include <cstdint>
#include <string>
#include <vector>

namespace pycomm {

class RankLayout {
 public:
  // Throws LayoutError on empty or repeated names, sizes < 1, offset < 0.
  RankLayout(
      std::vector<int64_t> shape,
      std::vector<std::string> dimNames,
      int64_t rankOffset = 0);

  int64_t worldSize() const {
    return worldSize_;
  }
  int64_t rankOffset() const {
    return rankOffset_;
  }
  const std::vector<int64_t>& shape() const {
    return shape_;
  }
  const std::vector<std::string>& dimNames() const {
    return dimNames_;
  }

  // The sorted global ranks that share every coordinate with `rank` except
  // along `dims`. Costs O(group size): no other group is enumerated, which is
  // what keeps per-rank group creation flat in the world size.
  std::vector<int64_t> groupOf(int64_t rank, const std::vector<std::string>& dims)
      const;

  // Every group along `dims`, each sorted, ordered by their smallest rank.
  std::vector<std::vector<int64_t>> allGroups(
      const std::vector<std::string>& dims) const;

  // How many groups along `dims` there are (worldSize / product of dims).
  int64_t groupCount(const std::vector<std::string>& dims) const;

 private:
  std::vector<bool> maskOf(const std::vector<std::string>& dims) const;
  std::vector<int64_t> membersFrom(int64_t baseIndex, const std::vector<bool>& mask)
      const;

  std::vector<int64_t> shape_;
  std::vector<std::string> dimNames_;
  std::vector<int64_t> strides_;
  int64_t rankOffset_;
  int64_t worldSize_;
};

} // namespace pycomm
