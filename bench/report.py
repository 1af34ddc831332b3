"""What every bench script ends with: `<out>.json` (all numbers) and `<out>.md` (the table), the table printed."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str, data: dict, lines: list[str]) -> int:
    """Writes both files next to each other and prints the markdown; returns the script's exit code 0."""
    Path(out + ".json").write_text(json.dumps(data, indent=2))
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
