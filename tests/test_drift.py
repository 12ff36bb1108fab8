"""Drift detection through Evidently: verdicts per group, stored thresholds, HTML, determinism, bounds."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from shiftcost.drift import DriftInputs, detect_drift, subsample_rows
from shiftcost.errors import ConfigError, InputError
from shiftcost.imagestats import image_stats, stats_table

DIM = 24
CLASS_P = np.array([0.2, 0.15, 0.12, 0.1, 0.1, 0.09, 0.08, 0.07, 0.05, 0.04])


def sample(n: int, seed: int) -> DriftInputs:
    """A reference-like sample: correlated embeddings, image statistics and predicted classes."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(DIM, DIM)) / math.sqrt(DIM)
    return DriftInputs(
        embeddings=rng.normal(size=(n, DIM)) @ mixing + 0.5,
        image_stats={
            "brightness": rng.beta(5, 5, n),
            "contrast": rng.gamma(4.0, 0.05, n),
            "sharpness": rng.gamma(2.0, 0.02, n),
            "noise": rng.gamma(3.0, 0.005, n),
        },
        predictions=rng.choice(10, size=n, p=CLASS_P),
    )


def halves(n: int, seed: int = 1) -> tuple[DriftInputs, DriftInputs]:
    """The two halves of one random sample: no drift between them."""
    whole = sample(2 * n, seed)
    first, second = slice(0, n), slice(n, 2 * n)

    def part(rows: slice) -> DriftInputs:
        return DriftInputs(
            embeddings=whole.embeddings[rows],
            image_stats={k: v[rows] for k, v in whole.image_stats.items()},
            predictions=whole.predictions[rows],
        )

    return part(first), part(second)


def shifted(inputs: DriftInputs, groups: set[str], seed: int = 5) -> DriftInputs:
    """``inputs`` with a clear shift in the named groups only."""
    rng = np.random.default_rng(seed)
    embeddings, table, predictions = inputs.embeddings, dict(inputs.image_stats), inputs.predictions
    n = len(predictions)
    if "embeddings" in groups:
        embeddings = embeddings.copy()
        embeddings[:, : DIM // 2] += 1.0
    if "image_stats" in groups:
        table["brightness"] = np.clip(table["brightness"] + 0.2, 0, 1)
        table["contrast"] = table["contrast"] * 1.6
        table["noise"] = table["noise"] + 0.02
    if "predictions" in groups:
        predictions = predictions.copy()
        flip = rng.random(n) < 0.35
        predictions[flip] = 9
    return DriftInputs(embeddings=embeddings, image_stats=table, predictions=predictions)


ALL = {"embeddings", "image_stats", "predictions"}


def drifted_groups(result) -> set[str]:
    return {g.name for g in result.groups if g.drifted}


# ----------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("method", ["model", "distance", "ratio", "mmd"])
def test_two_halves_of_one_sample_show_no_drift(method: str) -> None:
    reference, current = halves(600)
    result = detect_drift(reference, current, embedding_method=method)
    assert all(g.tested for g in result.groups)
    assert drifted_groups(result) == set() and result.verdict is False


@pytest.mark.parametrize("method", ["model", "distance", "ratio", "mmd"])
def test_a_clear_shift_is_detected_by_every_embedding_method(method: str) -> None:
    reference, current = halves(600)
    result = detect_drift(reference, shifted(current, {"embeddings"}), embedding_method=method)
    assert drifted_groups(result) == {"embeddings"} and result.verdict is True


@pytest.mark.parametrize("group", sorted(ALL))
def test_each_group_detects_its_own_shift_and_only_that(group: str) -> None:
    reference, current = halves(600)
    result = detect_drift(reference, shifted(current, {group}))
    assert drifted_groups(result) == {group}
    assert result.verdict is True
    assert result.to_dict()["groups"][[g.name for g in result.groups].index(group)]["drifted"] is True


def test_min_drifted_groups_makes_the_overall_rule_stricter() -> None:
    reference, current = halves(600)
    one = shifted(current, {"predictions"})
    assert detect_drift(reference, one).verdict is True
    strict = detect_drift(reference, one, thresholds={"min_drifted_groups": 2})
    assert strict.verdict is False and "at least 2 of the 3" in strict.rule
    assert detect_drift(reference, shifted(current, {"predictions", "image_stats"}), thresholds={"min_drifted_groups": 2}).verdict is True


def test_image_statistics_of_real_images_see_added_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(800, 1, 12, 12, generator=generator), 3, stride=1, padding=1)
    reference, batch = base[:400], base[400:]
    noisy = (batch + 0.08 * torch.randn(batch.shape, generator=generator)).clamp(0, 1)
    ref = DriftInputs(image_stats=stats_table(image_stats(reference)))
    assert detect_drift(ref, DriftInputs(image_stats=stats_table(image_stats(batch)))).verdict is False
    result = detect_drift(ref, DriftInputs(image_stats=stats_table(image_stats(noisy))))
    group = result.group("image_stats")
    assert group.drifted and {"sharpness", "noise"} <= set(group.details["drifted_columns"])
    assert [g.tested for g in result.groups] == [False, True, False]


