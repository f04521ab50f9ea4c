// The routing statistics as a JSON value of the library's JSON layer (io/json.h), for documents
// that embed them (`moekit route`'s OUT); the fields are stats.h's visit_routing_stats.
#pragma once

#include "io/json.h"
#include "moekit/stats.h"

namespace moekit::io {

Json routing_stats_json(const RoutingStats& stats);

}  // namespace moekit::io
