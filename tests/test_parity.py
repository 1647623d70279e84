"""The parity report: agreement with the source, how much of the disagreement is near ties, and how far the
artifact's next-token distributions moved (KL divergence)."""

import numpy as np

from appliance.model.decoder import Decoder
from appliance.model.manifest import load_manifest
from export.parity import NEAR_TIE, Reference, kl_divergence, parity_report


def test_near_ties_are_counted_apart_from_the_positions_where_the_source_was_sure(tiny_fp32):
    decoder = Decoder(load_manifest(tiny_fp32))
    prompt, continuation = [5, 17, 42, 9], [int(t) for t in np.arange(100, 132)]
    cache = decoder.new_cache(slots=1, max_length=64)
    own = [decoder.prefill(cache, 0, prompt)] + [decoder.decode(cache, 0, t) for t in continuation[:-1]]
    chosen = np.stack(own).argmax(-1)
    # a source that agrees with the artifact everywhere, by a wide margin, except at two positions: at 3 it prefers
    # another token by a hair (a near tie), at 7 by far (a real disagreement)
    logits = np.zeros((len(continuation), own[0].shape[-1]), dtype=np.float32)
    logits[np.arange(len(continuation)), chosen] = 5.0
    for position, lead in ((3, NEAR_TIE / 5), (7, 5.0)):
        logits[position, chosen[position]] = 0.0
        logits[position, (chosen[position] + 1) % logits.shape[1]] = lead

    report = parity_report([Reference("p", prompt, continuation, logits)], decoder)

    (case,) = report["cases"]
    assert case["agreement"] == round(30 / 32, 4) and case["near_ties"] == 1
    assert case["agreement_where_sure"] == round(30 / 31, 4)
    assert report["lowest_agreement_where_sure"] == report["agreement_where_sure"] == case["agreement_where_sure"]
    assert report["near_tie_logits"] == NEAR_TIE


def test_kl_divergence_is_the_closed_form_and_zero_for_the_same_logits():
    source = np.array([[0.0, np.log(3.0)], [2.0, -1.0]])  # softmax: [1/4, 3/4], …
    artifact = np.array([[0.0, 0.0], [2.0, -1.0]])  # [1/2, 1/2], and the source's own second row
    expected = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    np.testing.assert_allclose(kl_divergence(source, artifact), [expected, 0.0], atol=1e-12)
    # large logits, as a model's are, do not overflow
    np.testing.assert_allclose(kl_divergence(source + 1e4, artifact + 1e4), [expected, 0.0], atol=1e-9)


def test_the_report_gives_the_mean_kl_divergence_of_its_prompts(tiny_fp32):
    decoder = Decoder(load_manifest(tiny_fp32))
    prompt, continuation = [5, 17, 42, 9], [int(t) for t in np.arange(100, 116)]
    cache = decoder.new_cache(slots=1, max_length=64)
    own = np.stack([decoder.prefill(cache, 0, prompt)] + [decoder.decode(cache, 0, t) for t in continuation[:-1]])

    same = parity_report([Reference("same", prompt, continuation, own)], decoder)
    flatter = parity_report([Reference("same", prompt, continuation, own),
                             Reference("flatter", prompt, continuation, own / 2)], decoder)

    assert same["kl_divergence"] < 1e-6 and same["agreement"] == 1.0
    cases = [c["kl_divergence"] for c in flatter["cases"]]
    assert cases[0] < 1e-6 and cases[1] > 0.01  # the same top-1 everywhere, yet another distribution
    assert flatter["cases"][1]["agreement"] == 1.0
    assert flatter["kl_divergence"] == float(f"{np.mean(cases):.4g}")
