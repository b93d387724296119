"""Does it matter that the shipped toy identity network was trained on the held-out characters too?

Trains the identity network (``train_identity_net``, same settings and seed as the shipped one) without the
head/body combinations of the 4 ``HELDOUT_CHARACTERS`` (into ``--out``, reused when present), then compares
both networks on renders of the 12 characters: the same-character cosine (a fresh render vs the mean of
the character's 4 evaluation references), the highest cosine to another character, and the 12-way
recognition accuracy, for the held-out and the train characters; renders are augmented as VAE-decoded
samples are (blur, colour jitter, noise: ``identity._augment``). Report: ``OUT/separation.json``.

    OMP_NUM_THREADS=1 python scripts/probe_identity_heldout.py --out runs/idnet_excl_heldout
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def separation(net, n: int = 64, seed: int = 1) -> dict:
    from diffalign.toyworld.identity import CHARACTERS, HELDOUT_CHARACTERS, TRAIN_CHARACTERS, _augment, reference_images

    names = list(CHARACTERS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        refs = torch.stack([F.normalize(net(reference_images(c, 4, seed=0)).mean(0), dim=-1) for c in names])
        out = {}
        for split, group in (("heldout", HELDOUT_CHARACTERS), ("train", TRAIN_CHARACTERS)):
            same, other, acc = [], [], []
            for c in group:
                i = names.index(c)
                x = _augment(reference_images(c, n, seed=seed), gen)
                cos = net(x) @ refs.T
                same.append(cos[:, i])
                other.append(torch.cat([cos[:, :i], cos[:, i + 1 :]], 1).max(1).values)
                acc.append((cos.argmax(1) == i).float())
            out[split] = {"same_cos": float(torch.cat(same).mean()), "max_other_cos": float(torch.cat(other).mean()),
                          "recognition": float(torch.cat(acc).mean()), "n": n * len(group)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffalign.toyworld.identity import HELDOUT_CHARACTERS, load_identity_net, train_identity_net

    out = Path(args.out)
    if (out / "model.safetensors").exists():
        excl = load_identity_net(out)
    else:
        excl = train_identity_net(out, steps=args.steps, exclude=HELDOUT_CHARACTERS)
    rep = {"shipped (all 270 identities)": separation(load_identity_net()),
           "without the 4 held-out characters (266)": separation(excl)}
    (out / "separation.json").write_text(json.dumps(rep, indent=2))
    print(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    main()
