"""ShiftAddViT's Mult/Shift mixture of experts with a latency-aware load-balancing loss.

A transformer FFN is replaced by E experts (in ShiftAddViT: the dense "multiplication" MLP and a copy with
power-of-two weights, the "shift" expert) and a noisy top-1 router (Shazeer et al., 2017). Besides the task
loss, training adds a balance loss in which each expert's importance and load are weighted by its measured
per-token latency, so the minimiser sends tokens to experts in inverse proportion to their latency: the faster
an expert runs, the more tokens it gets.

Experts are passed in as modules (any x [N, C] -> [N, C'] module); nothing here knows what a shift layer is.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISPATCH_MODES = ("sorted", "gather")
GATE_SCALINGS = ("straight_through", "probability")
# floor on the learned noise std: keeps the load estimate's Phi((clean - threshold) / std) well conditioned
MIN_NOISE_STD = 1e-2


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var(x) / mean(x)^2 of a 1-d tensor x [E]; 0 for one element.

    Uses the *population* variance (divide by E, not E - 1): then cv^2 is 0 exactly when all entries are equal
    and, for E = 2, equals ((a - b) / (a + b))^2, which keeps hand-derived targets and gradients simple.
    """
    x = x.float().reshape(-1)
    if x.numel() <= 1:
        return x.new_zeros(())
    mean = x.mean()
    variance = (x - mean).pow(2).mean()
    return variance / (mean.pow(2) + eps)


def latency_aware_balance_loss(importance: Tensor, load: Tensor, latency: Tensor | None) -> Tensor:
    """cv^2(importance * w) + cv^2(load * w) with w = latency / mean(latency) (w = 1 when latency is None).

    importance, load: [E] per-expert sums over tokens (summed router probabilities, smooth token count);
    latency: [E] per-token cost of each expert in any unit. The loss is 0 iff importance_e * latency_e (and
    load_e * latency_e) is the same for every expert, i.e. minimising it drives importance_e ~ 1 / latency_e.
    """
    if latency is None:
        return cv_squared(importance) + cv_squared(load)
    latency = latency.to(device=importance.device, dtype=torch.float32)
    weight = latency / latency.mean()
    return cv_squared(importance.float() * weight) + cv_squared(load.float() * weight)


