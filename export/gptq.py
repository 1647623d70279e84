"""GPTQ: each MatMul's levels chosen for the error they cause in its output on real activations, not in its weights.

Rounding a block on its own (export/block_fit.py) treats every weight as equally important and every error as
independent. GPTQ (Frantar et al., 2022) quantizes a matrix one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse of H = 2·XᵀX, the second moment of the
inputs X the matrix actually sees; what one column loses, the others make up for in the product. Each block's scale
and zero point still come from block_fit's search, taken when the column loop reaches the block, so the layout, the
kernels and the speed are exactly MatMulNBits's.

The activations come from the source model itself: it answers CALIBRATION_PROMPTS (what the box is asked: customer
service in Chinese and English, code, explanations; none of them a parity prompt) greedily, and one forward pass
over those conversations runs with a hook before every projection. The hook quantizes the projection from its input
and puts the dequantized weights in place before the projection runs, so every later layer is calibrated on what the
quantized layers before it produce (GPTQ's sequential order) in a single pass. q/k/v and gate/up read one input and
are quantized together as the fused MatMuls the graph holds. Calibrating rewrites the torch model's weights: the
parity references must be taken before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from appliance.errors import ExportError
from appliance.model.tokenizer import ChatTokenizer
from export.block_fit import Fitted, pack, search
from export.gguf_blocks import Parts, fill, stack
from export.progress import count_bar

CALIBRATION_PROMPTS = (
    "我想办一张信用卡，需要满足什么条件？",
    "How do I reset the password of my online banking account?",
    "转账到国外需要多长时间？手续费是多少？",
    "Write a SQL query that lists the ten customers with the largest balances.",
    "请解释一下定期存款和活期存款的区别。",
    "My card was swallowed by the ATM. What should I do?",
    "帮我写一封邮件，通知客户下周一系统升级暂停服务。",
    "Write a JavaScript function that formats a number as a currency amount.",
    "贷款买房需要准备哪些材料？",
    "Explain what compound interest is, with a short example.",
    "客户抱怨排队时间太长，我应该怎么回复比较得体？",
    "Write a Python class for a bank account with deposit and withdraw methods that reject negative amounts.",
    "如何开通手机银行？请分步骤说明。",
    "What is the difference between a debit card and a credit card?",
    "把这句话翻译成英文：感谢您的耐心等待，我们会尽快处理您的问题。",
    "List three ways to protect yourself from phone scams, briefly.",
)
# of H's mean diagonal, added to it. GPTQ's default is 0.01, for 128 × 2048 calibration tokens; with our ~2,000 H is
# far from full rank (a down projection reads 8,960 inputs), and 0.01 let the error run into directions the
# calibration never saw: the 0.5B's parity 0.926 with 0.01, 0.953 with 0.1, against 0.941 for block_fit alone
DAMPING = 0.1
_ROWS_PER_PASS = 4096


def calibrate(model, tokenizer: ChatTokenizer, bits_of: Callable[[str], int], block: int, symmetric: bool,
              new_tokens: int = 96, carried: dict[str, Parts] | None = None) -> dict[str, Fitted]:
    """GPTQ for every projection of a Qwen2 torch model; returns MatMulNBits tensors by the graph's weight name
    (model.layers.N.self_attn.qkv_proj.weight, …, lm_head.weight). bits_of(graph weight name) → 4, 6 or 8. carried:
    a GGUF's own blocks (export/gguf_blocks.py), taken as they are; GPTQ quantizes only the other rows."""
    carried = carried or {}
    ids, mask = _conversations(model, tokenizer, new_tokens)
    valid = mask.reshape(-1).bool()
    fitted: dict[str, Fitted] = {}
    groups = _fused_groups(model)
    bar = count_bar(range(len(groups) + 1), "GPTQ", "MatMul")

    def quantize_group(name: str, modules: list[torch.nn.Linear], x: torch.Tensor, replace: bool) -> None:
        # a carried part's torch weights are already its blocks dequantized: nothing to put in place
        parts = carried.get(name) or [m.out_features for m in modules]
        own = [m for m, part in zip(modules, parts) if isinstance(part, int)]
        if own:
            x = x.reshape(-1, x.shape[-1])[valid].float()
            weight = torch.cat([m.weight.detach().float() for m in own])
            quantized, dequantized = gptq(weight, x.T @ x * (2 / x.shape[0]), bits_of(name), block, symmetric)
            if replace:
                for m, part in zip(own, dequantized.split([m.out_features for m in own])):
                    m.weight.data.copy_(part)
            fitted[name] = quantized if len(own) == len(modules) else stack(fill(parts, quantized))
        else:
            fitted[name] = stack(parts)
        bar.update()

    hooks = [modules[0].register_forward_pre_hook(
        lambda module, args, name=name, modules=modules: quantize_group(name, modules, args[0], True))
        for name, modules in groups]
    try:
        with torch.no_grad():
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            # the vocabulary projection is last: nothing reads its output, and its weight may be the embedding's
            quantize_group("lm_head.weight", [model.lm_head], hidden, replace=False)
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()
    return fitted


