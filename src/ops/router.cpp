// The router op's checks and dispatch (router.h); the implementations are the backends'
// (src/cpu/router.cpp).
#include "ops/router.h"

#include <type_traits>

#include "moekit/error.h"

namespace moekit::ops {

namespace {

template <typename View>
void check_shape(const View& m, const char* name, int64_t rows, int64_t cols) {
  if (m.rows != rows || m.cols != cols) {
    throw_input_error(detail::concat(name, " shape"), detail::concat("[", rows, ", ", cols, "]"),
                      detail::concat("[", m.rows, ", ", m.cols, "]"));
  }
}

template <typename Real>
void check_projection(ConstMatrixView<Real> x, ConstMatrixView<Real> weight, size_t bias_size) {
  check_shape(weight, "router weight", weight.rows, x.cols);
  if (bias_size != 0 && static_cast<int64_t>(bias_size) != weight.rows) {
    throw_input_error("router bias length", weight.rows, bias_size);
  }
}

}  // namespace

template <typename Real>
void router_forward(const OpContext& ctx, ConstMatrixView<Real> x, ConstMatrixView<Real> weight,
                    std::span<const Real> bias, MatrixView<Real> logits, RouterCache* cache) {
  check_projection(x, weight, bias.size());
  check_shape(logits, "router logits", x.rows, weight.rows);
  if constexpr (std::is_same_v<Real, float>) {
    ctx.backend->router_forward(ctx, x, weight, bias, logits, cache);
  } else {
    ctx.backend->router_forward(ctx, x, weight, bias, logits);
  }
}

template <typename Real>
void router_backward(const OpContext& ctx, ConstMatrixView<Real> x, ConstMatrixView<Real> weight,
                     ConstMatrixView<Real> d_logits, MatrixView<Real> d_x, MatrixView<Real> d_weight,
                     std::span<Real> d_bias) {
  check_projection(x, weight, 0);
  check_shape(d_logits, "router d_logits", x.rows, weight.rows);
  if (!d_x.empty()) check_shape(d_x, "router d_x", x.rows, x.cols);
  if (!d_weight.empty()) check_shape(d_weight, "router d_weight", weight.rows, weight.cols);
  if (!d_bias.empty() && static_cast<int64_t>(d_bias.size()) != weight.rows) {
    throw_input_error("router d_bias length", weight.rows, d_bias.size());
  }
  ctx.backend->router_backward(ctx, x, weight, d_logits, d_x, d_weight, d_bias);
}

template void router_forward<float>(const OpContext&, ConstMatrixView<float>, ConstMatrixView<float>,
                                    std::span<const float>, MatrixView<float>, RouterCache*);
template void router_forward<double>(const OpContext&, ConstMatrixView<double>, ConstMatrixView<double>,
                                     std::span<const double>, MatrixView<double>, RouterCache*);
template void router_backward<float>(const OpContext&, ConstMatrixView<float>, ConstMatrixView<float>,
                                     ConstMatrixView<float>, MatrixView<float>, MatrixView<float>, std::span<float>);
template void router_backward<double>(const OpContext&, ConstMatrixView<double>, ConstMatrixView<double>,
                                      ConstMatrixView<double>, MatrixView<double>, MatrixView<double>,
                                      std::span<double>);

std::unique_ptr<RouterCache> make_router_cache(const OpContext& ctx) { return ctx.backend->make_router_cache(); }

void router_prepare(const OpContext& ctx, ConstMatrixView<float> weight, RouterCache& cache) {
  ctx.backend->router_prepare(ctx, weight, cache);
}

}  // namespace moekit::ops