# ----------------------------------------------------------------------------- scores and thresholds


def test_per_feature_scores_are_evidentlys_default_tests_with_their_thresholds() -> None:
    reference, current = halves(600)
    current = shifted(current, {"image_stats", "predictions"})
    result = detect_drift(reference, current)
    stats_group = result.group("image_stats")
    for feature in stats_group.features:
        assert feature.test == "K-S p_value" and feature.threshold == 0.05
        expected = scipy_stats.ks_2samp(reference.image_stats[feature.name], current.image_stats[feature.name]).pvalue
        assert feature.score == pytest.approx(expected, rel=1e-9, abs=1e-300)
        assert feature.drift_when == "score <= threshold" and feature.drifted == (feature.score <= feature.threshold)
    assert stats_group.score == pytest.approx(np.mean([f.drifted for f in stats_group.features]))
    assert stats_group.threshold == 0.5

    (pred,) = result.group("predictions").features
    classes = np.arange(10)
    ref_counts = np.array([(reference.predictions == c).sum() for c in classes])
    cur_counts = np.array([(current.predictions == c).sum() for c in classes])
    # Pearson's test of homogeneity on the 2 x 10 table, written out.
    table = np.array([ref_counts, cur_counts], dtype=float)
    expected_counts = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = ((table - expected_counts) ** 2 / expected_counts).sum()
    expected = scipy_stats.chi2.sf(statistic, df=len(classes) - 1)
    assert pred.test == "chi-square homogeneity p_value" and pred.threshold == 0.05
    assert pred.score == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert result.group("predictions").details["current_counts"] == cur_counts.tolist()


def test_a_chosen_evidently_test_is_used_and_an_unknown_one_refused() -> None:
    reference, current = halves(300)
    result = detect_drift(reference, current, thresholds={"predictions_method": "jensenshannon", "image_stats_method": "wasserstein", "image_stats": 0.3})
    assert result.group("predictions").features[0].test == "Jensen-Shannon distance"
    assert {(f.test, f.threshold) for f in result.group("image_stats").features} == {("Wasserstein distance (normed)", 0.3)}
    with pytest.raises(ConfigError, match="not available"):
        detect_drift(reference, current, thresholds={"predictions_method": "no-such-test"})


def test_large_samples_use_wasserstein_and_jensen_shannon_with_their_thresholds() -> None:
    # Above 1,000 reference rows Evidently's defaults are distances, not tests.
    reference, current = halves(1200)
    assert detect_drift(reference, current).verdict is False
    result = detect_drift(reference, shifted(current, ALL))
    assert drifted_groups(result) == ALL
    for feature in result.group("image_stats").features:
        assert feature.test == "Wasserstein distance (normed)" and feature.threshold == 0.1
        assert feature.drift_when == "score >= threshold" and feature.drifted == (feature.score >= feature.threshold)
    (pred,) = result.group("predictions").features
    assert pred.test == "Jensen-Shannon distance" and pred.threshold == 0.1 and pred.drifted


def test_thresholds_used_are_stored_and_a_given_threshold_decides() -> None:
    reference, current = halves(600)
    current = shifted(current, {"embeddings"})
    default = detect_drift(reference, current)
    group = default.group("embeddings")
    assert group.threshold == 0.55 and group.details["threshold_source"] == "Evidently default"
    assert default.thresholds["embeddings_resolved"] == 0.55 and default.thresholds["embedding_method"] == "model"
    assert 0.55 < group.score <= 1.0

    lenient = detect_drift(reference, current, thresholds={"embeddings": group.score + 0.01})
    assert not lenient.group("embeddings").drifted
    assert lenient.thresholds["embeddings"] == pytest.approx(group.score + 0.01)
    feature = lenient.group("embeddings").features[0].to_dict()
    assert feature["threshold"] == pytest.approx(group.score + 0.01) and feature["drift_when"] == "score > threshold"


