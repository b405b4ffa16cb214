"""MEMIT's least-squares update checked against its normal equations (MEMIT Eq. 14).

In our `[d_mlp, d_model]` orientation the paper's `Δ = R Kᵀ (λC + K Kᵀ)⁻¹` is the solution
of `(λC + K Kᵀ) ΔW = K Rᵀ`, with keys `K [d_mlp, n]` and wanted changes `Rᵀ [n, d_model]`.
"""

import torch

from editor import EditRequest, MEMITHParams, memit
from editor.optimize import block_values, subject_keys

REQS = [
    EditRequest(prompt="The capital city of {}", subject="France", target_new="Rome"),
    EditRequest(prompt="The capital city of {}", subject="Berlin", target_new="Tokyo"),
    EditRequest(prompt="{} is located in the city of", subject="The Louvre", target_new="London"),
]
TEMPLATES = ["{}", "The first time. {}"]


def _spd(d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(d, d, generator=g)
    return a @ a.T / d + 0.5 * torch.eye(d)


def test_update_solves_the_normal_equations(tiny_model):
    layer, lam = 1, 3.0
    hp = MEMITHParams(layers=(layer,), mom2_update_weight=lam)
    C = _spd(tiny_model.cfg.d_mlp)
    g = torch.Generator().manual_seed(0)
    h = block_values(tiny_model, REQS, layer, "resid")
    zs = h + torch.randn(h.shape, generator=g)  # wanted residuals
    deltas, _ = memit.spread_updates(tiny_model, REQS, zs, hp, {layer: C}, TEMPLATES)
    dW = deltas[layer].matrix().double()  # [d_mlp, d_model]
    K = subject_keys(tiny_model, REQS, TEMPLATES, layer).mean(1).double().T  # [d_mlp, n]
    R = (zs - h).double()  # [n, d_model]: one layer takes the whole change
    lhs = (lam * C.double() + K @ K.T) @ dW
    assert torch.allclose(lhs, K @ R, atol=1e-4 * float((K @ R).abs().max()))
    # and it is the least-squares optimum: any perturbation raises the objective
    def objective(W):
        return float(lam * torch.trace(W.T @ C.double() @ W) + ((K.T @ W - R) ** 2).sum())
    E = torch.randn(dW.shape, generator=g, dtype=torch.float64) * 1e-3
    assert objective(dW) < objective(dW + E) and objective(dW) < objective(dW - E)
