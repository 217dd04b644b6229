"""Active-dormant heads in real models: per head and domain, sink mass vs the loss change on ablation.

Guo et al., "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena
in LLMs" (GuoTianYu2000/Active-Dormant-Attention), section 4. For head h and domain D (a set of
texts):
    sink_mass(h, D)  = mean over texts and queries i >= 1 of A_h[i, first real token]
    delta_zero(h, D) = loss(D | head h zeroed) - loss(D)
    delta_bos(h, D)  = loss(D | head h attends only to the first token) - loss(D)
The head is dormant on D when sink_mass >= tau_a (0.89) and max(|delta_zero|, |delta_bos|) <= tau_l;
active otherwise. Over domains: dormant (dormant on every domain), active (on none),
active-dormant (dormant on some, active on others). Published example: Llama-2-7B L16H25,
dormant on Wikipedia, active on GitHub. The toy-model side (Bigram-Backcopy) is in
`attnlab.analyses.bigram_backcopy`.

    res = head_domains(probe, ["prose", "code", "lists"])
    res.tables["heads"].status.value_counts()

attnlab's choices: loss = mean next-token cross-entropy over every real target token of the
domain's texts (each truncated to its first T tokens, BOS counted); query 0 is left out of the sink
mass (it can only see itself); tau_l = 0.005 nats by default (a parameter: the paper's figure
separates heads by eye). One forward per (head, ablation mode) over all domains at once (~1.5 s
for 3 x 4 texts of 64 tokens on 2 idle CPU cores). By default only the heads with sink mass >=
tau_a on some domain are ablated (the others are active by definition): on SmolLM2 that is 19 of
270 heads, 38 forwards instead of 540.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from attnlab.analyses import plots
from attnlab.analyses.base import Analysis, as_progress, register
from attnlab.analyses.result import Result
from attnlab.analyses.sinks import prepare
from attnlab.probe.ablations import MODES
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tasks.domains import load_domain
from attnlab.probe.tokens import Tokens


def _rows(tokens: Tokens, r: slice) -> Tokens:
    return Tokens(tokens.input_ids[r], tokens.attention_mask[r], tokens.strings[r], tokens.offsets[r],
                  tokens.texts[r] if tokens.texts else None, tokens.prepend_bos)


def token_losses(probe, tokens: Tokens) -> torch.Tensor:
    """[B, N-1] next-token cross-entropy at every position whose target is a real token (NaN
    elsewhere), on the fast path (so active head ablations apply)."""
    logits = probe.forward(tokens).logits.float()
    ids = tokens.input_ids.to(logits.device)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    valid = tokens.attention_mask[:, :-1].to(logits.device) & tokens.attention_mask[:, 1:].to(logits.device)
    return torch.where(valid, ce, torch.full_like(ce, float("nan"))).cpu()


def mean_sink_mass(sink_mass: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """sink_mass [B, L, H, N] (the capture's sink_mass(1)) -> [L, H]: mean over rows and over the
    real queries after the first token."""
    after_first = tokens.attention_mask.clone()
    after_first[torch.arange(tokens.batch_size), tokens.first_real()] = False
    x = sink_mass.masked_fill(~after_first[:, None, None, :], float("nan"))
    return torch.nanmean(x.permute(1, 2, 0, 3).reshape(x.shape[1], x.shape[2], -1).double(), dim=-1).float()


def classify(table: pd.DataFrame, tau_a: float = 0.89, tau_l: float = 0.005) -> tuple[pd.DataFrame, pd.DataFrame]:
    """table: layer, head, domain, sink_mass, delta_zero and/or delta_bos -> (table + `dormant`,
    per-head table: layer, head, status, n_dormant, dormant_on)."""
    t = table.copy()
    deltas = [c for c in ("delta_zero", "delta_bos") if c in t]
    t["max_abs_delta"] = t[deltas].abs().max(axis=1)
    t["dormant"] = (t.sink_mass >= tau_a) & (t.max_abs_delta <= tau_l)
    n_dom = t.domain.nunique()
    rows = []
    for (layer, head), g in t.groupby(["layer", "head"]):
        nd = int(g.dormant.sum())
        status = "dormant" if nd == n_dom else "active" if nd == 0 else "active-dormant"
        rows.append({"layer": layer, "head": head, "status": status, "n_dormant": nd,
                     "dormant_on": ",".join(g.domain[g.dormant]), "active_on": ",".join(g.domain[~g.dormant]),
                     "score": float(g.sink_mass.mean())})
    heads = pd.DataFrame(rows)
    t = t.merge(heads[["layer", "head", "status"]], on=["layer", "head"])
    return t, heads


def head_domains(
    probe,
    domains: Sequence[str] | Mapping[str, Sequence[str]] = ("prose", "code", "lists"),
    *,
    T: int | None = 64,
    n_texts: int | None = None,
    prepend_bos: bool = True,
    modes: Sequence[str] = MODES,
    tau_a: float = 0.89,
    tau_l: float = 0.005,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    ablate: str = "candidates",
    progress=None,
) -> Result:
    """The head x domain dormancy table (see the module docstring).

    domains: names of shipped domains or {name: texts}. n_texts: use only the first n texts of each.
    ablate: "candidates" (default) ablates only the heads with sink mass >= tau_a on some domain
    (the others are active by definition; their deltas are NaN), "all" ablates every head.
    Tables: `heads_domains` (layer, head, kv_head, domain, sink_mass, delta_zero, delta_bos, score =
    sink_mass, dormant, status), `heads` (layer, head, status, n_dormant, dormant_on, active_on,
    score = mean sink mass), `base_loss` (domain, loss). progress (`attnlab.probe.progress`): ablations
    done of (heads measured x modes)."""
    named = dict(domains) if isinstance(domains, Mapping) else {d: load_domain(d) for d in domains}
    named = {k: list(v)[:n_texts] if n_texts else list(v) for k, v in named.items()}
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise AttnlabError(f"unknown ablation modes {bad}: choose from {', '.join(MODES)}")
    if ablate not in ("candidates", "all"):
        raise AttnlabError(f"ablate must be 'candidates' or 'all', got {ablate!r}")
    # All domains in one batch (one forward per ablation); rows[d] = the batch rows of domain d.
    tokens = prepare(probe, [t for texts in named.values() for t in texts], T, prepend_bos)
    bounds = np.cumsum([0] + [len(v) for v in named.values()])
    rows_of = {d: slice(int(a), int(b)) for d, a, b in zip(named, bounds[:-1], bounds[1:])}
    layer_list = list(range(probe.info.n_layers)) if layers is None else sorted(layers)
    head_list = list(range(probe.info.n_heads)) if heads is None else sorted(heads)

    def domain_losses() -> dict[str, float]:
        ce = token_losses(probe, tokens).double()
        return {d: torch.nanmean(ce[r]).item() for d, r in rows_of.items()}

    cap = probe.capture(tokens, stats=["sink_mass(1)"], layers=layer_list, heads=head_list)
    sink = {d: mean_sink_mass(cap["sink_mass"][r], _rows(tokens, r)) for d, r in rows_of.items()}  # [L', H']
    base = domain_losses()

    # A head whose sink mass is below tau_a on every domain is active whatever its loss change:
    # with ablate="candidates" only the others are ablated (their deltas are NaN otherwise).
    sink_max = torch.stack(list(sink.values())).amax(dim=0)  # [L', H']
    measured = {(l, h) for li, l in enumerate(layer_list) for hi, h in enumerate(head_list)
                if ablate == "all" or sink_max[li, hi] >= tau_a}
    rows, total, done = [], len(measured) * len(modes), 0
    report = as_progress(progress, "dormant heads", unit="ablation")
    if report is not None:
        report(0, total)
    for li, layer in enumerate(layer_list):
        for hi, head in enumerate(head_list):
            deltas = {d: {m: float("nan") for m in modes} for d in named}
            for mode in modes if (layer, head) in measured else ():
                with probe.ablate([(layer, head)], mode=mode):
                    losses = domain_losses()
                for d in named:
                    deltas[d][mode] = losses[d] - base[d]
                done += 1
                if report is not None:
                    report(done, total)
            for d in named:
                row = {"layer": layer, "head": head, "kv_head": probe.info.kv_head(head), "domain": d,
                       "sink_mass": float(sink[d][li, hi])}
                row.update({f"delta_{m}": deltas[d][m] for m in modes})
                rows.append(row)
    table = pd.DataFrame(rows)
    table["score"] = table.sink_mass
    table, head_table = classify(table, tau_a, tau_l)
    counts = head_table.status.value_counts().to_dict()
    res = Result(
        analysis="active_dormant",
        tables={"heads_domains": table, "heads": head_table,
                "base_loss": pd.DataFrame({"domain": list(base), "loss": list(base.values())})},
        params={"model": probe.name, "domains": list(named), "T": T, "n_texts": n_texts, "modes": list(modes),
                "tau_a": tau_a, "tau_l": tau_l, "layers": layer_list, "heads": head_list, "ablate": ablate,
                "n_ablated_heads": len(measured)},
        prepend_bos=prepend_bos,
    )
    res.figures = figures(res)
    per_domain = table.groupby("domain").dormant.sum().to_dict()
    res.summary = (f"{len(head_table)} heads: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                   + "; dormant per domain: " + ", ".join(f"{k} {int(v)}" for k, v in per_domain.items())
                   + f" (tau_a {tau_a}, tau_l {tau_l})")
    return res


def figures(res: Result) -> dict:
    """The figures from the result's tables (a run read back from disk gets them too)."""
    table, head_table = res.tables["heads_domains"], res.tables["heads"]
    return {
        "dormancy_scatter": plots.dormancy_scatter(table, x="sink_mass", y="max_abs_delta"),
        "status_counts": plots.class_counts(table.assign(status=table.dormant.map({True: "dormant", False: "active"}))),
        "status_map": plots.head_heatmap(head_table.assign(code=head_table.status.map(
            {"active": 0.0, "active-dormant": 0.5, "dormant": 1.0})), value="code",
            title="0 active, 0.5 active-dormant, 1 dormant", zmin=0, zmax=1),
    }


# ----- the analysis contract (`attnlab.analyses.ANALYSES`) -----
@dataclass(frozen=True)
class ActiveDormantParams:
    """Guo et al.'s tau_a; tau_l is attnlab's (module docstring)."""
    domains: tuple[str, ...] = field(default=("prose", "code", "lists"), metadata={
        "help": "shipped domains, comma-separated"})
    T: int | None = field(default=64, metadata={"range": (2, 4096), "help": "tokens per text (BOS counted)"})
    n_texts: int | None = field(default=None, metadata={"range": (1, 10_000), "help": "texts per domain (none: all)"})
    tau_a: float = field(default=0.89, metadata={"range": (0.0, 1.0)})
    tau_l: float = field(default=0.005, metadata={"range": (0.0, 100.0)})
    ablate: str = field(default="candidates", metadata={"choices": ("candidates", "all")})


register(Analysis(
    "active_dormant", "Active-dormant heads",
    "A head is dormant on a domain when it parks its attention on the first token and removing it barely "
    "changes the loss, and active-dormant when it is dormant on one domain and active on another. Guo et al., "
    "<i>Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs</i> (2024).",
    ActiveDormantParams,
    lambda probe, inputs, p, progress: head_domains(probe, p.domains, T=p.T, n_texts=p.n_texts, tau_a=p.tau_a,
                                                    tau_l=p.tau_l, ablate=p.ablate, progress=progress),
    cpu_minutes=0.5, needs=("statistics: sink_mass", "causal LM (loss)", "head ablations"), figures_of=figures,
    unit="head ablation",
))

__all__ = ["ActiveDormantParams", "classify", "figures", "head_domains", "mean_sink_mass", "token_losses"]
