"""attnlab.probe.tasks: inputs for the analyses, with the scoring that goes with them.

- `domains`: named text sets shipped with attnlab (prose, Python code, lists/tables).
- `bigram_backcopy`: the Bigram-Backcopy task of Guo et al. (active-dormant heads): a character
  corpus generated reproducibly, the sampler, and the oracle next-token distribution.
"""

from attnlab.probe.tasks.bigram_backcopy import BigramBackcopy, generate_corpus
from attnlab.probe.tasks.domains import DOMAINS, load_domain, load_domains

__all__ = ["DOMAINS", "BigramBackcopy", "generate_corpus", "load_domain", "load_domains"]
