"""Planted circuits: a small attention-only transformer trained on induction, whose circuit is known by
construction, so the precision and recall of circuit discovery are exact (METHODS.md section 5, ground
truth (b); O'Neill & Bui evaluate on compiled Tracr models for the same reason).

Induction (Olsson et al. 2022, "In-context Learning and Induction Heads"): after "... A B ... A" predict
B. A two-layer attention-only model does it with a previous-token head in layer 0 (at B's position it
writes "my previous token is A") feeding, by K-composition, an induction head in layer 1 (from the second
A it attends to the position whose previous token is A, and copies B). One layer cannot do it.

The model is a Hugging Face Llama (RoPE, RMSNorm) with `n_layers` x `n_heads` heads and its MLPs
switched off (down_proj zero and frozen: the blocks are attention-only), so `probe`, the head-output
hooks and activation patching run on it unchanged. By construction:
- the previous-token head's attention is planted: its query and key weights are set and frozen so that,
  through RoPE, key j scores sum_p cos(theta_p (i - j - 1)) for query i (a peak at j = i - 1, ~9 logits
  above any other offset). They read coordinate 0 of the (frozen) token embeddings, which is 1 for every
  token: a content-free direction. Its value/output weights train, except that its value does not read
  coordinate 0: it writes the previous token, not a constant shared by every position;
- the induction head in layer 1 is the only other head that trains;
- every other head is a distractor: its query and key weights are zero and frozen, so it attends
  uniformly to the context (it can find neither the previous token nor a matching one), and its value
  and output weights stay at the random initialisation (std `distractor_std`, HF's 0.02): an
  input-dependent but uninformed output;
- the unembedding and the norms after layer 0 train; the token embeddings are frozen random codes.
So the only route to induction is the planted pair: the circuit is {prev_token_head, induction_head}
with the edge prev -> induction. Training is checked, not assumed: `roles` measures every head's
previous-token and induction attention and its attention on BOS where nothing matches (seed 0: 0.97 on
the previous-token head, 0.92 and 0.93 on the induction head; 0.11, 0.06 and 0.17 on the distractors,
whose attention is uniform).

Training data: BOS + 24 tokens drawn from 62 letters and digits, in which a random segment of 4-12
tokens is repeated right after itself. The first `induction_steps` train on the repeat's predictable
targets only (the circuit forms within ~500 steps); the rest add the mean next-token loss and a no-op
cost, `no_op_cost` (beta) times the induction head's mean squared output (after W_O) at the positions
whose next token is not predictable. Evaluation pairs are `probe.tasks.circuits.induction_pairs` over
the same letters.

Why the no-op cost. Real induction heads attend to BOS when nothing matches, and BOS's value is small
(an attention sink used as a no-op). Trained on the next-token loss alone, this attention-only model
learns something else: it cannot otherwise make flat predictions on the random tokens, so its induction
head attends to BOS and writes a *large* constant there (norm ~27, against ~10 when it copies; zeroing
it raises the loss on unpredictable tokens from 4.56 to 5.23 nats), using the final RMSNorm to damp the
logits. That constant then dominates the head's mean over positions, positives and negatives get the
same SAE code, and the paper's mean pooling misses the induction head (node ROC AUC 0.53-0.59). With the
no-op cost the head still parks on BOS but writes ~0.2 there (~1 when it copies), so its mean over
positions is what it copied: negatives share a few codes, positives get many of their own. The
previous-token head's value reads the token code only because, when it could also read coordinate 0,
the no-op cost made it grow a constant part that hid its token-dependent part from mean pooling in two
training seeds of three. `PlantedConfig(prev_value_reads_constant=True)` with `TrainConfig(no_op_cost=0)`
is the model before both changes; docs/sae_circuits.md has the numbers of every variant.

What the SAE sees (docs/sae_circuits.md): the paper's mean pooling ranks both planted heads first
(node ROC AUC 1.00, std 0 over 5 SAE seeds, on training seeds 0, 1 and 2); last-position pooling finds
the induction head and misses the previous-token head (which acts at every position alike); activation
patching finds both. A node score counts codes seen only on positives, so a head whose outputs are
varied gets some by chance: with the positive/negative labels shuffled the induction head still scores
about half its score and the previous-token head 70-80% of it. The induction head is found by its
role (what it does differs on positives) as well as its activity; the previous-token head, which does
the same thing on positives and negatives, mostly by its activity (the distractors write little).

    planted = train_planted()
    res = evaluate_planted(planted)           # SAE (5 seeds, mean pooling) and patching vs the planted circuit
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import stage, track
from attnlab.probe.threads import torch_threads

ALPHANUMERIC = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class PlantedConfig:
    """The planted-circuit model: shape, which heads are the previous-token and induction heads, the distractors'
    weight std, and the token alphabet."""

    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    seq_len: int = 24  # training tokens after BOS
    prev_token_head: tuple[int, int] = (0, 1)
    induction_head: tuple[int, int] = (1, 2)
    distractor_std: float = 0.02
    alphabet: str = ALPHANUMERIC
    prev_value_reads_constant: bool = False  # True: its value also reads coordinate 0 (the model before the fix)

    @property
    def circuit(self) -> list[tuple[int, int]]:
        """The ground-truth circuit: [previous-token head, induction head] as (layer, head)."""
        return [self.prev_token_head, self.induction_head]

    @property
    def edges(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """The ground-truth edge: previous-token head -> induction head."""
        return [(self.prev_token_head, self.induction_head)]

    def vocab(self, tokenizer) -> list[int]:
        """Token ids of the alphabet's characters under `tokenizer`."""
        return [tokenizer.convert_tokens_to_ids(ch) for ch in self.alphabet]


