"""Every package installed in this environment is pinned, at that version, in the constraints file
(argv[1]); else exit 1 with the list. Run by the Makefile right after installing, so that an
unpinned dependency (one that a new release could swap under CI) shows up at once."""
import re
import sys
from importlib import metadata


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


pins = {}
with open(sys.argv[1]) as f:
    for line in f:
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[norm(name)] = version.strip()

bad = []
for dist in metadata.distributions():
    name = norm(dist.metadata["Name"])
    if name == "fused-pairloss":
        continue
    if pins.get(name) != dist.version:
        bad.append(f"{dist.metadata['Name']}=={dist.version} (constraints: {pins.get(name, 'not pinned')})")
if bad:
    sys.exit(f"{sys.argv[1]} does not pin what is installed:\n  " + "\n  ".join(sorted(bad)))
print(f"check_pins: every installed package is pinned in {sys.argv[1]} at its version")
