"""Recipe budgets: --budget-scale multiplies the stages' minutes, and a stage that trained well under
its shipped model's steps says which scale gives about that count; the stages' frames loaded in processes."""
import math

import numpy as np

import pytest

from eartalk.cli import main
from eartalk.model.bundle import read_card
from eartalk.model.recipe import RECIPES, _recipe, step_shortfall


def test_budget_scale_multiplies_every_stages_minutes_and_nothing_else():
    r = _recipe("tiny", 2.5)
    assert r["tok_minutes"] == RECIPES["tiny"]["tok_minutes"] * 2.5 == 62.5
    assert r["gpt_minutes"] == RECIPES["tiny"]["gpt_minutes"] * 2.5 == 112.5
    assert r["dec_minutes"] == RECIPES["tiny"]["dec_minutes"] * 2.5 == 22.5
    assert r["dec_critic_minutes"] == RECIPES["tiny"]["dec_critic_minutes"] * 2.5
    assert {k: v for k, v in r.items() if not k.endswith("minutes")} == \
        {k: v for k, v in RECIPES["tiny"].items() if not k.endswith("minutes")}
    assert RECIPES["tiny"]["gpt_minutes"] == 45          # the table itself is untouched
    assert _recipe("tiny") == RECIPES["tiny"]


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "2"])
def test_a_budget_scale_that_is_not_a_positive_number_is_refused(bad):
    with pytest.raises(ValueError, match="budget scale .*expected a positive number"):
        _recipe("tiny", bad)


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match="unknown recipe 'huge'.*smoke.*tiny"):
        _recipe("huge")