class MoEFeedForward(nn.Module):
    """Top-1 mixture of experts over tokens: x [..., C] -> [..., C].

    Each token goes to the expert with the highest router probability p (noise added in training when
    `noisy`); its output is g * expert(token) with gate g = p / p.detach() ("straight_through": exactly 1 in
    the forward pass, so a freshly converted model reproduces its chosen expert, while the router still gets
    the gradient of p) or g = p ("probability").

    dispatch:
      * "sorted" (default): tokens are argsorted by expert, every expert is evaluated on the whole sorted
        batch and each token keeps its own expert's row (torch.where), then the permutation is undone. No host
        synchronisation and no data-dependent shapes, so it runs under torch.compile(fullgraph=True) and CUDA
        graphs. This pure-torch reference spends E x the FFN compute; the saving comes from the fused kernel,
        which consumes the same sorted layout but runs each expert only on its contiguous slice.
      * "gather": eager mode that runs each expert only on its own tokens (index_select; syncs with the host
        to learn the slice sizes). Cheaper on CPU (training, op counting), unusable under fullgraph compile.
      The default is "sorted" because the project trains and benchmarks on GPU, where a host sync per MoE
      layer stalls the launch queue and breaks compiled graphs, while GNT's FFNs (64 -> 256 -> 64, E = 2)
      are small enough that doubling their compute costs less. Both modes give the same numbers (up to BLAS
      rounding for different batch sizes); with dropout inside the experts their random masks differ.

    Balance loss (computed on every forward, training or not; cheap): importance = sum over tokens of the
    router probabilities; load = with noise, sum over tokens of the probability that the expert is the
    noisy top-1 (normal CDF, as in Shazeer et al.), without noise the routed-token count.
    `auxiliary_loss()` returns balance_coef * latency_aware_balance_loss(...) of the last forward; it holds
    that forward's graph until the next forward.
    """

    def __init__(self, experts: Sequence[nn.Module], dim: int, noisy: bool = True, balance_coef: float = 0.01,
                 expert_latency: Sequence[float] | None = None, latency_weighting: bool = True,
                 dispatch: str = "sorted", gate_scaling: str = "straight_through"):
        super().__init__()
        if len(experts) < 1:
            raise ValueError("MoEFeedForward needs at least one expert")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        if gate_scaling not in GATE_SCALINGS:
            raise ValueError(f"gate_scaling must be one of {GATE_SCALINGS}, got {gate_scaling!r}")
        self.experts = nn.ModuleList(experts)
        self.dim = dim
        num_experts = len(self.experts)
        # zero router: every expert starts equally likely (ties in eval go to expert 0)
        self.router = nn.Linear(dim, num_experts)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.noisy = noisy
        # learned noise std softplus(noise(x)); only built when used, so DDP sees no unused parameters
        self.noise: nn.Linear | None = None
        if noisy:
            self.noise = nn.Linear(dim, num_experts)
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)
        self.balance_coef = float(balance_coef)
        self.latency_weighting = latency_weighting
        self.dispatch = dispatch
        self.gate_scaling = gate_scaling
        self.register_buffer("expert_latency", torch.ones(num_experts))
        if expert_latency is not None:
            self.set_expert_latency(expert_latency)
        self.last_balance_loss: Tensor | None = None
        self.last_tokens_per_expert: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def set_expert_latency(self, latency: Sequence[float]) -> None:
        """Per-token latency of each expert [E] (any unit; only ratios matter)."""
        values = torch.as_tensor([float(v) for v in latency], dtype=torch.float32)
        if values.numel() != self.num_experts:
            raise ValueError(f"expected {self.num_experts} expert latencies, got {values.numel()}")
        if not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
            raise ValueError(f"expert latencies must be positive and finite, got {values.tolist()}")
        with torch.no_grad():
            self.expert_latency.copy_(values.to(self.expert_latency.device))

    def forward(self, x: Tensor) -> Tensor:
        lead_shape = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])  # [N, C]
        clean_logits, noisy_logits, noise_std = self._router_logits(tokens)  # [N, E] float32
        probabilities = torch.softmax(noisy_logits, dim=-1)
        chosen = noisy_logits.argmax(dim=-1)  # [N]
        chosen_probability = probabilities.gather(1, chosen[:, None]).squeeze(1)  # [N]
        if self.gate_scaling == "straight_through":
            gate = chosen_probability / chosen_probability.detach()  # == 1 in forward (p >= 1/E > 0)
        else:
            gate = chosen_probability

        if self.dispatch == "sorted":
            expert_out = self._dispatch_sorted(tokens, chosen)
        else:
            expert_out = self._dispatch_gather(tokens, chosen)
        out = expert_out * gate.to(expert_out.dtype)[:, None]

        routed = (chosen[:, None] == torch.arange(self.num_experts, device=chosen.device)).to(torch.float32)
        importance = probabilities.sum(dim=0)  # [E]
        if noise_std is not None:
            load = self._smooth_load(clean_logits, noisy_logits, noise_std)
        else:
            load = routed.sum(dim=0)
        latency = self.expert_latency if self.latency_weighting else None
        self.last_balance_loss = self.balance_coef * latency_aware_balance_loss(importance, load, latency)
        self.last_tokens_per_expert = routed.sum(dim=0).detach()
        return out.reshape(*lead_shape, out.shape[-1])

    def _router_logits(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(clean logits, logits used for routing, noise std or None), each [N, E] float32.

        The router runs in float32 outside autocast: routing decisions are discrete and sensitive to rounding.
        """
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            tokens32 = tokens.float()
            clean = self.router(tokens32)
            if not (self.training and self.noise is not None):
                return clean, clean, None
            noise_std = F.softplus(self.noise(tokens32)) + MIN_NOISE_STD
            return clean, clean + torch.randn_like(clean) * noise_std, noise_std

    def _smooth_load(self, clean: Tensor, noisy: Tensor, noise_std: Tensor) -> Tensor:
        """[E] sum over tokens of P(expert e is the noisy top-1), approximated as
        Phi((clean_e - max_{j != e} noisy_j) / std_e) with the other experts' noisy logits held fixed."""
        if self.num_experts == 1:
            return clean.new_full((1,), float(clean.shape[0]))
        top2_values, top2_indices = noisy.topk(2, dim=-1)  # [N, 2]
        experts = torch.arange(self.num_experts, device=clean.device)
        is_top1 = experts[None, :] == top2_indices[:, :1]  # [N, E]
        threshold = torch.where(is_top1, top2_values[:, 1:2], top2_values[:, :1])  # best of the others
        return torch.special.ndtr((clean - threshold) / noise_std).sum(dim=0)

    def _dispatch_sorted(self, tokens: Tensor, chosen: Tensor) -> Tensor:
        """Sync-free: tokens [N, C], chosen [N] -> each token's own expert output [N, C']."""
        order = torch.argsort(chosen, stable=True)  # tokens grouped by expert, as the fused kernel wants them
        sorted_tokens = tokens.index_select(0, order)
        sorted_chosen = chosen.index_select(0, order)[:, None]
        sorted_out = None
        for index, expert in enumerate(self.experts):
            expert_out = expert(sorted_tokens)  # reference: every expert on all tokens, no data-dependent slice
            sorted_out = expert_out if sorted_out is None else torch.where(sorted_chosen == index, expert_out,
                                                                           sorted_out)
        return torch.empty_like(sorted_out).index_copy(0, order, sorted_out)  # undo the sort

    def _dispatch_gather(self, tokens: Tensor, chosen: Tensor) -> Tensor:
        """Eager: each expert runs only on its own tokens (empty ones on 0 rows, so DDP still sees their
        parameters used). tokens [N, C], chosen [N] -> [N, C']."""
        indices, outputs = [], []
        for index, expert in enumerate(self.experts):
            token_indices = (chosen == index).nonzero().squeeze(1)  # host sync: the slice size
            indices.append(token_indices)
            outputs.append(expert(tokens.index_select(0, token_indices)))
        all_outputs = torch.cat(outputs, dim=0)
        return all_outputs.new_empty((tokens.shape[0], all_outputs.shape[-1])).index_copy(
            0, torch.cat(indices), all_outputs)

    def auxiliary_loss(self) -> Tensor:
        """balance_coef * latency-aware balance loss of the last forward (a 0 tensor before any)."""
        if self.last_balance_loss is None:
            return self.router.weight.new_zeros(())
        return self.last_balance_loss

    def routing_fractions(self) -> Tensor:
        """[E] fraction of the last forward's tokens routed to each expert (zeros before any forward)."""
        if self.last_tokens_per_expert is None:
            return self.router.weight.new_zeros(self.num_experts)
        return self.last_tokens_per_expert / self.last_tokens_per_expert.sum().clamp_min(1.0)

    def extra_repr(self) -> str:
        latency = ", ".join(f"{v:.3g}" for v in self.expert_latency.tolist())
        return (f"num_experts={self.num_experts}, dim={self.dim}, noisy={self.noisy}, "
                f"balance_coef={self.balance_coef}, expert_latency=[{latency}], "
                f"latency_weighting={self.latency_weighting}, dispatch={self.dispatch!r}, "
                f"gate_scaling={self.gate_scaling!r}")

    def __getstate__(self) -> dict:
        """Drop the last balance loss (a non-leaf tensor holding a graph) so deepcopy / pickle work."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["last_balance_loss"] = None
        return state


def moe_modules(model: nn.Module) -> list[MoEFeedForward]:
    """Every MoEFeedForward inside `model` (itself included), in module order."""
    return [module for module in model.modules() if isinstance(module, MoEFeedForward)]


def total_auxiliary_loss(model: nn.Module) -> Tensor | float:
    """Sum of auxiliary_loss() over the model's MoE layers; 0.0 (a float) when it has none."""
    losses = [module.auxiliary_loss() for module in moe_modules(model)]
    if not losses:
        return 0.0
    return torch.stack([loss.float() for loss in losses]).sum()
