// Routing statistics to JSON (stats_json.h, moekit/stats.h): one object per visit, the field
// names and order of visit_routing_stats and visit_label_stats.
#include "io/stats_json.h"

#include <type_traits>

namespace moekit::io {

namespace {

template <typename Stats, typename Visit>
Json object_of(const Stats& stats, Visit visit) {
  Json out = Json::object();
  visit(stats, [&](const char* name, const auto& field) {
    using Field = std::remove_cvref_t<decltype(field)>;
    if constexpr (std::is_same_v<Field, std::vector<LabelStats>>) {
      Json list = Json::array();
      for (const LabelStats& l : field)
        list.push_back(object_of(l, [](const LabelStats& x, auto&& v) { visit_label_stats(x, v); }));
      out[name] = std::move(list);
    } else {
      out[name] = field;
    }
  });
  return out;
}

}  // namespace

Json routing_stats_json(const RoutingStats& stats) {
  return object_of(stats, [](const RoutingStats& s, auto&& v) { visit_routing_stats(s, v); });
}

}  // namespace moekit::io

namespace moekit {

std::string routing_stats_to_json(const RoutingStats& stats) { return io::routing_stats_json(stats).dump(); }

}  // namespace moekit
