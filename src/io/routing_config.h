// Reading a RoutingConfig out of a JSON object that may hold other keys too: the layer config
// is one flat object with routing and layer keys side by side, and a preset file holds its
// routing keys in an object of their own.
#pragma once

#include <nlohmann/json.hpp>

#include "io/json.h"
#include "moekit/config.h"

namespace moekit::io {

// Takes `preset` (applied first), `router_dtype` and every routing key and alias the reader
// still holds, and returns the config they give. Keys it does not know are left for the
// caller's reject_unknown_keys(); nothing is validated yet.
RoutingConfig read_routing_config(ObjectReader& reader);

// The same without `preset`: `router_dtype` and every routing key and alias the reader holds,
// applied on top of `config` (a preset file, where a `preset` key is unknown).
void read_routing_fields(ObjectReader& reader, RoutingConfig& config);

// Every routing field under its canonical key, in declaration order (no `preset`).
nlohmann::ordered_json routing_fields_json(const RoutingConfig& config);

}  // namespace moekit::io
