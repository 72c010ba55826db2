"""REFERENCE-STYLE LOOP: a benchmark baseline only. The library never imports this file.

It reproduces the *cost structure* of the public FedPGP reference (CoOp/Dassl trainer):

- every training step re-encodes its images with the frozen image encoder (no feature cache);
- every training step runs the text encoder four times over all `context_length` (77) token
  positions of every class: sigma + U V (the classifier), the frozen "X X ... X c." prompt (f0,
  recomputed every step), sigma, and U V alone (whose features no loss uses);
- evaluation re-encodes every test batch and re-runs the full text pass per batch;
- fp32 only, clients one after another in one process.

It keeps the project's *semantics* so that its accuracy can be compared with our runtimes:
same dataset, partition, frozen CLIP, seeded initialisation, client sampling, batch order,
loss (written the reference's way: cosine similarities and a 2-column cross-entropy, which is
the same function as `fedpgp_ray.algorithms.fedpgp.contrastive_loss`), one prompt (N=1), and
each client's own SGD state. The reference's defects that would change results (one momentum
buffer shared by all clients, N=2 logit columns, every client trained in round 0) are NOT
reproduced: they are not costs, and SPEC.md names them as defects.

With a deterministic transform (`data.augment_views: 0`) re-encoding gives exactly the cached
features, so this loop and ours train on the same numbers and must reach the same accuracy up
to floating-point noise. With `augment_views > 0` it draws a fresh augmentation each step (as the
reference does) where we sample one of K cached views.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedpgp_ray.algorithms import build_algorithm
from fedpgp_ray.client import PERSONAL_INIT, TRAIN_STREAM, init_global_params, seeded_generator
from fedpgp_ray.clip.backbone import FrozenClip, load_clip
from fedpgp_ray.clip.features import augmentation
from fedpgp_ray.config import ExperimentConfig
from fedpgp_ray.data.partition import EvalSet, partition_dataset
from fedpgp_ray.data.registry import build_dataset
from fedpgp_ray.strategy import aggregate_weighted, sample_clients, summarize_accuracy


class FullTextEncoder:
    """CoOp's TextEncoder: all `context_length` positions of every class, every call (no truncation,
    no shared prefix). `embed(ctx)` builds [SOS] ctx [class . EOT pad...] like CoOp's PromptLearner."""

    def __init__(self, clip: FrozenClip, n_ctx: int, classnames: list[str]) -> None:
        self.model = clip.model
        texts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
        self.tokens = clip.tokenizer(texts).to(clip.device)  # [n_cls, 77]
        with torch.no_grad():
            self.embedding = self.model.token_embedding(self.tokens).float()  # frozen "X X ... X c."
        self.prefix = self.embedding[:, :1]
        self.suffix = self.embedding[:, 1 + n_ctx:]
        self.eot = self.tokens.argmax(dim=-1)

    def embed(self, ctx: torch.Tensor) -> torch.Tensor:
        n_cls = self.prefix.shape[0]
        return torch.cat([self.prefix, ctx.unsqueeze(0).expand(n_cls, -1, -1), self.suffix], dim=1)

    def __call__(self, prompts: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = prompts + m.positional_embedding
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.eot]
        x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x / x.norm(dim=-1, keepdim=True)


@dataclass
class PhaseStats:
    seconds: float = 0.0
    steps: int = 0
    images_encoded: int = 0
    text_passes: int = 0


@dataclass
class ReferenceClientState:
    U: torch.Tensor
    V: torch.Tensor
    optimizer: dict | None = None


