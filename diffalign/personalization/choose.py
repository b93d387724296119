"""``diffalign choose``: a local web page to make the choices a profile is built from.

The page shows two images from a model for a prompt; the person picks one (or calls a tie, or skips).
Each decision becomes a row of ``OUT/pairs.jsonl`` in the Pick-a-Pic schema with the user id::

    {"caption", "jpg_0", "jpg_1", "label_0": 1 | 0 | 0.5, "user_id", "ranking_id", "created_at"}

with the two images under ``OUT/images/``. Once ``min_pairs`` decided choices exist the page offers to
create the profile (``OUT/<user>.profile``; needs a user encoder).

Safety of the data: every change of ``pairs.jsonl`` writes a complete new file next to it, fsyncs it and
renames it over the old one, so a stop at any moment leaves either the old or the new file, never a torn
one. The pair on screen is kept in ``OUT/pending.json`` (written the same way) before it is shown, so a
reload (or a restarted server) shows the same pair again and no decision is lost or recorded twice.
The server binds 127.0.0.1 unless told otherwise.

HTTP API (JSON): ``GET /api/state`` (the pending pair, creating one if needed, and the counts),
``POST /api/choice`` ``{"pair_id", "choice": "0" | "1" | "tie" | "skip"}``, ``POST /api/profile``,
``GET /images/NAME.png``, ``GET /`` (the page).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

CHOICES = {"0": 1.0, "1": 0.0, "tie": 0.5, "skip": None}
MAX_BODY = 4096
_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.png$")
_USER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")

PairMaker = Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]  # (prompt, seed) -> two [3,H,W] in [0,1]


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class ChoiceStore:
    """The choices on disk: ``pairs.jsonl``, ``images/``, ``pending.json``; thread-safe."""

    def __init__(self, out_dir: str | Path, user_id: str, prompts: list[str], make_pair: PairMaker,
                 min_pairs: int = 4, seed: int = 0) -> None:
        if not _USER.match(user_id):
            raise ValueError(f"user id {user_id!r}: use 1-64 letters, digits, '_', '-', '.', '@'")
        if not prompts:
            raise ValueError("no prompts to show")
        self.out, self.user_id, self.prompts, self.make_pair = Path(out_dir), user_id, list(prompts), make_pair
        self.min_pairs, self.seed = min_pairs, seed
        self.lock = threading.Lock()
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        for stray in self.out.glob(".*.tmp"):  # an interrupted write: the real file is intact
            stray.unlink()
        self.pairs_path, self.pending_path = self.out / "pairs.jsonl", self.out / "pending.json"
        self.rows = self._read_rows()
        self.pending = json.loads(self.pending_path.read_text()) if self.pending_path.exists() else None
        self.shown = sum(1 for _ in (self.out / "images").glob("*_0.png"))
        self.profile_path: str | None = None

    def _read_rows(self) -> list[dict[str, Any]]:
        if not self.pairs_path.exists():
            return []
        rows = []
        for ln, line in enumerate(self.pairs_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.pairs_path}:{ln}: not valid JSON ({e.msg}); fix or move the file") from None
        return rows

    def decided(self) -> int:
        return sum(1 for r in self.rows if r.get("user_id") == self.user_id and r.get("label_0") in (0.0, 1.0))

    def state(self) -> dict[str, Any]:
        with self.lock:
            if self.pending is None:
                self._new_pending()
            p = self.pending
            assert p is not None
            return {"user_id": self.user_id, "pair_id": p["pair_id"], "prompt": p["caption"],
                    "image_0": f"/images/{Path(p['jpg_0']).name}", "image_1": f"/images/{Path(p['jpg_1']).name}",
                    "choices": len(self.rows), "decided": self.decided(), "min_pairs": self.min_pairs,
                    "can_create_profile": self.decided() >= self.min_pairs, "profile": self.profile_path}

    def _new_pending(self) -> None:
        from PIL import Image

        n = self.shown
        prompt = self.prompts[n % len(self.prompts)]
        a, b = self.make_pair(prompt, self.seed + n)
        pid = uuid.uuid4().hex[:12]
        names = []
        for side, img in (("0", a), ("1", b)):
            name = f"images/{n:06d}_{pid}_{side}.png"
            arr = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            tmp = self.out / f".{Path(name).name}.tmp"
            Image.fromarray(arr).save(tmp, format="PNG")
            os.replace(tmp, self.out / name)
            names.append(name)
        self.pending = {"pair_id": pid, "caption": prompt, "jpg_0": names[0], "jpg_1": names[1]}
        atomic_write(self.pending_path, json.dumps(self.pending))
        self.shown = n + 1

    def choose(self, pair_id: str, choice: str) -> dict[str, Any]:
        with self.lock:
            if self.pending is None or pair_id != self.pending["pair_id"]:
                raise LookupError(f"pair {pair_id!r} is not the pair on screen (reload the page)")
            label = CHOICES[choice]
            if label is not None:
                row = {"caption": self.pending["caption"], "jpg_0": self.pending["jpg_0"],
                       "jpg_1": self.pending["jpg_1"], "label_0": label, "user_id": self.user_id,
                       "ranking_id": pair_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                text = "".join(json.dumps(r) + "\n" for r in [*self.rows, row])
                atomic_write(self.pairs_path, text)  # the new row is on disk before it counts
                self.rows.append(row)
            self.pending = None
            self.pending_path.unlink(missing_ok=True)
        return {"recorded": label is not None, "decided": self.decided()}


def _page() -> str:
    return """<!doctype html><html><head><meta charset="utf-8"><title>diffalign: which do you prefer?</title>