def test_distance_threshold_is_calibrated_on_the_reference() -> None:
    reference, current = halves(600)
    result = detect_drift(reference, current, embedding_method="distance")
    group = result.group("embeddings")
    # The score is the distance between the mean embeddings (checked independently) ...
    assert group.score == pytest.approx(np.linalg.norm(reference.embeddings.mean(0) - current.embeddings.mean(0)), rel=1e-9)
    # ... and the threshold the 95% quantile of that distance between same-size draws from the reference.
    assert group.details["threshold_source"].startswith("bootstrap q0.95")
    rng = np.random.default_rng(123)
    draws = [
        np.linalg.norm(reference.embeddings[rng.integers(0, 600, 600)].mean(0) - reference.embeddings[rng.integers(0, 600, 600)].mean(0))
        for _ in range(400)
    ]
    assert group.threshold == pytest.approx(np.quantile(draws, 0.95), rel=0.25)
    higher = detect_drift(reference, current, embedding_method="distance", thresholds={"embeddings_quantile": 0.999})
    assert higher.group("embeddings").threshold > group.threshold


def _slow_mmd2u(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, RBF kernel with gamma = 1 / median(cross distances)^2, by loops over pairs."""
    cross = [math.dist(a, b) for a in x for b in y]
    gamma = 1.0 / float(np.median(cross)) ** 2

    def k(a, b) -> float:
        return math.exp(-gamma * math.dist(a, b) ** 2)

    m, n = len(x), len(y)
    xx = math.fsum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = math.fsum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = math.fsum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_subsamples_both_sides_and_scores_the_subsample() -> None:
    rng = np.random.default_rng(4)
    reference = DriftInputs(embeddings=rng.normal(size=(700, 4)))
    current = DriftInputs(embeddings=rng.normal(size=(500, 4)) + 0.4)
    result = detect_drift(reference, current, embedding_method="mmd", max_embedding_rows=60, seed=3)
    group = result.group("embeddings")
    assert group.rows == (60, 60) and group.details["reference_rows_given"] == 700
    x = subsample_rows(reference.embeddings, 60, 3, 0)
    y = subsample_rows(current.embeddings, 60, 3, 1)
    assert group.score == pytest.approx(max(_slow_mmd2u(x, y), 0.0), rel=1e-9)
    assert group.drifted


def test_mmd_memory_stays_bounded_by_the_subsample() -> None:
    rng = np.random.default_rng(0)
    reference = DriftInputs(embeddings=rng.normal(size=(3000, 8)))
    current = DriftInputs(embeddings=rng.normal(size=(3000, 8)))
    detect_drift(DriftInputs(embeddings=reference.embeddings[:50]), DriftInputs(embeddings=current.embeddings[:50]), embedding_method="mmd")  # warm up imports
    tracemalloc.start()
    try:
        result = detect_drift(reference, current, embedding_method="mmd", max_embedding_rows=200)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_kernel = (6000**2) * 8  # 288 MB: what the kernel alone would take without subsampling
    assert result.group("embeddings").rows == (200, 200)
    assert peak < full_kernel / 4


# ----------------------------------------------------------------------------- report, determinism


def test_html_report_contains_evidentlys_widgets_and_our_summary(tmp_path) -> None:
    reference, current = halves(600)
    result = detect_drift(reference, shifted(current, {"image_stats"}))
    html = result.html
    assert html.lstrip().lower().startswith("<html") or "<!doctype html>" in html[:200].lower()
    assert len(html) > 100_000  # Evidently inlines its renderer
    for text in ("shiftcost drift verdict", "Per-feature results", "Drift in column &#39;brightness&#39;", "Embeddings drift", "Value Drift for column predicted_class"):
        assert text in html or text.replace("&#39;", "'") in html, text
    path = result.save_html(tmp_path / "reports" / "batch.html")
    assert path.read_text(encoding="utf-8") == html
    assert "html" not in result.to_dict() and result.to_dict(include_html=True)["html"] == html


def test_evidently_embedding_plot_gives_the_same_score() -> None:
    rng = np.random.default_rng(2)
    reference = DriftInputs(embeddings=rng.normal(size=(60, 6)))
    current = DriftInputs(embeddings=rng.normal(size=(60, 6)) + 0.8)
    fast = detect_drift(reference, current, embedding_method="distance")
    plotted = detect_drift(reference, current, embedding_method="distance", embedding_plot=True)
    assert plotted.group("embeddings").score == pytest.approx(fast.group("embeddings").score, rel=1e-12)
    assert plotted.verdict is fast.verdict is True
    assert "Drift in embeddings" in plotted.html and "Drift in embeddings" not in fast.html


def test_same_seed_same_result_and_the_seed_drives_subsampling() -> None:
    reference, current = halves(600)
    current = shifted(current, {"embeddings"})

    def run(seed: int) -> dict:
        data = detect_drift(reference, current, embedding_method="distance", max_embedding_rows=200, seed=seed).to_dict()
        data.pop("seconds")
        return data

    first, again, other = run(11), run(11), run(12)
    assert first == again
    assert first["seed"] == 11 and first["groups"][0]["rows"] == [200, 200]
    assert other["groups"][0]["score"] != first["groups"][0]["score"]
    assert json.loads(json.dumps(first, allow_nan=False)) == first


def test_one_pass_outputs_as_torch_tensors_and_score_matrices_are_accepted() -> None:
    reference, current = halves(300)
    logits = np.eye(10)[current.predictions] * 5.0  # arg-max gives the classes back
    as_torch = DriftInputs(
        embeddings=torch.from_numpy(current.embeddings),
        image_stats={k: torch.from_numpy(v) for k, v in current.image_stats.items()},
        predictions=torch.from_numpy(logits),
    )
    plain = detect_drift(reference, current).to_dict()
    converted = detect_drift(reference, as_torch).to_dict()
    for data in (plain, converted):
        data.pop("seconds")
    assert converted == plain


# ----------------------------------------------------------------------------- bad input


def test_groups_missing_on_one_side_are_reported_untested() -> None:
    reference, current = halves(300)
    result = detect_drift(DriftInputs(predictions=reference.predictions), current)
    assert [g.tested for g in result.groups] == [False, False, True]
    assert "reference" in result.group("embeddings").method
    assert "1 tested groups" in result.rule or "of the 1 tested" in result.rule


@pytest.mark.parametrize(
    "reference, current, error, words",
    [
        (DriftInputs(), DriftInputs(), InputError, "no drift test could run"),
        (DriftInputs(embeddings=np.zeros((50, 4))), DriftInputs(embeddings=np.zeros((50, 5))), InputError, "5 dimensions"),
        (DriftInputs(embeddings=np.zeros((5, 4))), DriftInputs(embeddings=np.zeros((50, 4))), InputError, "at least 10"),
        (DriftInputs(embeddings=np.zeros(50)), DriftInputs(embeddings=np.zeros((50, 4))), InputError, "N x D"),
        (DriftInputs(embeddings=np.full((50, 4), np.nan)), DriftInputs(embeddings=np.zeros((50, 4))), InputError, "NaN"),
        (DriftInputs(image_stats={"a": np.zeros(9)}), DriftInputs(image_stats={"b": np.zeros(9)}), InputError, "differ"),
        (DriftInputs(image_stats={"a": np.zeros(9), "b": np.zeros(8)}), DriftInputs(image_stats={"a": np.zeros(9)}), InputError, "different lengths"),
        (DriftInputs(predictions=np.array([0.5, 1.5, 2.0])), DriftInputs(predictions=np.array([0, 1, 2])), InputError, "class indices"),
    ],
)
def test_bad_inputs_raise_one_clear_sentence(reference, current, error, words: str) -> None:
    with pytest.raises(error, match=words):
        detect_drift(reference, current)


@pytest.mark.parametrize(
    "kwargs",
    [{"embedding_method": "cosine"}, {"max_embedding_rows": 3}, {"thresholds": {"embedings": 0.5}}, {"thresholds": {"image_stats_share": 0.0}}],
)
def test_bad_settings_raise_config_errors(kwargs) -> None:
    reference, current = halves(50)
    with pytest.raises(ConfigError):
        detect_drift(reference, current, **kwargs)