@dataclass(frozen=True)
class TrainConfig:
    """How the planted model trains: steps, batch, lr, seed, the induction-only warm-up steps and the no-op cost
    beta."""

    steps: int = 2000
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0
    induction_steps: int = 800  # the first steps train on the repeat's predictable targets only
    no_op_cost: float = 1.0  # after them: beta * the induction head's mean squared output where nothing is predictable


@dataclass
class PlantedModel:
    """A trained planted model: its probe, configs, training history (per logged step) and `roles` table, and
    training time in seconds."""

    probe: object  # attnlab.probe.Probe over the trained model
    config: PlantedConfig
    train: TrainConfig
    history: pd.DataFrame
    roles: pd.DataFrame
    seconds: float


def _check(cfg: PlantedConfig) -> None:
    if cfg.n_layers < 2 or cfg.d_model % cfg.n_heads:
        raise AttnlabError("a planted induction model needs at least 2 layers and d_model divisible by n_heads")
    (l0, h0), (l1, h1) = cfg.prev_token_head, cfg.induction_head
    if not (l0 < l1 < cfg.n_layers and 0 <= h0 < cfg.n_heads and 0 <= h1 < cfg.n_heads):
        raise AttnlabError(f"prev_token_head {cfg.prev_token_head} must sit in an earlier layer than induction_head "
                           f"{cfg.induction_head}, both inside {cfg.n_layers} layers x {cfg.n_heads} heads")
    if not 8 <= cfg.seq_len <= 120 or len(set(cfg.alphabet)) < 20 or any(ord(c) > 126 for c in cfg.alphabet):
        raise AttnlabError("seq_len must be 8-120 and the alphabet at least 20 distinct ASCII characters")


def build_model(cfg: PlantedConfig = PlantedConfig(), seed: int = 0):
    """The untrained planted model: a Llama with MLPs off, planted heads free, distractors frozen."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attnlab.probe import fast_path
    from attnlab.probe.registry import BYTE_VOCAB

    _check(cfg)
    fast_path.register()
    dh = cfg.d_model // cfg.n_heads
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=cfg.d_model, intermediate_size=1, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, head_dim=dh,
        max_position_embeddings=256, initializer_range=cfg.distractor_std, bos_token_id=256, eos_token_id=257,
        pad_token_id=258, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=fast_path.ATTN_IMPLEMENTATION)
    with torch.no_grad():
        # Frozen embeddings: coordinate 0 is 1 for every token (a content-free direction that gives the
        # planted previous-token head position-only queries and keys), the rest a random token code.
        emb = model.model.embed_tokens.weight
        emb.normal_(0, (cfg.d_model - 1) ** -0.5)
        emb[:, 0] = 1.0
    emb.requires_grad_(False)
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    planted = {cfg.prev_token_head, cfg.induction_head}
    for layer, block in enumerate(model.model.layers):
        with torch.no_grad():
            block.mlp.down_proj.weight.zero_()  # the MLP adds exactly 0: an attention-only block
        for p in block.mlp.parameters():
            p.requires_grad_(False)
        attn = block.self_attn
        for name, lin in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj)):
            free = torch.zeros_like(lin.weight)  # 1 where the weight trains
            for head in range(cfg.n_heads):
                if (layer, head) == cfg.prev_token_head and name in "qk":
                    with torch.no_grad():
                        _head_part(lin.weight, name, head, dh).copy_(_previous_token_qk(model, dh, name))
                elif (layer, head) in planted:
                    _head_part(free, name, head, dh).fill_(1)
                    if (layer, head) == cfg.prev_token_head and name == "v" and not cfg.prev_value_reads_constant:
                        # its value reads the token code, not the content-free coordinate 0: what it
                        # writes is the previous token, with no constant part shared by every position
                        _head_part(free, name, head, dh)[:, 0] = 0
                        with torch.no_grad():
                            _head_part(lin.weight, name, head, dh)[:, 0] = 0
                elif name in "qk":
                    with torch.no_grad():  # uniform attention: no previous-token or match lookup
                        _head_part(lin.weight, name, head, dh).zero_()
            lin.weight.register_hook(lambda g, free=free: g * free)
    return model


def _head_part(weight: torch.Tensor, name: str, head: int, dh: int) -> torch.Tensor:
    """A head's slice (a view) of a projection weight: rows of q/k/v_proj, columns of o_proj."""
    cols = slice(head * dh, (head + 1) * dh)
    return weight[:, cols] if name == "o" else weight[cols]


