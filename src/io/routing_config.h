// Reading a RoutingConfig out of a JSON object that may hold other keys too: the layer config
// is one flat object with routing and layer keys side by side.
#pragma once

#include "io/json.h"
#include "moekit/config.h"

namespace moekit::io {

// Takes `preset` (applied first), `router_dtype` and every routing key and alias the reader
// still holds, and returns the config they give. Keys it does not know are left for the
// caller's reject_unknown_keys(); nothing is validated yet.
RoutingConfig read_routing_config(ObjectReader& reader);

}  // namespace moekit::io
