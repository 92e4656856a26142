// Fused CPU kernels for one step of the task-batched LSTM node (metalstm/rnn.py, _LSTMLayer).
//
// Unfused, a forward step is a dozen elementwise PyTorch ops over [T, B, 4H] and [T, B, H] views, each
// reading its operands back from L3 after the step's recurrent matmul has streamed every task's weights
// through the cache; a backward step is four. Here each is one pass over a row of the step, computing
// exactly what those ops compute, with ATen's own vectorised exp and tanh (Sleef, as torch.sigmoid and
// torch.tanh use), so results match the unfused path to rounding. No graph is recorded: the autograd node
// owns differentiation.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <optional>

namespace {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  return (Vectorized<T>(T(1)) + x.neg().exp()).reciprocal();
}

// Strided [T, B, K] view: the address of row (t, b).
template <typename T>
struct Rows {
  T* data;
  int64_t s0, s1;
  explicit Rows(const torch::Tensor& x) : data(x.data_ptr<T>()), s0(x.stride(0)), s1(x.stride(1)) {}
  T* at(int64_t t, int64_t b) const { return data + t * s0 + b * s1; }
};

void check_rows(const torch::Tensor& x, const char* name, int64_t tasks, int64_t batch, int64_t width,
                const torch::Tensor& like) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == tasks && x.size(1) == batch && x.size(2) == width, name,
              ": expected shape [", tasks, ", ", batch, ", ", width, "], got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1, name, ": the last dimension must be contiguous");
  TORCH_CHECK(x.scalar_type() == like.scalar_type() && x.device().is_cpu(), name, ": expected a CPU tensor of ",
              like.scalar_type());
}

}  // namespace

// gates [T, B, 4H]: x W_ih^T + b + h W_hh^T with the g block doubled (tanh z = 2 sigmoid(2z) - 1), activated
// in place to (i, f, tanh g, o). Writes c, h and, when `local`, coef = (g sigma'(i), c_prev sigma'(f),
// i tanh'(g), tanh(c) sigma'(o)) and q = o tanh'(c).
void forward_step(torch::Tensor gates, torch::Tensor c_prev, torch::Tensor c, torch::Tensor h, torch::Tensor coef,
                  torch::Tensor q, bool local) {
  const int64_t tasks = gates.size(0), batch = gates.size(1), hidden = gates.size(2) / 4;
  check_rows(gates, "gates", tasks, batch, 4 * hidden, gates);
  check_rows(c_prev, "c_prev", tasks, batch, hidden, gates);
  check_rows(c, "c", tasks, batch, hidden, gates);
  check_rows(h, "h", tasks, batch, hidden, gates);
  if (local) {
    check_rows(coef, "coef", tasks, batch, 4 * hidden, gates);
    check_rows(q, "q", tasks, batch, hidden, gates);
  }
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "forward_step", [&] {
    using Vec = Vectorized<scalar_t>;
    const Rows<scalar_t> a(gates), cp(c_prev), cn(c), hn(h);
    const std::optional<Rows<scalar_t>> k = local ? std::optional(Rows<scalar_t>(coef)) : std::nullopt;
    const std::optional<Rows<scalar_t>> qq = local ? std::optional(Rows<scalar_t>(q)) : std::nullopt;
    const Vec one(1), two(2), four(4);
    at::parallel_for(0, tasks * batch, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = r / batch, b = r % batch;
        scalar_t *ar = a.at(t, b), *cpr = cp.at(t, b), *cr = cn.at(t, b), *hr = hn.at(t, b);
        for (int64_t j = 0; j < hidden; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), hidden - j);
          const Vec i = sigmoid(Vec::loadu(ar + j, n)), f = sigmoid(Vec::loadu(ar + hidden + j, n));
          const Vec s = sigmoid(Vec::loadu(ar + 2 * hidden + j, n)), o = sigmoid(Vec::loadu(ar + 3 * hidden + j, n));
          const Vec g = two * s - one;
          const Vec c_old = Vec::loadu(cpr + j, n);
          const Vec c_new = f * c_old + i * g;
          const Vec tanh_c = c_new.tanh();
          const Vec h_new = o * tanh_c;
          i.store(ar + j, n);
          f.store(ar + hidden + j, n);
          g.store(ar + 2 * hidden + j, n);
          o.store(ar + 3 * hidden + j, n);
          c_new.store(cr + j, n);
          h_new.store(hr + j, n);
          if (local) {
            scalar_t* kr = k->at(t, b);
            ((i - i * i) * g).store(kr + j, n);
            ((f - f * f) * c_old).store(kr + hidden + j, n);
            (four * (s - s * s) * i).store(kr + 2 * hidden + j, n);
            ((o - o * o) * tanh_c).store(kr + 3 * hidden + j, n);
            (o - h_new * tanh_c).store(qq->at(t, b) + j, n);
          }
        }
      }
    });
  });
}

// One reverse step: dc = dc_next + dh q (or dh q without dc_next); dz = coef (dc, dc, dc, dh) into `dz`
// ([T, B, 4H]); returns dc f, the cell gradient that flows to the previous step.
torch::Tensor backward_step(torch::Tensor dh, std::optional<torch::Tensor> dc_next, torch::Tensor q,
                            torch::Tensor coef, torch::Tensor forget, torch::Tensor dz) {
  const int64_t tasks = coef.size(0), batch = coef.size(1), hidden = coef.size(2) / 4;
  check_rows(coef, "coef", tasks, batch, 4 * hidden, coef);
  check_rows(dh, "dh", tasks, batch, hidden, coef);
  check_rows(q, "q", tasks, batch, hidden, coef);
  check_rows(forget, "forget", tasks, batch, hidden, coef);
  check_rows(dz, "dz", tasks, batch, 4 * hidden, coef);
  if (dc_next) check_rows(*dc_next, "dc_next", tasks, batch, hidden, coef);
  torch::Tensor dc_prev = torch::empty({tasks, batch, hidden}, coef.options());
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "backward_step", [&] {
    using Vec = Vectorized<scalar_t>;
    const Rows<scalar_t> dhr(dh), qr(q), kr(coef), fr(forget), zr(dz), out(dc_prev);
    const std::optional<Rows<scalar_t>> dcr = dc_next ? std::optional(Rows<scalar_t>(*dc_next)) : std::nullopt;
    at::parallel_for(0, tasks * batch, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = r / batch, b = r % batch;
        const scalar_t* k = kr.at(t, b);
        scalar_t* z = zr.at(t, b);
        for (int64_t j = 0; j < hidden; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), hidden - j);
          const Vec d_h = Vec::loadu(dhr.at(t, b) + j, n);
          Vec dc = d_h * Vec::loadu(qr.at(t, b) + j, n);
          if (dcr) dc = Vec::loadu(dcr->at(t, b) + j, n) + dc;
          (Vec::loadu(k + j, n) * dc).store(z + j, n);
          (Vec::loadu(k + hidden + j, n) * dc).store(z + hidden + j, n);
          (Vec::loadu(k + 2 * hidden + j, n) * dc).store(z + 2 * hidden + j, n);
          (Vec::loadu(k + 3 * hidden + j, n) * d_h).store(z + 3 * hidden + j, n);
          (dc * Vec::loadu(fr.at(t, b) + j, n)).store(out.at(t, b) + j, n);
        }
      }
    });
  });
  return dc_prev;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_step", &forward_step, "one fused forward step of the task-batched LSTM node");
  m.def("backward_step", &backward_step, "one fused reverse step of the task-batched LSTM node");
}
