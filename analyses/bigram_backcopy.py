"""Bigram-Backcopy toy models: training, the dormancy probe, and the extreme-token dynamics.

Guo et al., "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena
in LLMs" (GuoTianYu2000/Active-Dormant-Attention), sections 2-3. Small transformers trained on the
Bigram-Backcopy task (`attnlab.probe.tasks.BigramBackcopy`) develop an attention sink on BOS:
    dormant on token i  <=>  A[i, BOS] >= 0.89  (from the last position of [BOS, ..., x_i]);
expected: dormant on non-triggers (the bigram needs only x_i itself), active on triggers (the
head attends to the previous token, which is the one to copy). Over training, the BOS attention
logit grows (~log steps) while the BOS value norm shrinks (mutual reinforcement); ReLU attention
and SGD largely remove both.

    res = train_variants(ToyConfig(), TrainConfig())   # softmax+AdamW, relu+AdamW, softmax+SGD
    res.tables["dormancy"]; res.figures["dynamics"]

Model (as in the paper): pre-LayerNorm, learned absolute positions, `n_heads` heads (1), ReLU
FFN of width 4 d, no biases anywhere. ReLU attention (attnlab's reading of the paper's variant):
A[i, j] = ReLU(q_i . k_j / sqrt(d_h)) / (i + 1), causal (normalised by the number of visible keys,
as in ReLU-attention vision transformers), so nothing forces the row to sum to 1.

CPU defaults (`ToyConfig()`, `TrainConfig()`): width 64, sequences of 32, batch 64, 10,000 steps
(the paper's count), AdamW lr 3e-3, 2.5-6 min per variant on one CPU core. Measured with them (seeds 0
and 1, AMD EPYC, AVX2): the softmax head is dormant on 97% / 98% of non-trigger positions (BOS
attention 0.97 / 0.99), attends to the previous token on triggers (0.94 / 0.97, BOS 0.00), excess loss
0.006 / 0.005 nats; the BOS value norm falls to 0.11 / 0.13 of the others' and the BOS logit gap grows
from ~4 in the first 500 steps to 13 / 36. The sink needs the steps, and when it completes depends on
the seed and on the CPU's float kernels: at 6,000 steps the same seeds gave 44% / 77% dormant on this
CPU (BOS attention 0.75 / 0.90), 95% for seed 0 on an earlier machine; after 500 steps the head already
copies on triggers but only 4-13% of non-triggers are dormant. The paper's settings (width 256, 256 tokens, batch 512, 10k steps, lr 3e-4):
`ToyConfig.paper()`, `TrainConfig.paper()`. The probe is read on sampled BB sequences: every
position i >= 1 is one probe [BOS, x_1..x_i], classified by whether x_i is a trigger.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlab.analyses import plots
from attnlab.analyses.base import Analysis, register, track
from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tasks.bigram_backcopy import BigramBackcopy

DORMANT_THRESHOLD = 0.89


@dataclass(frozen=True)
class ToyConfig:
    """Shape of a Bigram-Backcopy toy transformer (defaults CPU-sized; `paper()` for section 2's d_model 256,
    seq_len 256)."""

    d_model: int = 64
    n_layers: int = 1
    n_heads: int = 1
    seq_len: int = 32  # tokens after BOS
    attention: str = "softmax"  # or "relu"

    @classmethod
    def paper(cls, **kw) -> ToyConfig:
        """The paper's model (d_model 256, seq_len 256); keyword arguments override."""
        return cls(**{"d_model": 256, "seq_len": 256, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """How a toy model trains: steps, batch, optimizer (AdamW or SGD), learning rate, seed, and how many log-spaced
    steps record the dynamics."""

    steps: int = 10_000  # 6,000 left the sink half-formed on some CPUs (module docstring)
    batch: int = 64
    optimizer: str = "adamw"  # or "sgd"
    lr: float | None = None  # None: 3e-3 for AdamW (paper 3e-4), 0.03 for SGD (paper)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    seed: int = 0
    log_points: int = 20  # log-spaced steps at which the dynamics are recorded

    @classmethod
    def paper(cls, **kw) -> TrainConfig:
        """The paper's training (10,000 steps, batch 512, AdamW lr 3e-4 or SGD lr 0.03); keyword arguments override."""
        return cls(**{"steps": 10_000, "batch": 512, "lr": None if kw.get("optimizer") == "sgd" else 3e-4, **kw})

    def learning_rate(self) -> float:
        """`lr`, or when None the default of the optimizer: 0.03 for SGD, 3e-3 for AdamW."""
        return self.lr if self.lr is not None else (0.03 if self.optimizer == "sgd" else 3e-3)


# ----- the model -----
class Attention(nn.Module):
    """Causal multi-head attention, softmax or ReLU (ReLU scores divided by the query's number of visible keys)."""

    def __init__(self, d: int, n_heads: int, kind: str):
        super().__init__()
        if kind not in ("softmax", "relu"):
            raise AttnlabError(f"attention must be 'softmax' or 'relu', got {kind!r}")
        self.h, self.dh, self.kind = n_heads, d // n_heads, kind
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        """x [B, N, d] -> [B, N, d]; `record` (a dict) collects scores and pattern [B, H, N, N] and
        value_norm [B, H, N] (||v_j W_O^h||)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)  # [B, H, N, dh] each
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dh)  # [B, H, N, N]
        causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        if self.kind == "softmax":
            a = s.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        else:
            a = F.relu(s) * causal / torch.arange(1, N + 1, device=x.device, dtype=x.dtype)[:, None]
        z = a @ v  # [B, H, N, dh]
        if record is not None:
            W_O = self.o.weight.view(D, self.h, self.dh).permute(1, 2, 0)  # [H, dh, D]
            record.setdefault("scores", []).append(s.detach())
            record.setdefault("pattern", []).append(a.detach())
            record.setdefault("value_norm", []).append(torch.einsum("bhnd,hdm->bhnm", v, W_O).norm(dim=-1).detach())
        return self.o(z.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a ReLU MLP (4 d), each on a residual branch."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.attn = Attention(d, cfg.n_heads, cfg.attention)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.ReLU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x, record=None):
        """x [B, N, d] -> [B, N, d]; `record` also collects resid_norm [B, N] (the block's output norms)."""
        x = x + self.attn(self.ln1(x), record)
        x = x + self.ffn(self.ln2(x))
        if record is not None:
            record.setdefault("resid_norm", []).append(x.norm(dim=-1).detach())
        return x


class ToyTransformer(nn.Module):
    """The toy model: token and learned position embeddings, `n_layers` blocks, a final norm and an unembedding
    (weights N(0, 0.02))."""

    def __init__(self, cfg: ToyConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len + 1, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.unembed = nn.Linear(cfg.d_model, vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        """x [B, N] -> logits [B, N, V]; `record` (a dict) collects per layer scores/pattern
        [B, H, N, N], value_norm [B, H, N] (||v_i W_O^h||) and resid_norm [B, N]."""
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h, record)
        return self.unembed(self.ln_f(h))


# ----- probes -----
def dormancy(model: ToyTransformer, task: BigramBackcopy, batch: int = 64, seed: int = 1234,
             threshold: float = DORMANT_THRESHOLD) -> pd.DataFrame:
    """Per layer and head: the share of non-trigger / trigger positions where the head is dormant
    (A[i, BOS] >= threshold), the mean BOS attention on each, and on triggers the mean attention to
    the previous token and the share where it is the argmax key."""
    x = task.sample(batch, torch.Generator().manual_seed(seed), seq_len=model.cfg.seq_len)
    rec: dict = {}
    with torch.no_grad():
        logits = model(x, rec)
    trig = task.is_trigger[x]
    trig[:, 0] = False
    pos = torch.arange(1, x.shape[1])
    excess = task.excess_loss(logits, x)
    rows = []
    for layer, pattern in enumerate(rec["pattern"]):
        for head in range(pattern.shape[1]):
            a = pattern[:, head]  # [B, N, N]
            bos = a[:, 1:, 0]
            prev = a[:, pos, pos - 1]
            self_ = a[:, pos, pos]
            top = a[:, 1:].argmax(dim=-1) == (pos - 1)
            t, nt = trig[:, 1:], ~trig[:, 1:]
            rows.append({
                "layer": layer, "head": head,
                "dormant_nontrigger": float((bos[nt] >= threshold).float().mean()),
                "dormant_trigger": float((bos[t] >= threshold).float().mean()),
                "bos_attn_nontrigger": float(bos[nt].mean()), "bos_attn_trigger": float(bos[t].mean()),
                "prev_attn_trigger": float(prev[t].mean()), "prev_is_top_trigger": float(top[t].float().mean()),
                "prev_attn_nontrigger": float(prev[nt].mean()), "self_attn_nontrigger": float(self_[nt].mean()),
                "score": float((bos[nt] >= threshold).float().mean()),
                "excess": excess["excess"], "excess_backcopy": excess["backcopy"], "excess_bigram": excess["bigram"],
            })
    return pd.DataFrame(rows)


def dynamics(model: ToyTransformer, task: BigramBackcopy, x: torch.Tensor) -> dict[str, float]:
    """The extreme-token statistics of the last layer's head 0 on a fixed batch x: the BOS
    attention logit minus the mean logit of the other visible keys (non-trigger queries), the BOS
    attention there, the BOS value-output norm over the mean of the others, the BOS residual norm
    over the mean of the others."""
    rec: dict = {}
    with torch.no_grad():
        logits = model(x, rec)
    s, a = rec["scores"][-1][:, 0], rec["pattern"][-1][:, 0]  # [B, N, N]
    N = x.shape[1]
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    causal[:, 0] = False
    others = (s * causal).sum(-1) / causal.sum(-1).clamp_min(1)  # [B, N]
    nt = ~task.is_trigger[x]
    nt[:, 0] = False
    vn, rn = rec["value_norm"][-1][:, 0], rec["resid_norm"][-1]
    ex = task.excess_loss(logits, x)
    return {
        "bos_logit_gap": float((s[:, :, 0] - others)[nt].mean()),
        "bos_attention": float(a[:, :, 0][nt].mean()),
        "dormant_share": float((a[:, :, 0][nt] >= DORMANT_THRESHOLD).float().mean()),
        "bos_value_norm": float(vn[:, 0].mean()), "value_norm_ratio": float(vn[:, 0].mean() / vn[:, 1:].mean()),
        "bos_resid_norm": float(rn[:, 0].mean()), "resid_norm_ratio": float(rn[:, 0].mean() / rn[:, 1:].mean()),
        "excess": ex["excess"], "excess_backcopy": ex["backcopy"], "excess_bigram": ex["bigram"], "loss": ex["loss"],
    }


# ----- training -----
def train(cfg: ToyConfig, train_cfg: TrainConfig, task: BigramBackcopy | None = None
          ) -> tuple[ToyTransformer, pd.DataFrame]:
    """Train one toy model on BB; returns the model and its history (step + `dynamics` columns)."""
    task = task or BigramBackcopy()
    torch.manual_seed(train_cfg.seed)
    gen = torch.Generator().manual_seed(train_cfg.seed)
    model = ToyTransformer(cfg, task.vocab_size)
    lr = train_cfg.learning_rate()
    if train_cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=train_cfg.weight_decay)
    elif train_cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=train_cfg.momentum,
                              weight_decay=train_cfg.weight_decay)
    else:
        raise AttnlabError(f"optimizer must be 'adamw' or 'sgd', got {train_cfg.optimizer!r}")
    log_at = set(np.unique(np.geomspace(1, train_cfg.steps, train_cfg.log_points).astype(int)).tolist()) | {0}
    probe_x = task.sample(64, torch.Generator().manual_seed(99), seq_len=cfg.seq_len)
    history = []
    for step in range(train_cfg.steps + 1):
        if step in log_at:
            model.eval()
            history.append({"step": step, **dynamics(model, task, probe_x)})
            model.train()
        if step == train_cfg.steps:
            break
        x = task.sample(train_cfg.batch, gen, seq_len=cfg.seq_len)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, pd.DataFrame(history)


VARIANTS = {
    "softmax-adamw": ({"attention": "softmax"}, {"optimizer": "adamw"}),
    "relu-adamw": ({"attention": "relu"}, {"optimizer": "adamw"}),
    "softmax-sgd": ({"attention": "softmax"}, {"optimizer": "sgd"}),
}


def train_variants(cfg: ToyConfig = ToyConfig(), train_cfg: TrainConfig = TrainConfig(),
                   variants=tuple(VARIANTS), task: BigramBackcopy | None = None,
                   progress=None) -> Result:
    """Train each variant (softmax/ReLU attention x AdamW/SGD) and probe it.

    Tables: `history` (variant, step, bos_logit_gap, bos_attention, bos_value_norm, ...),
    `dormancy` (variant, layer, head, dormant_nontrigger, prev_attn_trigger, ..., score =
    dormant_nontrigger). progress (`attnlab.probe.progress`): variants trained."""
    task = task or BigramBackcopy(seq_len=cfg.seq_len)
    hist, dorm, models, seconds = [], [], {}, {}
    variants = tuple(variants)
    for name in variants:
        if name not in VARIANTS:
            raise AttnlabError(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
    for name in track(variants, progress, desc="bigram backcopy variants", unit="variant"):
        mk, tk = VARIANTS[name]
        started = time.perf_counter()
        model, h = train(replace(cfg, **mk), replace(train_cfg, **tk), task)
        seconds[name] = round(time.perf_counter() - started, 2)
        models[name] = model
        hist.append(h.assign(variant=name))
        dorm.append(dormancy(model, task).assign(variant=name))
    history, dormant = pd.concat(hist, ignore_index=True), pd.concat(dorm, ignore_index=True)
    dormant = dormant[["variant"] + [c for c in dormant.columns if c != "variant"]]
    res = Result(
        analysis="bigram_backcopy", tables={"history": history, "dormancy": dormant},
        params={"model": f"bb-toy-{cfg.n_layers}L-{cfg.d_model}d", "toy": asdict(cfg), "train": asdict(train_cfg),
                "variants": list(variants),
                "triggers": [task.chars[t] for t in task.triggers], "threshold": DORMANT_THRESHOLD},
        timings={"train_seconds": seconds},
    )
    res.models = models  # the trained modules (not saved with the run)
    res.figures = figures(res)
    d0 = dormant[(dormant.layer == dormant.layer.max()) & (dormant["head"] == 0)]
    res.summary = "; ".join(
        f"{r.variant}: dormant on {100 * r.dormant_nontrigger:.0f}% of non-triggers, prev-token attention "
        f"{r.prev_attn_trigger:.2f} on triggers, excess loss {r.excess:.3f}" for r in d0.itertuples())
    return res


def figures(res: Result) -> dict:
    """The training-dynamics figures from the `history` table (a run read back from disk gets them too)."""
    history = res.tables["history"]
    return {
        "dynamics": plots.training_curves(history, ["bos_logit_gap", "bos_value_norm", "resid_norm_ratio"]),
        "excess": plots.training_curves(history, ["excess"]),
    }


# ----- the analysis contract (`attnlab.analyses.ANALYSES`) -----
@dataclass(frozen=True)
class BigramBackcopyParams:
    """The CPU defaults of `ToyConfig()` and `TrainConfig()` (the paper's: `ToyConfig.paper()`, `TrainConfig.paper()`)."""
    d_model: int = field(default=ToyConfig.d_model, metadata={"range": (4, 4096)})
    seq_len: int = field(default=ToyConfig.seq_len, metadata={"range": (4, 4096), "help": "tokens after BOS"})
    steps: int = field(default=TrainConfig.steps, metadata={"range": (1, 10**7)})
    batch: int = field(default=TrainConfig.batch, metadata={"range": (1, 1 << 16)})
    seed: int = field(default=TrainConfig.seed, metadata={"range": (0, 2**31 - 1)})
    variants: tuple[str, ...] = field(default=tuple(VARIANTS), metadata={"help": ", ".join(VARIANTS)})


def _run(probe, inputs, p: BigramBackcopyParams, progress) -> Result:
    # Trains its own toy models (softmax/ReLU attention x AdamW/SGD): the probe is not used.
    return train_variants(ToyConfig(d_model=p.d_model, seq_len=p.seq_len),
                          TrainConfig(steps=p.steps, batch=p.batch, seed=p.seed), tuple(p.variants), progress=progress)


register(Analysis(
    "bigram_backcopy", "Bigram-Backcopy toy models: how a sink forms",
    "One-layer transformers trained on the Bigram-Backcopy task park attention on BOS for tokens that need "
    "no context (dormant) and copy the previous token after triggers (active), while the BOS attention logit "
    "grows and its value norm shrinks; ReLU attention or SGD largely remove the sink. Guo et al., "
    "<i>Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs</i> (2024), "
    "sections 2-3.",
    BigramBackcopyParams, _run, cpu_minutes=8, needs=("nothing: trains its own toy models (the model is unused)",),
    figures_of=figures, top_table="dormancy", unit="variant trained",
))