def test_shortfall_names_the_shipped_steps_and_the_scale_that_reaches_them():
    shipped = read_card("tiny")["training"]
    gpt, tok = int(shipped["gpt"]["steps"]), int(shipped["tokenizer"]["steps"])
    steps = gpt * 4 // 10                                       # 40% of the shipped count
    scale = math.ceil(gpt / steps * 10) / 10                    # 2.5, rounded up to a tenth
    notice = step_shortfall("tiny", "gpt", steps)
    assert f"trained {steps:,} steps in its 45 minutes" in notice and f"had {gpt:,}" in notice
    assert f"--budget-scale {scale:g}` " in notice and "resumes from its checkpoint" in notice
    # already at twice the minutes: the scale asked for is relative to the recipe's own minutes
    twice = step_shortfall("tiny", "gpt", steps, budget_scale=2.0)
    assert "in its 90 minutes" in twice and f"--budget-scale {math.ceil(2 * gpt / steps * 10) / 10:g}` " in twice
    assert "trains again from its start" in step_shortfall("tiny", "tokenizer", tok // 2)
    # within 10% of the shipped count, or a recipe that made no shipped model: nothing to say
    assert step_shortfall("tiny", "gpt", math.ceil(0.9 * gpt)) is None
    assert step_shortfall("tiny", "gpt", math.ceil(0.9 * gpt) - 1) is not None
    assert step_shortfall("smoke", "gpt", 1) is None
    # cut short by the recipe's total: the minutes it trained, and the scale from its steps a minute
    cut = step_shortfall("tiny", "gpt", steps, trained_minutes=36.0)
    assert "in 36 of its 45 minutes (the recipe's total cut it short)" in cut
    assert f"--budget-scale {math.ceil(gpt / (steps / 36 * 45) * 10) / 10:g}` " in cut
    assert step_shortfall("tiny", "gpt", steps, trained_minutes=45.0) == notice


def test_shortfall_across_precisions_judges_the_tokenizer_by_its_held_out_psnr(monkeypatch):
    import eartalk.model.bundle as bundle
    card = {"recipe": "tiny", "training": {
        "tokenizer": {"steps": 9711, "bf16": True, "val_psnr": 24.98},
        "gpt": {"steps": 6337, "bf16": True, "val_loss": 3.56},
        "decoder": {"steps": 909, "bf16": False, "val_psnr": 24.81}}}
    monkeypatch.setattr(bundle, "read_card", lambda name: card)
    # float32 at under half the bf16 steps but a held-out PSNR within 0.1 dB: nothing to say
    assert step_shortfall("tiny", "tokenizer", 4442, bf16=False, held_out=24.89) is None
    worse = step_shortfall("tiny", "tokenizer", 4442, bf16=False, held_out=24.37)
    assert "trained 4,442 steps in float32 in its 25 minutes, to a held-out PSNR of 24.37 dB" in worse
    assert "trained 9,711 in bf16, to 24.98 dB" in worse
    # the scale still counts steps (9,711 / 4,442 = 2.19 -> 2.2), now a bound
    assert "--budget-scale 2.2` trains the shipped step count" in worse and "fewer steps may do" in worse
    # within 90% of the shipped steps but 0.2 dB short: still a notice, since the steps do not compare
    assert step_shortfall("tiny", "decoder", 900, bf16=True, held_out=24.6) is not None
    assert "more may be needed" in step_shortfall("tiny", "decoder", 400, bf16=True, held_out=24.0)
    # more steps than the shipped stage and still below it: no scale below 1
    more = step_shortfall("tiny", "tokenizer", 12000, bf16=False, held_out=24.0)
    assert "--budget-scale 0" not in more and "trained the shipped step count already" in more
    # a precision unknown on either side: the steps, as before
    assert "had 9,711" in step_shortfall("tiny", "tokenizer", 4442, held_out=24.37)
    del card["training"]["decoder"]["bf16"]
    assert "had 909" in step_shortfall("tiny", "decoder", 400, bf16=True, held_out=20.0)
    assert step_shortfall("tiny", "decoder", 900, bf16=True, held_out=20.0) is None
    # the same precision: the steps, whatever the PSNR
    assert step_shortfall("tiny", "tokenizer", 9000, bf16=True, held_out=20.0) is None
    # the transformer's steps compare across precisions; its loss is never the judge
    assert "had 6,337" in step_shortfall("tiny", "gpt", 3000, bf16=False, held_out=3.0)
    assert step_shortfall("tiny", "gpt", 6000, bf16=False, held_out=9.9) is None
    # another precision but no held-out PSNR to judge by: silent rather than a wrong scale
    assert step_shortfall("tiny", "tokenizer", 4442, bf16=False) is None


def test_cli_refuses_a_bad_budget_scale_and_one_given_to_the_probe(tmp_path, capsys):
    (tmp_path / "splits.json").write_text("{}")
    assert main(["train", "gpt", "--recipe", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--budget-scale", "-2"]) == 2
    assert "budget scale -2.0: expected a positive number" in capsys.readouterr().err
    assert main(["train", "probe", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--budget-scale", "2"]) == 2
    assert "--budget-scale applies to the recipe's stages" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_prints_one_notice_per_stage_short_of_the_shipped_steps(capsys):
    from eartalk.commands.train import _shortfall
    shipped = read_card("tiny")["training"]
    # a recipe run whose tokenizer was kept from before (no report) and whose transformer fell short
    _shortfall("tiny", {"recipe": "tiny", "gpt": {"steps": int(shipped["gpt"]["steps"]) // 2}}, 1.0)
    err = capsys.readouterr().err
    assert err.count("notice:") == 1 and "notice: the gpt stage trained" in err
    # both stages at the shipped counts: silent
    _shortfall("tiny", {k: {"steps": int(shipped[k]["steps"])} for k in ("tokenizer", "gpt")}, 1.0)
    assert capsys.readouterr().err == ""
    # cut short by the recipe's total: the minutes trained, the decoder's with its critic's
    _shortfall("tiny", {"gpt": {"steps": 10, "schedule_minutes": 40.0},
                        "decoder": {"steps": 10, "schedule_minutes": 5.0, "expression_critic": {"minutes": 3.2}}}, 1.0)
    err = capsys.readouterr().err
    assert "gpt stage trained 10 steps in 40 of its 45 minutes" in err
    assert "decoder stage trained 10 steps in 8.2 of its 9 minutes" in err
    # a stage's report carries its precision and held-out PSNR to the notice; the shipped card records
    # its tokenizer's bf16
    assert shipped["tokenizer"]["bf16"] is True and shipped["decoder"]["bf16"] is False
    _shortfall("tiny", {"tokenizer": {"steps": 10, "bf16": False, "val_psnr": shipped["tokenizer"]["val_psnr"]}}, 1.0)
    assert capsys.readouterr().err == ""
    _shortfall("tiny", {"tokenizer": {"steps": 10, "bf16": False, "val_psnr": 20.0}}, 1.0)
    err = capsys.readouterr().err
    assert "in float32 in its 25 minutes, to a held-out PSNR of 20.00 dB" in err
    assert f"to {shipped['tokenizer']['val_psnr']:.2f} dB" in err


def test_tokenizer_frames_loaded_in_processes_are_the_arrays_of_one(tmp_path):
    from eartalk.data.corpus import list_clips, load_clip
    from eartalk.data.synth import synthesize_corpus
    from eartalk.model.recipe import tokenizer_frames
    synthesize_corpus(tmp_path, 5, seed=2, size=32, workers=1, progress=False)
    one = tokenizer_frames(tmp_path, "train", 32, 3, None, False, successors=True, expr=True)
    two = tokenizer_frames(tmp_path, "train", 32, 3, None, False, successors=True, expr=True, workers=2)
    assert set(one) == set(two) == {"frames", "portraits", "index", "states", "next_frames", "next_states",
                                    "exprs", "next_exprs"}
    assert all(np.array_equal(one[k], two[k], equal_nan=True) for k in one)
    ids = list_clips(tmp_path, "train")
    assert len(ids) > 1 and sorted(set(one["index"].tolist())) == list(range(len(ids)))
    last = load_clip(tmp_path, ids[-1])          # the last clip's frames, in order, channels first
    mine = np.flatnonzero(one["index"] == len(ids) - 1)
    at = np.arange(0, len(np.asarray(last.frames)) - 1, 3)
    assert np.array_equal(one["frames"][mine], np.moveaxis(np.asarray(last.frames)[at], -1, 1))
    assert np.array_equal(one["next_frames"][mine], np.moveaxis(np.asarray(last.frames)[at + 1], -1, 1))


def test_run_recipe_ends_the_transformer_in_time_for_the_decoder_stage_and_that_by_the_total(monkeypatch, tmp_path):
    import eartalk.model.decoder_stage as decoder_stage
    import eartalk.model.recipe as recipe
    calls = {}
    monkeypatch.setattr(recipe.time, "time", lambda: 1000.0)
    monkeypatch.setattr(recipe, "tokenizer_stage", lambda *a, **k: calls.setdefault("tokenizer", a[-1]) and {})
    monkeypatch.setattr(recipe, "gpt_stage", lambda *a, until=None: calls.setdefault("gpt", (a[-1], until)) and {})
    monkeypatch.setattr(decoder_stage, "decoder_stage", lambda *a, until=None: calls.setdefault("decoder", (a[-1], until)) and {})
    (tmp_path / "out" / "work").mkdir(parents=True)     # what the stubbed stages would have made
    rep = recipe.run_recipe("tiny", tmp_path / "corpus", tmp_path / "out", False, 0, 2.0)
    r = RECIPES["tiny"]
    assert (r["total_minutes"], r["dec_minutes"], r["dec_load_minutes"]) == (89, 9, 3.0)
    # at budget scale 2: the total 178 minutes, the decoder stage's 18 + 6 of them kept for it
    assert calls == {"tokenizer": 2.0, "gpt": (2.0, 1000.0 + (178 - 24) * 60), "decoder": (2.0, 1000.0 + 178 * 60)}
    assert rep["total_budget_minutes"] == 178 and rep["total_minutes"] == 0


def test_train_says_when_the_total_shortened_the_transformer_stage(monkeypatch, tmp_path, capsys):
    import eartalk.model.recipe as recipe
    (tmp_path / "splits.json").write_text("{}")
    rep = {"recipe": "tiny", "total_budget_minutes": 89, "total_minutes": 88.7,
           "gpt": {"steps": 10 ** 6, "budget_minutes": 45, "schedule_minutes": 43.25}}
    monkeypatch.setattr(recipe, "run_recipe", lambda *a, **k: rep)
    assert main(["train", "--recipe", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "the transformer stage trained 43.25 of its 45 minutes, so that the recipe keeps to its 89" in out
    assert "recipe tiny: 88.7 min (its budget 89)" in out
    rep["gpt"]["schedule_minutes"] = 45
    assert main(["train", "--recipe", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert "transformer stage trained" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["tiny", "smoke"])
def test_the_tokenizer_stage_trains_in_the_precision_its_recipe_names(monkeypatch, tmp_path, name):
    """tok_bf16 reaches train_tokenizer: False in tiny (float32 measured better per minute on an AMX
    Xeon), None (the CPU decides) in smoke."""
    import eartalk.model.recipe as recipe
    seen = {}

    def fake_train(*a, **k):
        seen.update(k)
        raise StopIteration          # nothing past the call is under test
    n = 4
    frames = dict(frames=np.zeros((n, 3, 8, 8), np.uint8), portraits=np.zeros((1, 3, 8, 8), np.uint8),
                  index=np.zeros(n, np.int64), states=np.zeros((n, 1), np.float32), exprs=np.zeros((n, 8, 8), np.uint8))
    monkeypatch.setattr(recipe, "tokenizer_frames", lambda *a, **k: frames)
    monkeypatch.setattr(recipe, "list_clips", lambda *a: [])
    monkeypatch.setattr(recipe, "train_tokenizer", fake_train)
    with pytest.raises(StopIteration):
        recipe.tokenizer_stage(name, tmp_path / "corpus", tmp_path / "out", progress=False)
    assert RECIPES["tiny"]["tok_bf16"] is False and RECIPES["smoke"]["tok_bf16"] is None
    assert seen["bf16"] is RECIPES[name]["tok_bf16"]


def test_the_decoder_stage_passes_its_precision_to_train_tokenizer(monkeypatch):
    import eartalk.model.finetune as finetune
    seen = []

    def fake_train(*a, **k):
        seen.append(k["bf16"])
        raise StopIteration
    monkeypatch.setattr(finetune, "train_tokenizer", fake_train)
    monkeypatch.setattr(finetune, "_freeze_encoder", lambda tok: [])
    monkeypatch.setattr(finetune, "encoder_digest", lambda tok: "d")
    for bf16 in (False, None, True):
        with pytest.raises(StopIteration):
            finetune.train_decoder(None, None, None, None, None, None, val=None, lr=1e-3, batch=2, minutes=1,
                                   expr_weight=0, out_dir=".", seed=0, progress=False, bf16=bf16)
    assert seen == [False, None, True]