PREV_TOKEN_SCALE = 1.5


def _previous_token_qk(model, dh: int, name: str) -> torch.Tensor:
    """[dh, d_model] query or key weights that read coordinate 0 (the same for every token) and, through
    RoPE, score key j for query i as sum_p cos(theta_p (i - j - 1)) over the 4 fastest rotary planes: a
    peak at j = i - 1, ~9 logits above every other offset."""
    theta = model.model.rotary_emb.inv_freq.float()[:4]
    vec = torch.zeros(dh)
    half = dh // 2
    if name == "q":  # z_q = exp(-i theta): cos(theta (i - j) - theta) after rotation
        vec[:len(theta)], vec[half:half + len(theta)] = torch.cos(theta), -torch.sin(theta)
    else:
        vec[:len(theta)] = 1.0
    out = torch.zeros(dh, model.config.hidden_size)
    out[:, 0] = PREV_TOKEN_SCALE * vec
    return out


def training_batch(cfg: PlantedConfig, vocab: torch.Tensor, batch: int, bos: int, g: torch.Generator):
    """[batch, 1 + seq_len] ids (BOS, random tokens with one segment repeated right after itself) and a
    [batch, seq_len] mask of the targets the repeat makes predictable."""
    T = cfg.seq_len
    x = vocab[torch.randint(len(vocab), (batch, T), generator=g)]
    predictable = torch.zeros(batch, T, dtype=torch.bool)
    for b in range(batch):
        n = int(torch.randint(4, T // 2 + 1, (1,), generator=g))
        a = int(torch.randint(0, T - 2 * n + 1, (1,), generator=g))
        x[b, a + n:a + 2 * n] = x[b, a:a + n]
        predictable[b, a + n + 1:a + 2 * n] = True  # x[j] for j in the copy, after its first token
    return torch.cat([torch.full((batch, 1), bos), x], 1), predictable


def train_planted(cfg: PlantedConfig = PlantedConfig(), train: TrainConfig = TrainConfig(),
                  progress=True, threads: int | None = 1) -> PlantedModel:
    """Train the planted model on induction and measure every head's role. threads: torch threads while
    training (a width-64 model gains nothing from more; None leaves the setting alone). progress
    (`attnlab.probe.progress`): training steps."""
    from attnlab.probe.probe import Probe
    from attnlab.probe.registry import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = build_model(cfg, train.seed)
    vocab = torch.tensor(cfg.vocab(tokenizer))
    g = torch.Generator().manual_seed(train.seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=train.lr)
    layer, head = cfg.induction_head
    dh = cfg.d_model // cfg.n_heads
    o_proj = model.model.layers[layer].self_attn.o_proj
    z: dict[str, torch.Tensor] = {}
    handle = o_proj.register_forward_pre_hook(lambda module, args: z.__setitem__("z", args[0]))
    history, started = [], time.perf_counter()
    model.train()
    try:
        with torch_threads(threads):
            for step in track(range(train.steps), progress, desc="training planted model"):
                x, predictable = training_batch(cfg, vocab, train.batch, tokenizer.bos_token_id, g)
                logits = model(input_ids=x[:, :-1]).logits  # position i predicts x[i + 1]
                ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(x.shape[0], -1)
                induction = ce[predictable].mean()
                # the induction head's output (after W_O) where the next token is not predictable: a no-op there
                out = z["z"][..., head * dh:(head + 1) * dh] @ o_proj.weight[:, head * dh:(head + 1) * dh].T
                no_op = out.pow(2).sum(-1)[~predictable].mean()
                if step < train.induction_steps:
                    loss = induction
                else:
                    loss = ce.mean() + induction + train.no_op_cost * no_op
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step % 100 == 0 or step == train.steps - 1:
                    history.append({"step": step, "loss": ce.mean().item(), "induction_loss": induction.item(),
                                    "no_op": no_op.item()})
    finally:
        handle.remove()
    model.eval()
    seconds = time.perf_counter() - started
    probe = Probe(f"planted-induction-{cfg.n_layers}x{cfg.n_heads}", None,
                  {"trained": True, "source": {"kind": "planted", "config": asdict(cfg), "train": asdict(train)}},
                  model, tokenizer, "cpu", torch.float32)
    return PlantedModel(probe, cfg, train, pd.DataFrame(history), roles(probe, cfg), seconds)


def roles(probe, cfg: PlantedConfig, n: int = 32, length: int = 10, seed: int = 1) -> pd.DataFrame:
    """Per head: previous-token attention (mean A[i, i-1]), induction attention (from the second copy
    of s, the attention on the token after the first copy of the current token) and BOS attention where
    nothing matches (from the first copy of s, after its first token) on BOS + s + s."""
    g = torch.Generator().manual_seed(seed)
    vocab = torch.tensor(cfg.vocab(probe.tokenizer))
    s = torch.stack([vocab[torch.randperm(len(vocab), generator=g)[:length]] for _ in range(n)])
    ids = torch.cat([torch.full((n, 1), probe.tokenizer.bos_token_id), s, s], 1)
    queries = list(range(2, ids.shape[1]))
    cap = probe.capture(ids, stats=[f"rows({','.join(map(str, queries))})"], prepend_bos=False, backend="chunked")
    rows = cap["rows"]  # [B, L, H, P, N]
    q = torch.tensor(queries)
    prev = rows[..., torch.arange(len(q)), q - 1].mean((0, -1))
    second = q > length  # queries in the second copy: token s[k] at position length + 1 + k
    target = q[second] - length + 1  # position of s[k + 1] in the first copy
    ind = rows[..., torch.nonzero(second)[:, 0], target].mean((0, -1))
    bos = rows[..., torch.nonzero(~second)[:, 0], 0].mean((0, -1))
    L, H = prev.shape
    frame = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                          "prev_token": prev.flatten().numpy(), "induction": ind.flatten().numpy(),
                          "bos_no_match": bos.flatten().numpy()})
    frame["planted"] = [(l, h) in cfg.circuit for l, h in zip(frame.layer, frame["head"])]
    return frame


