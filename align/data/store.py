"""The built data of a run: the seven output files and stats.json in outputs/<run.name>/data/.

recipes.build makes a Built; write() puts it on disk, read() reads one output back when a later stage reuses it.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from align.data import jsonl

OUTPUTS = ("sft_train", "sft_eval", "pref_train", "pref_eval", "prompts_train", "prompts_eval", "scope_eval")
KIND_OUTPUTS = {"sft": ("sft_train", "sft_eval"), "preference": ("pref_train", "pref_eval"),
                "prompt": ("prompts_train", "prompts_eval"), "scope_eval": (None, "scope_eval")}


@dataclass
class Built:
    sft_train: list = field(default_factory=list)
    sft_eval: list = field(default_factory=list)
    pref_train: list = field(default_factory=list)
    pref_eval: list = field(default_factory=list)
    prompts_train: list = field(default_factory=list)
    prompts_eval: list = field(default_factory=list)
    scope_eval: list = field(default_factory=list)
    stats: list = field(default_factory=list)
    fingerprint: str = ""
    config_fingerprint: str = ""

    def sizes(self) -> dict:
        return {name: len(getattr(self, name)) for name in OUTPUTS}


def data_dir(run) -> Path:
    """outputs/<run.name>/data for the `run` section."""
    return Path(run.output_dir) / run.name / "data"


def write(built: Built, out_dir: Path) -> None:
    """The seven split files and stats.json (per-source stats, sizes, fingerprints)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        jsonl.write(out_dir / f"{name}.jsonl", getattr(built, name))
    summary = {"sources": built.stats, "sizes": built.sizes(), "fingerprint": built.fingerprint,
               "config_fingerprint": built.config_fingerprint}
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")


def read_stats(out_dir: Path) -> dict:
    """stats.json of a written build."""
    return json.loads((Path(out_dir) / "stats.json").read_text())


def read(out_dir: Path, name: str) -> list:
    """The rows of one output (sft_train, ..., scope_eval) of a written build."""
    return jsonl.read(Path(out_dir) / f"{name}.jsonl")
