"""FedOTP: a global and a local prompt, matched to image regions by unbalanced optimal transport.

Each client has two CoOp contexts: `ctx_global` (averaged by the server) and `ctx_local`
(personal, never leaves the client). For an image with M projected, normalised patch
tokens z_m and a class c with the two prompts' features t_{c,1}, t_{c,2}, the similarity
matrix S[m, n] = cos(z_m, t_{c,n}) is turned into a score by an entropic transport plan T
between the patches and the prompts:

    cost   = 1 - S
    T      = argmin <cost, T> - eps * H(T)
             s.t.  T 1_N <= 1/M         (a patch gives at most its share: patches may stay out)
                   T^T 1_M = mass / N   (every prompt receives the same mass; total = mass)
    logit  = logit_scale * <T, S> / <T, 1>

With mass < 1 the plan may leave the patches that fit no prompt untransported (background,
clutter): the "unbalanced" part. The plan is computed without gradient; gradients flow
through S only. Dividing by the plan's total (= mass once converged) keeps the logit a
plan-weighted mean of cosines, on CLIP's scale, and keeps classes comparable when 100
iterations at eps = 0.01 have not fully converged (they move the column marginal by a few
percent; the row bound always holds). Defaults (config `algorithm.ot_*`): eps 0.01,
100 iterations, mass 0.8.

The plan solver is a pure function (`unbalanced_sinkhorn`): Sinkhorn's scaling for the
equality marginal and Dykstra's corrected scaling for the inequality marginal, in float32 or
float64 as the cost range allows (eps = 0.01 can put exp(-cost/eps) below float32's range).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedpgp_ray.algorithms.base import Algorithm, FrozenEncoders, LossTerms, Params, normal_init

EVAL_CHUNK = 256  # images per transport batch in evaluation (bounds the [B, C, M, N] tensors)


FLOAT32_RANGE = 60.0   # largest (cost range / eps) solved in float32 (kernel >= e^-60, scalings well in range)
SCALING_RANGE = 300.0  # largest (cost range / eps) solved in float64 scaling form; beyond it: log domain


@torch.no_grad()
def unbalanced_sinkhorn(cost: torch.Tensor, eps: float, iters: int, mass: float) -> torch.Tensor:
    """Entropic transport plan T [..., M, N] for cost [..., M, N] (a batch of independent problems).

    Solves min <cost, T> - eps * H(T) subject to T 1_N <= 1/M (rows, inequality) and
    T^T 1_M = mass / N (columns, equality), 0 < mass <= 1; mass = 1 is balanced OT with
    uniform marginals. Iterative KL (Bregman) projections on T = diag(u) K diag(v), with
    K = exp(-cost / eps), starting from K:

        v = (mass / N) / (K^T u)          exact projection onto the column constraint
        u = min(1, (1/M) / (K v))         projection onto the row bound, with Dykstra's correction

    (the inequality set is not affine, so plain alternation would be wrong; Dykstra's
    correction q = 1/u makes every row projection start again from K diag(v), which is the
    closed form above). The returned plan meets the row bound exactly and the column marginal
    up to the solver's convergence. Returned in the cost's dtype.

    Numerics: each column's smallest cost is subtracted first (a column scaling of K, absorbed
    by v: the plan is unchanged). Then, by the remaining range over eps: up to FLOAT32_RANGE in
    float32 (float64 costs stay float64), up to SCALING_RANGE in float64 (eps = 0.01 with cosine
    costs spanning up to 2 puts K far below float32's range), beyond that in the log domain.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if eps <= 0 or iters < 1:
        raise ValueError(f"eps must be > 0 and iters >= 1, got eps={eps}, iters={iters}")
    m, n = cost.shape[-2:]
    shifted = cost.reshape(-1, m, n).transpose(1, 2)  # [P, N, M]: the reductions over M are contiguous
    shifted = shifted - shifted.amin(dim=-1, keepdim=True)
    spread = float(shifted.amax()) / eps if shifted.numel() else 0.0
    if spread <= FLOAT32_RANGE and cost.dtype != torch.float64:
        plan = _scaling(shifted.float() / eps, 1.0 / m, mass / n, iters)
    elif spread <= SCALING_RANGE:
        plan = _scaling(shifted.double() / eps, 1.0 / m, mass / n, iters)
    else:
        plan = _log_domain(shifted.double() / eps, 1.0 / m, mass / n, iters)
    return plan.transpose(1, 2).reshape(cost.shape).to(cost.dtype)


def _scaling(scaled_cost: torch.Tensor, a: float, b: float, iters: int) -> torch.Tensor:
    """Plan [P, N, M] in scaling form; scaled_cost = cost / eps (>= 0, each column's min 0)."""
    kernel = torch.exp(-scaled_cost)
    u = torch.ones(kernel.shape[0], 1, kernel.shape[2], dtype=kernel.dtype, device=kernel.device)  # patches
    for _ in range(iters):
        v = b / (kernel * u).sum(-1, keepdim=True)                 # columns: T^T 1 = b exactly
        u = (a / (kernel * v).sum(1, keepdim=True)).clamp(max=1.0)  # rows: only those above 1/M shrink
    return u * kernel * v


def _log_domain(scaled_cost: torch.Tensor, a: float, b: float, iters: int) -> torch.Tensor:
    """The same iterations as `_scaling` on log u and log v (never overflows; slower)."""
    log_k = -scaled_cost
    log_a, log_b = math.log(a), math.log(b)
    log_u = torch.zeros(log_k.shape[0], 1, log_k.shape[2], dtype=log_k.dtype, device=log_k.device)
    for _ in range(iters):
        log_v = log_b - torch.logsumexp(log_k + log_u, dim=-1, keepdim=True)
        log_u = (log_a - torch.logsumexp(log_k + log_v, dim=1, keepdim=True)).clamp(max=0.0)
    return torch.exp(log_u + log_k + log_v)


def ot_logits(logit_scale: float, patch_tokens: torch.Tensor, prompt_features: torch.Tensor, eps: float,
              iters: int, mass: float) -> torch.Tensor:
    """[B, C] logits from patch tokens [B, M, D] and prompt features [N, C, D] (both normalised).

    logit[b, c] = logit_scale * sum_{m,n} T S / sum_{m,n} T, with the plan T of cost 1 - S
    computed without gradient.
    """
    with torch.autocast(device_type=patch_tokens.device.type, enabled=False):
        sim = torch.einsum("bmd,ncd->bcmn", patch_tokens.float(), prompt_features.float())
        plan = unbalanced_sinkhorn(1.0 - sim.detach(), eps, iters, mass)
        weights = plan / plan.sum(dim=(-2, -1), keepdim=True)
        return logit_scale * (weights * sim).sum(dim=(-2, -1))


class FedOTP(Algorithm):
    """Global + local prompt combined by unbalanced OT over patch tokens; only the global is averaged."""
    name = "fedotp"
    global_keys = ("ctx_global",)
    personal_keys = ("ctx_local",)
    uses_patch_tokens = True  # the client passes patch_tokens=[n, P, D] to loss() and logits()

    def init_global(self, width: int, generator: torch.Generator) -> Params:
        return {"ctx_global": normal_init((self.cfg.n_ctx, width), self.cfg.init_std, generator)}

    def init_personal(self, width: int, generator: torch.Generator) -> Params:
        return {"ctx_local": normal_init((self.cfg.n_ctx, width), self.cfg.init_std, generator)}

    def prompt_features(self, enc: FrozenEncoders, params: Params, classnames: list[str]) -> torch.Tensor:
        """[2, n_cls, D]: the global and the local prompt's normalised class features."""
        prompts = enc.prompts(classnames)
        return torch.stack([enc.text.encode(params["ctx_global"], prompts),
                            enc.text.encode(params["ctx_local"], prompts)])

    def class_features(self, enc: FrozenEncoders, params: Params, classnames: list[str]) -> torch.Tensor:
        """The two prompts' mean feature (normalised): a pooled-feature summary, not FedOTP's classifier."""
        return F.normalize(self.prompt_features(enc, params, classnames).mean(0), dim=-1)

    def _ot_logits(self, enc: FrozenEncoders, prompt_features: torch.Tensor,
                   patch_tokens: torch.Tensor | None) -> torch.Tensor:
        if patch_tokens is None:
            raise ValueError("FedOTP needs the images' patch tokens (patch_tokens=...): its client must "
                             "declare uses_patch_tokens and pass them")
        c = self.cfg
        return ot_logits(enc.clip.logit_scale, patch_tokens, prompt_features, c.ot_eps, c.ot_iters, c.ot_mass)

    def loss(self, enc: FrozenEncoders, params: Params, image_features: torch.Tensor, labels: torch.Tensor,
             classnames: list[str], global_start: Params, patch_tokens: torch.Tensor | None = None) -> LossTerms:
        logits = self._ot_logits(enc, self.prompt_features(enc, params, classnames), patch_tokens)
        ce = F.cross_entropy(logits, labels)
        return LossTerms(ce, {"ce": ce})

    def logits(self, enc: FrozenEncoders, params: Params, image_features: torch.Tensor, classnames: list[str],
               patch_tokens: torch.Tensor | None = None) -> torch.Tensor:
        text = self.prompt_features(enc, params, classnames)  # once for all chunks
        if patch_tokens is None:
            return self._ot_logits(enc, text, None)
        return torch.cat([self._ot_logits(enc, text, patch_tokens[i:i + EVAL_CHUNK])
                          for i in range(0, len(patch_tokens), EVAL_CHUNK)])
