from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.metrics.spec import parse_metric


@pytest.mark.parametrize(
    ("name", "kind", "num_gen", "num_real", "nn"),
    [
        ("fid50k_full", "fid", 50000, None, 3),
        ("fid50k", "fid", 50000, 50000, 3),
        ("kid50k_full", "kid", 50000, 1_000_000, 3),
        ("is50k", "is", 50000, 0, 3),
        ("pr50k3_full", "pr", 50000, 200_000, 3),
        ("pr10k5", "pr", 10000, 10000, 5),
        ("clip_score30k", "clip_score", 30000, 0, 3),
        ("fid256", "fid", 256, 256, 3),
        ("acc10k", "acc", 10000, 0, 3),
        ("acc1k", "acc", 1000, 0, 3),
        ("ifid5k", "ifid", 5000, 5000, 3),
        ("ifid5k_full", "ifid", 5000, None, 3),
        ("ifid50", "ifid", 50, 50, 3),
        ("conf10k", "conf", 10000, 0, 3),
        ("conf500", "conf", 500, 0, 3),
        ("eqt50k_int", "eqt_int", 50000, 0, 3),
        ("eqt50k_frac", "eqt_frac", 50000, 0, 3),
        ("eqr50k", "eqr", 50000, 0, 3),
        ("eqt1k_int", "eqt_int", 1000, 0, 3),
        ("eqr16", "eqr", 16, 0, 3),
    ],
)
def test_names_users_know(name: str, kind: str, num_gen: int, num_real: int | None, nn: int) -> None:
    s = parse_metric(name)
    assert (s.kind, s.num_gen, s.num_real, s.neighbours) == (kind, num_gen, num_real, nn)


@pytest.mark.parametrize(
    "name",
    ["fid", "fdi50k", "fid0", "is50k_full", "fid50k3", "clip_score30k_full", "FID50k", "acc1k_full", "acc10k3",
     "ifid1", "ifid5k3_full", "iifid5k", "acc", "conf1k_full", "conf10k3", "conf", "conf0", "eqt50k",
     "eqt50k_full", "eqt50k_int_full", "eqr50k_full", "eqr50k_int", "eqt0_int", "eqr0", "eqt", "eqt50k_half",
     "eqt50k3_int", "EQT50k_int"],
)  # fmt: skip
def test_bad_names_say_what_is_valid(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        parse_metric(name)


def test_the_unknown_name_error_lists_every_kind() -> None:
    with pytest.raises(ConfigError, match="fid, kid, is, pr, clip_score, acc, ifid, conf") as e:
        parse_metric("accuracy1k")
    assert "acc10k" in str(e.value) and "ifid5k_full" in str(e.value) and "conf10k" in str(e.value)
    assert "eqtCOUNT[k]_int, eqtCOUNT[k]_frac, eqrCOUNT[k]" in str(e.value)


@pytest.mark.parametrize(
    ("name", "fix"),
    [("eqt50k", "eqt50k_int (whole pixels) or eqt50k_frac"), ("eqr50k_int", "e.g. eqr50k"),
     ("eqt1k_full", "drop '_full' (e.g. eqt1k_int)"), ("eqr0", "must be > 0")],
)  # fmt: skip
def test_equivariance_name_errors_name_the_fix(name: str, fix: str) -> None:
    with pytest.raises(ConfigError, match=name) as e:
        parse_metric(name)
    assert fix in str(e.value)


def test_what_each_kind_needs() -> None:
    acc, ifid, fid = parse_metric("acc1k"), parse_metric("ifid5k_full"), parse_metric("fid50k_full")
    assert acc.needs_reals and acc.needs_classes and not acc.needs_extractor  # reals train the classifier
    assert ifid.needs_reals and ifid.needs_classes and ifid.needs_extractor and not ifid.needs_real_features
    assert not fid.needs_classes
    conf = parse_metric("conf1k")  # the classifier and its held-out reals; any generator
    assert conf.needs_reals and conf.needs_labels and conf.needs_classifier and not conf.needs_classes
    assert not conf.needs_extractor and not conf.needs_real_features
    assert acc.needs_labels and acc.needs_classifier and ifid.needs_labels and not ifid.needs_classifier
    assert not fid.needs_labels and not fid.needs_classifier
    for name in ("eqt50k_int", "eqt50k_frac", "eqr50k"):  # a generator with an input transform, nothing else
        s = parse_metric(name)
        assert s.needs_input_transform and s.num_real == 0
        assert not (s.needs_reals or s.needs_labels or s.needs_classes or s.needs_classifier or s.needs_extractor)
    assert not fid.needs_input_transform and not acc.needs_input_transform
