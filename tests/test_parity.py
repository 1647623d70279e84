"""The parity report: agreement with the source, and how much of the disagreement is near ties."""

import numpy as np

from appliance.model.decoder import Decoder
from appliance.model.manifest import load_manifest
from export.parity import NEAR_TIE, Reference, parity_report


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
