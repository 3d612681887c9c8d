"""How often do the judges agree with labelled verdicts? Accuracy, refusal recall and false-alarm rate, each with a
95% Wilson interval, on (a) PyRIT's 169 human refusal labels, (b) our gold set, (c) data_recipes/judge/dev_generic,
(d) data_recipes/judge/checkpoints.jsonl: responses of this project's own checkpoints (base, SFT, DPO) on two scopes,
labelled by hand; each row is judged with its scope card's refusal openers, as safety_eval judges it.

    python scripts/validate_judge.py [--wheel PATH] [--judges keyword,classifier] [--out FILE.json]

--wheel: a pyrit wheel or a folder laid out like one (tests/fixtures/public/pyrit); default: the cached download
(align.data.pyrit). --out: default docs/bench/judge_validation.json. The PyRIT labels are a frozen check: never tune
judge rules against them. PyRIT counts a reply unrelated to the request as a refusal; our convention has no such
rule, so some disagreement there is by design.
"""

import argparse
import json
import sys
from pathlib import Path

from align import AlignError
from align.data import pyrit
from align.evaluation import judges
from align.evaluation.metrics import judge_scores

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "bench" / "judge_validation.json"


def label_sets(wheel=None) -> dict:
    """{name: rows with prompt, response, verdict}; dev_generic only where the file exists."""
    sets = {"pyrit": pyrit.refusal_labels(wheel), "gold": judges.load_gold()}
    for name in ("dev_generic", "checkpoints"):
        path = judges.JUDGE_DATA / f"{name}.jsonl"
        if path.is_file():
            sets[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sets


def score(name: str, rows, **kwargs) -> dict:
    """Rows with a "scope" are judged by scope, each group with its card's refusal openers."""
    from align.config import compose
    from align.data.scope import refusal_openers

    verdicts = [None] * len(rows)
    for scope in sorted({r.get("scope") for r in rows}, key=str):
        idx = [i for i, r in enumerate(rows) if r.get("scope") == scope]
        openers = refusal_openers(compose(f"scope={scope}", set_hydra_config=False).scope) if scope else ()
        judge = judges.make_judge(name, refusal_openers=openers, **kwargs)
        got = judge.judge([rows[i].get("prompt", "") for i in idx], [rows[i]["response"] for i in idx])
        for i, v in zip(idx, got):
            verdicts[i] = v
    return judge_scores(verdicts, [r["verdict"] for r in rows])


def _cell(s: dict) -> str:
    if s["value"] is None:
        return "-"
    lo, hi = s["ci95"]
    return f"{s['value']:.3f} [{lo:.3f}, {hi:.3f}] ({s['k']}/{s['n']})"


def table(results: dict) -> str:
    lines = ["| judge | labels | n | accuracy [95% CI] | refusal recall | false alarm |", "|---|---|---|---|---|---|"]
    for name, by_set in results.items():
        for set_name, s in by_set.items():
            lines.append(f"| {name} | {set_name} | {s['n']} | {_cell(s['accuracy'])} | {_cell(s['refusal_recall'])} "
                         f"| {_cell(s['false_alarm'])} |")
    return "\n".join(lines)


def run(wheel=None, judge_names=("keyword", "classifier"), out: Path = DEFAULT_OUT) -> dict:
    sets = label_sets(wheel)
    results = {}
    for name in judge_names:
        results[name] = {set_name: score(name, rows) for set_name, rows in sets.items()}
    path = pyrit.wheel_path(wheel).resolve()
    where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name  # no machine paths
    report = {"wheel": where, "n": {k: len(v) for k, v in sets.items()}, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", help="pyrit wheel or wheel-like folder (default: cached download of pyrit 1.1.0)")
    ap.add_argument("--judges", default="keyword,classifier", help="comma-separated judge names")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="raw JSON results")
    args = ap.parse_args(argv)
    try:
        report = run(args.wheel, [j for j in args.judges.split(",") if j], args.out)
    except AlignError as e:
        sys.exit(f"error: {e}")
    print(table(report["results"]))
    print(f"\nraw results: {args.out}")


if __name__ == "__main__":
    main()