<style>body{font-family:system-ui,sans-serif;max-width:760px;margin:24px auto;color:#222}
h1{font-size:20px} .prompt{font-size:18px;margin:12px 0;padding:8px 12px;background:#f3f3f3;border-radius:6px}
.pair{display:flex;gap:16px} .pair button{flex:1;border:3px solid #ddd;border-radius:8px;background:#fff;cursor:pointer;padding:6px}
.pair button:hover{border-color:#3a7} .pair img{width:100%;image-rendering:pixelated}
.row{display:flex;gap:8px;margin-top:12px} .row button{padding:8px 14px;font-size:15px}
#status{margin-top:12px;color:#555} #profile{display:none;margin-top:16px;padding:10px;background:#eef8f0;border-radius:6px}
</style></head><body>
<h1>Which image do you prefer? <small id="user"></small></h1>
<div class="prompt" id="prompt">loading...</div>
<div class="pair"><button id="b0" title="left is better (key 1)"><img id="i0" alt="image A"></button>
<button id="b1" title="right is better (key 2)"><img id="i1" alt="image B"></button></div>
<div class="row"><button id="tie">Both equally good (tie)</button><button id="skip">Skip</button></div>
<div id="status"></div>
<div id="profile">You have made enough choices to build your profile.
<button id="make">Create my profile</button> <span id="made"></span></div>
<script>
let cur=null;
async function load(){const r=await fetch('/api/state');const s=await r.json();cur=s;
document.getElementById('user').textContent='('+s.user_id+')';
document.getElementById('prompt').textContent=s.prompt;
document.getElementById('i0').src=s.image_0;document.getElementById('i1').src=s.image_1;
document.getElementById('status').textContent=s.decided+' choices recorded ('+s.min_pairs+' make a profile)';
document.getElementById('profile').style.display=s.can_create_profile?'block':'none';
if(s.profile)document.getElementById('made').textContent='saved: '+s.profile;}
async function choose(c){if(!cur)return;const id=cur.pair_id;cur=null;
const r=await fetch('/api/choice',{method:'POST',headers:{'Content-Type':'application/json'},
body:JSON.stringify({pair_id:id,choice:c})});if(!r.ok){alert((await r.json()).error);}load();}
document.getElementById('b0').onclick=()=>choose('0');document.getElementById('b1').onclick=()=>choose('1');
document.getElementById('tie').onclick=()=>choose('tie');document.getElementById('skip').onclick=()=>choose('skip');
document.addEventListener('keydown',e=>{if(e.key==='1')choose('0');if(e.key==='2')choose('1');});
document.getElementById('make').onclick=async()=>{const r=await fetch('/api/profile',{method:'POST'});
const j=await r.json();document.getElementById('made').textContent=r.ok?('saved: '+j.profile):j.error;};
load();
</script></body></html>"""


def make_handler(store: ChoiceStore, make_profile: Callable[[ChoiceStore], str] | None) -> type:
    class Handler(BaseHTTPRequestHandler):
        server_version = "diffalign-choose"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default
            pass

        def _json(self, code: int, obj: dict[str, Any]) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/":
                body = _page().encode()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif path == "/api/state":
                self._json(200, store.state())
            elif path.startswith("/images/") and _NAME.match(path[len("/images/"):]):
                f = store.out / "images" / path[len("/images/"):]
                if not f.is_file():
                    self._json(404, {"error": "no such image"})
                    return
                data = f.read_bytes()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._json(404, {"error": f"no such page {path!r}"})

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                self._json(413, {"error": f"request body over {MAX_BODY} bytes"})
                return
            raw = self.rfile.read(n) if n else b""
            if path == "/api/choice":
                try:
                    body = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    self._json(400, {"error": "the body is not JSON"})
                    return
                if not isinstance(body, dict) or set(body) != {"pair_id", "choice"}:
                    self._json(400, {"error": 'expected {"pair_id": ..., "choice": "0" | "1" | "tie" | "skip"}'})
                    return
                if body["choice"] not in CHOICES or not isinstance(body["pair_id"], str):
                    self._json(400, {"error": f"choice must be one of {sorted(CHOICES)}, got {body['choice']!r}"})
                    return
                try:
                    self._json(200, store.choose(body["pair_id"], body["choice"]))
                except LookupError as e:
                    self._json(409, {"error": str(e)})
            elif path == "/api/profile":
                if make_profile is None:
                    self._json(400, {"error": "no user encoder: restart with --encoder SPEC to create profiles"})
                    return
                if store.decided() < store.min_pairs:
                    self._json(400, {"error": f"{store.decided()} decided choices; {store.min_pairs} needed"})
                    return
                try:
                    store.profile_path = make_profile(store)
                except Exception as e:  # noqa: BLE001  (report it to the page)
                    self._json(500, {"error": f"{type(e).__name__}: {e}"})
                    return
                self._json(200, {"profile": store.profile_path})
            else:
                self._json(404, {"error": f"no such endpoint {path!r}"})

    return Handler


def serve(store: ChoiceStore, host: str = "127.0.0.1", port: int = 7860,
          make_profile: Callable[[ChoiceStore], str] | None = None) -> ThreadingHTTPServer:
    """A started server (in a daemon thread); ``.shutdown()`` stops it. ``port=0`` picks a free port."""
    server = ThreadingHTTPServer((host, port), make_handler(store, make_profile))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="diffalign-choose").start()
    return server


def backbone_pair_maker(backbone: Any, steps: int = 30, guidance_scale: float = 7.5) -> PairMaker:
    """Two samples of ``backbone`` for a prompt, from seeds ``2s`` and ``2s + 1``."""
    from ..sampling.solvers import generate

    def make(prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = torch.cat([generate(backbone, [prompt], steps=steps, guidance_scale=guidance_scale, seed=2 * seed + i)
                          for i in range(2)])
        return imgs[0].cpu(), imgs[1].cpu()

    return make


def profile_maker(encoder_spec: str, resolution: int = 224) -> Callable[[ChoiceStore], str]:
    """Create ``OUT/<user>.profile`` from the store's decided choices with the encoder ``encoder_spec``."""

    def make(store: ChoiceStore) -> str:
        from ..data.users import user_choices
        from .encoder import load_encoder
        from .profiles import create_profile

        enc = load_encoder(encoder_spec)
        prompts, w, lose = user_choices(store.pairs_path, store.user_id, resolution, min_pairs=store.min_pairs)
        prof = create_profile(enc, prompts, w, lose, user_id=store.user_id, source=str(store.pairs_path),
                              min_pairs=store.min_pairs)
        return str(prof.save(store.out / f"{store.user_id}.profile", overwrite=True))

    return make
