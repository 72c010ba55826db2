"""Pretraining of the project's tiny CLIP (`fedpgp-tiny`) on captioned images of the procedural world.

The command is `fedpgp-ray pretrain` (fedpgp_ray/pretrain.py); this module holds the work.
Contrastive training (open_clip's ClipLoss, AdamW, warmup + cosine schedule) on
batches from `fedpgp_ray.data.world.render_captioned_batch`: every class of the
world's universe, in the four pretraining styles, with several caption templates.
The "task" style is never shown. The fp16 state dict is saved, loaded back through the
project's factory (`load_clip`), and its zero-shot accuracy with "a photo of a {c}." is
reported per style (and on the base and novel halves of the task style). A checkpoint written
into `fedpgp_ray/clip/weights/` is registered in `shipped.json` as `fedpgp-tiny/fedpgp-world`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from tqdm import tqdm

from fedpgp_ray.clip.backbone import SHIPPED_WEIGHTS_FILE, WEIGHTS_DIR, FrozenClip, register_project_models, sha256_of
from fedpgp_ray.data import world

MODEL_NAME = "fedpgp-tiny"
TAG = "fedpgp-world"
ZERO_SHOT_TEMPLATE = "a photo of a {c}."
# The held-out zero-shot sample: the default task's class list, test stream of seed 0.
EVAL_CLASSES = 64
EVAL_SEED = 0


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, S, S, 3] -> normalised float [n, 3, S, S] (CLIP's ToTensor + Normalize, no resize)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_text_short(model: torch.nn.Module, tokens: torch.Tensor,
                      table: torch.Tensor | None = None, lookup: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's encode_text on tokens cut after the longest row's EOT (exact: the text tower is causal).

    With `table`/`lookup`, token embeddings come from `table[lookup[token]]` (the trainable rows
    of the words the captions use) instead of the full 49408-row embedding.
    """
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    if table is None:
        x = model.token_embedding(tokens[:, :length])
    else:
        rows = lookup[tokens[:, :length]]
        if bool((rows < 0).any()):
            raise ValueError("a caption uses a token outside the pretraining vocabulary (caption_token_ids)")
        x = table[rows]
    x = x + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot] @ model.text_projection
    return F.normalize(x, dim=-1)


@torch.inference_mode()
def zero_shot_accuracy(clip: FrozenClip, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str],
                       template: str = ZERO_SHOT_TEMPLATE, batch_size: int = 512) -> float:
    """Top-1 accuracy of zero-shot classification with one prompt template."""
    text = clip.encode_texts([template.format(c=c) for c in classnames])
    correct = 0
    for start in range(0, len(labels), batch_size):
        feats = clip.encode_images(images_to_tensor(images[start:start + batch_size]))
        pred = (feats @ text.T).argmax(dim=-1).cpu().numpy()
        correct += int((pred == labels[start:start + batch_size]).sum())
    return correct / max(len(labels), 1)


def zero_shot_report(clip: FrozenClip, num_classes: int = EVAL_CLASSES, per_class: int = 20,
                     seed: int = EVAL_SEED, size: int = 32) -> dict[str, float]:
    """Zero-shot accuracy per style on held-out test images, plus the base/novel halves of "task"."""
    classes = world.world_classes(num_classes)
    names = [k.name for k in classes]
    out: dict[str, float] = {}
    for style in world.STYLES:
        split = world.build_split(classes, per_class, [style], size, seed, world.STREAM_TEST)
        out[style] = zero_shot_accuracy(clip, split.images, split.labels, names)
        if style == "task":
            n_base = math.ceil(len(names) / 2)
            for part, keep in (("task_base", split.labels < n_base), ("task_novel", split.labels >= n_base)):
                offset = 0 if part == "task_base" else n_base
                sub = names[:n_base] if part == "task_base" else names[n_base:]
                out[part] = zero_shot_accuracy(clip, split.images[keep], split.labels[keep] - offset, sub)
    return out


def caption_token_ids(tokenizer) -> torch.Tensor:
    """Sorted ids of every token any pretraining caption can contain (CLIP's BPE works word by word)."""
    texts = [k.name for k in world.universe()]
    for pool in world.CAPTION_TEMPLATES.values():
        for template in pool:
            for size in ("small", "medium", "large"):
                texts += [template.format(c="circle", size=size, place=place)
                          for place in ("in the middle", "in a picture", "on its own", "in an image")]
    return torch.unique(tokenizer(texts))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "token_table" in name or "logit_scale" in name \
                or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_fp16(model: torch.nn.Module, path: Path) -> int:
    """Save the state dict as plain fp16 tensors (loadable with weights_only=True); returns bytes."""
    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().clone()
             for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path.stat().st_size


def register_shipped(path: Path) -> str | None:
    """Record `path` (inside the package's weights folder) as fedpgp-tiny/fedpgp-world in shipped.json."""
    path = path.resolve()
    if path.parent != WEIGHTS_DIR.resolve():
        return None
    entries = json.loads(SHIPPED_WEIGHTS_FILE.read_text()) if SHIPPED_WEIGHTS_FILE.is_file() else {}
    digest = sha256_of(path)
    entries[f"{MODEL_NAME}/{TAG}"] = {"file": path.name, "sha256": digest}
    SHIPPED_WEIGHTS_FILE.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return digest


def pretrain(seed: int = 0, steps: int = 2500, batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 0.1,
             warmup: int = 60, image_size: int = 32, threads: int = 2, progress: bool = True,
             log_every: int = 0, callback: Callable[[int, torch.nn.Module], None] | None = None
             ) -> torch.nn.Module:
    """Train fedpgp-tiny from scratch; returns the fp32 model in eval mode.

    callback(step, model) runs after every step (e.g. to save snapshots).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    register_project_models()
    model = open_clip.create_model(MODEL_NAME, pretrained=None, device="cpu")
    model.train()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    # Only the ~100 token rows the captions use are trained (as a small table, written back at
    # the end); the other rows of the 49408 x width embedding keep their initialisation. This
    # saves most of the backward pass and optimizer work of the embedding.
    used = caption_token_ids(tokenizer)
    lookup = torch.full((model.token_embedding.num_embeddings,), -1, dtype=torch.long)
    lookup[used] = torch.arange(len(used))
    model.token_embedding.weight.requires_grad_(False)
    table = torch.nn.Parameter(model.token_embedding.weight[used].clone())
    model.register_parameter("_caption_token_table", table)  # trained with the rest; removed below
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    rng = world.stream(seed, world.STREAM_PRETRAIN)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    bar = tqdm(range(steps), desc="pretrain fedpgp-tiny", disable=not progress, dynamic_ncols=True)
    ema = None
    for step in bar:
        images, captions, _ = world.render_captioned_batch(batch_size, image_size, rng)
        x = images_to_tensor(images)
        tokens = tokenizer(captions)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = encode_text_short(model, tokens, table, lookup)
        loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.set_postfix(loss=f"{ema:.3f}", scale=f"{model.logit_scale.detach().exp().item():.1f}")
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1} loss {ema:.4f}", flush=True)
        if callback is not None:
            callback(step + 1, _with_table(model, table, used))
    return _with_table(model, table, used).eval()


def _with_table(model: torch.nn.Module, table: torch.Tensor, used: torch.Tensor) -> torch.nn.Module:
    """The plain open_clip model: trained caption-token rows written into the full embedding."""
    with torch.no_grad():
        model.token_embedding.weight[used] = table.detach()
    if hasattr(model, "_caption_token_table"):
        del model._parameters["_caption_token_table"]
    return model