def induction_task(planted: PlantedModel, n: int = 64, seed: int = 0, length: int = 10):
    """Induction pairs over the model's alphabet that the planted model solves."""
    from attnlab.probe.tasks.circuits import make_task

    return make_task(planted.probe, "induction", n=n, seed=seed, vocab=planted.config.vocab(planted.probe.tokenizer),
                     length=length)


def evaluate_planted(planted: PlantedModel | None = None, *, n: int = 64, seeds: int = 5, pooling: str = "mean",
                     progress=True, **kwargs) -> Result:
    """SAE circuit discovery and activation patching on the planted model, scored against the planted
    circuit (heads and edge). Trains a model with the defaults when none is given. progress
    (`attnlab.probe.progress`): training (when a model is trained), then the evaluation."""
    from attnlab.analyses import sae_circuits

    stages = 1 if planted is not None else 2
    planted = planted or train_planted(progress=stage(progress, 0, stages))
    task = induction_task(planted, n=n)
    res = sae_circuits.evaluate(planted.probe, task, reference=planted.config.circuit,
                                reference_edges=planted.config.edges, seeds=seeds, pooling=pooling,
                                progress=stage(progress, stages - 1, stages), **kwargs)
    res.tables["roles"] = planted.roles
    res.tables["history"] = planted.history
    res.params["planted"] = asdict(planted.config)
    res.params["train"] = asdict(planted.train)
    res.timings["train_seconds"] = round(planted.seconds, 2)
    return res


__all__ = ["PlantedConfig", "PlantedModel", "TrainConfig", "build_model", "evaluate_planted", "induction_task",
           "roles", "train_planted", "training_batch"]
