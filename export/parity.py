"""The parity check that ends every export: the source model against the artifact on fixed prompts.

Free-running greedy text of an int4 model leaves the fp32 text within a few tokens, so identical output is no
measure. Instead the source model writes its own greedy continuation, both models read it teacher-forced, and we
count the positions where their top-1 tokens agree, and the largest logit difference.
"""

from __future__ import annotations

import numpy as np

from appliance.model import OnnxDecoder
from appliance.tokenizer import ChatTokenizer

PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Explain in two sentences why the sky is blue.",
    "用一句话介绍一下长城。",
)


def parity_report(torch_model, decoder: OnnxDecoder, tokenizer: ChatTokenizer, new_tokens: int = 32) -> dict:
    import torch

    cases = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(tokenizer.render([{"role": "user", "content": prompt}]))
        with torch.no_grad():
            full = torch_model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, pad_token_id=0)
            reference = torch_model(full).logits[0].float().numpy()
        logits, _ = decoder.forward(full.numpy(), decoder.empty_past())
        # positions len(ids)-1 … end-1 predict the continuation's tokens
        span = slice(len(ids) - 1, full.shape[1] - 1)
        ref, got = reference[span], logits[0, span].astype(np.float32)
        cases.append({
            "prompt": prompt,
            "prompt_tokens": len(ids),
            "agreement": round(float(np.mean(ref.argmax(-1) == got.argmax(-1))), 4),
            "max_abs_logit_diff": round(float(np.max(np.abs(ref - got))), 4),
        })
    return {
        "method": f"teacher-forced top-1 agreement over {new_tokens} greedy tokens of the source model",
        "agreement": round(float(np.mean([c["agreement"] for c in cases])), 4),
        "max_abs_logit_diff": max(c["max_abs_logit_diff"] for c in cases),
        "cases": cases,
    }
