"""Write conf/config.yaml from align/config/, where every option is declared (default, help, range).

    python scripts/gen_config_yaml.py          # rewrite conf/config.yaml
    python scripts/gen_config_yaml.py --check  # exit 1 when the committed file differs (tests/test_config_source.py)
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align.config.yaml_file import config_yaml  # noqa: E402

TARGET = ROOT / "conf" / "config.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when conf/config.yaml differs")
    args = parser.parse_args()
    text = config_yaml()
    if args.check:
        if TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} differs from align/config/: run python scripts/gen_config_yaml.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
