"""Per-stage seconds, tokens per second and peak GPU memory of finished runs, from each stage's metrics.json
(scripts/gpu_check.sh prints it after its runs; any run folder works, CPU ones show no GPU memory).

    python scripts/gpu_report.py outputs/<run> [outputs/<other run> ...]
"""

import json
import sys
from pathlib import Path

from align.config import STAGES  # the project's one list; stages without a folder are skipped



def rows(run: Path) -> list[str]:
    out = []
    for stage in STAGES:
        path = run / stage / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        tps = m.get("train/tokens_per_second") or m.get("speed/after/tokens_per_second")
        manifest_path = run / stage / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        out.append(f"| {run.name} | {stage} | {manifest.get('world_size', 1)} | {m.get('seconds', '-')} | "
                   f"{f'{tps:,.0f}' if tps else '-'} | {m.get('gpu/peak_memory_mb', '-')} | "
                   f"{m.get('gpu/name', 'cpu')} |")
    return out


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    print("| run | stage | processes | seconds | tokens/s | peak GPU memory (MB) | device |")
    print("|---|---|---|---|---|---|---|")
    for p in paths:
        found = rows(Path(p))
        if not found:
            sys.exit(f"gpu_report: {p} holds no finished stage (expected <stage>/metrics.json)")
        print("\n".join(found))


if __name__ == "__main__":
    main(sys.argv[1:])
