"""bench/learning.py end to end on generated ImageNet-layout roots: issue 22's arms and flags in one run.

One run, one rank, a few steps per arm: ``pixel``, ``pixel_matched`` (read from the decoded pixel cache),
``token`` and ``token:seitpp`` (TokenAdapt and ColorAdapt trained for two steps, then run in the training
step), ``--budget-scale``, the curve, ``--dev-fraction``, and a tokenizer kind other than k-means made by the
tokenise job. The generated classes differ in colour, so a few dozen steps learn them: arms must beat
chance (1/3). The summary (means over seeds, the best pixel and token arms, the targets) is checked on its
own, without launches. The pre-training arms (mtm, m3i, addp) and jpeg_equal run the same ``run_arm`` /
``launch`` path; their objectives, the adapters under MTM (test_augment.py) and the equal-byte copies
have their own tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.job_support import local_ray
from vqpt.sample_data import generate_imagenet

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.learning import BUDGET_KEYS, main, merge_prior, summarise  # noqa: E402

pytestmark = pytest.mark.slow
CHANCE = 1 / 3
BATCH = 8


def test_one_run_every_new_arm_and_flag(tmp_path):
    data = generate_imagenet(tmp_path / "imgs", classes=3, train_per_class=10, val_per_class=2)
    out = tmp_path / "learning.json"
    with local_ray():  # one Ray instance for both tokenise calls (each would start its own otherwise)
        rc = main(["--train", str(data / "train"), "--val", str(data / "val"), "--json", str(out), "--work",
                   str(tmp_path / "work"), "--arms", "pixel,pixel_matched,token,token:seitpp,token:adapters",
                   "--resolution", "32", "--token-resolution", "64", "--depth", "1", "--batch-size", str(BATCH),
                   "--ranks", "1", "--workers", "0", "--finetune-steps", "12", "--budget-scale", "2",
                   "--dev-fraction", "0.3", "--tokenizer-kind", "kmeans_residual", "--vocab", "32",
                   "--adapter-steps", "2", "--adapter-images", "12", "--equal-formats", "webp"])
    assert rc == 0
    result = json.loads(out.read_text())
    # --dev-fraction: 3 of each class's 10 train images held out (disjoint), evaluated there, not on val.
    assert result["evaluated_on"].startswith("dev") and result["reported_val"] == str(data / "val")
    assert result["train_images"] == 21 and result["val_images"] == 9
    dev = {p.name for p in (tmp_path / "work" / "dev_split" / "dev").rglob("*.JPEG")}
    rest = {p.name for p in (tmp_path / "work" / "dev_split" / "train").rglob("*.JPEG")}
    assert len(dev) == 9 and len(rest) == 21 and not dev & rest
    # The residual tokenizer (K = 8 x 4) was fitted on train and made the tokens through the tokenise job.
    assert result["tokenizer_kind"] == "kmeans_residual" and result["budget"]["vocab"] == 32
    assert result["token_grid"] == 8 and result["token_resolution"] == 64
    assert 0 < result["bytes_tokens"] < result["bytes_jpeg"]
    assert result["bytes_per_image_token"] == pytest.approx(result["bytes_tokens"] / 30, rel=1e-3)
    for key in ("pixel", "pixel_matched", "token", "token_seitpp", "token_adapters"):
        arm = result["arms"][key]
        assert arm["val_samples"] == 9 and arm["finetune_s"] > 0, key
        assert arm["finetune_steps"] == 24, key  # --budget-scale 2
        # Evaluated at 25 / 50 / 75 / 100 % of the fine-tuning steps, in epochs of the 21 train images.
        assert [e for e, _ in result["curve"][key]] == [round(s * BATCH / 21, 3) for s in (6, 12, 18, 24)], key
        assert result["curve"][key][-1][1] == result[f"top1_{key}"] == arm["top1"], key
        assert result[f"top1_{key}"] > CHANCE + 0.1, (key, result[f"top1_{key}"])  # learned the colours
    assert result["arms"]["token_seitpp"]["aug"] == "seitpp" and result["arms"]["token"]["aug"] == "ids"
    assert result["adapters"]["seconds"] > 0
    assert result["adapters"]["tokenadapt_train"]["steps"] == result["adapters"]["coloradapt_train"]["steps"] == 2
    def augment_of(run: str) -> dict:
        return yaml.safe_load((tmp_path / "work" / run / "config.yaml").read_text())["augment"]

    adapters = tmp_path / "work" / "adapters" / "r64_k32_kmeans_residual_s2_n12"  # tokens, steps, images
    seitpp = augment_of("ft_token_r64_k32_kmeans_residual_seitppaug_x2")  # the seitpp run trained with both
    assert (seitpp["tokenadapt"], seitpp["coloradapt"]) == (str(adapters / "tokenadapt.pt"),
                                                             str(adapters / "coloradapt.pt"))
    assert seitpp["replace_p"] > 0 and seitpp["swap_p"] > 0  # with Token-EDA
    learned = augment_of("ft_token_r64_k32_kmeans_residual_adaptersaug_x2")  # the same adapters, no Token-EDA
    assert (learned["tokenadapt"], learned["coloradapt"]) == (seitpp["tokenadapt"], seitpp["coloradapt"])
    assert learned["replace_p"] == learned["swap_p"] == 0 and learned["affine_p"] == seitpp["affine_p"] > 0
    assert result["arms"]["token_adapters"]["aug"] == "adapters" and "adapters_minus_ids_points" in result
    assert augment_of("ft_token_r64_k32_kmeans_residual_x2")["tokenadapt"] is None  # the ids run without
    # Targets against the better pixel arm; the pixel_matched arm read 64 px crops from the decoded cache.
    best = max(result["top1_pixel"], result["top1_pixel_matched"])
    assert result["top1_pixel_best"] == best and result[f"top1_{result['pixel_best']}"] == best
    assert result["token_vs_pixel_best_top1"] == pytest.approx(result["top1_token_best"] / best)
    assert set(result["targets"]) == {"token (best aug) >= 0.90 x top1_pixel_best with <= 1200 B/image",
                                      "seitpp aug >= ids aug + 2 points"}
    assert len(list((tmp_path / "work" / "pixel_cache").glob("*_64_*.u8"))) == 2  # train and dev
    assert (tmp_path / "learning.png").stat().st_size > 0


def test_summary_means_seeds_and_judges_every_target_against_the_best_pixel_arm():
    result = {"bytes_per_image_token": 800.0, "budget": {"token_aug": "ids"}}
    seeds = {"pixel": [0.50, 0.54], "pixel_matched": [0.60], "token": [0.55, 0.57], "token_seitpp": [0.60],
             "token_adapters": [0.575], "mtm_seitpp": [0.62]}
    summarise(result, seeds)
    assert result["top1_pixel"] == pytest.approx(0.52) and result["top1_pixel_spread"] == pytest.approx(0.02)
    assert result["top1_pixel_seeds"] == [0.50, 0.54] and "top1_pixel_matched_spread" not in result
    assert (result["pixel_best"], result["top1_pixel_best"]) == ("pixel_matched", 0.60)
    assert (result["token_best"], result["top1_token_best"]) == ("token_seitpp", 0.60)
    assert result["token_vs_pixel_best_top1"] == pytest.approx(1.0)
    assert result["seitpp_minus_ids_points"] == pytest.approx(4.0)
    assert result["adapters_minus_ids_points"] == pytest.approx(1.5)  # the ablation is reported, not a target
    assert result["mtm_minus_token_points"] == pytest.approx(2.0)
    assert result["targets"] == {"token (best aug) >= 0.90 x top1_pixel_best with <= 1200 B/image": True,
                                 "seitpp aug >= ids aug + 2 points": True,
                                 "mtm >= token + 3 points (best aug each)": False}
    result["bytes_per_image_token"] = 1500.0  # over the byte budget: the token target fails whatever its top-1
    summarise(result, seeds)
    assert result["targets"]["token (best aug) >= 0.90 x top1_pixel_best with <= 1200 B/image"] is False


def test_the_adapters_aug_is_seitpp_without_token_eda_and_parses_as_an_arm():
    from bench.learning import _arms
    from bench.learning_arms import seitpp_overrides

    paths = {"tokenadapt": "/m/ta.pt", "coloradapt": "/m/ca.pt"}
    full, learned = seitpp_overrides(paths, eda=True), seitpp_overrides(paths, eda=False)
    assert "augment.tokenadapt=/m/ta.pt" in learned and "augment.coloradapt=/m/ca.pt" in learned
    assert set(learned) < set(full)
    assert {o.split("=")[0] for o in set(full) - set(learned)} == {"augment.replace_p", "augment.synonym_k",
                                                                   "augment.swap_p"}
    assert _arms("token:adapters,mtm:adapters", "ids") == [("token", "adapters"), ("mtm", "adapters")]
    with pytest.raises(SystemExit, match="adapters"):  # the error lists the augmentations, this one among them
        _arms("token:bogus", "ids")


def test_a_pre_trained_arm_takes_one_aug_for_pre_training_and_another_for_fine_tuning():
    from bench.learning import _arms, _best, arm_key, run_key
    from bench.learning_arms import aug_overrides, aug_stages, pretrain_tag

    assert _arms("mtm:seitpp/ids,mtm:seitpp", "ids") == [("mtm", "seitpp/ids"), ("mtm", "seitpp")]
    assert aug_stages("seitpp/ids") == ("seitpp", "ids") and aug_stages("adapters") == ("adapters", "adapters")
    paths = {"tokenadapt": "/m/ta.pt", "coloradapt": "/m/ca.pt"}
    # seitpp/ids pre-trains as seitpp does (the same run folder, reused) and fine-tunes as ids does
    assert pretrain_tag("seitpp/ids") == pretrain_tag("seitpp") == pretrain_tag("adapters") == "_seitppaug"
    assert aug_overrides("seitpp/ids", paths, "pretrain") == aug_overrides("seitpp", paths, "pretrain")
    assert "augment.tokenadapt=/m/ta.pt" in aug_overrides("seitpp/ids", paths, "pretrain")
    assert aug_overrides("seitpp/ids", paths, "finetune") == aug_overrides("ids", None, "finetune") == []
    assert pretrain_tag("ids") == "" and aug_overrides("ids", None, "pretrain") == []
    assert "augment.replace_p=0.0625" in aug_overrides("ids/seitpp", paths, "finetune")
    assert arm_key("mtm", "seitpp/ids", "ids") == "mtm_seitpp-ids" and arm_key("mtm", "ids", "ids") == "mtm"
    assert run_key("pixel", "ids", 1, "ids") == "pixel_s1"
    assert run_key("mtm", "seitpp/ids", 0, "ids") == "mtm_seitpp-ids"
    # the staged arm competes for the best mtm arm; spreads and other arms' keys do not
    found = {"top1_mtm_seitpp": 0.60, "top1_mtm_seitpp-ids": 0.63, "top1_mtm_seitpp-ids_spread": 0.9,
             "top1_mtm_bogus-ids": 0.99}
    assert _best(found, "mtm") == ("mtm_seitpp-ids", 0.63)
    for bad, says in (("token:seitpp/ids", "only fine-tunes"), ("mtm:seitpp/bogus", "unknown arm"),
                      ("mtm:ids/ids/ids", "unknown arm"), ("mtm:seitpp/", "unknown arm")):
        with pytest.raises(SystemExit, match=says):
            _arms(bad, "ids")


def test_with_merges_an_earlier_runs_arms_of_the_same_budget_and_refuses_another(tmp_path):
    budget = dict.fromkeys(BUDGET_KEYS, 1) | {"seeds": [0], "budget_scale": 4.0}
    same = {"train_images": 90, "val_images": 30, "classes": 3, "evaluated_on": "val", "token_resolution": 64}
    prior = {**same, "budget": budget | {"seeds": [1]},
             "arms": {"pixel": {"top1": 0.4, "curve": [[1.0, 0.4]]}, "token": {"top1": 0.9, "curve": []},
                      "pixel_matched": {"top1": None}}}
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    result, seeds = {**same, "budget": budget, "arms": {}, "curve": {}, "bytes_per_image_token": 700.0}, {}
    merge_prior(result, seeds, tmp_path / "prior.json", running={"token"})
    assert set(result["arms"]) == {"pixel"} and result["arms"]["pixel"]["from"] == str(tmp_path / "prior.json")
    assert seeds == {"pixel": [0.4]} and result["curve"]["pixel"] == [[1.0, 0.4]]
    prior["budget"] = budget | {"budget_scale": 1.0}
    (tmp_path / "other.json").write_text(json.dumps(prior))
    with pytest.raises(SystemExit, match=r"other.json: not the same images and budget .*budget.budget_scale"):
        merge_prior(result, seeds, tmp_path / "other.json", running=set())
    # the adapters' budget matters only where the earlier run trained adapters; a seed-1 run keeps seed 0's arm
    prior["budget"] = budget | {"adapter_steps": 150}
    (tmp_path / "no_adapters.json").write_text(json.dumps(prior))
    result, seeds = {**same, "budget": budget, "arms": {}, "curve": {}}, {}
    merge_prior(result, seeds, tmp_path / "no_adapters.json", running={"token_s1"})
    assert set(result["arms"]) == {"pixel", "token"} and seeds == {"pixel": [0.4], "token": [0.9]}
    (tmp_path / "adapters.json").write_text(json.dumps(prior | {"adapters": {"seconds": 1.0}}))
    with pytest.raises(SystemExit, match=r"budget.adapter_steps"):
        merge_prior(result, seeds, tmp_path / "adapters.json", running=set())