@dataclass
class ReferenceRun:
    """The reference-style federated loop for FedPGP (see the module docstring)."""
    cfg: ExperimentConfig
    device: str | None = "cpu"
    states: dict[int, ReferenceClientState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.cfg
        if cfg.algorithm.name != "fedpgp":
            raise ValueError("the reference-style loop implements FedPGP only")
        self.dataset = build_dataset(cfg.data, cfg.seed)
        self.partition = partition_dataset(self.dataset, cfg.data, cfg.federation.num_clients, cfg.seed)
        self.clip = load_clip(cfg.model, self.device)
        self.clip.precision = "fp32"  # the reference's fp32 path
        self.algorithm = build_algorithm(cfg.algorithm)
        self.width = self.clip.model.token_embedding.weight.shape[1]
        self.sigma = init_global_params(self.algorithm, self.width, cfg.seed)["sigma"]
        self._text: dict[tuple[str, ...], FullTextEncoder] = {}
        self._train_tf = self.clip.preprocess if cfg.data.augment_views == 0 else augmentation(self.clip)

    # -- helpers -------------------------------------------------------------------------------------
    def text(self, classnames: list[str]) -> FullTextEncoder:
        key = tuple(classnames)
        if key not in self._text:
            self._text[key] = FullTextEncoder(self.clip, self.cfg.algorithm.n_ctx, classnames)
        return self._text[key]

    def encode_images(self, split, indices, transform) -> torch.Tensor:
        """Load, transform and encode images now (the reference's data loader + image encoder)."""
        batch = torch.stack([transform(split.load(int(i))) for i in indices])
        return self.clip.encode_images(batch)

    def labels(self, global_labels: np.ndarray, classes: list[int]) -> torch.Tensor:
        lookup = {c: i for i, c in enumerate(classes)}
        return torch.as_tensor([lookup[int(y)] for y in global_labels], dtype=torch.long, device=self.clip.device)

    def state(self, cid: int) -> ReferenceClientState:
        if cid not in self.states:
            p = self.algorithm.init_personal(self.width, seeded_generator(self.cfg.seed, PERSONAL_INIT, cid))
            self.states[cid] = ReferenceClientState(p["U"], p["V"])
        return self.states[cid]

    # -- training --------------------------------------------------------------------------------------
    def fit_client(self, cid: int, rnd: int, stats: PhaseStats) -> tuple[torch.Tensor, int]:
        cfg, tc, ac = self.cfg, self.cfg.train, self.cfg.algorithm
        part = self.partition.clients[cid]
        state = self.state(cid)
        names = [self.partition.classnames[c] for c in self.partition.train_classes]
        text = self.text(names)
        labels = self.labels(self.dataset.train.labels[part.train_indices], self.partition.train_classes)
        dev = self.clip.device
        sigma = self.sigma.detach().to(dev).clone().requires_grad_(True)
        U = state.U.to(dev).clone().requires_grad_(True)
        V = state.V.to(dev).clone().requires_grad_(True)
        # The reference's parameter order in its prompt learner: U, V, sigma. Ours: sigma, U, V (only the
        # optimizer-state layout differs; SGD is per-parameter, so the order does not change results).
        optimizer = torch.optim.SGD([sigma, U, V], lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        gen = seeded_generator(cfg.seed, TRAIN_STREAM, rnd, cid)
        n = len(labels)
        views = cfg.data.augment_views
        for _ in range(tc.local_epochs):
            order = torch.randperm(n, generator=gen)
            for begin in range(0, n, tc.batch_size):
                idx = order[begin:begin + tc.batch_size]
                if views > 0:
                    torch.randint(views, (len(idx),), generator=gen)  # keep the batch-order stream aligned
                image_features = self.encode_images(self.dataset.train, part.train_indices[idx.numpy()],
                                                    self._train_tf)
                UV = U @ V
                f_p = text(text.embed(sigma + UV))     # pass 1: the classifier
                f_0 = text(text.embedding)             # pass 2: frozen prompt, recomputed every step
                f_s = text(text.embed(sigma))          # pass 3: the global prompt
                f_uv = text(text.embed(UV))            # pass 4: computed, never used by any loss
                del f_uv
                logits = self.clip.logit_scale * image_features @ f_p.t()
                posi = F.cosine_similarity(f_0, f_s, dim=-1)
                nega = F.cosine_similarity(f_s, f_p, dim=-1)
                con_logits = torch.stack([posi, nega], dim=1) / ac.tau
                target = torch.zeros(con_logits.shape[0], dtype=torch.long, device=dev)
                loss = F.cross_entropy(logits, labels[idx.to(dev)]) + ac.mu * F.cross_entropy(con_logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                stats.steps += 1
                stats.images_encoded += len(idx)
                stats.text_passes += 4
        state.U, state.V = U.detach().cpu(), V.detach().cpu()
        state.optimizer = optimizer.state_dict()
        return sigma.detach().cpu(), n

    def fit_round(self, rnd: int) -> tuple[list[int], PhaseStats]:
        """Train the round's sampled clients one after another and aggregate sigma."""
        stats = PhaseStats()
        start = time.perf_counter()
        fc = self.cfg.federation
        sampled = sample_clients(fc.num_clients, fc.client_fraction, self.cfg.seed, rnd)
        uploads = [self.fit_client(cid, rnd, stats) for cid in sampled]
        self.sigma = aggregate_weighted([({"sigma": s}, n) for s, n in uploads])["sigma"]
        stats.seconds = time.perf_counter() - start
        return sampled, stats

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, ctx: torch.Tensor, eval_set: EvalSet, stats: PhaseStats) -> float:
        """Per test batch: images re-encoded and one full text pass (the reference's eval forward)."""
        if len(eval_set.indices) == 0:
            return float("nan")
        names = [self.partition.classnames[c] for c in eval_set.classes]
        text = self.text(names)
        labels = self.labels(self.dataset.test.labels[eval_set.indices], eval_set.classes)
        correct = 0
        bs = self.cfg.evaluation.batch_size
        for begin in range(0, len(eval_set.indices), bs):
            rows = eval_set.indices[begin:begin + bs]
            feats = self.encode_images(self.dataset.test, rows, self.clip.preprocess)
            logits = self.clip.logit_scale * feats @ text(text.embed(ctx)).t()
            correct += int((logits.argmax(-1) == labels[begin:begin + bs]).sum())
            stats.images_encoded += len(rows)
            stats.text_passes += 1
        return 100.0 * correct / len(eval_set.indices)

    def evaluate_all(self) -> tuple[dict[str, float], PhaseStats]:
        stats = PhaseStats()
        start = time.perf_counter()
        per_client = {}
        for cid in range(self.cfg.federation.num_clients):
            state = self.state(cid)
            ctx = (self.sigma + state.U @ state.V).to(self.clip.device)
            part = self.partition.clients[cid]
            m = {"local": self.accuracy(ctx, part.local, stats), "base": self.accuracy(ctx, self.partition.base, stats)}
            if self.partition.novel is not None:
                m["novel"] = self.accuracy(ctx, self.partition.novel, stats)
            per_client[cid] = m
        stats.seconds = time.perf_counter() - start
        return summarize_accuracy(per_client), stats
