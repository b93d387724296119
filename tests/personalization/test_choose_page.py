"""The choice page through real HTTP requests to a server on 127.0.0.1."""

import json
import urllib.error
import urllib.request

import pytest
import torch

from diffalign.data.pairs import PreferencePairs
from diffalign.personalization.choose import ChoiceStore, serve


def fake_pair(prompt, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)


def _get(base, path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return r.status, r.read()


def _post(base, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(**kw):
        store = ChoiceStore(tmp_path / "choices", "alice", ["a red circle", "a blue square"], fake_pair,
                            min_pairs=kw.pop("min_pairs", 2))
        srv = serve(store, "127.0.0.1", 0, **kw)
        servers.append(srv)
        return store, srv, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_record_a_choice(server):
    store, srv, base = server()
    assert srv.server_address[0] == "127.0.0.1"
    code, html = _get(base, "/")
    assert code == 200 and b"Which image do you prefer" in html
    state = json.loads(_get(base, "/api/state")[1])
    assert state["prompt"] == "a red circle" and state["decided"] == 0 and not state["can_create_profile"]
    assert _get(base, state["image_0"])[1][:4] == b"\x89PNG"
    # a reload shows the same pair
    assert json.loads(_get(base, "/api/state")[1])["pair_id"] == state["pair_id"]
    code, res = _post(base, "/api/choice", {"pair_id": state["pair_id"], "choice": "1"})
    assert code == 200 and res == {"recorded": True, "decided": 1}
    rows = [json.loads(x) for x in (store.out / "pairs.jsonl").read_text().splitlines()]
    assert rows[0]["label_0"] == 0.0 and rows[0]["user_id"] == "alice" and rows[0]["caption"] == "a red circle"
    nxt = json.loads(_get(base, "/api/state")[1])
    assert nxt["pair_id"] != state["pair_id"] and nxt["prompt"] == "a blue square"
    _post(base, "/api/choice", {"pair_id": nxt["pair_id"], "choice": "skip"})  # skip: nothing written
    s3 = json.loads(_get(base, "/api/state")[1])
    _post(base, "/api/choice", {"pair_id": s3["pair_id"], "choice": "tie"})
    s4 = json.loads(_get(base, "/api/state")[1])
    _post(base, "/api/choice", {"pair_id": s4["pair_id"], "choice": "0"})
    rows = [json.loads(x) for x in (store.out / "pairs.jsonl").read_text().splitlines()]
    assert [r["label_0"] for r in rows] == [0.0, 0.5, 1.0]
    st = json.loads(_get(base, "/api/state")[1])
    assert st["decided"] == 2 and st["can_create_profile"]
    ds = PreferencePairs(store.out / "pairs.jsonl", resolution=32, ties="keep")  # the training loader reads it
    assert len(ds) == 4


def test_reject_malformed_choices(server):
    store, _, base = server()
    state = json.loads(_get(base, "/api/state")[1])
    for body, code in [
        (b"not json", 400),
        ({"pair_id": state["pair_id"]}, 400),
        ({"pair_id": state["pair_id"], "choice": "left"}, 400),
        ({"pair_id": state["pair_id"], "choice": "0", "extra": 1}, 400),
        ({"pair_id": 5, "choice": "0"}, 400),
        ({"pair_id": "stale", "choice": "0"}, 409),
        (b"x" * 5000, 413),
    ]:
        got, res = _post(base, "/api/choice", body)
        assert got == code and "error" in res
    assert not (store.out / "pairs.jsonl").exists()
    assert _get(base, "/api/state") and json.loads(_get(base, "/api/state")[1])["pair_id"] == state["pair_id"]
    assert _post(base, "/api/profile", {})[0] == 400  # no encoder configured
    with pytest.raises(urllib.error.HTTPError):
        _get(base, "/images/../../etc/passwd")


def test_file_intact_when_stopped_mid_choice(server, tmp_path):
    store, srv, base = server()
    for c in ("0", "1"):
        s = json.loads(_get(base, "/api/state")[1])
        _post(base, "/api/choice", {"pair_id": s["pair_id"], "choice": c})
    pending = json.loads(_get(base, "/api/state")[1])  # the person is looking at this pair...
    before = (store.out / "pairs.jsonl").read_bytes()
    srv.shutdown()  # ... when the server stops
    srv.server_close()
    # a write interrupted between the temporary file and the rename leaves only a stray temp file
    (store.out / ".pairs.jsonl.999.1.tmp").write_text('{"caption": "torn')
    assert (store.out / "pairs.jsonl").read_bytes() == before
    store2, _, base2 = server()
    assert not list(store2.out.glob(".*.tmp"))
    again = json.loads(_get(base2, "/api/state")[1])
    assert again["pair_id"] == pending["pair_id"] and again["decided"] == 2  # same pair, nothing lost
    code, _ = _post(base2, "/api/choice", {"pair_id": again["pair_id"], "choice": "0"})
    assert code == 200
    assert len(PreferencePairs(store2.out / "pairs.jsonl", resolution=32)) == 3


def test_profile_from_the_page(server, tmp_path):
    from diffalign.personalization.choose import profile_maker
    from diffalign.personalization.profiles import Profile
    from rewards.testing import tiny_hf_clip, write_clip_tokenizer

    clip = tmp_path / "clip"
    tiny_hf_clip().save_pretrained(str(clip))
    write_clip_tokenizer(clip)
    store, _, base = server(make_profile=profile_maker(f"clip={clip}", resolution=32))
    assert _post(base, "/api/profile", {})[0] == 400  # too few choices yet
    for c in ("0", "1"):
        s = json.loads(_get(base, "/api/state")[1])
        _post(base, "/api/choice", {"pair_id": s["pair_id"], "choice": c})
    code, res = _post(base, "/api/profile", {})
    assert code == 200, res
    prof = Profile.load(res["profile"])
    assert prof.user_id == "alice" and prof.pairs == 2 and prof.encoder == f"clip={clip}"


def test_backbone_pair_maker():
    from diffalign.backbones import load_backbone
    from diffalign.backbones.tiny import build_tiny_pipeline
    from diffalign.personalization.choose import backbone_pair_maker

    bb = load_backbone(build_tiny_pipeline("sd15"))
    bb.resolution = 32
    a, b = backbone_pair_maker(bb, steps=2, guidance_scale=2.0)("a red circle", 0)
    assert a.shape == b.shape == (3, 32, 32) and not torch.equal(a, b)
