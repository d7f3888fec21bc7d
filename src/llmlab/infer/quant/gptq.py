"""GPTQ: one-shot weight quantization with second-order error feedback.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv:2210.17323).

For a layer y = W x, GPTQ minimises ||W X - Q X||^2 over the quantized weight Q, one input column at a
time. The loss's Hessian with respect to a row of W is H = 2 X X^T (X: calibration inputs, [K, tokens]).
After column j is rounded, the optimal update of the not-yet-quantized columns (Optimal Brain Surgeon) is

    W[:, j+1:] -= (w_j - q_j) / [H^-1]_jj * [H^-1]_{j, j+1:}

where H^-1 is the inverse Hessian *of the remaining columns*. GPTQ's observations, all used here:
  * the column order can be fixed for every row, so H^-1 is shared by all rows;
  * the successive inverses are the rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U), so one
    factorisation replaces K rank-1 downdates -- [H^-1]_{j,j:} / [H^-1]_jj becomes U_{j,j:} / U_jj;
  * 1% dampening (lambda = 0.01 * mean diag H added to the diagonal) keeps the factorisation stable;
  * "lazy batch" updates: columns are processed in blocks of 128; inside a block the error is propagated
    column by column, to the rest of the matrix once per block (one matmul instead of 128 rank-1 updates);
  * act-order (optional): quantize columns in order of decreasing H_jj (the most active inputs first),
    which helps on models with outlier features.
Group-wise int4 scales are computed when a group's first column is reached, from the weights as updated by
the errors so far (groups never straddle a lazy block). With act-order the columns of one group are no
longer visited together, so the group's scale and zero are fixed beforehand from the original weights
(the reference implementation's "static groups"), keeping the plain contiguous-group storage format.

Dead inputs (H_jj = 0: a channel that is always zero in the calibration data) get H_jj = 1 and a zero weight,
as in the reference implementation.
"""

from __future__ import annotations

import torch

from llmlab.infer.quant.linear import dequantize_codes, find_params, quantize_codes


def hessian_inverse_factor(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 (H^-1 = U^T U), lambda = percdamp * mean(diag H).

    If the dampened H is still not positive definite (a near-rank-deficient calibration set), the
    dampening is raised tenfold up to three times rather than failing.
    """
    K = H.shape[0]
    mean_diag = H.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    for attempt in range(4):
        damp = percdamp * 10 ** attempt * mean_diag
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise torch.linalg.LinAlgError("GPTQ: the calibration Hessian is not positive definite even with 10x "
                                   "dampening; use more calibration tokens")


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None,
                         blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] given H = 2 X X^T / n [K, K] -> (codes [N, K], scales, zeros) as RTN returns them
    ([N] for int8, [N, K/G] for int4)."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    N, K = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    G = K if bits == 8 else group_size
    scales = torch.zeros(N, K // G, dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    # int8 (one scale per row) and act-order groups: parameters fixed up front from the original weights.
    static = bits == 8 or act_order
    if static:
        s, z = find_params(W.reshape(N, K // G, G), bits)
        scales.copy_(s)
        zeros.copy_(z)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // G).tolist()  # group (original column // G) of each permuted column; on the host, so
    # the column loop below never waits for the GPU
    U = hessian_inverse_factor(H, percdamp)
    if not static:  # whole groups per lazy block, so a group's parameters see all earlier feedback
        blocksize = G * max(1, blocksize // G)
    codes = torch.zeros_like(W)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not static and col % G == 0:
                s, z = find_params(W1[:, i:i + G], bits)
                scales[:, g], zeros[:, g] = s, z
            s, z = scales[:, g], zeros[:, g]
            w = W1[:, i]
            q = quantize_codes(w, s, z, bits)
            codes[:, col] = q
            e = (w - dequantize_codes(q, s, z)) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ U[i1:i2, i2:]  # the lazy batch update
    codes = codes[:, torch.argsort(perm)]
    if bits == 8:
        return codes, scales.reshape(N), zeros.reshape(N)
    return codes, scales, zeros


class HessianAccumulator:
    """Running H = 2/n * sum_t x_t x_t^T over every input row a layer sees (a forward hook feeds it)."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.H.addmm_(x.t(), x)
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.H * (2.0 / max(self.n, 1))


@torch.no_grad()
def gptq_model(model, calib: torch.Tensor, bits: int, group_size: int | None, *, include_head: bool = False,
               act_order: bool = False, blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 8,
               progress: bool = True) -> None:
    """Quantize every linear layer of model.blocks (and lm_head if asked) in place, in execution order, each
    from the inputs the partly quantized model gives it (see sequential.py)."""
    from tqdm.auto import tqdm

    from llmlab.infer.quant import sequential as seq
    from llmlab.infer.quant.rtn import to_quant_linear

    def quantize_layer(root, name, linear, xs, rope, runner):
        acc = HessianAccumulator(linear.in_features, linear.weight.device)
        runner(root, xs, rope, {name: linear}, lambda _n, x: acc.add(x), stop_at=linear)
        codes, scales, zeros = gptq_quantize_weight(linear.weight, acc.result(), bits, group_size, blocksize,
                                                    percdamp, act_order)
        q = to_quant_linear(linear, codes, scales, zeros, bits, group_size)
        q.kernel = "dequant"  # exact arithmetic while the later layers calibrate
        seq.replace_module(root, name, q)

    xs, rope = seq.capture_block_inputs(model, calib, batch_size)
    for block in tqdm(model.blocks, desc=f"GPTQ int{bits}", unit="block", disable=not progress):
        for name, linear in seq.block_linears(block):
            quantize_layer(block, name, linear, xs, rope, seq.feed_inputs)
        xs = seq.run_block(block, xs, rope)
    if include_head:
        def head_runner(root, xs, rope, watch, fn, stop_at=None):
            for x in xs:
                fn("lm_head", root.norm(x))
        quantize_layer(model, "lm_head", model.lm_head, xs, rope, head_runner)
