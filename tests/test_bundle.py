"""Model bundles (eartalk/model/bundle.py): saving a loaded bundle again writes a card that matches."""
import json

import torch

from eartalk.model.bundle import load_bundle, new_bundle, save_bundle
from eartalk.model.config import preset


def test_a_loaded_bundle_saved_again_carries_its_new_hash_and_keeps_its_card(tmp_path):
    first = save_bundle(new_bundle(preset("test"), seed=0), tmp_path / "a", recipe="smoke", training={"gpt": {"steps": 3}})
    bundle = load_bundle(first)
    with torch.no_grad():
        next(bundle.tokenizer.parameters()).add_(1.0)          # new weights, so a new hash
    again = save_bundle(bundle, tmp_path / "b", training={"gpt": {"steps": 3}, "extra": 1})
    old, new = (json.loads((d / "model.json").read_text()) for d in (first, again))
    assert new["sha256"] != old["sha256"]                        # not the loaded card's stale hash
    reloaded = load_bundle(again)                                # the hash check passes
    assert torch.equal(next(reloaded.tokenizer.parameters()), next(bundle.tokenizer.parameters()))
    assert new["recipe"] == "smoke" and new["training"] == {"gpt": {"steps": 3}, "extra": 1}
    assert new["config"] == old["config"] and new["format"] == old["format"]
