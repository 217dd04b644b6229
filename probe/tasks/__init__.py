"""attnlab.probe.tasks: inputs for the analyses, with the scoring that goes with them.

- `domains`: named text sets shipped with attnlab (prose, Python code, lists/tables).
- `bigram_backcopy`: the Bigram-Backcopy task of Guo et al. (active-dormant heads): a character
  corpus generated reproducibly, the sampler, and the oracle next-token distribution.
- `classification`: the sae-probes classification and multiple-choice sets (SST-2, AG News, MNLI,
  PIQA, OpenBookQA, SocialIQA, ...) with fixed disjoint splits, prompts and label words.
- `span_qa`: generated questions whose answer is in one highlighted sentence of a conflicting,
  distracting context (for PASTA and VAR).
"""

from attnlab.probe.tasks.bigram_backcopy import BigramBackcopy, generate_corpus
from attnlab.probe.tasks.classification import TASKS, ClassificationTask, Example, load_task
from attnlab.probe.tasks.domains import DOMAINS, load_domain, load_domains
from attnlab.probe.tasks.span_qa import SpanExample, SpanTask, span_qa

__all__ = ["DOMAINS", "TASKS", "BigramBackcopy", "ClassificationTask", "Example", "load_task", "generate_corpus", "load_domain", "load_domains",
           "SpanExample", "SpanTask", "span_qa"]
