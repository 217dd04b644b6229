"""Named text domains shipped with attnlab: short, clearly different sets of texts.

    texts = load_domain("code")      # list[str]

| domain | what                                                    |
|--------|---------------------------------------------------------|
| prose  | narrative English paragraphs (written for attnlab)      |
| code   | small Python functions and scripts                      |
| lists  | Markdown tables, CSV rows, bullet and numbered lists    |

Each file is `probe/data/domains/<name>.txt`, texts separated by a line holding only `%%`. Every
text is at least 64 SmolLM2 tokens long (the sink metric's T). The texts were written for attnlab
and are public domain (CC0). Used by the sink metric (Gu et al.) and the per-domain dormancy
analysis (Guo et al.), which define a domain as a set of texts.
"""

from __future__ import annotations

from pathlib import Path

from attnlab.probe.errors import AttnlabError

FOLDER = Path(__file__).resolve().parent.parent / "data" / "domains"
DOMAINS = ("prose", "code", "lists")
SEPARATOR = "%%"


def load_domain(name: str) -> list[str]:
    """The texts of one shipped domain (or of a .txt file in the same format, given by path)."""
    path = FOLDER / f"{name}.txt" if name in DOMAINS else Path(name)
    if not path.is_file():
        raise AttnlabError(f"unknown domain '{name}': choose from {', '.join(DOMAINS)} or pass a .txt file path")
    texts, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == SEPARATOR:
            texts.append("\n".join(cur).strip("\n"))
            cur = []
        else:
            cur.append(line)
    texts.append("\n".join(cur).strip("\n"))
    return [t for t in texts if t.strip()]


def load_domains(names=DOMAINS) -> dict[str, list[str]]:
    """Domain name -> its texts (`load_domain`) for each of `names`."""
    return {n: load_domain(n) for n in names}
