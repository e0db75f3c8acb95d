"""Sum the shared-memory wavefronts of an Nsight Compute source page (``--page source --print-source sass
--csv``) by SASS opcode: measured and ideal, per kernel, so that a layout's excess shows by instruction kind.

    python3 scripts/ncu_shared_by_opcode.py ncu_source.csv
"""

from __future__ import annotations

import collections
import csv
import re
import sys


def main(path):
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    # the page holds one table a kernel: a line "Kernel Name",NAME, then the header ("Address",
    # "Source", ...) and one row an instruction
    tables, name, rows = [], "?", None
    for line in lines:
        if line.startswith('"Kernel Name"'):
            name, rows = next(csv.reader([line]))[1], None
        elif line.startswith('"Address"'):
            rows = [line]
            tables.append((name, rows))
        elif rows is not None and line.startswith('"'):
            rows.append(line)
    if not tables:
        print("no source table in", path)
        print("\n".join(lines[:8]))
        return
    for name, rows in tables:
        table = list(csv.reader(rows))
        head = table[0]
        src = next((i for i, h in enumerate(head) if h == "Source"), None)
        cols = {h: i for i, h in enumerate(head) if "Shared" in h and "Wavefront" in h}
        execs = next((i for i, h in enumerate(head) if h.startswith("Instructions Executed")), None)
        if src is None or not cols:
            print(name, "columns:", head[:30])
            continue
        sums = collections.defaultdict(lambda: collections.Counter())
        for r in table[1:]:
            if len(r) <= max(cols.values()):
                continue
            m = re.match(r"\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", r[src])
            if not m or not re.match(r"(LDS|STS|LDSM|SHFL|ATOMS|LD|ST)\b", m.group(1)):
                continue
            op = m.group(1)
            for h, i in cols.items():
                try:
                    sums[op][h] += float(r[i].replace(",", "") or 0)
                except ValueError:
                    pass
            if execs is not None:
                try:
                    sums[op]["executed"] += float(r[execs].replace(",", "") or 0)
                except ValueError:
                    pass
        print(name)
        keys = sorted(cols) + (["executed"] if execs is not None else [])
        print("   opcode | " + " | ".join(keys))
        for op, c in sorted(sums.items()):
            if any(c.values()):
                print(f"   {op} | " + " | ".join(f"{c[k]:.3g}" for k in keys))


if __name__ == "__main__":
    main(sys.argv[1])
