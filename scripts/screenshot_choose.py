"""Screenshot of the choice page (docs/choose_page.png): the toy SD base, 5 choices made, headless chromium.

    PYTHONPATH=. python scripts/screenshot_choose.py docs/choose_page.png
"""
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch

from diffalign.backbones import load_backbone
from diffalign.personalization.choose import ChoiceStore, backbone_pair_maker, serve

torch.set_num_threads(1)

bb = load_backbone("diffalign/toyworld/base/sd")
d = Path(tempfile.mkdtemp())
store = ChoiceStore(d, "alice", ["a red circle", "a blue square left of a green triangle", "a yellow triangle"], backbone_pair_maker(bb, steps=20, guidance_scale=5.0), min_pairs=4)
srv = serve(store, "127.0.0.1", 0)
base = f"http://127.0.0.1:{srv.server_address[1]}"
def post(c):
    s = store.state()
    req = urllib.request.Request(base + "/api/choice", data=json.dumps({"pair_id": s["pair_id"], "choice": c}).encode(), method="POST")
    urllib.request.urlopen(req).read()
for c in ("0", "1", "tie", "0", "1"):
    post(c)
store.state()
out = Path(sys.argv[1]).resolve()
subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={out}", "--window-size=820,760", "--virtual-time-budget=5000", base + "/"], check=True, capture_output=True, timeout=120)
print(out, out.stat().st_size, json.dumps(store.state()))
srv.shutdown()