def gptq(weight: torch.Tensor, h: torch.Tensor, bits: int, block: int, symmetric: bool
         ) -> tuple[Fitted, torch.Tensor]:
    """weight [N, K] (torch's layout), h [K, K] → (MatMulNBits tensors, the dequantized weight [N, K])."""
    n, k = weight.shape
    blocks = -(-k // block)
    padded = blocks * block
    w = torch.zeros(n, padded)
    w[:, :k] = weight
    hessian = torch.eye(padded)  # padding columns: zero weights, an identity that couples them to nothing
    hessian[:k, :k] = h
    dead = hessian.diagonal() == 0  # an input that is always zero: its weights do nothing
    hessian[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_cholesky(hessian)
    levels = torch.empty(n, padded, dtype=torch.uint8)
    scales = torch.empty(n, blocks)
    zeros = torch.empty(n, blocks, dtype=torch.uint8)
    for lo in range(0, n, _ROWS_PER_PASS):  # rows are independent: a pass over a few thousand stays in cache
        hi = min(lo + _ROWS_PER_PASS, n)
        levels[lo:hi], scales[lo:hi], zeros[lo:hi] = _quantize_rows(w[lo:hi], hinv, (1 << bits) - 1, block,
                                                                    symmetric)
    dequantized = (scales.repeat_interleave(block, 1) * (levels.float() - zeros.float().repeat_interleave(block, 1)))
    fitted = pack(levels.reshape(n, blocks, block), scales, None if symmetric else zeros, bits)
    return fitted, dequantized[:, :k]


def _quantize_rows(w: torch.Tensor, hinv: torch.Tensor, top: int, block: int, symmetric: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over rows w [n, K] (updated in place): levels [n, K], scales and zero points [n, blocks].
    Each block's scale and zero point are searched when the loop reaches it, on the weights as the errors of the
    blocks before have left them."""
    n, k = w.shape
    levels = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // block)
    zeros = torch.empty(n, k // block, dtype=torch.uint8)
    for b in range(k // block):
        lo, hi = b * block, (b + 1) * block
        w1 = w[:, lo:hi].clone()
        _, scale, zero = search(w1, top, symmetric)
        step, zero_f = torch.where(scale > 0, scale, torch.ones_like(scale)), zero.float()
        h1 = hinv[lo:hi, lo:hi]
        errors = torch.empty(n, block)
        for i in range(block):
            q = (w1[:, i] / step + zero_f).round().clamp(0, top)
            error = (w1[:, i] - scale * (q - zero_f)) / h1[i, i]
            w1[:, i:].addr_(error, h1[i, i:], alpha=-1)
            errors[:, i] = error
            levels[:, lo + i] = q.to(torch.uint8)
        w[:, hi:].addmm_(errors, hinv[lo:hi, hi:], alpha=-1)
        scales[:, b], zeros[:, b] = scale, zero
    return levels, scales, zeros


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """U, upper triangular, with UᵀU = (H + damping)⁻¹: the factor GPTQ's column loop reads. With J the reversal
    and JHJ = MMᵀ, U = J·M⁻¹·J, one factorization and one triangular inverse (half the classic three steps'
    work, which for a down projection's 8960 columns is seconds on two cores). More damping if H will not factor."""
    eye = torch.eye(hessian.shape[0])
    damping = DAMPING * hessian.diagonal().mean()
    for _ in range(4):
        lower, info = torch.linalg.cholesky_ex(torch.flip(hessian + damping * eye, (0, 1)))
        if info == 0:
            return torch.flip(torch.linalg.solve_triangular(lower, eye, upper=False), (0, 1))
        damping *= 10
    raise ExportError("GPTQ: a layer's input statistics cannot be factored even with heavy damping; export with "
                      "--no-gptq.")


def _fused_groups(model) -> list[tuple[str, list[torch.nn.Linear]]]:
    """The graph's fused MatMuls as torch modules, in the order the forward pass reaches them."""
    groups = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        groups += [(f"{p}.self_attn.qkv_proj.weight", [attn.q_proj, attn.k_proj, attn.v_proj]),
                   (f"{p}.self_attn.o_proj.weight", [attn.o_proj]),
                   (f"{p}.mlp.gate_up_proj.weight", [mlp.gate_proj, mlp.up_proj]),
                   (f"{p}.mlp.down_proj.weight", [mlp.down_proj])]
    return groups


def _conversations(model, tokenizer: ChatTokenizer, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration prompts with the model's own greedy answers: ids and mask [prompts, length], right-padded
    (so that positions count from each row's start without position ids)."""
    prompts = [tokenizer.encode(tokenizer.render([{"role": "user", "content": p}])) for p in CALIBRATION_PROMPTS]
    width = max(map(len, prompts))
    left = torch.zeros(len(prompts), width, dtype=torch.long)
    left_mask = torch.zeros_like(left)
    for row, p in enumerate(prompts):
        left[row, width - len(p):] = torch.tensor(p)
        left_mask[row, width - len(p):] = 1
    with torch.no_grad():
        answered = model.generate(left, attention_mask=left_mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ids = torch.zeros_like(answered)
    mask = torch.zeros_like(answered)
    for row, p in enumerate(prompts):
        text = answered[row, width - len(p):]
        ids[row, :text.numel()] = text
        mask[row, :text.numel()] = 1
    return ids, mask
