#!/usr/bin/env python3
"""Remove the SCTP server containers from the network-policy-api conformance base manifests.

For kernels without SCTP sockets: agnhost `porter` exits when it cannot listen on its
SERVE_SCTP_PORT_* port, its pod never becomes ready, and the suite's setup fails every test.
Without those containers the other tests run; the SCTP tests are skipped by scripts/e2e.sh.

    drop-sctp.py FILE   rewrites FILE in place; prints how many containers it removed

Works on the text (the file is a plain multi-document YAML list of workloads), keeping the rest
byte for byte: a container is a `- name:` item of a `containers:` list, up to the next line at
its indentation or less.
"""

import re
import sys


def drop_sctp(text: str) -> tuple[str, int]:
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    removed = 0
    i = 0
    in_containers = -1  # indentation of the `containers:` key we are in, -1 outside
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip(" "))
        stripped = line.strip()
        if in_containers >= 0 and stripped and indent <= in_containers and not stripped.startswith("- "):
            in_containers = -1
        if stripped == "containers:":
            in_containers = indent
            out.append(line)
            i += 1
            continue
        if in_containers >= 0 and re.match(r"-\s+name:", stripped):
            j = i + 1
            while j < len(lines):
                nxt = lines[j]
                nindent = len(nxt) - len(nxt.lstrip(" "))
                if nxt.strip() and (nindent < indent or (nindent == indent and nxt.strip().startswith("- "))):
                    break
                if nxt.strip() and nindent <= in_containers:
                    break
                j += 1
            item = lines[i:j]
            if any("SERVE_SCTP_PORT_" in x for x in item):
                removed += 1
            else:
                out.extend(item)
            i = j
            continue
        out.append(line)
        i += 1
    return "".join(out), removed


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: drop-sctp.py FILE", file=sys.stderr)
        return 2
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new, removed = drop_sctp(text)
    if removed == 0:
        print(f"drop-sctp: no SCTP server container found in {path}; its layout changed?", file=sys.stderr)
        return 1
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    print(removed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
